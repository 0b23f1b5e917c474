"""prepare_corpus on every input kind, and every kind of bad input (one clear line, input untouched)."""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.io import InputError
from corpus.read import prepare_corpus

DOMAINS = {
    "cooking": "whisk the butter and sugar then bake the dough in the oven for {i} minutes",
    "sports": "the striker scored in minute {i} and the home team won the league match",
    "code": "def function_{i}(x): return x * {i}  # python helper with a docstring",
    "medicine": "the patient received {i} mg of the drug and the fever went down overnight",
}


def docs(n_per_domain: int = 10, start: int = 0) -> list[dict]:
    return [{"text": t.format(i=i + start), "source": d} for i in range(n_per_domain) for d, t in DOMAINS.items()]


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def read_out(out: Path) -> dict[str, list[dict]]:
    return {s: pq.read_table(out / f"{s}.parquet").to_pylist() for s in ("train", "valid", "test")}


def digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_jsonl_seeded_split_labels_and_empty_docs(tmp_path):
    rows = docs(10) + [{"text": "   ", "source": "x"}, {"text": "", "source": "x"}]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    stats = prepare_corpus(src, tmp_path / "out", label_field="source", seed=3)
    out = read_out(tmp_path / "out")
    assert stats["n_empty_dropped"] == {"all": 2}
    assert sum(stats["n_docs"].values()) == 40 and all(n >= 1 for n in stats["n_docs"].values())
    all_rows = [r for s in out.values() for r in s]
    assert sorted(r["text"] for r in all_rows) == sorted(r["text"] for r in docs(10))
    assert set(out["train"][0]) == {"id", "text", "label"}
    assert {r["label"] for r in all_rows} == set(DOMAINS)
    assert out["valid"][0]["id"] == "valid-0"  # no id field: <split>-<index>
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["split_from"] == "seeded"
    # same seed → same split; other seed → other split
    prepare_corpus(src, tmp_path / "again", label_field="source", seed=3)
    assert read_out(tmp_path / "again") == out
    prepare_corpus(src, tmp_path / "other", label_field="source", seed=4)
    assert read_out(tmp_path / "other")["valid"] != out["valid"]


def test_no_label_field_means_no_label_column(tmp_path):
    prepare_corpus(write_jsonl(tmp_path / "c.jsonl", docs(5)), tmp_path / "out")
    assert set(read_out(tmp_path / "out")["train"][0]) == {"id", "text"}


def test_gzip_own_split_files_and_ids(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for split, start in (("train", 0), ("validation", 100), ("test", 200)):
        rows = [dict(r, id=f"{split}/{k}") for k, r in enumerate(docs(3, start))]
        write_jsonl(d / f"{split}.jsonl.gz", rows, gz=True)
    stats = prepare_corpus(d, tmp_path / "out", label_field="source")
    out = read_out(tmp_path / "out")
    assert stats["split_from"] == "corpus"
    assert stats["n_docs"] == {"train": 12, "valid": 12, "test": 12}
    assert out["valid"][0]["id"].startswith("validation/")  # the corpus's own ids are kept


def test_split_folders_parquet_and_txt(tmp_path):
    d = tmp_path / "corpus"
    for split in ("train", "valid"):
        (d / split).mkdir(parents=True)
        pq.write_table(pa.table({"body": [r["text"] for r in docs(4)]}), d / split / "part-0.parquet")
    (d / "test").mkdir()
    (d / "test" / "a.txt").write_text("first test document\n\nsecond test document\n")
    stats = prepare_corpus(d, tmp_path / "out", text_field="body")
    assert stats["n_docs"] == {"train": 16, "valid": 16, "test": 2}  # .txt: one document per line
    assert stats["n_empty_dropped"]["test"] == 1


def test_txt_parquet_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(r["text"] for r in docs(5)) + "\n")
    assert sum(prepare_corpus(tmp_path / "a.txt", tmp_path / "o1")["n_docs"].values()) == 20
    pq.write_table(pa.table({"text": [r["text"] for r in docs(5)], "source": [r["source"] for r in docs(5)]}),
                   tmp_path / "b.parquet")
    assert sum(prepare_corpus(tmp_path / "b.parquet", tmp_path / "o2", label_field="source")["n_docs"].values()) == 20
    for i in range(3):
        write_jsonl(tmp_path / f"shard{i}.jsonl", docs(4, start=10 * i))
    stats = prepare_corpus(str(tmp_path / "shard*.jsonl"), tmp_path / "o3", max_docs=24)
    assert len(stats["files"]) == 3 and sum(stats["n_docs"].values()) == 24


