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
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from corpus.io import InputError, atomic_dir, read_json, write_json
from corpus.layout import SHARDS_META
from corpus.read import parquet_file
from corpus.stream import NpyWriter, WorkerPool, exact_batches, iter_batches, read_npy_range

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


_WORKER: dict = {}
CHUNK_DOCS = 4096  # documents per unit of work (one process-pool task, one write)


def _encoder_spec(tokenizer_dir, loaded: tuple | None = None) -> tuple:
    """What a worker needs to encode like the fast tokenizer of `tokenizer_dir`: its backend `tokenizers.Tokenizer`
    as JSON (truncation and padding off), the token dtype, eos and [bos] or []; workers need not import
    transformers. `loaded`: `_load_fast_tokenizer(tokenizer_dir)` when the caller has it (not loaded twice)."""
    tokenizer, _, dtype, eos, prefix = loaded if loaded is not None else _load_fast_tokenizer(tokenizer_dir)
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    backend.no_truncation()
    backend.no_padding()
    return backend.to_str(), dtype.str, int(eos), list(prefix)


def _init_encoder(spec: tuple) -> None:
    """Pool initializer: this process's `tokenizers.Tokenizer` and the ids framing every document."""
    from tokenizers import Tokenizer

    backend_json, dtype, eos, prefix = spec
    _WORKER.update(backend=Tokenizer.from_str(backend_json), dtype=np.dtype(dtype), eos=eos, prefix=prefix)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """`[bos] + tokens + [eos]` of every text, concatenated → (tokens (n_tokens,) dtype, lengths (n_docs,) int64).
    `encode_batch_fast` is the Rust batch encoder (its own threads unless TOKENIZERS_PARALLELISM=false, as in
    a pool's workers); the ids go to numpy without a Python list per document."""
    import itertools

    w = _WORKER
    enc = w["backend"].encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in enc]
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype=w["dtype"], count=sum(map(len, ids)))
    p = len(w["prefix"])
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + p + 1
    out = np.empty(int(lengths.sum()), dtype=w["dtype"])
    ends = np.cumsum(lengths)  # (n_docs,) one past each document's eos
    frame = np.zeros(len(out), bool)
    frame[ends - 1] = True
    out[ends - 1] = w["eos"]
    if p:
        frame[ends - lengths] = True
        out[ends - lengths] = w["prefix"][0]
    out[~frame] = body
    return out, lengths


def _text_chunks(path: Path, rows: int) -> Iterator[list[str]]:
    for batch in iter_batches(parquet_file(path, ["text"]), rows, ["text"]):
        yield [t if t is not None else "" for t in batch.column(0).to_pylist()]


def _encoder_pool(tokenizer_dir, num_proc: int, loaded: tuple | None = None) -> WorkerPool:
    """The stage's pool of `num_proc` encoding processes (or this one), each holding the tokenizer (`loaded`: as
    in `_encoder_spec`)."""
    return WorkerPool(num_proc, _init_encoder, (_encoder_spec(tokenizer_dir, loaded),))


def _encoded(path: Path, pool: WorkerPool, rows: int, desc: str, n: int):
    """(tokens, lengths) per chunk of `rows` documents of the split `path`, in order, encoded by `pool`."""
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=desc, unit="doc", mininterval=2.0)
    for tokens, lengths in pool.map(_encode_chunk, _text_chunks(path, rows)):
        bar.update(len(lengths))
        yield tokens, lengths
    bar.close()


# tokenizer_config.json keys of the tokenizers `experts.tokenizer.train_tokenizer` saves (and `make_portable`
# leaves): nothing in them changes how transformers builds the backend, so the backend is tokenizer.json as is.
_PLAIN_CONFIG_KEYS = {"backend", "bos_token", "eos_token", "pad_token", "unk_token", "model_max_length",
                      "tokenizer_class", "clean_up_tokenization_spaces", "added_tokens_decoder"}


