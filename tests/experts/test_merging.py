"""The merge-method registry: every method by name, the folders each reads, the cluster statistics it derives."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.io import InputError
from experts.merging import (MERGE_METHODS, PARAMETER_MERGES, TASK_VECTOR_MERGES, cluster_texts, document_shares,
                             get_method, needs)


def test_registry_names_every_method_once():
    assert set(MERGE_METHODS) == {"ensemble", "posterior", "moe"} | set(PARAMETER_MERGES)
    with pytest.raises(InputError, match="unknown merge method 'mean'"):
        get_method("mean")


def test_needs():
    assert needs("posterior") == ()
    assert needs("average") == ("assignments",)
    for m in TASK_VECTOR_MERGES:
        assert {"seed", "shards", "assignments"} <= set(needs(m))
    assert "shared" not in needs("moe") and "shared" not in needs("moe", "seed")
    assert needs("moe", "ties") == needs("moe") + ("shared",)


def test_document_shares_and_cluster_texts(tmp_path):
    ids = [1, 0, 1, 1, 2, 1]
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(6)], "cluster_id": ids}), tmp_path / "train.parquet")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(6)], "text": [f"t{i}" for i in range(6)]}),
                   corpus / "train.parquet")
    assert document_shares(tmp_path, 4) == [1 / 6, 4 / 6, 1 / 6, 0.0]
    assert cluster_texts(corpus, tmp_path, 4, per_cluster=2) == [["t1"], ["t0", "t2"], ["t4"], []]
