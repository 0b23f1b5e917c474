"""embed_corpus → fit_clusters → assign_clusters → describe_clusters on a tiny corpus in parquet."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clustering.embed import embed_corpus
from clustering.inspect import describe_clusters
from clustering.io import assign_clusters, fit_clusters
from corpus.io import InputError

DOMAINS = {
    "sports": "football match goal team player scored league season coach stadium",
    "finance": "stock market shares investors bank profit earnings price trading fund",
    "medicine": "patients clinical trial drug dose treatment disease hospital therapy",
    "code": "function return variable class import module error loop python string",
}


def make_corpus(path, n_per=30, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for split, n in (("train", n_per), ("valid", 5)):
        rows = []
        for label, words in DOMAINS.items():
            w = words.split()
            for i in range(n):
                rows.append({"id": f"{split}-{label}-{i}", "label": label,
                             "text": " ".join(rng.choice(w, 12)) + f" {rng.integers(1000)}"})
        pq.write_table(pa.Table.from_pylist(rows), path / f"{split}.parquet")


@pytest.mark.parametrize("assign", ["nearest", "balanced"])
def test_stage_functions_end_to_end(tmp_path, assign):
    make_corpus(tmp_path / "corpus")
    stats = embed_corpus(tmp_path / "corpus", tmp_path / "emb", fit_sample=1000, n_components=20)
    assert stats["n_docs"] == {"train": 120, "valid": 20}
    x = np.load(tmp_path / "emb" / "train.npy")
    assert x.dtype == np.float32 and x.shape == (120, stats["dim"])
    cfg = fit_clusters(tmp_path / "emb", tmp_path / "clusters", n_clusters=4, device="cpu", n_iter=5)
    assert cfg["algorithm"] == "balanced" and sum(cfg["sizes"]) == 120
    summary = assign_clusters(tmp_path / "emb", tmp_path / "clusters", tmp_path / "assign", tmp_path / "corpus",
                              assign=assign, device="cpu")
    t = pq.read_table(tmp_path / "assign" / "train.parquet")
    assert t.schema.field("cluster_id").type == pa.int32() and t.schema.field("distance").type == pa.float32()
    d = np.load(tmp_path / "assign" / "train_distances.npy")
    assert d.shape == (120, 4)
    np.testing.assert_allclose(t.column("distance").to_numpy(), d[np.arange(120), t.column("cluster_id").to_numpy()],
                               rtol=1e-5, atol=1e-6)
    assert summary["splits"]["valid"]["n_docs"] == 20
    desc = describe_clusters(tmp_path / "corpus", tmp_path / "emb", tmp_path / "assign", tmp_path / "clusters",
                             tmp_path / "report")
    assert desc["nmi"] > 0.8 and desc["purity"] > 0.8
    assert all(len(c["top_terms"]) == 10 for c in desc["clusters"])
    assert (tmp_path / "report" / "cluster_sizes.png").stat().st_size > 0
    assert (tmp_path / "report" / "projection.png").stat().st_size > 0
    assert json.loads((tmp_path / "report" / "clusters.json").read_text())["n_clusters"] == 4


def test_random_and_bad_inputs(tmp_path):
    make_corpus(tmp_path / "corpus", n_per=10)
    embed_corpus(tmp_path / "corpus", tmp_path / "emb", n_components=10)
    cfg = fit_clusters(tmp_path / "emb", tmp_path / "rand", n_clusters=3, clusterer="random", device="cpu")
    assert cfg["algorithm"] == "random"
    s = assign_clusters(tmp_path / "emb", tmp_path / "rand", tmp_path / "a", tmp_path / "corpus", device="cpu")
    assert s["splits"]["train"]["n_docs"] == 40
    with pytest.raises(InputError, match="larger than"):
        fit_clusters(tmp_path / "emb", tmp_path / "c2", n_clusters=100, device="cpu")
    with pytest.raises(InputError, match="missing"):
        embed_corpus(tmp_path / "nowhere", tmp_path / "e2")
    with pytest.raises(InputError, match="clusterer"):
        fit_clusters(tmp_path / "emb", tmp_path / "c3", n_clusters=2, clusterer="spectral")
    assert not (tmp_path / "c2").exists()
