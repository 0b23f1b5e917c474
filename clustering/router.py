"""Routing by centroid distance, the one home of the c-BTM routing formula (Gururangan et al. 2023, §2.3):

    d²_j(x) = ‖e(x) − c_j‖²                                   squared Euclidean distance to centroid c_j
    w_j(x)  = softmax_j(−d²_j(x) / T)   over the top_k nearest centroids, zero elsewhere (renormalised)
    cluster_id(x) = argmin_j d²_j(x)

e(·) is the clusterer's embedder, T the temperature. The sparse ensemble routes prefixes with it
(`experts.ensemble.SparseEnsemble`), the MoE router initialisation groups texts by cluster with it
(`experts.moe`), and BTM branching weighs the experts it averages by their centroids' distances to the new
cluster's (`experts.merge.branch_average`). The official c-BTM code passes an already-squared distance into its
d² (it uses ‖·‖⁴); this uses d².
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from corpus.io import InputError

if TYPE_CHECKING:
    import torch

# The routing settings' defaults and choices, owned here and imported by every layer that exposes them (the
# ensembles, the merge inputs, the pipeline's flags). torch is imported by the router when it routes, so reading
# these stays light.
TEMPERATURE = 0.1  # T of softmax(−d²/T)
TOP_K = 2  # experts per prefix of the sparse ensemble (None = all)
ROUTE_EVERY = 16  # tokens between routing refreshes of a prefix (experts.ensemble.RoutingSchedule)
ROUTE_WEIGHTS = ("posterior", "distance")  # the ensemble's weights; the first is the default


def check_top_k(top_k: int | None, k: int) -> int:
    """top_k as an int in [1, k] (None: all k experts); InputError otherwise."""
    top_k = k if top_k is None else int(top_k)
    if top_k < 1 or top_k > k:
        raise InputError(f"top_k must be between 1 and the number of experts ({k}), got {top_k}")
    return top_k


class CentroidRouter:
    """Routes embeddings (or texts, through `embedder`) to centroids.

    embedder: anything with `.transform(texts) -> (n, d)`, or None when only embeddings are routed. centroids
    (k, d), stored as float32. temperature T > 0. top_k in [1, k] (None: all k). The distances are computed in
    float64 from the float32 centroids.
    """

    def __init__(self, embedder, centroids: np.ndarray, temperature: float = TEMPERATURE, top_k: int | None = None):
        centroids = np.asarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or centroids.shape[0] == 0:
            raise InputError(f"centroids must be a non-empty (k, d) matrix, got shape {centroids.shape}")
        if not temperature > 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        top_k = check_top_k(top_k, centroids.shape[0])
        import torch

        self.embedder = embedder
        self.centroids = centroids  # (k, d) float32
        self.temperature = float(temperature)
        self.top_k = top_k
        self._c = torch.as_tensor(np.asarray(centroids, dtype=np.float64))  # (k, d)
        self._c2 = (self._c * self._c).sum(1)  # (k,)

    @property
    def n_centroids(self) -> int:
        return self.centroids.shape[0]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The embedder's (n, d) float32 embeddings of texts; InputError if their dimension is not the centroids'."""
        if self.embedder is None:
            raise InputError("this router has no embedder: pass embeddings, not texts")
        emb = np.asarray(self.embedder.transform(list(texts)), dtype=np.float32)  # (n, d)
        if emb.ndim != 2 or emb.shape[1] != self.centroids.shape[1]:
            raise InputError(f"embedder gives shape {emb.shape}, centroids have dimension {self.centroids.shape[1]}")
        return emb

    def distances(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances d² (n, k) float64 of embeddings x (n, d) to every centroid:
        ‖x‖² − 2 x·c + ‖c‖², clamped at 0."""
        import torch

        e = torch.as_tensor(np.asarray(x, dtype=np.float64))  # (n, d)
        d2 = (e * e).sum(1, keepdim=True) - 2 * e @ self._c.T + self._c2[None, :]  # (n, k)
        return d2.clamp_min(0)

    def route(self, x: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top_k nearest centroids of embeddings x (n, d) and their weights: (idx (n, top_k) int64, nearest
        first; w (n, top_k) float32, softmax(−d²/T) over those top_k)."""
        import torch

        neg, idx = torch.topk(-self.distances(x), self.top_k, dim=1)  # (n, top_k), nearest first
        return idx, torch.softmax(neg / self.temperature, dim=1).float()

    def ranking(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """All k centroid ids of each embedding in x (n, d), nearest first: (n, k) int64."""
        import torch

        return torch.topk(-self.distances(x), self.n_centroids, dim=1).indices

    def weights(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The routing weights of embeddings x (n, d) as a dense (n, k) float32 matrix: ≥ 0, rows sum to 1, zero
        outside the top_k nearest centroids."""
        import torch

        idx, w = self.route(x)
        return torch.zeros(idx.shape[0], self.n_centroids).scatter_(1, idx, w)

    def assign(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """cluster_id (n,) int64 of embeddings x (n, d): the nearest centroid."""
        return self.distances(x).argmin(1)