def _plain_backend(tokenizer_dir) -> tuple | None:
    """(backend `tokenizers.Tokenizer`, vocab_size, eos, prefix) read from tokenizer.json and tokenizer_config.json
    without transformers (whose import, with this package's model registration, costs ~5 s of CPU per stage),
    for a plain `PreTrainedTokenizerFast` folder such as TrainTokenizer writes; None for anything else (an HF seed's
    tokenizer: transformers loads it). Same ids as transformers' loading (tests/experts/test_data.py)."""
    folder = Path(tokenizer_dir)
    try:
        cfg = read_json(folder / "tokenizer_config.json")
        if not (folder / "tokenizer.json").is_file():
            return None
        if (folder / "special_tokens_map.json").exists():  # transformers 4 also writes the specials here
            smap = read_json(folder / "special_tokens_map.json")
            content = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
            if set(smap) - {"bos_token", "eos_token", "pad_token", "unk_token"} or any(
                    k in cfg and content(cfg[k]) != content(v) for k, v in smap.items()):
                return None
            cfg = {**smap, **cfg}
        if cfg.get("tokenizer_class") not in ("PreTrainedTokenizerFast", "TokenizersBackend") or \
                set(cfg) - _PLAIN_CONFIG_KEYS:
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - anything unusual: transformers decides
        return None

    def token_id(key):
        tok = cfg.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return None if tok is None else backend.token_to_id(tok)

    eos, bos = token_id("eos_token"), token_id("bos_token")
    if eos is None or (cfg.get("bos_token") is not None and bos is None):
        return None
    return backend, backend.get_vocab_size(with_added_tokens=True), eos, ([bos] if bos is not None else [])


def _load_fast_tokenizer(tokenizer_dir) -> tuple:
    """(tokenizer, vocab_size, dtype, eos, prefix [bos] or []) with the checks every sharding needs; `tokenizer`
    is the backend `tokenizers.Tokenizer` when `_plain_backend` reads the folder, else transformers' fast
    tokenizer."""
    plain = _plain_backend(tokenizer_dir)
    if plain is not None:
        backend, vocab_size, eos, prefix = plain
        return backend, vocab_size, token_dtype(vocab_size), eos, prefix
    from experts.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"tokenizer in {tokenizer_dir} is not a fast tokenizer; shard with a tokenizers-backed one")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError(f"tokenizer in {tokenizer_dir} has no eos token; documents could not be separated")
    bos = tokenizer.bos_token_id
    return tokenizer, len(tokenizer), token_dtype(len(tokenizer)), eos, ([bos] if bos is not None else [])


class _Blocks:
    """A token stream written as (n_blocks, seq_len) blocks into one .npy, the tail < seq_len dropped at close."""

    def __init__(self, path: Path, dtype, seq_len: int):
        self.writer, self.seq_len = NpyWriter(path, dtype), seq_len

    def write(self, tokens: np.ndarray) -> None:
        self.writer.write(tokens)

    def close(self) -> int:
        n_blocks = self.writer.rows // self.seq_len
        self.writer.close(keep_rows=n_blocks * self.seq_len, shape=(n_blocks, self.seq_len))
        return n_blocks


def tokenize_corpus(
    corpus_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seq_len: int,
    num_proc: int = 1,
    batch_size: int | None = None,
    splits: Sequence[str] = ("train", "valid"),
) -> dict:
    """Tokenize `corpus_dir/{split}.parquet` once, whatever the clustering, for the seed and dense models.

    Writes into `out_dir` (atomically), per split: `{split}_tokens.npy` (n_tokens,) the stream of every document
    as `[bos] + tokens + [eos]` in corpus order, `{split}_offsets.npy` (n_docs + 1,) int64 where document i's
    tokens start, and `corpus.npy` / `valid_corpus.npy` (n_blocks, seq_len) the stream cut into blocks; plus
    `meta.json` {seq_len, vocab_size, eos_id, bos_id, dtype, tokenizer_dir, splits: {split: {n_docs, n_tokens,
    n_blocks, n_tokens_in_blocks}}}. Returns the meta dict.

    Documents are read and encoded `batch_size` (default CHUNK_DOCS) at a time by `num_proc` processes and every file is appended
    as the chunks come back in order: memory holds a few chunks whatever the corpus size, and the files do not
    depend on `num_proc` or `batch_size`.
    """
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    batch_size = int(batch_size or CHUNK_DOCS)
    loaded = _load_fast_tokenizer(tokenizer_dir)
    _, vocab_size, dtype, eos, prefix = loaded
    meta: dict = {"seq_len": int(seq_len), "vocab_size": int(vocab_size), "eos_id": int(eos),
                  "bos_id": int(prefix[0]) if prefix else None, "dtype": dtype.name,
                  "tokenizer_dir": str(tokenizer_dir), "splits": {}}
    with atomic_dir(out_dir) as tmp, _encoder_pool(tokenizer_dir, num_proc, loaded) as pool:
        for split in splits:
            path = corpus_dir / f"{split}.parquet"
            n_docs = parquet_file(path, ["text"]).metadata.num_rows
            stream = NpyWriter(tmp / f"{split}_tokens.npy", dtype)
            offsets = NpyWriter(tmp / f"{split}_offsets.npy", np.int64)
            offsets.write(np.zeros(1, np.int64))
            blocks = _Blocks(tmp / corpus_shard_name(split), dtype, seq_len)
            for tokens, lengths in _encoded(path, pool, batch_size, f"tokenize {split}", n_docs):
                offsets.write(stream.rows + np.cumsum(lengths))
                stream.write(tokens)
                blocks.write(tokens)
            n_tok = stream.close()
            offsets.close()
            n_blocks = blocks.close()
            meta["splits"][split] = {"n_docs": n_docs, "n_tokens": n_tok, "n_blocks": n_blocks,
                                     "n_tokens_in_blocks": n_blocks * seq_len}
            log.info("tokenized %s: %d docs, %d tokens, %d blocks", split, n_docs, n_tok, n_blocks)
        write_json(tmp / SHARDS_META, meta)
    return meta


