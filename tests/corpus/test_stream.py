"""The data stages stream: one chunk or many, one process or two, give the same bytes; a rerun after one input
file changed reads only that file; a file that changes while it is read is named and nothing is published."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from corpus.io import InputError

WORDS = {
    "cooking": "whisk butter sugar bake dough oven flour recipe simmer sauce garlic onion",
    "sports": "striker scored goal league match team coach season referee penalty stadium",
    "code": "function return python class import module variable loop compile debug",
    "medicine": "patient drug dose fever clinical trial symptoms diagnosis treatment nurse",
}


def write_corpus(folder: Path, n_files: int = 3, docs_per_file: int = 40, seed: int = 0) -> Path:
    """`n_files` JSON-lines files (gzip for the odd ones) of documents drawn from four vocabularies."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        rows = []
        for i in range(docs_per_file):
            domain = list(WORDS)[(i + f) % 4]
            words = WORDS[domain].split()
            text = " ".join(rng.choice(words, size=int(rng.integers(5, 60)))) + f" {i * 7 + f}"
            rows.append({"text": text if i % 17 else "   ", "source": domain})  # a few empty documents
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        if f % 2:
            (folder / f"part-{f}.jsonl.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / f"part-{f}.jsonl").write_bytes(data)
    return folder


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path → digest), the stage stamps' timings left out."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "stats.json":
                data = json.dumps({k: v for k, v in json.loads(data).items() if k != "seconds"}).encode()
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(data).hexdigest()
    return out


def data_stages(tmp: Path, corpus: Path, name: str, small: bool, workers: int) -> Path:
    """Every data stage's library function, with tiny chunks (`small`) or one chunk, in `workers` processes."""
    from clustering.embed import embed_corpus
    from clustering.io import assign_clusters, fit_clusters
    from corpus.read import prepare_corpus
    from experts.data import shard_corpus, tokenize_corpus
    from experts.tokenizer import tokenizer_for_corpus

    root = tmp / name
    chunk = 7 if small else None
    prepare_corpus(corpus, root / "corpus", label_field="source", seed=1, workers=workers,
                   batch_rows=5 if small else 4096)
    info = embed_corpus(root / "corpus", root / "emb", n_components=8, workers=workers, chunk=chunk)
    assert info["workers"] == workers
    # the clusters and the tokenizer are fitted once (not streamed): every variant uses the same
    if not (tmp / "clusters").exists():
        fit_clusters(root / "emb", tmp / "clusters", 3, clusterer="unbalanced", device="cpu", n_iter=5)
        tokenizer_for_corpus(root / "corpus", tmp / "tok", vocab_size=300)
    assign_clusters(root / "emb", tmp / "clusters", root / "assign", root / "corpus", device="cpu",
                    chunk_rows=6 if small else 65_536)
    tokenize_corpus(root / "corpus", tmp / "tok", root / "tokens", seq_len=16, num_proc=workers, batch_size=chunk)
    shard_corpus(root / "corpus", root / "assign", tmp / "tok", root / "shards", seq_len=16,
                 tokens_dir=root / "tokens", batch_size=chunk)
    shard_corpus(root / "corpus", root / "assign", tmp / "tok", root / "shards-tok", seq_len=16, num_proc=workers,
                 batch_size=chunk)
    return root


def test_chunks_and_pool_sizes_give_the_same_bytes(tmp_path):
    corpus = write_corpus(tmp_path / "in")
    one = digests(data_stages(tmp_path, corpus, "one", small=False, workers=1))
    many = digests(data_stages(tmp_path, corpus, "many", small=True, workers=1))
    pool = digests(data_stages(tmp_path, corpus, "pool", small=True, workers=2))
    assert len(one) > 20 and any(k.startswith("shards/cluster_") for k in one)
    assert many == one
    assert pool == one
    import pyarrow.parquet as pq  # several row groups were cut by rows, not by the chunks they came in
    assert pq.ParquetFile(tmp_path / "many" / "assign" / "train.parquet").metadata.num_row_groups == 1
    shards = {p: np.load(tmp_path / "one" / p) for p in one if p.startswith("shards/") and p.endswith(".npy")}
    for p, blocks in shards.items():  # tokenizing here or reusing the whole corpus's streams: same shards
        np.testing.assert_array_equal(blocks, np.load(tmp_path / "one" / p.replace("shards/", "shards-tok/")))


