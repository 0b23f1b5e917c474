"""Integration: the clustering half of the pipeline on a ~3000-document sample of ../shared/data/corpus_dev
(label field `source`, never used for clustering) finds the domains: NMI ≥ 0.6. Skipped when the data is absent."""
from __future__ import annotations

import json
from pathlib import Path

import luigi
import pytest

from pipeline import DescribeClusters

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "corpus_dev"


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/corpus_dev is absent")
def test_corpus_dev_sample_clusters_match_sources(tmp_path):
    import pyarrow.parquet as pq
    from sklearn.metrics import normalized_mutual_info_score

    stage = DescribeClusters(corpus=str(DATA.resolve()), label_field="source", run_dir=str(tmp_path / "run"),
                             max_docs=3000, num_clusters=7, device="cpu", embed_sample=3000)
    assert luigi.build([stage], local_scheduler=True, workers=1, log_level="WARNING")
    corpus = stage.requires()["corpus"].out_path()
    assignments = stage.requires()["assignments"].out_path()
    stats = json.loads((corpus / "stats.json").read_text())
    assert 2900 <= sum(stats["n_docs"].values()) <= 3100
    labels = pq.read_table(corpus / "train.parquet", columns=["label"]).column(0).to_pylist()
    clusters = pq.read_table(assignments / "train.parquet", columns=["cluster_id"]).column(0).to_pylist()
    nmi = normalized_mutual_info_score(labels, clusters)
    print(f"corpus_dev sample: NMI {nmi:.3f} over {len(labels)} training documents")
    assert nmi >= 0.6
    info = json.loads((stage.out_path() / "stage.json").read_text())["result"]
    assert info  # describe_clusters' summary (sizes, top terms, NMI/purity, plots)
