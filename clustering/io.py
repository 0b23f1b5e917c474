"""The clustering stages' functions: they read and write the `embeddings-`, `clusters-` and `assignments-` folders
described in docs/ARCHITECTURE.md. `fit_clusters` fits a clusterer on the train embeddings; `assign_clusters` gives
every document of every split a cluster_id."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from clustering.clusterers import BalancedKMeans, Clusterer, RandomClusters, UnbalancedKMeans, load_clusterer
from corpus.io import InputError, atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


def _load_npy(path: Path) -> np.ndarray:
    if not path.exists():
        raise InputError(f"missing embeddings file: {path}")
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read embeddings {path}: {e}") from None
    if x.ndim != 2:
        raise InputError(f"{path} must hold a 2-D (n_docs, dim) matrix, got shape {x.shape}")
    return x


BALANCE_BY = ("docs", "tokens")


def document_weights(corpus_dir: str | Path, split: str = "train") -> np.ndarray:
    """A proxy for each document's length in tokens, before any tokenizer exists: its text's UTF-8 bytes (at least
    1), float64 (n_docs,) in the order of `corpus_dir/{split}.parquet`. Byte-level BPE tokens grow with bytes, so
    clusters balanced by bytes are balanced by tokens up to how well each cluster's text compresses."""
    import pyarrow.compute as pc

    from corpus.read import read_columns

    texts = read_columns(Path(corpus_dir) / f"{split}.parquet", ["text"]).column("text")
    return np.maximum(pc.binary_length(pc.cast(texts, "binary")).to_numpy(zero_copy_only=False), 1).astype(np.float64)


def fit_clusters(
    embeddings_dir: str | Path,
    out_dir: str | Path,
    n_clusters: int,
    clusterer: str = "balanced",
    fit_sample: int = 1_000_000,
    n_iter: int = 20,
    balance: float = 1.02,
    backend: str = "auto",
    seed: int = 0,
    device: str = "auto",
    balance_by: str = "docs",
    corpus_dir: str | Path | None = None,
) -> dict:
    """Fit a clusterer on `embeddings_dir/train.npy` and write `out_dir/{centroids.npy, config.json[, prices.npy]}`
    atomically. clusterer: balanced | unbalanced | random. balance_by (balanced only): `docs` balances document
    counts (c-BTM); `tokens` balances the documents' lengths (`document_weights` of `corpus_dir`'s train split),
    for corpora whose documents differ in length. Returns the config dict (sizes during fit, inertia)."""
    if balance_by not in BALANCE_BY:
        raise InputError(f"balance_by must be docs or tokens, got {balance_by!r}")
    x = _load_npy(Path(embeddings_dir) / "train.npy")
    weights = None
    if clusterer == "balanced" and balance_by == "tokens":
        if corpus_dir is None:
            raise InputError("balance_by='tokens' needs the corpus folder (corpus_dir) to weigh documents by length")
        weights = document_weights(corpus_dir)
        if len(weights) != x.shape[0]:
            raise InputError(f"{Path(corpus_dir) / 'train.parquet'} has {len(weights)} documents but "
                             f"{Path(embeddings_dir) / 'train.npy'} has {x.shape[0]} rows")
    common = dict(n_iter=n_iter, backend=backend, device=device, seed=seed, fit_sample=fit_sample)
    if clusterer == "balanced":
        model: Clusterer = BalancedKMeans(n_clusters, balance=balance, **common)
    elif clusterer == "unbalanced":
        model = UnbalancedKMeans(n_clusters, **common)
    elif clusterer == "random":
        model = RandomClusters(n_clusters, **common)
    else:
        raise InputError(f"clusterer must be balanced, unbalanced or random, got {clusterer!r}")
    if n_clusters > x.shape[0]:
        raise InputError(f"n_clusters={n_clusters} is larger than the number of training documents "
                         f"({x.shape[0]} in {Path(embeddings_dir) / 'train.npy'})")
    model.fit(x) if weights is None else model.fit(x, weights=weights)
    with atomic_dir(out_dir) as tmp:
        model.save(tmp)
        cfg = read_json(tmp / "config.json")
    return cfg


