"""The clustering stages' functions: they read and write the `embeddings-`, `clusters-` and `assignments-` folders
described in docs/ARCHITECTURE.md. `fit_clusters` fits a clusterer on the train embeddings; `assign_clusters` gives
every document of every split a cluster_id."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

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


CLUSTERERS = ("balanced", "unbalanced", "random")  # fit_clusters' clusterer (the first is the default)
ASSIGNMENTS = ("nearest", "balanced")  # assign_clusters' assign: nearest centroid, or capacity-aware
BALANCE_BY = ("docs", "tokens")


def document_weights(corpus_dir: str | Path, split: str = "train") -> np.ndarray:
    """A proxy for each document's length in tokens, before any tokenizer exists: its text's UTF-8 bytes (at least
    1), float64 (n_docs,) in the order of `corpus_dir/{split}.parquet`. Byte-level BPE tokens grow with bytes, so
    clusters balanced by bytes are balanced by tokens up to how well each cluster's text compresses."""
    import pyarrow.compute as pc

    from corpus.read import parquet_file

    parts = [pc.binary_length(pc.cast(b.column(0), "binary")).to_numpy(zero_copy_only=False)
             for b in parquet_file(Path(corpus_dir) / f"{split}.parquet", ["text"]).iter_batches(columns=["text"])]
    return np.maximum(np.concatenate(parts) if parts else np.zeros(0), 1).astype(np.float64)  # one batch of text at a time


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
        raise InputError(f"balance_by must be {' or '.join(BALANCE_BY)}, got {balance_by!r}")
    x = _load_npy(Path(embeddings_dir) / "train.npy")
    weights = None
    if clusterer == "balanced" and balance_by == "tokens":
        if corpus_dir is None:
            raise InputError("balance_by='tokens' needs the corpus folder (corpus_dir) to weigh documents by length")
        weights = document_weights(corpus_dir)
        if len(weights) != x.shape[0]:
            raise InputError(f"{Path(corpus_dir) / 'train.parquet'} has {len(weights)} documents but "
                             f"{Path(embeddings_dir) / 'train.npy'} has {x.shape[0]} rows")
    from clustering.clusterers import BalancedKMeans, Clusterer, RandomClusters, UnbalancedKMeans  # torch

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


def _sizes_summary(sizes: np.ndarray) -> dict:
    return {"n_docs": int(sizes.sum()), "sizes": sizes.tolist(), "max": int(sizes.max()), "min": int(sizes.min()),
            "max_over_min": float(sizes.max() / sizes.min()) if sizes.min() > 0 else float("inf")}


