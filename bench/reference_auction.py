"""Reference for benchmarks only: the balanced k-means of the official c-BTM code (kernelmachine/balanced-kmeans),
re-implemented from its published algorithm, not copied.

Algorithm (BASE layers' balanced assignment, Lewis et al. 2021, used by c-BTM): Lloyd iterations whose assignment
step is an auction in which the k clusters ("workers") bid for points ("jobs"), each cluster wanting q = n/k
points. Scores s_ij = −‖x_i − c_j‖². Every round, each cluster j takes its q+1 best points by value
v_ij = s_ij − p_i (p: point prices), bids on its top q an increment v_ij − v_j,(q+1) + ε, with
ε = (max s − min s)/50; each point goes to its highest bidder and its price rises by that bid; for the first 100
rounds a cluster keeps the points it won last round with a minimal bid ε unless outbid. The auction ends in the
round where every point receives a bid. Centroids are then the means of their points. n must be a multiple of k
(the benchmark truncates n). Distances here use one GEMM instead of the original's broadcast difference, and the
centroid update is vectorised, so this reference is, if anything, faster than the original.
"""
from __future__ import annotations

import time

import torch


def auction_assign(scores: torch.Tensor, max_rounds: int = 100_000, deadline: float | None = None) -> torch.Tensor:
    """scores (n, k), higher is better; returns cluster id per point (n,) with exactly n/k points per cluster."""
    n, k = scores.shape
    q = n // k
    s = scores.T.contiguous()  # (k, n)
    eps = ((s.max() - s.min()) / 50).clamp_min(1e-4)
    price = torch.zeros(n, dtype=s.dtype, device=s.device)
    value = s.clone()
    bids = torch.zeros_like(s)
    keep = None
    for rnd in range(max_rounds):
        top_v, top_i = value.topk(q + 1, dim=1)  # (k, q+1)
        inc = top_v[:, :q] - top_v[:, q:] + eps  # (k, q)
        bids.zero_()
        bids.scatter_(1, top_i[:, :q], inc)
        if keep is not None and rnd < 100:
            bids.view(-1)[keep] = eps  # retain last round's winnings with a minimal bid
        has_bid = (bids > 0).any(0).nonzero().squeeze(1)  # points with at least one bidder
        high, winner = bids[:, has_bid].max(0)
        if has_bid.numel() == n:
            out = torch.empty(n, dtype=torch.long, device=s.device)
            out[has_bid] = winner
            return out
        price[has_bid] += high
        value = s - price[None, :]
        keep = winner * n + has_bid
        value.view(-1)[keep] = s.view(-1)[keep]
        if deadline is not None and time.perf_counter() > deadline:
            raise TimeoutError(f"auction still running after round {rnd}")
    raise TimeoutError(f"auction did not finish in {max_rounds} rounds")


def auction_kmeans(x: torch.Tensor, n_clusters: int, n_iter: int = 20, seed: int = 0,
                   time_budget_s: float | None = None):
    """Balanced k-means with the auction assignment. x (n, d) float32 on any device, n a multiple of k.
    Random initial centroids (as the original). Returns (centroids (k, d), assign (n,), inertia)."""
    n, d = x.shape
    k = n_clusters
    assert n % k == 0, "the auction needs n divisible by k"
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    x2 = (x * x).sum(1)
    deadline = None if time_budget_s is None else time.perf_counter() + time_budget_s
    for _ in range(n_iter):
        dist = (x2[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min(0)  # (n, k)
        assign = auction_assign(-dist, deadline=deadline)
        counts = torch.bincount(assign, minlength=k).clamp_min(1)
        c = torch.zeros_like(c).index_add_(0, assign, x) / counts[:, None]
    dist = (x2[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min(0)
    assign = auction_assign(-dist, deadline=deadline)
    inertia = float(dist.gather(1, assign[:, None]).mean())
    return c, assign, inertia