def _cluster_chunks(corpus: Path, assignments: Path, rows: int) -> Iterator[np.ndarray]:
    """cluster_id (int64) of the documents of the split `corpus`, `rows` at a time in corpus order, read from
    `assignments`. AssignClusters writes them in corpus order (checked first, by streaming both id columns); an
    assignment file in another order is looked up by id instead (a dict of every id: memory grows with it)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    docs = parquet_file(corpus, ["id"])
    assign = parquet_file(assignments, ["id", "cluster_id"])
    aligned = assign.metadata.num_rows == docs.metadata.num_rows and all(
        pc.all(pc.equal(a.cast(pa.string()), b.cast(pa.string()))).as_py() is not False
        for a, b in zip(exact_batches(docs, "id", rows), exact_batches(assign, "id", rows)))
    if aligned:
        for c in exact_batches(assign, "cluster_id", rows):
            yield c.to_numpy(zero_copy_only=False).astype(np.int64)
        return
    log.warning("%s does not list the documents of %s in order; looking them up by id", assignments, corpus)
    table = assign.read(columns=["id", "cluster_id"])
    cid_of = dict(zip(table.column("id").cast(pa.string()).to_pylist(), table.column("cluster_id").to_pylist()))
    del table
    for ids in exact_batches(docs, "id", rows):
        ids = ids.cast(pa.string()).to_pylist()
        missing = [i for i in ids if i not in cid_of]
        if missing:
            raise InputError(f"{len(missing)} document(s) of {corpus} have no cluster in {assignments} "
                             f"(first: {missing[0]!r})")
        yield np.asarray([cid_of[i] for i in ids], dtype=np.int64)


def _stream_chunks(tokens_dir: Path, split: str, rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, lengths) of `rows` documents at a time from `tokenize_corpus`'s stream and offsets (file reads)."""
    off_path, tok_path = tokens_dir / f"{split}_offsets.npy", tokens_dir / f"{split}_tokens.npy"
    n_docs = int(np.load(off_path, mmap_mode="r").shape[0]) - 1
    for s in range(0, n_docs, rows):
        off = read_npy_range(off_path, s, min(n_docs, s + rows) + 1)
        yield read_npy_range(tok_path, int(off[0]), int(off[-1])), np.diff(off)


def _max_cluster(assignments: Path) -> int:
    """The largest cluster_id of an assignments file (−1 when empty), one column batch at a time; InputError
    for a negative one."""
    import pyarrow.compute as pc

    top = -1
    for batch in parquet_file(assignments, ["cluster_id"]).iter_batches(columns=["cluster_id"]):
        if len(batch):
            lo, hi = pc.min_max(batch.column(0)).values()
            if lo.as_py() < 0:
                raise InputError(f"negative cluster_id in {assignments}")
            top = max(top, int(hi.as_py()))
    return top


