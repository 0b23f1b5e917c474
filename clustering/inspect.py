"""Describe clusters for the report: sizes, top terms or nearest documents, examples, agreement with labels, plots.

`describe_clusters` reads the corpus-, embeddings-, assignments- and clusters- folders and writes into out_dir:
`clusters.json` (the returned dict), `cluster_sizes.png` (bar chart of train sizes) and `projection.png` (2-D PCA
projection of a sample of train embeddings coloured by cluster_id, with a legend, centroids marked).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from corpus.io import InputError, atomic_file, load_array, write_json
from corpus.layout import CENTROIDS, TRAIN_SPLIT
from corpus.palette import distinct_colours

log = logging.getLogger(__name__)


def _snippet(text: str, n_chars: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n_chars else text[: n_chars - 1].rstrip() + "…"


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Purity = (1/n) Σ_clusters max_label |cluster ∩ label|."""
    if len(labels) == 0:
        return float("nan")
    _, lab = np.unique(labels, return_inverse=True)
    table = np.zeros((clusters.max() + 1, lab.max() + 1), dtype=np.int64)
    np.add.at(table, (clusters, lab), 1)
    return float(table.max(1).sum() / len(labels))


def describe_clusters(
    corpus_dir: str | Path,
    embeddings_dir: str | Path,
    assignments_dir: str | Path,
    clusters_dir: str | Path,
    out_dir: str | Path,
    label_field_present: bool | str = "auto",
    n_terms: int = 10,
    n_examples: int = 3,
    projection_sample: int = 5000,
    seed: int = 0,
) -> dict:
    """Per cluster (train split): size, top TF-IDF terms (TF-IDF embedder) or the texts nearest the centroid
    (encoder), example snippets, label distribution; overall NMI (sklearn normalized_mutual_info_score) and purity
    against the `label` column when present. Writes clusters.json, cluster_sizes.png, projection.png into out_dir
    (created if needed; each file written atomically). Returns the clusters.json dict."""
    import pyarrow.parquet as pq
    from sklearn.metrics import normalized_mutual_info_score

    from clustering.embed import load_embedder
    from corpus.io import read_json
    from corpus.read import parquet_file, read_columns, take_rows

    corpus_dir, embeddings_dir = Path(corpus_dir), Path(embeddings_dir)
    assignments_dir, clusters_dir, out_dir = Path(assignments_dir), Path(clusters_dir), Path(out_dir)
    cpath, apath = corpus_dir / TRAIN_SPLIT, assignments_dir / TRAIN_SPLIT
    for p in (cpath, apath, clusters_dir / CENTROIDS):
        if not p.exists():
            raise InputError(f"missing file: {p}")
    # ids and labels only: the texts of the few example documents are read at the end (`take_rows`)
    corpus = read_columns(cpath, [c for c in ("id", "label") if c in parquet_file(cpath).schema_arrow.names]).to_pandas()
    assign = pq.read_table(apath).to_pandas()
    if len(corpus) != len(assign) or not (corpus["id"].astype(str).values == assign["id"].astype(str).values).all():
        raise InputError(f"{apath} does not match {cpath} (different documents or order)")
    centroids = load_array(clusters_dir / CENTROIDS)
    k = centroids.shape[0]
    cid = assign["cluster_id"].to_numpy().astype(np.int64)
    dist = assign["distance"].to_numpy()
    has_label = "label" in corpus.columns and corpus["label"].notna().any()
    if label_field_present is not True and label_field_present != "auto":
        has_label = False
    elif label_field_present is True and not has_label:
        raise InputError(f"{cpath} has no 'label' column")
    labels = corpus["label"].astype(str).to_numpy() if has_label else None

    embedder = None
    if (embeddings_dir / "embedder" / "config.json").exists():
        try:
            embedder = load_embedder(embeddings_dir / "embedder", device="cpu")
        except InputError as e:
            log.warning("cannot load the embedder for top terms: %s", e)
    top_terms = None
    if embedder is not None and getattr(embedder, "kind", "") == "tfidf":
        top_terms = embedder.top_terms(centroids, n=n_terms)

    sizes = np.bincount(cid, minlength=k)
    rng = np.random.default_rng(seed)
    clusters = []
    for j in range(k):
        members = np.nonzero(cid == j)[0]
        info: dict = {"cluster_id": j, "size": int(sizes[j]), "fraction": float(sizes[j] / max(1, len(cid)))}
        if top_terms is not None:
            info["top_terms"] = top_terms[j]
        if members.size:
            info["nearest_documents"] = members[np.argsort(dist[members], kind="stable")[:n_examples]].tolist()
            info["examples"] = rng.choice(members, size=min(n_examples, members.size), replace=False).tolist()
            info["mean_distance"] = float(dist[members].mean())
        if labels is not None and members.size:
            vals, cnt = np.unique(labels[members], return_counts=True)
            order = np.argsort(-cnt, kind="stable")
            info["label_distribution"] = {str(vals[o]): int(cnt[o]) for o in order}
            info["majority_label"] = str(vals[order[0]])
        clusters.append(info)
    needed = sorted({i for info in clusters for key in ("nearest_documents", "examples") for i in info.get(key, [])})
    texts = dict(zip(needed, (row["text"] for row in take_rows(cpath, needed, ["text"]))))
    for info in clusters:  # row indices → snippets
        if "nearest_documents" in info:
            info["nearest_documents"] = [{"id": str(corpus["id"].iloc[i]), "text": _snippet(texts[i])}
                                         for i in info["nearest_documents"]]
            info["examples"] = [_snippet(texts[i]) for i in info["examples"]]
    result: dict = {"n_clusters": k, "n_docs": int(len(cid)), "sizes": sizes.tolist(),
                    "max_over_min": float(sizes.max() / sizes.min()) if sizes.min() > 0 else float("inf"),
                    "embedder": getattr(embedder, "kind", None), "clusters": clusters}
    summary_path = assignments_dir / "summary.json"
    if summary_path.exists():
        result["assignment_summary"] = read_json(summary_path)
    if labels is not None:
        result["nmi"] = float(normalized_mutual_info_score(labels, cid))
        result["purity"] = purity(labels, cid)
        result["label_field"] = "label"

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"c{j}" + (f" {c['majority_label']}" if c.get("majority_label") else
                        f" {', '.join(c['top_terms'][:2])}" if c.get("top_terms") else "") for j, c in enumerate(clusters)]
    _plot_sizes(sizes, out_dir / "cluster_sizes.png", [c.get("label_distribution") for c in clusters], names)
    emb_path = embeddings_dir / "train.npy"
    if emb_path.exists():
        x = np.load(emb_path, mmap_mode="r")
        idx = np.sort(rng.choice(len(cid), size=min(projection_sample, len(cid)), replace=False))
        _plot_projection(np.asarray(x[idx], dtype=np.float32), cid[idx], centroids, out_dir / "projection.png", names)
        result["plots"] = ["cluster_sizes.png", "projection.png"]
    else:
        result["plots"] = ["cluster_sizes.png"]
    write_json(out_dir / "clusters.json", result)
    return result


