"""Packed token shards of the whole corpus (`corpus-shards-<h>/`) and per cluster (`shards-<h>/`), and a
memory-mapped, seeded, resumable reader.

`tokenize_corpus` tokenizes each split once, independently of any clustering: every document becomes
`[bos] + tokens + [eos]` (no bos when the tokenizer has none), in corpus order, into one token stream per split
(kept with the offsets of its documents), which is also cut into blocks of `seq_len` tokens (the tail remainder
< seq_len is dropped): the seed and the dense baseline train on these. `shard_corpus` groups the documents by
cluster: each cluster's documents are concatenated in corpus order into one stream and cut into blocks the same
way; with `tokens_dir` it reads the documents' tokens from `tokenize_corpus`'s streams instead of re-tokenizing
(the shards are identical). No padding anywhere. Training reads blocks with `PackedBlocks`, never re-tokenizing.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from corpus.io import InputError, atomic_dir, read_json, write_json
from corpus.layout import SHARDS_META
from corpus.read import read_columns

log = logging.getLogger(__name__)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536), else int32 (the ARCHITECTURE.md contract)."""
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.int32)


def shard_name(cluster_id: int, split: str = "train") -> str:
    """`cluster_003.npy` for train, `valid_cluster_003.npy` for valid."""
    return f"cluster_{cluster_id:03d}.npy" if split == "train" else f"{split}_cluster_{cluster_id:03d}.npy"


def corpus_shard_name(split: str = "train") -> str:
    """The whole corpus's packed blocks: `corpus.npy` for train, `valid_corpus.npy` for valid."""
    return "corpus.npy" if split == "train" else f"{split}_corpus.npy"


def shard_paths(shards_dir: str | os.PathLike, cluster_ids=None, split: str = "train") -> list[str]:
    """The `split` shards in `shards_dir` (`shard_corpus`) of `cluster_ids` (default: every cluster), leaving out
    those without a block."""
    shards_dir = Path(shards_dir)
    clusters = read_json(shards_dir / SHARDS_META)["clusters"]
    ids = sorted(int(c) for c in clusters) if cluster_ids is None else list(cluster_ids)
    return [str(shards_dir / shard_name(c, split)) for c in ids
            if clusters.get(str(c), {}).get(split, {}).get("n_blocks", 0) > 0]


def corpus_shard_paths(tokens_dir: str | os.PathLike, split: str = "train") -> list[str]:
    """The whole corpus's `split` blocks in `tokens_dir` (`tokenize_corpus`): one file, or none when empty."""
    tokens_dir = Path(tokens_dir)
    n = read_json(tokens_dir / SHARDS_META)["splits"].get(split, {}).get("n_blocks", 0)
    return [str(tokens_dir / corpus_shard_name(split))] if n > 0 else []


def _encode_batch(args):
    tokenizer, texts = args
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # packed into blocks: no length warning


def _load_fast_tokenizer(tokenizer_dir) -> tuple:
    """(tokenizer, vocab_size, dtype, eos, prefix [bos] or []) with the checks every sharding needs."""
    from experts.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"tokenizer in {tokenizer_dir} is not a fast tokenizer; shard with a tokenizers-backed one")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError(f"tokenizer in {tokenizer_dir} has no eos token; documents could not be separated")
    bos = tokenizer.bos_token_id
    return tokenizer, len(tokenizer), token_dtype(len(tokenizer)), eos, ([bos] if bos is not None else [])