def test_rerun_after_one_file_changed_reads_only_that_file(tmp_path, monkeypatch):
    import corpus.read as read

    corpus = write_corpus(tmp_path / "in", n_files=4)
    cache = tmp_path / "cache"
    calls: list[str] = []
    normalize = read._normalize_batches

    def counting(tables, origin, *args):
        calls.append(Path(origin).name)
        return normalize(tables, origin, *args)

    monkeypatch.setattr(read, "_normalize_batches", counting)
    read.prepare_corpus(corpus, tmp_path / "a", cache_dir=cache)
    assert sorted(calls) == sorted(p.name for p in corpus.iterdir())
    calls.clear()
    read.prepare_corpus(corpus, tmp_path / "b", cache_dir=cache)  # nothing changed: every file from the cache
    assert calls == [] and digests(tmp_path / "b") == digests(tmp_path / "a")
    changed = corpus / "part-2.jsonl"
    changed.write_text(changed.read_text().replace("whisk", "stir"))
    read.prepare_corpus(corpus, tmp_path / "c", cache_dir=cache)
    assert calls == ["part-2.jsonl"]
    calls.clear()
    read.prepare_corpus(corpus, tmp_path / "fresh")  # no cache: the same output
    assert digests(tmp_path / "c") == digests(tmp_path / "fresh") != digests(tmp_path / "a")


@pytest.mark.parametrize("how", ["changed", "vanished"])
def test_a_file_that_changes_while_read_is_named_and_nothing_published(tmp_path, monkeypatch, how):
    import corpus.read as read

    corpus = write_corpus(tmp_path / "in", n_files=2)
    victim = corpus / "part-0.jsonl"
    write = read._write_splits

    def meddle(*args, **kw):
        out = write(*args, **kw)
        if how == "changed":
            victim.write_text(victim.read_text() + json.dumps({"text": "late document"}) + "\n")
        else:
            victim.unlink()
        return out

    monkeypatch.setattr(read, "_write_splits", meddle)
    with pytest.raises(InputError, match=f"part-0.jsonl {how}"):
        read.prepare_corpus(corpus, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_streaming_dataset_reads_the_same_documents(tmp_path):
    """The `datasets` streaming path (hub corpora too large to download) normalizes like a loaded dataset."""
    import datasets
    import pyarrow as pa

    from corpus.read import _dataset_batches, _normalize_batches

    corpus = write_corpus(tmp_path / "in", n_files=1)
    files = [str(corpus / "part-0.jsonl")]
    streamed = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    loaded = datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    a = _normalize_batches(_dataset_batches(streamed, 3), "s", "text", "source", tmp_path / "a.arrow")
    b = _normalize_batches(_dataset_batches(loaded, 1000), "l", "text", "source", tmp_path / "b.arrow")
    assert a["n_docs"] == b["n_docs"] > 0 and a["n_empty"] == b["n_empty"] > 0
    read = [pa.ipc.open_stream(pa.OSFile(str(p))).read_all() for p in (tmp_path / "a.arrow", tmp_path / "b.arrow")]
    assert read[0].equals(read[1])


def test_npy_writer_and_row_group_writer(tmp_path):
    import pyarrow as pa

    from corpus.stream import NpyWriter, RowGroupWriter, iter_npy_rows, ordered_map
    from corpus.threads import available_cores

    w = NpyWriter(tmp_path / "s.npy", np.uint16)
    for part in np.array_split(np.arange(23, dtype=np.uint16), 4):
        w.write(part)
    assert w.close(keep_rows=20, shape=(5, 4)) == 20
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), np.arange(20).reshape(5, 4))
    rows = [r for _, r in iter_npy_rows(tmp_path / "s.npy", 2)]
    np.testing.assert_array_equal(np.concatenate(rows), np.load(tmp_path / "s.npy"))
    t = pa.table({"text": ["x" * i for i in range(50)]})
    for size in (1, 7, 50):
        w = RowGroupWriter(tmp_path / f"t{size}.parquet", t.schema, rows=10, max_bytes=200)
        for b in t.to_batches(max_chunksize=size):
            w.write(pa.Table.from_batches([b]))
        w.close()
    assert len({(tmp_path / f"t{s}.parquet").read_bytes() for s in (1, 7, 50)}) == 1
    assert available_cores() >= 1
    assert list(ordered_map(abs, [-3, 2, -1], workers=1)) == [3, 2, 1]