def assign_clusters(
    embeddings_dir: str | Path,
    clusters_dir: str | Path,
    out_dir: str | Path,
    corpus_dir: str | Path,
    assign: str = "nearest",
    device: str = "auto",
    chunk_rows: int = 65_536,
) -> dict:
    """Give every document of every split a cluster_id; write into out_dir (atomically):

    - `{split}.parquet`: id (from corpus_dir/{split}.parquet), cluster_id int32, distance float32 (squared
      distance to the assigned centroid);
    - `{split}_distances.npy`: float32 (n_docs, n_clusters) squared distances to every centroid;
    - `summary.json`: sizes per split with max/min spread.
    assign="nearest" (the paper's default) takes the nearest centroid; "balanced" uses the streaming
    capacity-aware assignment on the train split (sizes within the clusterer's tolerance, weighted by
    `document_weights` when the clusterer was fitted by tokens); valid/test always go to the nearest centroid. A random clusterer assigns every split uniformly at random (seeded).
    Embeddings and ids are read `chunk_rows` rows at a time (ordinary reads, no memory map) and the outputs
    appended as they come, so memory holds one chunk; only the balanced train assignment needs the whole corpus.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clustering.clusterers import RandomClusters, load_clusterer  # torch
    from corpus.read import parquet_file
    from corpus.stream import NpyWriter, RowGroupWriter, exact_batches, iter_npy_rows

    if assign not in ASSIGNMENTS:
        raise InputError(f"assign must be nearest or balanced, got {assign!r}")
    embeddings_dir, corpus_dir = Path(embeddings_dir), Path(corpus_dir)
    model = load_clusterer(clusters_dir, device=device)
    k = model.n_clusters
    rows = max(1, int(chunk_rows))
    schema = pa.schema([("id", pa.string()), ("cluster_id", pa.int32()), ("distance", pa.float32())])
    summary: dict[str, Any] = {"assign": assign, "algorithm": model.algorithm, "n_clusters": k, "splits": {}}
    with atomic_dir(out_dir) as tmp:
        for si, split in enumerate(SPLITS):
            emb = embeddings_dir / f"{split}.npy"
            if not emb.exists():
                if split == "train":
                    raise InputError(f"missing embeddings file: {emb}")
                continue
            x = _load_npy(emb)  # memory-mapped: only its shape is read here
            cpath = corpus_dir / f"{split}.parquet"
            if not cpath.exists():
                raise InputError(f"missing corpus split {cpath} (embeddings exist for it)")
            pf = parquet_file(cpath, ["id"])
            n = pf.metadata.num_rows
            if n != x.shape[0]:
                raise InputError(f"{emb} has {x.shape[0]} rows but {cpath} has {n} documents")
            weighted = getattr(model, "weighted", False)
            weights = None  # document_weights of this split, once read (the whole text column)
            if isinstance(model, RandomClusters):
                labels_all = model.random_labels(n, salt=si + 1)

                def chunks():  # (labels, distances (b,), all distances (b, k)) of rows [s, s + b)
                    for s, xb in iter_npy_rows(emb, rows):
                        d = model.squared_distances(xb)
                        lab = labels_all[s: s + len(xb)]
                        yield lab, np.take_along_axis(d, lab[:, None], 1)[:, 0], d
            elif assign == "balanced" and split == "train":  # capacity-aware: one pass over the whole corpus
                dists = np.lib.format.open_memmap(tmp / f".{split}_distances.npy", mode="w+", dtype=np.float32,
                                                  shape=(n, k))
                weights = document_weights(corpus_dir, split) if weighted else None
                labels_all, dist_all = model.assign_balanced(x, return_distance=True, out_distances=dists,
                                                             weights=weights)
                dists.flush()

                def chunks():
                    for s, d in iter_npy_rows(tmp / f".{split}_distances.npy", rows):
                        yield labels_all[s: s + len(d)], dist_all[s: s + len(d)], d
            else:
                def chunks():
                    for _, xb in iter_npy_rows(emb, rows):
                        d = np.empty((len(xb), k), np.float32)
                        lab, dd = model.predict(xb, return_distance=True, out_distances=d)
                        yield lab, dd, d
            dist_w = NpyWriter(tmp / f"{split}_distances.npy", np.float32, (k,))
            table_w = RowGroupWriter(tmp / f"{split}.parquet", schema, measure=None)
            sizes = np.zeros(k, np.int64)
            ids = exact_batches(pf, "id", rows)
            for lab, dd, d in chunks():
                dist_w.write(d)
                id_b = next(ids)
                table_w.write(pa.table({"id": id_b.cast(pa.string()), "cluster_id": pa.array(lab.astype(np.int32)),
                                        "distance": pa.array(np.asarray(dd, np.float32))}, schema=schema))
                sizes += np.bincount(lab, minlength=k)
            dist_w.close()
            table_w.close()
            (tmp / f".{split}_distances.npy").unlink(missing_ok=True)
            summary["splits"][split] = _sizes_summary(sizes) if n else {"n_docs": 0}
            if weighted and n:
                w = weights if weights is not None else document_weights(corpus_dir, split)
                lab = pq.read_table(tmp / f"{split}.parquet", columns=["cluster_id"]).column(0).to_numpy()
                summary["splits"][split]["weighted_sizes"] = np.bincount(lab, weights=w, minlength=k).tolist()
            log.info("assigned %s: %d docs, sizes %s..%s", split, n, summary["splits"][split].get("min"),
                     summary["splits"][split].get("max"))
        write_json(tmp / "summary.json", summary)
    return summary