def test_save_to_disk_dataset_dict(tmp_path):
    import datasets

    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(docs(3, start=i * 50))
                               for i, s in enumerate(("train", "validation", "test"))})
    dd.save_to_disk(str(tmp_path / "saved"))
    stats = prepare_corpus(tmp_path / "saved", tmp_path / "out", label_field="source")
    assert stats["n_docs"] == {"train": 12, "valid": 12, "test": 12}
    single = datasets.Dataset.from_list(docs(5))
    single.save_to_disk(str(tmp_path / "one"))
    assert sum(prepare_corpus(tmp_path / "one", tmp_path / "out2")["n_docs"].values()) == 20


@pytest.mark.parametrize("case", ["missing", "empty", "no_text_field", "some_without_text", "not_utf8", "bad_json",
                                  "empty_dir", "no_glob_match", "label_missing"])
def test_bad_input_one_clear_line_and_input_untouched(tmp_path, case):
    src = tmp_path / "in.jsonl"
    kw = {}
    if case == "missing":
        src = tmp_path / "nope" / "corpus.jsonl"
    elif case == "empty":
        src.write_text("")
    elif case == "no_text_field":
        write_jsonl(src, [{"body": "x"}] * 5)
    elif case == "some_without_text":
        write_jsonl(src, docs(2) + [{"source": "cooking"}])
    elif case == "not_utf8":
        src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9 au lait"}\n')
    elif case == "bad_json":
        src.write_text('{"text": "fine"}\n{"text": oops}\n')
    elif case == "empty_dir":
        src = tmp_path / "empty_corpus_dir"
        src.mkdir()
    elif case == "no_glob_match":
        src = str(tmp_path / "*.parquet")
    elif case == "label_missing":
        write_jsonl(src, docs(3))
        kw["label_field"] = "domain"
    before = digest(Path(src)) if Path(src).exists() else None
    with pytest.raises(InputError) as err:
        prepare_corpus(src, tmp_path / "out", **kw)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300
    assert (str(src) if case == "no_glob_match" else Path(src).name) in msg
    assert not (tmp_path / "out").exists()
    if before is not None:
        assert digest(Path(src)) == before
    if case == "not_utf8":
        assert "line 2" in msg and "UTF-8" in msg
    if case == "bad_json":
        assert "line 2" in msg


def test_split_fractions_are_checked(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", docs(3))
    with pytest.raises(InputError, match="split"):
        prepare_corpus(src, tmp_path / "out", split=(0.5, 0.1, 0.1))


def test_take_rows_reads_the_rows_asked_for_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from corpus.read import take_rows

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(50)], "text": [f"text {i}" for i in range(50)]}), path,
                   row_group_size=7)
    rows = take_rows(path, [42, 3, 3, 49, 0], batch_size=5)  # across batches and row groups, repeats, any order
    assert [r["id"] for r in rows] == ["d42", "d3", "d3", "d49", "d0"] and rows[0]["text"] == "text 42"
    assert take_rows(path, [7], columns=["text"]) == [{"text": "text 7"}]
    assert take_rows(path, []) == []
    with pytest.raises(InputError, match="has 50 rows"):
        take_rows(path, [50])
