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
from clustering.balanced import size_bounds, weighted_size_bounds
from clustering.clusterers import BalancedKMeans, Clusterer, RandomClusters, UnbalancedKMeans, load_clusterer
from clustering.embed import EncoderEmbedder, TfidfEmbedder, embed_corpus, load_embedder
from clustering.inspect import describe_clusters
from clustering.io import assign_clusters, document_weights, fit_clusters
from clustering.router import CentroidRouter
from clustering.search import faiss_has_gpu

__all__ = [
    "BalancedKMeans", "CentroidRouter", "Clusterer", "EncoderEmbedder", "RandomClusters", "TfidfEmbedder",
    "UnbalancedKMeans", "assign_clusters", "describe_clusters", "document_weights", "embed_corpus", "faiss_has_gpu",
    "fit_clusters", "load_clusterer", "load_embedder", "size_bounds", "weighted_size_bounds",
]