def _encode_docs(texts: list[str], tokenizer, dtype, eos: int, prefix: list[int], pool, batch_size: int,
                 desc: str) -> Iterator[np.ndarray]:
    """`[bos] + tokens + [eos]` of every text, in order, as `dtype` arrays."""
    from tqdm.auto import tqdm

    batches = [(tokenizer, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    encoded = pool.imap(_encode_batch, batches) if pool else map(_encode_batch, batches)
    bar = tqdm(total=len(texts), desc=desc, unit="doc", mininterval=2.0)
    for ids_batch in encoded:
        for ids in ids_batch:
            yield np.asarray(prefix + ids + [eos], dtype=dtype)
        bar.update(len(ids_batch))
    bar.close()


def _pool(num_proc: int):
    if num_proc <= 1:
        return None
    import multiprocessing as mp

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return mp.get_context("spawn").Pool(num_proc)


def _pack(raw: Path, n_tok: int, dtype, seq_len: int, out: Path) -> int:
    """Cut the token stream in file `raw` into `out` (n_blocks, seq_len) .npy, dropping the tail; → n_blocks."""
    stream = np.memmap(raw, dtype=dtype, mode="r") if n_tok else np.zeros(0, dtype)
    n_blocks = int(n_tok // seq_len)
    blocks = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=(n_blocks, seq_len))
    if n_blocks:
        blocks[:] = np.asarray(stream[: n_blocks * seq_len]).reshape(n_blocks, seq_len)
    blocks.flush()
    del blocks, stream
    return n_blocks


def tokenize_corpus(
    corpus_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seq_len: int,
    num_proc: int = 1,
    batch_size: int = 1000,
    splits: Sequence[str] = ("train", "valid"),
) -> dict:
    """Tokenize `corpus_dir/{split}.parquet` once, whatever the clustering, for the seed and dense models.

    Writes into `out_dir` (atomically), per split: `{split}_tokens.npy` (n_tokens,) the stream of every document
    as `[bos] + tokens + [eos]` in corpus order, `{split}_offsets.npy` (n_docs + 1,) int64 where document i's
    tokens start, and `corpus.npy` / `valid_corpus.npy` (n_blocks, seq_len) the stream cut into blocks; plus
    `meta.json` {seq_len, vocab_size, eos_id, bos_id, dtype, tokenizer_dir, splits: {split: {n_docs, n_tokens,
    n_blocks, n_tokens_in_blocks}}}. Returns the meta dict.
    """
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    tokenizer, vocab_size, dtype, eos, prefix = _load_fast_tokenizer(tokenizer_dir)
    meta: dict = {"seq_len": int(seq_len), "vocab_size": int(vocab_size), "eos_id": int(eos),
                  "bos_id": int(prefix[0]) if prefix else None, "dtype": dtype.name,
                  "tokenizer_dir": str(tokenizer_dir), "splits": {}}
    pool = _pool(num_proc)
    try:
        with atomic_dir(out_dir) as tmp:
            for split in splits:
                texts = read_columns(corpus_dir / f"{split}.parquet", ["text"]).column("text").to_pylist()
                offsets = np.zeros(len(texts) + 1, dtype=np.int64)
                raw = tmp / f".{split}.bin"
                with open(raw, "wb") as f:
                    for i, arr in enumerate(_encode_docs(texts, tokenizer, dtype, eos, prefix, pool, batch_size,
                                                         f"tokenize {split}")):
                        f.write(arr.tobytes())
                        offsets[i + 1] = offsets[i] + len(arr)
                n_tok = int(offsets[-1])
                n_blocks = _pack(raw, n_tok, dtype, seq_len, tmp / corpus_shard_name(split))
                stream = np.lib.format.open_memmap(tmp / f"{split}_tokens.npy", mode="w+", dtype=dtype, shape=(n_tok,))
                if n_tok:
                    stream[:] = np.memmap(raw, dtype=dtype, mode="r")
                stream.flush()
                del stream
                raw.unlink()
                np.save(tmp / f"{split}_offsets.npy", offsets)
                meta["splits"][split] = {"n_docs": len(texts), "n_tokens": n_tok, "n_blocks": n_blocks,
                                         "n_tokens_in_blocks": n_blocks * seq_len}
                log.info("tokenized %s: %d docs, %d tokens, %d blocks", split, len(texts), n_tok, n_blocks)
            write_json(tmp / SHARDS_META, meta)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return meta


def shard_corpus(
    corpus_dir: str | os.PathLike,
    assignments_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seq_len: int,
    num_proc: int = 1,
    batch_size: int = 1000,
    splits: Sequence[str] = ("train", "valid"),
    tokens_dir: str | os.PathLike | None = None,
) -> dict:
    """Group `corpus_dir/{split}.parquet` by `assignments_dir/{split}.parquet` cluster_id and pack per cluster.

    The documents' tokens come from `tokens_dir` (a `tokenize_corpus` folder made with the same tokenizer) when
    given, else from tokenizing the texts here. Writes into `out_dir` (atomically): `cluster_{id:03d}.npy` and
    `valid_cluster_{id:03d}.npy`, each (n_blocks, seq_len) uint16/int32, and `meta.json` {seq_len, vocab_size,
    eos_id, bos_id, dtype, n_clusters, clusters: {id: {split: {n_docs, n_tokens, n_blocks}}}, n_tokens: {id: train
    tokens in blocks}, empty_clusters}. A cluster with no full block gets an empty (0, seq_len) file and is listed,
    not fatal. Returns the meta dict.
    """
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    corpus_dir, assignments_dir, out_dir = Path(corpus_dir), Path(assignments_dir), Path(out_dir)
    tokenizer, vocab_size, dtype, eos, prefix = _load_fast_tokenizer(tokenizer_dir)
    tok_meta = None
    if tokens_dir is not None:
        tokens_dir = Path(tokens_dir)
        tok_meta = read_json(tokens_dir / SHARDS_META)
        if tok_meta["vocab_size"] != vocab_size or tok_meta["dtype"] != dtype.name or tok_meta["eos_id"] != eos:
            raise InputError(f"token streams in {tokens_dir} were made with another tokenizer than {tokenizer_dir}")
    bos = prefix[0] if prefix else None

    n_clusters = 0
    tables = {}
    for split in splits:
        docs = read_columns(corpus_dir / f"{split}.parquet", ["id"] if tok_meta else ["id", "text"])
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
        if tok_meta is not None and tok_meta["splits"].get(split, {}).get("n_docs") != len(ids):
            raise InputError(f"token streams in {tokens_dir} do not hold the {len(ids)} documents of "
                             f"{corpus_dir / f'{split}.parquet'}")
        tables[split] = (None if tok_meta else docs.column("text").to_pylist(), cids)
    summary = assignments_dir / "summary.json"
    if summary.is_file():
        n_clusters = max(n_clusters, int(read_json(summary).get("n_clusters", 0) or 0))
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
    pool = None if tok_meta else _pool(num_proc)
    try:
        with atomic_dir(out_dir) as tmp:
            raw_dir = tmp / ".raw"
            raw_dir.mkdir()
            for split, (texts, cids) in tables.items():
                files = [open(raw_dir / f"{split}_{c}.bin", "wb") for c in range(n_clusters)]
                n_docs = np.bincount(cids, minlength=n_clusters)
                n_tok = np.zeros(n_clusters, dtype=np.int64)
                if tok_meta:
                    stream = np.load(tokens_dir / f"{split}_tokens.npy", mmap_mode="r")
                    off = np.load(tokens_dir / f"{split}_offsets.npy")
                    arrays = (stream[off[i] : off[i + 1]] for i in range(len(cids)))
                else:
                    arrays = _encode_docs(texts, tokenizer, dtype, eos, prefix, pool, batch_size,
                                          f"shard {split}: tokenizing")
                for i, arr in enumerate(arrays):
                    c = int(cids[i])
                    files[c].write(np.ascontiguousarray(arr).tobytes())
                    n_tok[c] += len(arr)
                for f in files:
                    f.close()
                for c in range(n_clusters):
                    raw = raw_dir / f"{split}_{c}.bin"
                    n_blocks = _pack(raw, int(n_tok[c]), dtype, seq_len, tmp / shard_name(c, split))
                    raw.unlink()
                    meta["clusters"].setdefault(str(c), {})[split] = {
                        "n_docs": int(n_docs[c]),
                        "n_tokens": int(n_tok[c]),
                        "n_blocks": n_blocks,
                        "n_tokens_in_blocks": n_blocks * seq_len,
                    }
                log.info("shard %s: %d docs, %d tokens, %d clusters", split, len(cids), int(n_tok.sum()), n_clusters)
            shutil.rmtree(raw_dir)
            meta["n_tokens"] = {c: v["train"]["n_tokens_in_blocks"] for c, v in meta["clusters"].items()} if "train" in tables else {}
            meta["empty_clusters"] = sorted(
                int(c) for c, v in meta["clusters"].items() if "train" in v and v["train"]["n_blocks"] == 0
            )
            if meta["empty_clusters"]:
                log.warning("clusters with no full %d-token block: %s", seq_len, meta["empty_clusters"])
            write_json(tmp / SHARDS_META, meta)
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