def _plot_sizes(sizes: np.ndarray, path: Path, label_counts: list[dict | None] | None = None,
                names: list[str] | None = None) -> None:
    """Train documents per cluster; with labels, each bar split by label (what each cluster holds: balanced k-means
    makes the bars equal by design, their make-up is what differs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(sizes)
    labels = sorted({lab for d in label_counts or [] if d for lab in d})
    fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * k + 3), 3.4), dpi=120)
    x = np.arange(k)
    if labels and len(labels) <= 20:
        bottom = np.zeros(k)
        for lab, colour in zip(labels, distinct_colours(len(labels) + k)[k:]):  # not the clusters' colours
            n = np.array([(d or {}).get(lab, 0) for d in label_counts], dtype=float)
            ax.bar(x, n, bottom=bottom, color=colour, label=lab, edgecolor="white", linewidth=0.5)
            bottom += n
        ax.legend(title="label", fontsize=7, title_fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        what = "train documents per cluster, by label"
    else:
        ax.bar(x, sizes, color=distinct_colours(k))  # as in the projection
        ax.axhline(sizes.mean(), color="k", lw=0.8, ls="--")
        what = "train documents per cluster (dashed: mean)"
    for i, n in enumerate(sizes):
        ax.text(i, n, f"{int(n)}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, names if names and k <= 30 else [str(i) for i in x], fontsize=7,
                  rotation=30 if names and k > 6 else 0, ha="right" if names and k > 6 else "center")
    ax.set_xlabel("cluster_id")
    ax.set_ylabel("train documents")
    ax.set_title(f"{what}; max/min {sizes.max() / max(sizes.min(), 1):.2f}", fontsize=9)
    _save_png(fig, path)


def _plot_projection(x: np.ndarray, cid: np.ndarray, centroids: np.ndarray, path: Path,
                     names: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    n_comp = min(2, x.shape[1], max(1, len(x)))
    pca = PCA(n_components=n_comp, random_state=0).fit(x)
    p = pca.transform(x)
    c = pca.transform(centroids.astype(np.float32))
    if n_comp == 1:
        p, c = np.c_[p, np.zeros(len(p))], np.c_[c, np.zeros(len(c))]
    k = len(c)
    colours = distinct_colours(k)
    fig, ax = plt.subplots(figsize=(6.2 if k <= 40 else 5, 4), dpi=120)
    for j in range(k):  # one scatter per cluster: categorical colours and a legend entry per cluster_id
        sel = cid == j
        ax.scatter(p[sel, 0], p[sel, 1], color=colours[j], s=3, alpha=0.6, linewidths=0, label=str(j))
    big = k <= 20
    ax.scatter(c[:, 0], c[:, 1], c="white", edgecolors="black", s=150 if big else 40, linewidths=1.2, zorder=3)
    for j, (a, b) in enumerate(c):
        ax.annotate(str(j), (a, b), fontsize=8 if big else 5, fontweight="bold", ha="center", va="center", zorder=4)
        if big and names:  # the cluster's name beside its centroid, on a white box
            ax.annotate(names[j], (a, b), xytext=(10, 8 if j % 2 == 0 else -16), textcoords="offset points",
                        fontsize=7, zorder=4,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": colours[j], "alpha": 0.85})
    var = pca.explained_variance_ratio_
    ax.set_xlabel(f"principal component 1 ({100 * var[0]:.0f}% of the variance)")
    ax.set_ylabel(f"principal component 2 ({100 * var[1]:.0f}% of the variance)" if n_comp > 1 else "(one dimension)")
    ax.set_title("train embeddings, PCA projection; circles: centroids", fontsize=9)
    if k <= 40:
        ax.legend(title="cluster_id", fontsize=6, title_fontsize=7, markerscale=3, loc="center left",
                  bbox_to_anchor=(1.0, 0.5), ncol=1 + k // 20)
    _save_png(fig, path)


def _save_png(fig, path: Path) -> None:
    """Lay out `fig`, write it to `path` as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