def shard_corpus(
    corpus_dir: str | os.PathLike,
    assignments_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    seq_len: int,
    num_proc: int = 1,
    batch_size: int | None = None,
    splits: Sequence[str] = ("train", "valid"),
    tokens_dir: str | os.PathLike | None = None,
) -> dict:
    """Group `corpus_dir/{split}.parquet` by `assignments_dir/{split}.parquet` cluster_id and pack per cluster.

    The documents' tokens come from `tokens_dir` (a `tokenize_corpus` folder made with the same tokenizer) when
    given, else from tokenizing the texts here (`num_proc` processes). Writes into `out_dir` (atomically):
    `cluster_{id:03d}.npy` and `valid_cluster_{id:03d}.npy`, each (n_blocks, seq_len) uint16/int32, and
    `meta.json` {seq_len, vocab_size, eos_id, bos_id, dtype, n_clusters, clusters: {id: {split: {n_docs,
    n_tokens, n_blocks}}}, n_tokens: {id: train tokens in blocks}, empty_clusters}. A cluster with no full block
    gets an empty (0, seq_len) file and is listed, not fatal. Returns the meta dict.

    `batch_size` documents at a time: their tokens are ordered by cluster (a stable sort keeps corpus order
    inside each cluster) and appended to each cluster's file, so memory holds one chunk whatever the corpus.
    """
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    corpus_dir, assignments_dir, out_dir = Path(corpus_dir), Path(assignments_dir), Path(out_dir)
    batch_size = int(batch_size or CHUNK_DOCS)
    loaded = _load_fast_tokenizer(tokenizer_dir)
    _, vocab_size, dtype, eos, prefix = loaded
    tok_meta = None
    if tokens_dir is not None:
        tokens_dir = Path(tokens_dir)
        tok_meta = read_json(tokens_dir / SHARDS_META)
        if tok_meta["vocab_size"] != vocab_size or tok_meta["dtype"] != dtype.name or tok_meta["eos_id"] != eos:
            raise InputError(f"token streams in {tokens_dir} were made with another tokenizer than {tokenizer_dir}")
    bos = prefix[0] if prefix else None

    n_clusters = 0
    for split in splits:
        n_docs = parquet_file(corpus_dir / f"{split}.parquet", ["id"]).metadata.num_rows
        n_clusters = max(n_clusters, _max_cluster(assignments_dir / f"{split}.parquet") + 1)
        if tok_meta is not None and tok_meta["splits"].get(split, {}).get("n_docs") != n_docs:
            raise InputError(f"token streams in {tokens_dir} do not hold the {n_docs} documents of "
                             f"{corpus_dir / f'{split}.parquet'}")
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
    with atomic_dir(out_dir) as tmp, (_encoder_pool(tokenizer_dir, num_proc, loaded) if tok_meta is None
                                      else WorkerPool(1)) as pool:
        for split in splits:
            cpath = corpus_dir / f"{split}.parquet"
            n_split = parquet_file(cpath, ["id"]).metadata.num_rows
            if tok_meta:
                chunks = _stream_chunks(tokens_dir, split, batch_size)
            else:
                chunks = _encoded(cpath, pool, batch_size, f"shard {split}: tokenizing", n_split)
            writers = [_Blocks(tmp / shard_name(c, split), dtype, seq_len) for c in range(n_clusters)]
            n_docs = np.zeros(n_clusters, dtype=np.int64)
            n_tok = np.zeros(n_clusters, dtype=np.int64)
            for (tokens, lengths), cids in zip(chunks, _cluster_chunks(cpath, assignments_dir / f"{split}.parquet",
                                                                        batch_size)):
                if len(cids) != len(lengths):
                    raise InputError(f"{assignments_dir / f'{split}.parquet'} and {cpath} hold different documents")
                per_token = np.repeat(cids, lengths)  # (n_tokens,) cluster of every token
                order = np.argsort(per_token, kind="stable")
                counts = np.bincount(per_token, minlength=n_clusters)
                grouped = tokens[order]
                for c, (s, e) in enumerate(zip(np.cumsum(counts) - counts, np.cumsum(counts))):
                    if e > s:
                        writers[c].write(grouped[s:e])
                n_docs += np.bincount(cids, minlength=n_clusters)
                n_tok += counts
            for c, w in enumerate(writers):
                n_blocks = w.close()
                meta["clusters"].setdefault(str(c), {})[split] = {
                    "n_docs": int(n_docs[c]),
                    "n_tokens": int(n_tok[c]),
                    "n_blocks": n_blocks,
                    "n_tokens_in_blocks": n_blocks * seq_len,
                }
            log.info("shard %s: %d docs, %d tokens, %d clusters", split, int(n_docs.sum()), int(n_tok.sum()), n_clusters)
        meta["n_tokens"] = {c: v["train"]["n_tokens_in_blocks"] for c, v in meta["clusters"].items()} if "train" in splits else {}
        meta["empty_clusters"] = sorted(
            int(c) for c, v in meta["clusters"].items() if "train" in v and v["train"]["n_blocks"] == 0
        )
        if meta["empty_clusters"]:
            log.warning("clusters with no full %d-token block: %s", seq_len, meta["empty_clusters"])
        write_json(tmp / SHARDS_META, meta)
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
