"""`make_task_from_corpus`: a domain-classification task folder built from a prepared, labelled corpus."""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pyarrow.parquet as pq

from corpus.io import InputError, atomic_dir, write_json
from tasks.builtin import DOMAIN, default_word

log = logging.getLogger(__name__)


def make_task_from_corpus(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    label_field: str = "label",
    n_train: int = 1000,
    n_test: int = 200,
    seed: int = 0,
    max_chars: int = 300,
    name: str = "domain",
) -> Path:
    """Build a domain-classification task folder from a prepared corpus (`corpus-<h>/{train,valid,test}.parquet`).

    The train pool comes from `train.parquet`, the test set from `valid.parquet` (else `test.parquet`); both are
    sampled with `seed`, as evenly over labels as the data allow, and texts are cut to about `max_chars`
    characters at a word boundary. Writes `out_dir/{train.jsonl, test.jsonl, labels.json, task.json}`
    atomically (labels sorted by name, template `Text: ...\\nDomain:`, words = lower-cased label names).
    """
    corpus_dir = Path(corpus_dir)
    train_path = corpus_dir / "train.parquet"
    test_path = next((corpus_dir / f for f in ("valid.parquet", "test.parquet") if (corpus_dir / f).is_file()), None)
    if not train_path.is_file():
        raise InputError(f"missing file: {train_path} (make_task_from_corpus needs a prepared corpus)")
    if test_path is None:
        raise InputError(f"missing file: {corpus_dir / 'valid.parquet'} (nor test.parquet) for the task's test set")

    def read(path):
        table = pq.read_table(path)
        for col in ("text", label_field):
            if col not in table.column_names:
                raise InputError(f"{path} has no column {col!r} (columns: {table.column_names})")
        return table.column("text").to_pylist(), [None if x is None else str(x) for x in table.column(label_field).to_pylist()]

    train_texts, train_labels = read(train_path)
    test_texts, test_labels = read(test_path)
    labels = sorted({x for x in train_labels if x is not None})
    if len(labels) < 2:
        raise InputError(f"{train_path}: column {label_field!r} has {len(labels)} distinct value(s); a task needs ≥ 2")
    rng = random.Random(seed)
    train = _balanced_sample(train_texts, train_labels, labels, n_train, rng, max_chars)
    test = _balanced_sample(test_texts, test_labels, labels, n_test, rng, max_chars)
    if not test:
        raise InputError(f"{test_path}: no documents with a label seen in {train_path}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for fname, rows in (("train.jsonl", train), ("test.jsonl", test)):
            with open(tmp / fname, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        write_json(tmp / "labels.json", labels)
        write_json(tmp / "task.json", {
            "name": name, "kind": "domain", "template": DOMAIN.to_dict(),
            "verbalizer": [default_word(x) for x in labels],
            "made_from": {"corpus_dir": str(corpus_dir), "label_field": label_field, "seed": seed,
                          "n_train": len(train), "n_test": len(test), "max_chars": max_chars},
        })
    log.info("wrote task %s: %d labels, %d train, %d test → %s", name, len(labels), len(train), len(test), out_dir)
    return out_dir


def _truncate(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip() + " ..."


def _balanced_sample(texts, labels_col, labels, n, rng, max_chars) -> list[dict]:
    """Up to n examples, round-robin over labels (so as balanced as the data allow), shuffled."""
    by_label = {y: [] for y in labels}
    for t, y in zip(texts, labels_col):
        if y in by_label and t and t.strip():
            by_label[y].append(t)
    for y in labels:
        rng.shuffle(by_label[y])
    picked, cursor = [], {y: 0 for y in labels}
    while len(picked) < n and any(cursor[y] < len(by_label[y]) for y in labels):
        for i, y in enumerate(labels):
            if len(picked) < n and cursor[y] < len(by_label[y]):
                picked.append({"text": _truncate(by_label[y][cursor[y]], max_chars), "label": i})
                cursor[y] += 1
    rng.shuffle(picked)
    return picked