def _size_summary(labels: np.ndarray, k: int) -> dict:
    sizes = np.bincount(labels, minlength=k)
    return {"n_docs": int(labels.size), "sizes": sizes.tolist(), "max": int(sizes.max()), "min": int(sizes.min()),
            "max_over_min": float(sizes.max() / sizes.min()) if sizes.min() > 0 else float("inf")}


def assign_clusters(
    embeddings_dir: str | Path,
    clusters_dir: str | Path,
    out_dir: str | Path,
    corpus_dir: str | Path,
    assign: str = "nearest",
    device: str = "auto",
) -> dict:
    """Give every document of every split a cluster_id; write into out_dir (atomically):

    - `{split}.parquet`: id (from corpus_dir/{split}.parquet), cluster_id int32, distance float32 (squared
      distance to the assigned centroid);
    - `{split}_distances.npy`: float32 (n_docs, n_clusters) squared distances to every centroid;
    - `summary.json`: sizes per split with max/min spread.
    assign="nearest" (the paper's default) takes the nearest centroid; "balanced" uses the streaming
    capacity-aware assignment on the train split (sizes within the clusterer's tolerance, weighted by
    `document_weights` when the clusterer was fitted by tokens); valid/test always go to the nearest centroid. A random clusterer assigns every split uniformly at random (seeded).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if assign not in ("nearest", "balanced"):
        raise InputError(f"assign must be nearest or balanced, got {assign!r}")
    embeddings_dir, corpus_dir = Path(embeddings_dir), Path(corpus_dir)
    model = load_clusterer(clusters_dir, device=device)
    k = model.n_clusters
    summary: dict[str, Any] = {"assign": assign, "algorithm": model.algorithm, "n_clusters": k, "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for si, split in enumerate(SPLITS):
            emb = embeddings_dir / f"{split}.npy"
            if not emb.exists():
                if split == "train":
                    raise InputError(f"missing embeddings file: {emb}")
                continue
            x = _load_npy(emb)
            cpath = corpus_dir / f"{split}.parquet"
            if not cpath.exists():
                raise InputError(f"missing corpus split {cpath} (embeddings exist for it)")
            ids = pq.read_table(cpath, columns=["id"]).column("id").to_pylist()
            if len(ids) != x.shape[0]:
                raise InputError(f"{emb} has {x.shape[0]} rows but {cpath} has {len(ids)} documents")
            dists = np.lib.format.open_memmap(tmp / f"{split}_distances.npy", mode="w+", dtype=np.float32,
                                              shape=(x.shape[0], k))
            if x.shape[0] == 0:
                labels, dist = np.zeros(0, np.int64), np.zeros(0, np.float32)
            elif isinstance(model, RandomClusters):
                model.squared_distances(x, out=dists)
                labels = model.random_labels(x.shape[0], salt=si + 1)
                dist = np.take_along_axis(np.asarray(dists), labels[:, None], 1)[:, 0]
            elif assign == "balanced" and split == "train":
                weights = document_weights(corpus_dir, split) if getattr(model, "weighted", False) else None
                labels, dist = model.assign_balanced(x, return_distance=True, out_distances=dists, weights=weights)
            else:
                labels, dist = model.predict(x, return_distance=True, out_distances=dists)
            dists.flush()
            del dists
            table = pa.table({"id": pa.array([str(i) for i in ids], pa.string()),
                              "cluster_id": pa.array(labels.astype(np.int32)),
                              "distance": pa.array(dist.astype(np.float32))})
            pq.write_table(table, tmp / f"{split}.parquet")
            summary["splits"][split] = _size_summary(labels, k) if len(labels) else {"n_docs": 0}
            if getattr(model, "weighted", False) and len(labels):
                summary["splits"][split]["weighted_sizes"] = np.bincount(
                    labels, weights=document_weights(corpus_dir, split), minlength=k).tolist()
            log.info("assigned %s: %d docs, sizes %s..%s", split, len(labels),
                     summary["splits"][split].get("min"), summary["splits"][split].get("max"))
        write_json(tmp / "summary.json", summary)
    return summary
