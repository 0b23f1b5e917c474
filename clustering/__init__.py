"""Document embeddings, (balanced) k-means clustering and centroid routing. No Luigi in here.

Modules, from the bottom up:
- `embed`: the embedders (c-BTM TF-IDF, a sentence encoder) and the EmbedCorpus stage's `embed_corpus`.
- `inputs`: checks of the input matrices and their rows read onto the compute device.
- `search`: search backends (torch, faiss): squared distances to the centroids.
- `select`: order statistics within groups, the selection primitives of the balanced solver.
- `balanced`: the capacitated (balanced) assignment step: dual prices and exact greedy repair.
- `clusterers`: `BalancedKMeans`, `UnbalancedKMeans`, `RandomClusters`, save / load.
- `io`: the stages' functions `fit_clusters` and `assign_clusters`, which read and write run folders.
- `inspect`: `describe_clusters` (sizes, purity, examples, plots).
- `router`: `CentroidRouter`, the routing formula softmax(−d²/T) over the top_k nearest centroids, and nearest-centroid
  assignment; `experts/` routes through it.
"""
import importlib

_HOMES = {
    "size_bounds": "balanced", "weighted_size_bounds": "balanced", "BalancedKMeans": "clusterers",
    "Clusterer": "clusterers", "RandomClusters": "clusterers", "UnbalancedKMeans": "clusterers",
    "load_clusterer": "clusterers", "EncoderEmbedder": "embed", "TfidfEmbedder": "embed", "embed_corpus": "embed",
    "load_embedder": "embed", "describe_clusters": "inspect", "assign_clusters": "io", "document_weights": "io",
    "fit_clusters": "io", "CentroidRouter": "router", "faiss_has_gpu": "search",
}


def __getattr__(name: str):
    """`from clustering import X` loads X's module on first use, so that a process that needs only the TF-IDF
    embedder (a worker of embed_corpus's pool) does not import torch."""
    if name in _HOMES:
        return getattr(importlib.import_module(f"clustering.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'clustering' has no attribute {name!r}")


__all__ = [
    "BalancedKMeans", "CentroidRouter", "Clusterer", "EncoderEmbedder", "RandomClusters", "TfidfEmbedder",
    "UnbalancedKMeans", "assign_clusters", "describe_clusters", "document_weights", "embed_corpus", "faiss_has_gpu",
    "fit_clusters", "load_clusterer", "load_embedder", "size_bounds", "weighted_size_bounds",
]
