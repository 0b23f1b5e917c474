"""Packed token shards (the `shards-<h>/` folder) and a memory-mapped, seeded, resumable reader.

`shard_corpus` tokenizes each split once: every document becomes `[bos] + tokens + [eos]` (no bos when the
tokenizer has none), each cluster's documents are concatenated in corpus order into one token stream, and the
stream is cut into blocks of `seq_len` tokens (the tail remainder < seq_len is dropped). No padding anywhere.
Training then reads blocks with `PackedBlocks`, never re-tokenizing.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from corpus.io import InputError, atomic_dir, write_json
from corpus.read import read_columns

log = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536), else int32 (the ARCHITECTURE.md contract)."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def shard_name(cluster_id: int, split: str = "train") -> str:
    """`cluster_003.npy` for train, `valid_cluster_003.npy` for valid."""
    return f"cluster_{cluster_id:03d}.npy" if split == "train" else f"{split}_cluster_{cluster_id:03d}.npy"


def _encode_batch(args):
    tokenizer, texts = args
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def shard_corpus(
    corpus_dir: str | os.PathLike,
    assignments_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seq_len: int,
    num_proc: int = 1,
    batch_size: int = 1000,
    splits: Sequence[str] = ("train", "valid"),
) -> dict:
    """Tokenize `corpus_dir/{split}.parquet`, group by `assignments_dir/{split}.parquet` cluster_id, pack.

    Writes into `out_dir` (atomically): `cluster_{id:03d}.npy` and `valid_cluster_{id:03d}.npy`, each
    (n_blocks, seq_len) uint16/int32, and `meta.json` {seq_len, vocab_size, eos_id, bos_id, dtype, n_clusters,
    clusters: {id: {split: {n_docs, n_tokens, n_blocks}}}, n_tokens: {id: train tokens in blocks},
    empty_clusters}. A cluster with no full block gets an empty (0, seq_len) file and is listed, not fatal.
    Returns the meta dict.
    """
    from tqdm.auto import tqdm

    from experts.tokenizer import load_tokenizer

    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    corpus_dir, assignments_dir, out_dir = Path(corpus_dir), Path(assignments_dir), Path(out_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"tokenizer in {tokenizer_dir} is not a fast tokenizer; shard with a tokenizers-backed one")
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError(f"tokenizer in {tokenizer_dir} has no eos token; documents could not be separated")
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None else []

    n_clusters = 0
    tables = {}
    for split in splits:
        docs = read_columns(corpus_dir / f"{split}.parquet", ["id", "text"])
        assign = read_columns(assignments_dir / f"{split}.parquet", ["id", "cluster_id"])
        cid_of = dict(zip(assign.column("id").to_pylist(), assign.column("cluster_id").to_pylist()))
        ids = docs.column("id").to_pylist()
        missing = [i for i in ids if i not in cid_of]
        if missing:
            raise InputError(
                f"{len(missing)} document(s) of {corpus_dir / f'{split}.parquet'} have no cluster in "
                f"{assignments_dir / f'{split}.parquet'} (first: {missing[0]!r})"
            )
        cids = np.asarray([cid_of[i] for i in ids], dtype=np.int64)
        if len(cids) and cids.min() < 0:
            raise InputError(f"negative cluster_id in {assignments_dir / f'{split}.parquet'}")
        n_clusters = max(n_clusters, int(cids.max()) + 1 if len(cids) else 0)
        tables[split] = (docs.column("text").to_pylist(), cids)
    summary = assignments_dir / "summary.json"
    if summary.is_file():
        import json

        n_clusters = max(n_clusters, int(json.loads(summary.read_text()).get("n_clusters", 0) or 0))
    if n_clusters == 0:
        raise InputError(f"no documents to shard in {corpus_dir}")

    meta: dict = {
        "seq_len": int(seq_len),
        "vocab_size": int(vocab_size),
        "eos_id": int(eos),
        "bos_id": None if bos is None else int(bos),
        "dtype": dtype.name,
        "n_clusters": n_clusters,
        "tokenizer_dir": str(tokenizer_dir),
        "clusters": {},
    }
    pool = None
    if num_proc > 1:
        import multiprocessing as mp

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        pool = mp.get_context("spawn").Pool(num_proc)
    try:
        with atomic_dir(out_dir) as tmp:
            raw_dir = tmp / ".raw"
            raw_dir.mkdir()
            for split, (texts, cids) in tables.items():
                files = [open(raw_dir / f"{split}_{c}.bin", "wb") for c in range(n_clusters)]
                n_docs = np.bincount(cids, minlength=n_clusters)
                n_tok = np.zeros(n_clusters, dtype=np.int64)
                batches = [(tokenizer, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
                encoded = pool.imap(_encode_batch, batches) if pool else map(_encode_batch, batches)
                bar = tqdm(total=len(texts), desc=f"shard {split}: tokenizing", unit="doc", mininterval=2.0)
                start = 0
                for ids_batch in encoded:
                    for j, ids in enumerate(ids_batch):
                        c = int(cids[start + j])
                        arr = np.asarray(prefix + ids + [eos], dtype=dtype)
                        files[c].write(arr.tobytes())
                        n_tok[c] += len(arr)
                    start += len(ids_batch)
                    bar.update(len(ids_batch))
                bar.close()
                for f in files:
                    f.close()
                for c in range(n_clusters):
                    raw = raw_dir / f"{split}_{c}.bin"
                    stream = np.memmap(raw, dtype=dtype, mode="r") if n_tok[c] else np.zeros(0, dtype)
                    n_blocks = int(n_tok[c] // seq_len)
                    out = np.lib.format.open_memmap(tmp / shard_name(c, split), mode="w+", dtype=dtype, shape=(n_blocks, seq_len))
                    if n_blocks:
                        out[:] = np.asarray(stream[: n_blocks * seq_len]).reshape(n_blocks, seq_len)
                    out.flush()
                    del out, stream
                    raw.unlink()
                    meta["clusters"].setdefault(str(c), {})[split] = {
                        "n_docs": int(n_docs[c]),
                        "n_tokens": int(n_tok[c]),
                        "n_blocks": n_blocks,
                        "n_tokens_in_blocks": n_blocks * seq_len,
                    }
                log.info("shard %s: %d docs, %d tokens, %d clusters", split, len(texts), int(n_tok.sum()), n_clusters)
            shutil.rmtree(raw_dir)
            meta["n_tokens"] = {c: v["train"]["n_tokens_in_blocks"] for c, v in meta["clusters"].items()} if "train" in tables else {}
            meta["empty_clusters"] = sorted(
                int(c) for c, v in meta["clusters"].items() if "train" in v and v["train"]["n_blocks"] == 0
            )
            if meta["empty_clusters"]:
                log.warning("clusters with no full %d-token block: %s", seq_len, meta["empty_clusters"])
            write_json(tmp / "meta.json", meta)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return meta


class PackedBlocks:
    """All blocks of the given `.npy` shards, memory-mapped, in a seeded shuffled order, epoch after epoch.

    Position p (0, 1, 2, ...) of the infinite stream is block `perm_e[p mod n]` of epoch e = p // n, where
    perm_e is a permutation seeded by (seed, e). `blocks(start, count)` reads positions [start, start+count)
    directly, so a resumed run restarts from a data position without re-reading earlier blocks.
    `shuffle=False` keeps file order (validation).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], seq_len: int | None = None, seed: int = 0, shuffle: bool = True):
        if not paths:
            raise InputError("no shard files given")
        self.paths = [Path(p) for p in paths]
        self.arrays = []
        for p in self.paths:
            if not p.is_file():
                raise InputError(f"missing shard file: {p}")
            try:
                a = np.load(p, mmap_mode="r")
            except Exception as e:  # noqa: BLE001
                raise InputError(f"unreadable shard file {p}: {e}") from None
            if a.ndim != 2:
                raise InputError(f"shard {p} has shape {a.shape}, expected (n_blocks, seq_len)")
            if seq_len is not None and a.shape[1] != seq_len:
                raise InputError(f"shard {p} has blocks of {a.shape[1]} tokens, expected seq_len {seq_len}")
            seq_len = a.shape[1]
            self.arrays.append(a)
        self.seq_len = int(seq_len)  # type: ignore[arg-type]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])  # (n_files + 1,)
        self.n_blocks = int(self.offsets[-1])
        self.seed = seed
        self.shuffle = shuffle
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self.n_blocks

    @property
    def n_tokens(self) -> int:
        return self.n_blocks * self.seq_len

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            else:
                self._perm = np.arange(self.n_blocks)
            self._epoch = epoch
        return self._perm  # type: ignore[return-value]

    def block(self, index: int) -> np.ndarray:
        """Block number `index` in file order, (seq_len,)."""
        f = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.arrays[f][index - self.offsets[f]]

    def blocks(self, start: int, count: int) -> np.ndarray:
        """Stream positions [start, start + count) → int64 array (count, seq_len)."""
        if self.n_blocks == 0:
            raise InputError(f"shards {', '.join(map(str, self.paths))} hold no blocks")
        out = np.empty((count, self.seq_len), dtype=np.int64)
        for i, pos in enumerate(range(start, start + count)):
            epoch, k = divmod(pos, self.n_blocks)
            out[i] = self.block(int(self._order(epoch)[k]))
        return out


class Prefetcher:
    """The blocks of a training run's micro-batches, read ahead of the training loop on a background thread.

    `schedule` yields (start, count) stream positions of `data` in the order the loop consumes them; each becomes
    an int64 tensor (count, seq_len) — pinned when `pin`, so that its host-to-device copy is asynchronous — and
    at most `depth` of them wait in a queue. `next()` returns them in order (re-raising the reader's error);
    `close()` stops the thread. The data are exactly those of `data.blocks(start, count)`: only the time they
    are read at changes. On CUDA the thread makes `device` its current device before pinning, so that no other
    GPU of the host gets a context.
    """

    _END = object()

    def __init__(self, data: "PackedBlocks", schedule, pin: bool = False, depth: int = 4, device=None):
        import queue
        import threading

        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(data, iter(schedule), pin, device),
                                        name="block-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self, data, schedule, pin, device) -> None:
        import torch

        try:
            if pin and getattr(device, "type", None) == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # a new thread's current device is GPU 0
            for start, count in schedule:
                x = torch.from_numpy(data.blocks(start, count))  # (count, seq_len) int64
                if pin:
                    x = x.pin_memory()
                if not self._put(x):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(e)

    def next(self):
        item = self._queue.get()
        if item is self._END:
            raise RuntimeError("the prefetch schedule is exhausted")
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
