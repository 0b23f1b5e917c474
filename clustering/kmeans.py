"""Balanced k-means for c-BTM clusters, on GPU or CPU, at corpus scale; plus the ablation baselines.

c-BTM (Gururangan et al. 2023, §2.2) clusters TF-IDF document embeddings with *balanced* k-means, so every expert
sees about the same amount of data. This module provides:

- `BalancedKMeans`: Lloyd iterations whose assignment step solves the capacitated assignment problem
  (sizes within a tolerance) with dual prices + exact greedy repair (see `balanced_assign` for the formulas);
  with per-point weights (document lengths) the sizes are weighted (`_wbalanced_assign`).
- `UnbalancedKMeans`: plain Lloyd (one GEMM + argmin per iteration), the speed floor and an ablation.
- `RandomClusters`: uniform random assignment, the paper's random-cluster control.
- `fit_clusters` / `assign_clusters`: the stage functions reading and writing the `embeddings-`, `clusters-` and
  `assignments-` folders described in docs/ARCHITECTURE.md.

Backends ("the minimal set of operations to perform k-means", as in faiss `contrib/clustering.py`): a searcher
computes squared distances to the centroids — `torch` (GEMM, CUDA or CPU) or `faiss` (IndexFlatL2, GPU index
when faiss has GPU support) — and the balancing, centroid update and bookkeeping are shared torch code that runs
on the same device, so both backends give the same result up to floating-point ties.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch

from corpus.io import InputError, atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_BATCH_BYTES = 1 << 28  # ~256 MiB of (rows × (dim + n_clusters)) float32 per streamed batch
_STAGE_BYTES = 1 << 26  # 64 MiB per pinned staging buffer of host → GPU copies (two, used by turns)
_DAMP = 0.5  # Jacobi damping of the dual steps
_RELAX_SLACK = 0.05  # intermediate Lloyd iterations: sizes within the bounds ±5% are good enough
_RELAX_STEPS = 4  # at most this many dual steps per intermediate Lloyd iteration
_PRICE_SAMPLE = 1024  # intermediate dual steps use a fixed sample of max(16384, 1024·k) fitted points


# ----------------------------------------------------------------------------------------------------------------
# input checks and helpers
# ----------------------------------------------------------------------------------------------------------------
def _check_matrix(x: Any, name: str = "x") -> Any:
    """Return `x` (numpy array, memmap or torch tensor) after checking it is a 2-D float/int matrix."""
    if isinstance(x, torch.Tensor):
        if x.ndim != 2:
            raise InputError(f"{name} must be a 2-D matrix (n_docs, dim), got shape {tuple(x.shape)}")
        if x.is_sparse:
            raise InputError(f"{name} is a sparse tensor; densify it (embedders return dense arrays)")
        return x
    if hasattr(x, "toarray"):
        raise InputError(f"{name} is a sparse matrix; densify it first (embedders return dense arrays)")
    x = x if isinstance(x, np.ndarray) else np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D matrix (n_docs, dim), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputError(f"{name} must hold numbers, got dtype {x.dtype}")
    return x


def _first_nonfinite_row(xb: torch.Tensor) -> int | None:
    """Index of the first row of xb (b, d) holding a NaN or ±inf, or None. A row sum is finite only if every entry
    is (inf and NaN propagate), so one cheap row sum finds the candidate rows and only those are checked entry-wise
    (a finite row can sum to inf by overflow); `torch.isfinite` over the whole matrix costs ~20× more on CPU."""
    cand = (~torch.isfinite(xb.sum(1))).nonzero().squeeze(1)  # (r,) rows whose sum is not finite
    if cand.numel() == 0:
        return None
    bad = cand[~torch.isfinite(xb[cand]).all(1)]
    return int(bad[0]) if bad.numel() else None


def _host_tensor(x: Any) -> torch.Tensor:
    """A CPU tensor viewing the numpy array / memmap `x` (no copy; a read-only memmap is only ever read)."""
    if isinstance(x, torch.Tensor):
        return x
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we never write through this view
        return torch.from_numpy(np.ascontiguousarray(x) if not x.flags.c_contiguous else x)


def _host_to_cuda(x: Any, device: torch.device, start: int = 0, stop: int | None = None,
                  idx: np.ndarray | None = None) -> torch.Tensor:
    """Rows [start, stop) of a host matrix `x` (numpy, memmap or CPU tensor), or rows `idx`, as float32 on the
    CUDA `device`, without a pageable (synchronous, staged by the driver) copy: chunks of `_STAGE_BYTES` are
    gathered by torch's multi-threaded copy/index_select into two pinned buffers by turns, and each goes to the
    GPU by an asynchronous copy on a side stream, so the host fills one buffer while the other crosses the bus.
    Returns once the copies are queued; the current stream waits for them."""
    src = _host_tensor(x)
    stop = x.shape[0] if stop is None else stop
    n = len(idx) if idx is not None else stop - start
    d = x.shape[1]
    out = torch.empty((n, d), dtype=torch.float32, device=device)
    if n == 0:
        return out
    rows = max(1, _STAGE_BYTES // (4 * max(1, d)))
    n_bufs = min(2, -(-n // rows))
    bufs = [torch.empty((min(rows, n), d), dtype=torch.float32, pin_memory=True) for _ in range(n_bufs)]
    sent: list[torch.cuda.Event | None] = [None] * n_bufs
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # `out` is allocated on the current stream
    for j, s in enumerate(range(0, n, rows)):
        e = min(n, s + rows)
        slot = j % n_bufs
        if sent[slot] is not None:
            sent[slot].synchronize()  # that buffer's previous chunk has reached the GPU
        buf = bufs[slot][: e - s]
        if idx is None:
            buf.copy_(src[start + s : start + e])  # converts float16 etc. to float32 on the way
        else:
            part = torch.from_numpy(np.ascontiguousarray(idx[s:e], dtype=np.int64))
            if src.dtype == torch.float32:
                torch.index_select(src, 0, part, out=buf)
            else:
                buf.copy_(src[part])
        with torch.cuda.stream(stream):
            out[s:e].copy_(buf, non_blocking=True)
            sent[slot] = torch.cuda.Event()
            sent[slot].record(stream)
    torch.cuda.current_stream(device).wait_stream(stream)
    return out


def _rows(x: Any, start: int, stop: int, device: torch.device, name: str = "x") -> torch.Tensor:
    """Rows [start, stop) of `x` as a float32 tensor on `device`; InputError on NaN/inf."""
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        xb = x[start:stop].to(device=device, dtype=torch.float32, non_blocking=True)
    elif device.type == "cuda":
        xb = _host_to_cuda(x, device, start, stop)
    elif isinstance(x, torch.Tensor):
        xb = x[start:stop].to(dtype=torch.float32)
    else:
        xb = torch.from_numpy(np.array(x[start:stop], dtype=np.float32))
    bad = _first_nonfinite_row(xb)
    if bad is not None:
        raise InputError(f"{name} has NaN or infinite values (first at row {start + bad}); fix the embeddings first")
    return xb


def _take_rows(x: Any, idx: np.ndarray, device: torch.device, name: str = "x") -> torch.Tensor:
    """Rows `idx` (sorted int64) of `x` as float32 on `device`, read in chunks (works on memory-mapped .npy).
    All rows of a float32 C-contiguous matrix already on `device` are used as they are, without a copy; a host
    matrix goes to a CUDA device through pinned, overlapped chunk copies (`_host_to_cuda`)."""
    everything = len(idx) == x.shape[0]
    if everything:
        if isinstance(x, np.ndarray) and device.type == "cpu" and x.dtype == np.float32 and \
                x.flags.c_contiguous and x.flags.writeable:
            x = torch.from_numpy(x)
        if isinstance(x, torch.Tensor) and x.device == device and x.dtype == torch.float32 and x.is_contiguous():
            bad = _first_nonfinite_row(x)
            if bad is not None:
                raise InputError(f"{name} has NaN or infinite values (first at row {bad}); fix the embeddings first")
            return x
    if device.type == "cuda" and not (isinstance(x, torch.Tensor) and x.device.type != "cpu"):
        out = _host_to_cuda(x, device, idx=None if everything else idx)
        bad = _first_nonfinite_row(out)  # one check (one sync) over the whole matrix, on the GPU
        if bad is not None:
            raise InputError(f"{name} has NaN or infinite values (first at row {int(idx[bad])}); "
                             "fix the embeddings first")
        return out
    out = torch.empty((len(idx), x.shape[1]), dtype=torch.float32, device=device)
    step = max(1, _BATCH_BYTES // (4 * max(1, x.shape[1])))
    for s in range(0, len(idx), step):
        part = idx[s : s + step]
        if isinstance(x, torch.Tensor):
            xb = x[torch.as_tensor(part, device=x.device)].to(device=device, dtype=torch.float32)
        else:
            xb = torch.from_numpy(np.array(x[part], dtype=np.float32)).to(device)
        bad = _first_nonfinite_row(xb)
        if bad is not None:
            raise InputError(f"{name} has NaN or infinite values (first at row {int(part[bad])}); "
                             "fix the embeddings first")
        out[s : s + len(part)] = xb
    return out


def size_bounds(n: int, n_clusters: int, balance: float) -> tuple[int, int]:
    """Cluster-size bounds (lo, hi) for n points: hi/lo ≤ balance, or exactly ⌊n/k⌋..⌈n/k⌉ when that is tighter.

    lo = ⌈(n/k)/√balance⌉ and hi = ⌊(n/k)·√balance⌋, clamped so that lo ≤ ⌊n/k⌋ and hi ≥ ⌈n/k⌉ (always
    feasible). balance = 1 gives the exact ⌊n/k⌋/⌈n/k⌉ split.
    """
    k = n_clusters
    avg = n / k
    s = math.sqrt(balance)
    lo = min(math.ceil(avg / s - 1e-9), n // k)
    hi = max(math.floor(avg * s + 1e-9), -(-n // k))
    return lo, hi


def _sqnorms(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖² (n,) of x (n, d) as row-wise dot products: no (n, d) temporary (x * x costs ~5× more on CPU)."""
    return torch.einsum("ij,ij->i", x, x)


def _sqdist(x: torch.Tensor, c: torch.Tensor, x2: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 distances ‖x−c‖² = ‖x‖² − 2x·c + ‖c‖², clamped at 0. x (n, d), c (k, d) → (n, k), written into
    `out` (n, k) when given (a reused buffer: on CPU a fresh 10+ MB tensor costs page faults on every call)."""
    if x2 is None:
        x2 = _sqnorms(x)
    c2 = (c * c).sum(1)
    d = torch.addmm(c2[None, :], x, c.T, alpha=-2.0, out=out)  # (n, k)
    return d.add_(x2[:, None]).clamp_min_(0.0)


def _cluster_of(cand_idx: torch.Tensor | None, pos: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster ids at candidate positions `pos` (n,) (cand_idx None means position == cluster id)."""
    if cand_idx is None:
        return pos
    ci = cand_idx if rows is None else cand_idx[rows]
    return ci.gather(1, pos[:, None]).squeeze(1)


def _dense(cand_dist: torch.Tensor, cand_idx: torch.Tensor | None, k: int) -> torch.Tensor:
    """Candidate distances (n, m) at ids cand_idx (n, m) → dense (n, k), +inf where a centroid is no candidate."""
    if cand_idx is None:
        return cand_dist
    out = torch.full((cand_dist.shape[0], k), float("inf"), dtype=cand_dist.dtype, device=cand_dist.device)
    return out.scatter_(1, cand_idx, cand_dist)


class _Scratch:
    """Named scratch tensors reused from call to call by the fit loop. On CPU a fresh tensor of several MB costs
    page faults on first touch (measured ~0.5 ms per MB on a 2-core VM: more than the arithmetic done in it), so
    the hot loops write their temporaries into these. Where a function takes `scratch=None`: fresh tensors."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        b = self._bufs.get(name)
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            b = self._bufs[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return b[:numel].view(shape)


def _empty(scratch: _Scratch | None, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """scratch.get(...) or a fresh tensor of like's dtype and device."""
    if scratch is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return scratch.get(name, shape, like)


def _group_order(keys: torch.Tensor, groups: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Permutation sorting items by (group, key), ties kept in input order: a stable sort by key, then a stable
    sort by group. keys (n,) float, groups (n,) int64 ≥ 0. On CUDA two torch sorts; on CPU numpy's (torch's CPU
    stable sort of 200k int64 takes ~0.2 s, numpy's radix sort of small ints ~1 ms), same permutation."""
    if keys.is_cuda:
        order = torch.argsort(keys, descending=descending, stable=True)
        return order[torch.argsort(groups[order], stable=True)]
    kn = keys.numpy()
    order = np.argsort(-kn if descending else kn, kind="stable")
    return torch.from_numpy(order[_radix_order(groups.numpy()[order])])


def _radix_order(groups: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative int group ids (a radix sort when they fit in 16 bits)."""
    if groups.size and int(groups.max()) < 1 << 15:
        groups = groups.astype(np.int16)
    return np.argsort(groups, kind="stable")


def _rank_within(keys: torch.Tensor, groups: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Order items by (group, key) (`_group_order`) and return (order, rank of each ordered item within its group).

    No Python loop; ±inf keys sort last / first as usual."""
    n = keys.numel()
    if n == 0:
        e = torch.zeros(0, dtype=torch.long, device=keys.device)
        return e, e
    order = _group_order(keys, groups, descending).to(keys.device)
    g = groups[order]
    cnt = torch.bincount(g)
    start = torch.cumsum(cnt, 0) - cnt  # first position of each group in the order
    return order, torch.arange(n, device=g.device) - start[g]


def _select_by_rank(keys: torch.Tensor, groups: torch.Tensor, quota: torch.Tensor, largest: bool) -> torch.Tensor:
    """`_select_per_group` by sorting: keep the items whose rank within their group (`_rank_within`) < quota."""
    order, rank = _rank_within(keys, groups, descending=largest)
    keep = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    keep[order[rank < quota[groups[order]]]] = True
    return keep


def _select_per_group(keys: torch.Tensor, groups: torch.Tensor, quota: torch.Tensor, largest: bool) -> torch.Tensor:
    """Mask (s,) of the items kept when every group g keeps its quota[g] items of largest (or smallest) key, ties
    going to the earlier item; quota ≤ 0 keeps none. keys (s,) without NaN, groups (s,) int64 < len(quota).

    Same set as `rank < quota[group]` with `_rank_within` (used on CUDA). On CPU only the groups over their quota
    are looked at, each by one numpy partition: the q-th largest key t is the threshold, keys beyond t are kept
    and the earliest items equal to t fill the rest — O(s) instead of two sorts."""
    if keys.is_cuda:
        return _select_by_rank(keys, groups, quota, largest)
    kn, gn, qn = keys.numpy(), groups.numpy(), quota.numpy()
    cnt = np.bincount(gn, minlength=len(qn))
    keep = cnt[gn] <= qn[gn]  # groups within their quota keep every item
    full = np.flatnonzero((cnt > qn) & (qn > 0))
    if full.size:
        order = _radix_order(gn)  # items grouped by group, ascending index within each group
        start = np.cumsum(cnt) - cnt
        for g in full.tolist():
            idx = order[start[g] : start[g] + cnt[g]]
            r, q = kn[idx], int(qn[g])
            if largest:
                t = np.partition(r, r.size - q)[r.size - q]
                sel = r > t
            else:
                t = np.partition(r, q - 1)[q - 1]
                sel = r < t
            sel[np.flatnonzero(r == t)[: q - int(sel.sum())]] = True
            keep[idx] = sel
    return torch.from_numpy(keep)


def _group_kth_sorted(values: torch.Tensor, groups: torch.Tensor, ids: torch.Tensor, kth: torch.Tensor,
                      n_groups: int) -> torch.Tensor:
    """`_group_kth` by sorting the members of the asked groups by (group, value)."""
    asked = torch.zeros(n_groups, dtype=torch.bool, device=values.device)
    asked[ids] = True
    sel = asked[groups].nonzero().squeeze(1)  # members of the asked groups
    vals, g = values[sel], groups[sel]
    order = _group_order(vals, g).to(values.device)
    cnt = torch.bincount(g, minlength=n_groups)[ids]
    starts = torch.cumsum(cnt, 0) - cnt  # ids ascending → segment of ids[t] starts here
    return vals[order][starts + torch.minimum(kth, cnt).clamp_min(1) - 1]


def _group_kth(values: torch.Tensor, groups: torch.Tensor, ids: torch.Tensor, kth: torch.Tensor,
               n_groups: int) -> torch.Tensor:
    """For each group id in `ids` (ascending), the kth-smallest (1-based, clamped to the group's size) of `values`
    over its members. values, groups (s,) with groups < n_groups; every group in `ids` has a member. On CUDA the
    members of the asked groups are sorted by (group, value) (`_group_order`) and each answer is read at its
    offset; on CPU one numpy partition per asked group."""
    if values.is_cuda:
        return _group_kth_sorted(values, groups, ids, kth, n_groups)
    vn, gn = values.numpy(), groups.numpy()
    cnt = np.bincount(gn, minlength=n_groups)
    start = np.cumsum(cnt) - cnt
    order = _radix_order(gn)
    out = np.empty(len(ids), dtype=vn.dtype)
    for t, (j, e) in enumerate(zip(ids.tolist(), kth.tolist())):
        seg = vn[order[start[j] : start[j] + cnt[j]]]
        e = min(max(e, 1), seg.size)
        out[t] = np.partition(seg, e - 1)[e - 1]
    return torch.from_numpy(out)


def _row_kth(g: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """kth[t]-th smallest (1-based) value of row t of g (u, n) → (u,): one topk on CUDA, numpy partition on CPU."""
    n = g.shape[1]
    kth = kth.clamp(1, n)
    if g.is_cuda:
        top = g.topk(int(kth.max()), dim=1, largest=False).values  # (u, max kth) ascending
        return top.gather(1, (kth - 1)[:, None]).squeeze(1)
    gn = g.numpy()
    return torch.tensor([np.partition(gn[t], e - 1)[e - 1] for t, e in enumerate(kth.tolist())], dtype=g.dtype)


# ----------------------------------------------------------------------------------------------------------------
# the balanced assignment step (shared by both backends)
# ----------------------------------------------------------------------------------------------------------------
def _priced_argmin(d: torch.Tensor, prices: torch.Tensor, out: torch.Tensor | None = None):
    """cost = d + λ (n, k) (into `out` when given), each point's cheapest cluster and cost, and the cluster sizes.
    Returns (cost, v0 (n,), a (n,) int64, counts (k,))."""
    cost = torch.add(d, prices, out=out)  # (n, k)
    v0, a = cost.min(1)  # (n,), (n,)
    return cost, v0, a, torch.bincount(a, minlength=d.shape[1])


def _gains(cost: torch.Tensor, v0: torch.Tensor, donors: torch.Tensor, cols: torch.Tensor,
           d_t: torch.Tensor | None = None, prices: torch.Tensor | None = None,
           scratch: _Scratch | None = None) -> torch.Tensor:
    """g[t, i] = cost[i, cols_t] − v0[i] (u, ·) over the points flagged in `donors` (n,) bool. On CUDA only the
    donors' columns (u, s); on CPU all n points with +inf at the others (no kth-smallest changes), read from
    d_t (k, n) = dᵀ when given (cost = d + prices: contiguous rows instead of strided columns), else from cost's
    columns."""
    if cost.is_cuda:
        don = donors.nonzero().squeeze(1)
        return cost[don][:, cols].T.contiguous() - v0[None, don]
    g = _empty(scratch, "gains", (cols.numel(), cost.shape[0]), cost)  # (u, n)
    if d_t is not None:
        torch.index_select(d_t, 0, cols, out=g).add_(prices[cols, None])  # = cost[:, cols]ᵀ
    else:
        torch.index_select(cost.T, 0, cols, out=g)
    return g.sub_(v0[None, :]).masked_fill_(~donors[None, :], float("inf"))


def _price_delta(cost: torch.Tensor, v0: torch.Tensor, best: torch.Tensor, counts: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor, eps: float, d_t: torch.Tensor | None = None, prices: torch.Tensor | None = None,
                 scratch: _Scratch | None = None) -> tuple[torch.Tensor, bool]:
    """The undamped Jacobi step δ (k,) of `dual_step` from its `_priced_argmin`; (δ, counts within bounds).
    d_t (k, n) = dᵀ and the prices of cost = d + prices, optional: a faster source of cost's columns on CPU."""
    k = cost.shape[1]
    excess, deficit = counts - hi, lo - counts
    is_over, is_under = excess > 0, deficit > 0  # (k,)
    over, under = is_over.nonzero().squeeze(1), is_under.nonzero().squeeze(1)
    delta = torch.zeros(k, dtype=cost.dtype, device=cost.device)
    if (over.numel() == 0 and under.numel() == 0) or k < 2:
        return delta, True
    if over.numel() and over.numel() < k:  # λ_j += e_j-th smallest regret of its members
        sel = is_over[best].nonzero().squeeze(1)  # members of overfull clusters
        open_ = (~is_over).nonzero().squeeze(1)
        alt = torch.index_select(cost, 1, open_, out=_empty(scratch, "open", (cost.shape[0], open_.numel()), cost))
        alt = alt.amin(1)[sel]  # (s,) cost of the best cluster that is not overfull
        kv = _group_kth(alt - v0[sel], best[sel], over, excess[over], k)
        delta[over] = torch.nan_to_num(kv, posinf=0.0) + eps
    if under.numel() and under.numel() < k:  # λ_j −= f_j-th smallest gain among points of other clusters
        g = _gains(cost, v0, ~is_under[best], under, d_t, prices, scratch)  # (u, ·) over the points that may move
        kv = _row_kth(g, deficit[under])  # (u,)
        if not bool(torch.isfinite(kv).all()):  # fewer finite gains than needed: take the largest finite one
            fin_max = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).amax(1)
            kv = torch.where(torch.isfinite(kv), kv, fin_max)
        delta[under] = -(kv + eps)
    return delta, False


def dual_step(
    d: torch.Tensor, prices: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """One Jacobi step of dual (price) ascent for the capacitated assignment; no loop over points.

    d (n, k) squared distances (+inf: not a candidate), prices λ (k,), size bounds lo, hi (k,) int64. Every point
    takes a(i) = argmin_j d_ij + λ_j. Let O (U) be the clusters above hi (below lo). For j ∈ O with
    e_j = count_j − hi_j, λ_j rises by the e_j-th smallest regret min_{l∉O} (d_il + λ_l) − (d_ij + λ_j) among its
    members: the coordinate-wise optimum of the dual, at which exactly e_j of them would rather move to a cluster
    that can take them (Bertsekas 1988, auction; Tavenard et al. 2011 for k-means). For j ∈ U with
    f_j = lo_j − count_j, λ_j falls by the f_j-th smallest gain d_ij + λ_j − min_l (d_il + λ_l) among the points
    of clusters ∉ U. (Regrets towards other overfull clusters, or gains from other underfull ones, would let two
    neighbouring overfull clusters raise their prices in lockstep and never shed a point.) All clusters move at
    once, so callers damp the step (λ += damp·δ). The e-th smallest values: a sort on CUDA, a numpy partition per
    cluster on CPU (`_group_kth`, `_row_kth`).
    Returns (a (n,) int64 under the input prices, counts (k,), δ (k,) undamped step, feasible: counts within bounds).
    """
    cost, v0, best, counts = _priced_argmin(d, prices)
    delta, feasible = _price_delta(cost, v0, best, counts, lo, hi, eps)
    return best, counts, delta, feasible


def relaxed_prices(
    d: torch.Tensor, prices: torch.Tensor, damp: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, max_steps: int,
    eps: float, slack: float = _RELAX_SLACK, scratch: _Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual prices for the Lloyd iterations before the exact ones: up to `max_steps` `dual_step`s (at least one),
    warm-started from the previous iteration's prices, stopping once the sizes are within the bounds widened by
    `slack` (lo·(1−slack), hi·(1+slack)). d (n, k) is a fixed random sample of the fitted points, lo, hi the bounds
    for that many points. Per-cluster step sizes `damp` (k,) (state kept across calls, as in Rprop, Riedmiller &
    Braun 1993): a cluster whose violation changed sign since the step before halves its step, otherwise it
    grows ×1.5 up to 1/2 — Jacobi steps on clusters that share one dense blob otherwise overshoot back and forth.
    Returns (prices (k,), damp (k,)) after the last step (keeping instead the best prices tried was measured
    worse on CPU: 1M × 100 mixture, k = 64, seeds 0–2, inertia 122.6–125.8 vs 120.1–123.1, bench/RESULTS.md); the iteration then assigns every
    point to argmin_j d_ij + λ_j with no exact repair (`capped_assign`): sizes are close to, not always within,
    the bounds. Only the final assignments (`balanced_assign`) must be exact; the means of a nearly balanced
    partition are as good a centroid step (bench/RESULTS.md)."""
    lo_r, hi_r = (lo.double() * (1 - slack)).floor().long(), (hi.double() * (1 + slack)).ceil().long()
    last = torch.zeros_like(prices)  # sign of the last step per cluster
    buf = _empty(scratch, "cost", d.shape, d)
    d_t = None if d.is_cuda else _empty(scratch, "d_t", d.shape[::-1], d).copy_(d.T)  # (k, n) for `_gains`
    for s in range(max(1, max_steps)):
        cost, v0, a, counts = _priced_argmin(d, prices, out=buf)
        delta, feasible = _price_delta(cost, v0, a, counts, lo, hi, eps, d_t, prices, scratch)
        if feasible or (s > 0 and bool(((counts >= lo_r) & (counts <= hi_r)).all())):
            break  # the prices that gave these sizes are good enough
        sign = torch.sign(delta)
        flip = sign * last < 0
        damp = torch.where(flip, damp * 0.5, torch.where(sign != 0, (damp * 1.5).clamp_max(_DAMP), damp))
        prices = prices + damp * delta
        last = torch.where(sign != 0, sign, last)
    return prices, damp


def capped_assign(d: torch.Tensor, prices: torch.Tensor, hi: torch.Tensor, overwrite: bool = False,
                  scratch: _Scratch | None = None) -> torch.Tensor:
    """One vectorised round of capacity-capped assignment, for the Lloyd iterations before the exact ones.

    d (n, k), prices (k,), hi (k,); overwrite=True reuses d's memory for d + prices. Every point takes
    argmin_j d_ij + λ_j; a cluster j with e_j = count_j − hi_j > 0 keeps its hi_j members of largest regret (cost
    of the best cluster that is not overfull minus own cost; ties: the earlier point) and sends the other e_j to
    that best cluster that is not overfull — no further rounds, so those may end a little above hi. This stops one
    cluster from swallowing a neighbour's points (two clusters on one dense blob would otherwise get the same
    points, the same mean, and stay identical). Returns a (n,) int64."""
    n, k = d.shape
    cost = d.add_(prices) if overwrite else d + prices  # (n, k)
    own, best = cost.min(1)  # (n,)
    counts = torch.bincount(best, minlength=k)
    is_over = counts > hi  # (k,)
    if not bool(is_over.any()) or bool(is_over.all()):
        return best
    sel = is_over[best].nonzero().squeeze(1)  # members of overfull clusters
    rows = torch.index_select(cost, 0, sel, out=_empty(scratch, "rows", (sel.numel(), k), cost))  # (s, k)
    alt_v = rows.masked_fill_(is_over[None, :], float("inf")).amin(1)  # (s,) best cost elsewhere
    keep = _select_per_group(alt_v - own[sel], best[sel], hi, largest=True)  # largest regret stays
    moved = sel[~keep]
    best[moved] = cost[moved].masked_fill_(is_over[None, :], float("inf")).argmin(1)
    return best


def _greedy_capacity(cost: torch.Tensor, remaining: torch.Tensor, scratch: _Scratch | None = None) -> torch.Tensor:
    """Greedy capacity-constrained assignment by regret (deferred acceptance, accept-final).

    cost (n, k) price-adjusted costs (+inf: not allowed; overwritten); remaining (k,) free slots (updated in
    place). Each round every open point proposes to its cheapest cluster with a free slot; a cluster with more
    proposals than slots accepts those with the largest regret (second-cheapest minus cheapest open cost: the
    points that lose most by going elsewhere, Vogel's rule; ties: the earlier point) and is then full. ≤ k+1
    rounds, each over the still open points only. Returns assign (n,) int64, −1 where every allowed cluster filled
    up.
    """
    n, k = cost.shape
    dev = cost.device
    assign = torch.full((n,), -1, dtype=torch.long, device=dev)
    active = torch.arange(n, device=dev)
    masked = torch.zeros(k, dtype=torch.bool, device=dev)  # columns already set to +inf in c
    c, rnd = cost, 0
    while active.numel():
        full = remaining <= 0  # (k,)
        if bool((full & ~masked).any()):
            c.masked_fill_(full[None, :], float("inf"))  # (a, k)
            masked |= full
        if k < 2:
            v0, p0 = c[:, 0], torch.zeros(c.shape[0], dtype=torch.long, device=dev)
            regret = torch.full_like(v0, float("inf"))
        else:
            if c.is_cuda:
                v, p = c.topk(2, dim=1, largest=False)  # (a, 2)
                v0, p0, v1 = v[:, 0], p[:, 0], v[:, 1]
            else:  # a CPU topk over rows of k is 3× slower than min + masked min
                v0, p0 = c.min(1)
                v1 = _empty(scratch, "second", c.shape, c).copy_(c).scatter_(1, p0[:, None], float("inf")).amin(1)
            regret = torch.nan_to_num(v1 - v0, nan=0.0, posinf=float("inf"))
        ok = torch.isfinite(v0)  # (a,) points that still have an open cluster
        prop = torch.where(ok, p0, torch.zeros_like(p0))  # (a,)
        demand = torch.bincount(prop[ok], minlength=k)
        over = demand > remaining  # (k,)
        accept = ok & ~over[prop]
        contested = (ok & over[prop]).nonzero().squeeze(1)
        if contested.numel():
            won = _select_per_group(regret[contested], prop[contested], remaining, largest=True)
            accept[contested[won]] = True
        assign[active[accept]] = prop[accept]
        remaining -= torch.bincount(prop[accept], minlength=k)
        keep = ok & ~accept  # rejected: the cluster they asked is now full, so they ask another next round
        if not bool(keep.any()):
            break  # the rest were accepted or have no open cluster left (assign −1)
        keep = keep.nonzero().squeeze(1)
        rows = _empty(scratch, f"greedy{rnd % 2}", (keep.numel(), k), c)  # never the buffer c lives in
        active, c = active[keep], torch.index_select(c, 0, keep, out=rows)
        rnd += 1
    return assign


def balanced_assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    cand_dist: torch.Tensor,
    cand_idx: torch.Tensor | None,
    lo: torch.Tensor,
    hi: torch.Tensor,
    prices: torch.Tensor,
    price_steps: int = 2,
    x2: torch.Tensor | None = None,
    scratch: _Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign n points to k clusters with lo_j ≤ |cluster j| ≤ hi_j exactly, minimising Σ ‖x_i − c_a(i)‖².

    Inputs: x (n, d) and centroids (k, d) float32 on one device; cand_dist (n, m) squared distances to each point's
    m candidate centroids, cand_idx (n, m) their ids (None: all k, column j = cluster j); lo, hi (k,) int64 size
    bounds with Σlo ≤ n ≤ Σhi; prices (k,) float32 warm-start dual prices. Returns (assign (n,) int64,
    dist (n,) float32 squared distance to the assigned centroid, prices (k,)).

    The capacitated assignment LP  min Σ_ij d_ij z_ij  s.t. Σ_j z_ij = 1, lo_j ≤ Σ_i z_ij ≤ hi_j  has the dual
    max Σ_i min_j (d_ij + λ_j) − Σ_j (λ_j⁺ hi_j − λ_j⁻ lo_j): with the right prices λ each point simply takes
    argmin_j (d_ij + λ_j). Three steps:
      1. If the nearest-centroid assignment already satisfies the bounds it is optimal (λ = 0): return it.
      2. `price_steps` damped Jacobi steps of dual ascent (`dual_step`), warm-started from `prices`.
      3. Exact repair: greedy capacity assignment on the price-adjusted costs (`_greedy_capacity`, largest regret
         first; points whose m candidates all filled up fall back to all k centroids), then every cluster below lo_j
         pulls the points whose move costs least, d(x, c_j) − d(x, c_a(x)), from clusters above their own lo.
    After step 3 the bounds hold exactly, whatever the prices did. No Python loop runs over points; `BalancedKMeans`
    calls this once per fit (the last assignment) and once per batch in `assign_balanced`.
    """
    n, k = cand_dist.shape[0], centroids.shape[0]
    d = _dense(cand_dist, cand_idx, k)  # (n, k), +inf outside the candidates
    # 1. nearest centroid
    dist0, near = d.min(1)  # (n,)
    counts = torch.bincount(near, minlength=k)
    if bool(((counts >= lo) & (counts <= hi)).all()):
        return near, dist0, torch.zeros_like(prices)
    # 2. dual ascent on both bounds (`dual_step`)
    eps = 1e-6 * float(dist0.mean()) + 1e-12
    buf = _empty(scratch, "cost", d.shape, d)
    for _ in range(price_steps):
        cost, v0, a, cnt = _priced_argmin(d, prices, out=buf)
        delta, feasible = _price_delta(cost, v0, a, cnt, lo, hi, eps, scratch=scratch)
        if feasible:
            break
        prices = prices + _DAMP * delta
    # 3a. greedy repair with the upper bounds
    remaining = hi.clone()
    assign = _greedy_capacity(torch.add(d, prices, out=buf), remaining, scratch)  # (n,)
    dist = d.gather(1, assign.clamp_min(0)[:, None]).squeeze(1)  # (n,)
    lost = (assign < 0).nonzero().squeeze(1)
    if lost.numel():  # all m candidates full: use every centroid
        dl = _sqdist(x[lost], centroids)  # (r, k)
        a2 = _greedy_capacity(dl + prices[None, :], remaining)
        assign[lost] = a2
        dist[lost] = dl.gather(1, a2.clamp_min(0)[:, None]).squeeze(1)
    # 3b. fill clusters below their lower bound with the cheapest moves from clusters above theirs
    counts = torch.bincount(assign, minlength=k)
    need = lo - counts
    if x2 is None and cand_idx is not None and bool((need > 0).any()):
        x2 = _sqnorms(x)
    for j in (need > 0).nonzero().squeeze(1).tolist():
        nj = int(need[j])
        donor = (counts[assign] > lo[assign]) & (assign != j)  # (n,)
        dj = d[:, j] if cand_idx is None else _sqdist(x, centroids[j : j + 1], x2).squeeze(1)  # (n,)
        inc = (dj - dist).masked_fill(~donor, float("inf"))  # (n,) cost of moving each point to j
        take = min(n, max(4 * nj, 1024))
        while True:  # the cheapest `take` moves usually contain `need` that respect the donors' lower bounds
            cand = inc.topk(take, largest=False).indices  # (take,) ascending increase
            cand = cand[torch.isfinite(inc[cand])]
            order, rank = _rank_within(inc[cand], assign[cand], descending=False)
            ok = rank < (counts - lo)[assign[cand][order]]
            pick = order[ok]
            if pick.numel() >= nj or take >= n:
                break
            take = min(n, take * 4)
        pick = cand[pick[torch.argsort(inc[cand][pick], stable=True)][:nj]]
        counts -= torch.bincount(assign[pick], minlength=k)
        counts[j] += pick.numel()
        dist[pick] += inc[pick]
        assign[pick] = j
    return assign, dist, prices


# ----------------------------------------------------------------------------------------------------------------
# weighted capacities: sizes are sums of per-point weights (e.g. document lengths), not point counts
# ----------------------------------------------------------------------------------------------------------------
def weighted_size_bounds(total: float, max_weight: float, n_clusters: int, balance: float) -> tuple[float, float]:
    """Bounds (lo, hi) on the weighted size W_j = Σ_{a(i)=j} w_i of points with weights w_i > 0 summing to `total`.

    With W̄ = total/k: lo = max(0, min(W̄/√balance, W̄ − w_max)), hi = max(W̄·√balance, W̄ + w_max). Widening by the
    largest weight w_max keeps the bounds feasible whatever the weights (cutting the points, in any order, where
    the running sum crosses a multiple of W̄ gives sizes within W̄ ± w_max) and lets the greedy repair of
    `balanced_assign` meet them exactly: while a point has no cluster with room for it, every cluster is within
    w_max of hi, so Σ_j hi_j ≥ total + k·w_max leaves none unplaced."""
    k = n_clusters
    avg = total / k
    s = math.sqrt(balance)
    return max(0.0, min(avg / s, avg - max_weight)), max(avg * s, avg + max_weight)


def _check_weights(weights: Any, n: int) -> np.ndarray:
    """Per-point weights as float64 (n,), all finite and > 0; InputError otherwise."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise InputError(f"weights has {w.shape[0]} entries for {n} points")
    if not np.isfinite(w).all() or (w <= 0).any():
        raise InputError("weights must be finite and > 0 (a document's weight is its length)")
    return w


def _wcounts(assign: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Weighted cluster sizes (k,) float64: Σ of w over the points of each cluster."""
    return torch.bincount(assign, weights=w.double(), minlength=k)


def _wpriced_argmin(d: torch.Tensor, prices: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None):
    """cost = d + w_i·λ_j (n, k) (λ is a price per unit of weight), each point's cheapest cluster and cost, and the
    weighted sizes. Returns (cost, v0 (n,), a (n,) int64, sizes (k,) float64)."""
    cost = torch.addcmul(d, w[:, None], prices[None, :], out=out)  # (n, k)
    v0, a = cost.min(1)
    return cost, v0, a, _wcounts(a, w, d.shape[1])


def _wsorted_groups(keys: torch.Tensor, w: torch.Tensor, groups: torch.Tensor, descending: bool = False):
    """Items ordered by (group, key) (`_group_order`) → (order, weight of the items of the same group up to and
    including each ordered item (float64), group of each ordered item)."""
    order = _group_order(keys, groups, descending).to(keys.device)
    g = groups[order]
    cw = torch.cumsum(w[order].double(), 0)  # (s,) running weight over all groups
    cnt = torch.bincount(g)
    start = torch.cumsum(cnt, 0) - cnt
    before = torch.where(start > 0, cw[(start - 1).clamp_min(0)], torch.zeros_like(cw[:1]))  # weight of earlier groups
    return order, cw - before[g], g


def _wselect_per_group(keys: torch.Tensor, w: torch.Tensor, groups: torch.Tensor, quota: torch.Tensor,
                       largest: bool) -> torch.Tensor:
    """Mask (s,) of the items kept when every group g keeps its items of largest (or smallest) key for as long as
    their running weight stays ≤ quota[g] (the weighted `_select_per_group`; ties: the earlier item)."""
    keep = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    if keys.numel() == 0:
        return keep
    order, within, g = _wsorted_groups(keys, w, groups, descending=largest)
    keep[order[within <= quota[g].double() * (1 + 1e-12)]] = True
    return keep


def _group_wkth(values: torch.Tensor, w: torch.Tensor, groups: torch.Tensor, ids: torch.Tensor,
                need: torch.Tensor, n_groups: int) -> torch.Tensor:
    """For each group id in `ids` (ascending), the smallest value t of its members such that the members with value
    ≤ t weigh ≥ need (clamped to the group's largest value): the weighted `_group_kth`."""
    asked = torch.zeros(n_groups, dtype=torch.bool, device=values.device)
    asked[ids] = True
    sel = asked[groups].nonzero().squeeze(1)
    order, within, g = _wsorted_groups(values[sel], w[sel], groups[sel])
    vals = values[sel][order]
    out = torch.empty(len(ids), dtype=values.dtype, device=values.device)
    for t, (j, e) in enumerate(zip(ids.tolist(), need.tolist())):  # k groups at most
        seg = (g == j).nonzero().squeeze(1)
        pos = int(torch.searchsorted(within[seg], torch.tensor([e], dtype=torch.float64, device=within.device)))
        out[t] = vals[seg[min(pos, seg.numel() - 1)]]
    return out


def _row_wkth(g: torch.Tensor, w: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Per row t of g (u, n): the smallest value whose row-sorted running weight (weights w (n,)) reaches need[t]
    (the weighted `_row_kth`; +inf when the finite values weigh too little)."""
    order = torch.argsort(g, dim=1, stable=True)  # (u, n)
    cw = torch.cumsum(w.double()[order], 1)  # (u, n)
    pos = torch.searchsorted(cw, need.double()[:, None].contiguous()).clamp_max(g.shape[1] - 1)  # (u, 1)
    return g.gather(1, order.gather(1, pos)).squeeze(1)


def _wprice_delta(cost: torch.Tensor, v0: torch.Tensor, best: torch.Tensor, sizes: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor, eps: float, w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`_price_delta` with weighted sizes: raising λ_j by δ costs member i δ·w_i, so i leaves once δ exceeds its
    regret per unit weight (min_{l∉O} cost_il − cost_ij)/w_i; λ_j of an overfull cluster rises by the smallest such
    regret at which the members leaving weigh ≥ its excess W_j − hi_j, and λ_j of an underfull one falls by the
    smallest gain per unit weight (cost_ij − min_l cost_il)/w_i at which the points joining weigh ≥ lo_j − W_j."""
    k = cost.shape[1]
    excess, deficit = sizes - hi, lo - sizes
    is_over, is_under = excess > 0, deficit > 0
    over, under = is_over.nonzero().squeeze(1), is_under.nonzero().squeeze(1)
    delta = torch.zeros(k, dtype=cost.dtype, device=cost.device)
    if (over.numel() == 0 and under.numel() == 0) or k < 2:
        return delta, True
    if over.numel() and over.numel() < k:
        sel = is_over[best].nonzero().squeeze(1)
        alt = cost[:, (~is_over).nonzero().squeeze(1)].amin(1)[sel]
        kv = _group_wkth((alt - v0[sel]) / w[sel], w[sel], best[sel], over, excess[over], k)
        delta[over] = torch.nan_to_num(kv, posinf=0.0) + eps
    if under.numel() and under.numel() < k:
        don = (~is_under[best]).nonzero().squeeze(1)
        g = (cost[don][:, under].T - v0[None, don]) / w[None, don]  # (u, s) gain per unit weight
        kv = _row_wkth(g, w[don], deficit[under])
        if not bool(torch.isfinite(kv).all()):
            fin_max = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).amax(1)
            kv = torch.where(torch.isfinite(kv), kv, fin_max)
        delta[under] = -(kv + eps)
    return delta, False


def _wrelaxed_prices(d, prices, damp, lo, hi, max_steps, eps, w, slack=_RELAX_SLACK, scratch=None):
    """`relaxed_prices` with weighted sizes (weights w (n,) of the sampled points; lo, hi their weighted bounds)."""
    lo_r, hi_r = lo.double() * (1 - slack), hi.double() * (1 + slack)
    last = torch.zeros_like(prices)
    buf = _empty(scratch, "cost", d.shape, d)
    for s in range(max(1, max_steps)):
        cost, v0, a, sizes = _wpriced_argmin(d, prices, w, out=buf)
        delta, feasible = _wprice_delta(cost, v0, a, sizes, lo, hi, eps, w)
        if feasible or (s > 0 and bool(((sizes >= lo_r) & (sizes <= hi_r)).all())):
            break
        sign = torch.sign(delta)
        flip = sign * last < 0
        damp = torch.where(flip, damp * 0.5, torch.where(sign != 0, (damp * 1.5).clamp_max(_DAMP), damp))
        prices = prices + damp * delta
        last = torch.where(sign != 0, sign, last)
    return prices, damp


def _wcapped_assign(d: torch.Tensor, prices: torch.Tensor, hi: torch.Tensor, w: torch.Tensor,
                    overwrite: bool = False) -> torch.Tensor:
    """`capped_assign` with weighted sizes: an overfull cluster keeps its members of largest regret per unit weight
    while their weight stays ≤ hi_j and sends the others to their best cluster that is not overfull."""
    k = d.shape[1]
    cost = torch.addcmul(d, w[:, None], prices[None, :], out=d if overwrite else None)  # (n, k)
    own, best = cost.min(1)
    is_over = _wcounts(best, w, k) > hi.double()
    if not bool(is_over.any()) or bool(is_over.all()):
        return best
    sel = is_over[best].nonzero().squeeze(1)
    alt_v = cost[sel].masked_fill_(is_over[None, :], float("inf")).amin(1)
    keep = _wselect_per_group((alt_v - own[sel]) / w[sel], w[sel], best[sel], hi, largest=True)
    moved = sel[~keep]
    best[moved] = cost[moved].masked_fill_(is_over[None, :], float("inf")).argmin(1)
    return best


def _wgreedy_capacity(cost: torch.Tensor, remaining: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`_greedy_capacity` with weighted capacities: cost (n, k) (overwritten), remaining (k,) float64 room (updated in
    place), w (n,) weights. Each round every open point proposes to its cheapest cluster with room for it
    (remaining_j ≥ w_i); a cluster asked for more than its room accepts the proposers of largest regret per unit
    weight while they fit. The proposer of largest regret always fits, so every round places a point. Returns
    assign (n,) int64, −1 where no cluster has room left."""
    n, k = cost.shape
    dev = cost.device
    assign = torch.full((n,), -1, dtype=torch.long, device=dev)
    active = torch.arange(n, device=dev)
    wa, c = w.double(), cost
    while active.numel():
        c.masked_fill_(wa[:, None] > remaining[None, :], float("inf"))  # (a, k) no room for the point
        v0, p0 = c.min(1)
        if k < 2:
            regret = torch.full_like(v0, float("inf"))
        else:
            v1 = c.clone().scatter_(1, p0[:, None], float("inf")).amin(1)
            regret = torch.nan_to_num((v1 - v0) / wa.to(v0.dtype), nan=0.0, posinf=float("inf"))
        ok = torch.isfinite(v0)
        prop = torch.where(ok, p0, torch.zeros_like(p0))
        over = torch.bincount(prop[ok], weights=wa[ok], minlength=k) > remaining
        accept = ok & ~over[prop]
        contested = (ok & over[prop]).nonzero().squeeze(1)
        if contested.numel():
            won = _wselect_per_group(regret[contested], wa[contested], prop[contested], remaining, largest=True)
            accept[contested[won]] = True
        assign[active[accept]] = prop[accept]
        remaining -= torch.bincount(prop[accept], weights=wa[accept], minlength=k)
        keep = (ok & ~accept).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        active, c, wa = active[keep], c[keep], wa[keep]
    return assign


def _wbalanced_assign(x, centroids, cand_dist, cand_idx, lo, hi, prices, w, price_steps=2, x2=None):
    """`balanced_assign` with weighted sizes: lo_j ≤ Σ_{a(i)=j} w_i ≤ hi_j (bounds from `weighted_size_bounds`),
    minimising Σ ‖x_i − c_a(i)‖². The LP's dual now prices capacity per unit of weight: each point takes
    argmin_j d_ij + w_i·λ_j. Same three steps: nearest centroid if feasible; damped dual steps (`_wprice_delta`);
    exact repair by the weighted greedy (`_wgreedy_capacity`), then every cluster below lo_j pulls the points of
    cheapest increase per unit weight (d(x, c_j) − d(x, c_a(x)))/w from clusters that stay ≥ their own lo."""
    n, k = cand_dist.shape[0], centroids.shape[0]
    lo, hi = lo.double(), hi.double()
    d = _dense(cand_dist, cand_idx, k)
    dist0, near = d.min(1)
    sizes = _wcounts(near, w, k)
    if bool(((sizes >= lo) & (sizes <= hi)).all()):
        return near, dist0, torch.zeros_like(prices)
    eps = (1e-6 * float(dist0.mean()) + 1e-12) / float(w.mean())
    for _ in range(price_steps):
        cost, v0, a, sz = _wpriced_argmin(d, prices, w)
        delta, feasible = _wprice_delta(cost, v0, a, sz, lo, hi, eps, w)
        if feasible:
            break
        prices = prices + _DAMP * delta
    remaining = hi.clone()
    assign = _wgreedy_capacity(torch.addcmul(d, w[:, None], prices[None, :]), remaining, w)
    dist = d.gather(1, assign.clamp_min(0)[:, None]).squeeze(1)
    lost = (assign < 0).nonzero().squeeze(1)
    if lost.numel():  # all m candidates full: use every centroid
        dl = _sqdist(x[lost], centroids)
        a2 = _wgreedy_capacity(torch.addcmul(dl, w[lost][:, None], prices[None, :]), remaining, w[lost])
        assign[lost] = a2
        dist[lost] = dl.gather(1, a2.clamp_min(0)[:, None]).squeeze(1)
    if bool((assign < 0).any()):  # unreachable with weighted_size_bounds; keep every point placed regardless
        stray = (assign < 0).nonzero().squeeze(1)
        dist[stray], assign[stray] = _sqdist(x[stray], centroids).min(1)
    sizes = _wcounts(assign, w, k)
    if x2 is None and cand_idx is not None and bool((lo - sizes > 0).any()):
        x2 = _sqnorms(x)
    wd = w.double()
    for j in (lo - sizes > 0).nonzero().squeeze(1).tolist():
        need = float(lo[j] - sizes[j])
        slack = sizes - lo  # (k,) weight each cluster can give away
        donor = (assign != j) & (slack[assign] >= wd)
        dj = d[:, j] if cand_idx is None else _sqdist(x, centroids[j : j + 1], x2).squeeze(1)
        inc = ((dj - dist) / w).masked_fill(~donor, float("inf"))  # (n,) cost per unit weight of moving to j
        cand = torch.isfinite(inc).nonzero().squeeze(1)
        if cand.numel() == 0:
            continue
        order, within, g = _wsorted_groups(inc[cand], w[cand], assign[cand])
        ok = cand[order[within <= slack[g] * (1 + 1e-12)]]  # donors stay ≥ their own lower bound
        ok = ok[torch.argsort(inc[ok], stable=True)]
        cw = torch.cumsum(wd[ok], 0)
        pick = ok[: int(torch.searchsorted(cw, torch.tensor([need], dtype=torch.float64, device=cw.device))) + 1]
        sizes -= torch.bincount(assign[pick], weights=wd[pick], minlength=k)
        sizes[j] += wd[pick].sum()
        dist[pick] = dj[pick]
        assign[pick] = j
    return assign, dist, prices


# ----------------------------------------------------------------------------------------------------------------
# backends: squared distances to the centroids
# ----------------------------------------------------------------------------------------------------------------
class _TorchSearch:
    """Squared distances by one GEMM per batch (CUDA or CPU); candidates are all k centroids."""

    name = "torch"

    def __init__(self, centroids: torch.Tensor):
        self.centroids = centroids  # (k, d)

    def candidates(self, x: torch.Tensor, x2: torch.Tensor | None = None, out: torch.Tensor | None = None):
        """(distances (n, k), None); written into `out` (n, k) when given."""
        return _sqdist(x, self.centroids, x2, out), None  # (n, k), None

    def full(self, x: torch.Tensor) -> torch.Tensor:
        return _sqdist(x, self.centroids)


class _FaissSearch:
    """Squared distances with faiss: on CPU all k by `faiss.pairwise_distances` unless k > 4·n_candidates (then a
    top-m IndexFlatL2 search); on GPU a top-m search with a GPU flat index."""

    name = "faiss"

    def __init__(self, centroids: torch.Tensor, n_candidates: int, gpu: bool):
        import faiss

        c = np.ascontiguousarray(centroids.detach().cpu().numpy(), dtype=np.float32)
        k, d = c.shape
        index = faiss.IndexFlatL2(d)
        if gpu:
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        index.add(c)
        self.index, self.k, self.m, self.device = index, k, min(k, n_candidates), centroids.device
        self.c, self.gpu = c, gpu

    def _search(self, x: torch.Tensor, m: int):
        xn = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        dist, idx = self.index.search(xn, m)  # (n, m) ascending squared distances
        return (torch.from_numpy(np.maximum(dist, 0)).to(self.device),
                torch.from_numpy(idx.astype(np.int64)).to(self.device))

    def candidates(self, x: torch.Tensor, x2: torch.Tensor | None = None, out: torch.Tensor | None = None):
        """(top-m distances (n, m), their ids (n, m)) or (all distances (n, k), None), the latter written into
        `out` (n, k) when given."""
        if self.gpu or 4 * self.m < self.k:
            return self._search(x, self.m)  # (n, m) top-m, (n, m) ids
        return self.full(x, out), None  # a top-m heap over ≥ k/4 of the k centroids costs more than all distances

    def full(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if not self.gpu:  # faiss' blocked GEMM (`faiss.pairwise_distances`): as fast as a top-1 search on CPU
            import faiss

            xn = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
            if out is None or out.device.type != "cpu":
                out = torch.empty((xn.shape[0], self.k), dtype=torch.float32)
            d = out.numpy()  # (n, k)
            for s in range(0, xn.shape[0], 8192):  # row blocks whose (b, k) output stays in cache: ~1.4× faster
                xb, db = xn[s : s + 8192], d[s : s + 8192]
                faiss.pairwise_L2sqr(xn.shape[1], xb.shape[0], faiss.swig_ptr(xb), self.k, faiss.swig_ptr(self.c),
                                     faiss.swig_ptr(db))
            np.maximum(d, 0, out=d)
            return out.to(self.device)
        dist, idx = self._search(x, self.k)
        out = torch.empty_like(dist)
        out.scatter_(1, idx, dist)  # back to cluster order
        return out


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# ----------------------------------------------------------------------------------------------------------------
# clusterers
# ----------------------------------------------------------------------------------------------------------------
class _KMeansBase:
    """Shared parts: backend/device choice, k-means++ init, streaming predict, save/load."""

    algorithm = "base"

    def __init__(
        self,
        n_clusters: int,
        n_iter: int = 20,
        backend: str = "auto",
        device: str = "auto",
        seed: int = 0,
        fit_sample: int = 1_000_000,
        n_candidates: int = 32,
        batch_size: int | None = None,
        verbose: bool = True,
    ):
        if int(n_clusters) < 1:
            raise InputError(f"n_clusters must be ≥ 1, got {n_clusters}")
        if backend not in ("auto", "faiss", "torch"):
            raise InputError(f"backend must be auto, faiss or torch, got {backend!r}")
        if int(n_iter) < 0:
            raise InputError(f"n_iter must be ≥ 0, got {n_iter}")
        if int(fit_sample) < 1:
            raise InputError(f"fit_sample must be ≥ 1, got {fit_sample}")
        self.n_clusters, self.n_iter, self.seed = int(n_clusters), int(n_iter), int(seed)
        self.fit_sample, self.n_candidates, self.batch_size = int(fit_sample), int(n_candidates), batch_size
        self.backend_request, self.device_request, self.verbose = backend, str(device), verbose
        self.centroids: np.ndarray | None = None  # (k, d) float32
        self.labels_: np.ndarray | None = None  # (n_fit,) cluster of each fitted (sampled) point
        self.sizes_: list[int] | None = None
        self.inertia_: float | None = None
        self.fit_seconds_: float | None = None
        self._resolve()

    # -- device / backend ------------------------------------------------------------------------------------
    def _resolve(self) -> None:
        from corpus.device import resolve_device

        self.device = resolve_device(self.device_request).device
        backend = self.backend_request
        if backend == "auto":
            if self.device.type == "cuda":
                backend = "torch"
            else:
                try:
                    import faiss  # noqa: F401

                    backend = "faiss"
                except ImportError:
                    backend = "torch"
        if backend == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise InputError("backend='faiss' needs faiss: pip install faiss-cpu (or cbtm[gpu]), "
                                 "or use backend='torch'") from None
            if self.device.type == "cuda" and not faiss_has_gpu():
                raise InputError(f"backend='faiss' with device={self.device_request!r} needs a faiss GPU build: "
                                 "pip install 'cbtm[gpu]' (faiss-gpu), or use backend='torch' on the GPU")
        self.backend = backend

    def _searcher(self, centroids: torch.Tensor):
        if self.backend == "faiss":
            return _FaissSearch(centroids, self.n_candidates, gpu=self.device.type == "cuda")
        return _TorchSearch(centroids)

    def _batch_rows(self, dim: int) -> int:
        if self.batch_size:
            return int(self.batch_size)
        return max(1024, _BATCH_BYTES // (4 * (dim + self.n_clusters)))

    def _centroids_t(self) -> torch.Tensor:
        if self.centroids is None:
            raise InputError(f"{type(self).__name__} is not fitted yet: call fit(x) or load(dir) first")
        return torch.from_numpy(self.centroids).to(self.device)

    def _check_dim(self, x: Any) -> None:
        if x.shape[1] != self.centroids.shape[1]:
            raise InputError(f"x has dimension {x.shape[1]} but the centroids have {self.centroids.shape[1]} "
                             "(embeddings from a different embedder?)")

    # -- fitting helpers ---------------------------------------------------------------------------------------
    def _fit_sample(self, x: Any) -> tuple[torch.Tensor, np.ndarray]:
        x = _check_matrix(x)
        n = x.shape[0]
        if n == 0:
            raise InputError("cannot cluster an empty matrix (0 documents)")
        if self.n_clusters > n:
            raise InputError(f"n_clusters={self.n_clusters} is larger than the number of documents ({n})")
        rng = np.random.default_rng(self.seed)
        idx = np.arange(n) if n <= self.fit_sample else np.sort(rng.choice(n, self.fit_sample, replace=False))
        if n > self.fit_sample:
            log.info("fitting on a sample of %d of %d documents", self.fit_sample, n)
        return _take_rows(x, idx, self.device), idx

    def _init_centroids(self, xs: torch.Tensor) -> torch.Tensor:
        """Greedy k-means++ (Arthur & Vassilvitskii 2007; 2+log k local trials as in scikit-learn) on a seeded
        subsample of ≤ max(10k, 40k) points, in numpy on the CPU so every backend starts from the same centroids."""
        k = self.n_clusters
        rng = np.random.default_rng(self.seed + 1)
        n = xs.shape[0]
        s = min(n, max(10_000, 40 * k))
        sub = np.sort(rng.choice(n, s, replace=False)) if s < n else np.arange(n)
        pts = xs[torch.as_tensor(sub, device=xs.device)].cpu().numpy().astype(np.float64)  # (s, d)
        p2 = (pts * pts).sum(1)
        trials = 2 + int(math.log(k)) if k > 1 else 1
        chosen = [int(rng.integers(s))]
        closest = np.maximum(p2 - 2 * pts @ pts[chosen[0]] + p2[chosen[0]], 0)  # (s,)
        for _ in range(1, k):
            total = closest.sum()
            if total <= 0:  # fewer distinct points than clusters: duplicates are fine
                cand = rng.integers(s, size=trials)
            else:
                cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * total).clip(max=s - 1)
            dc = np.maximum(p2[None, :] - 2 * pts[cand] @ pts.T + p2[cand, None], 0)  # (trials, s)
            pot = np.minimum(closest[None, :], dc).sum(1)
            best = int(np.argmin(pot))
            chosen.append(int(cand[best]))
            closest = np.minimum(closest, dc[best])
        return torch.from_numpy(pts[chosen].astype(np.float32)).to(xs.device)  # (k, d)

    @staticmethod
    def _update(xs: torch.Tensor, assign: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroid step c_j = mean{x_i : a(i) = j}; empty clusters keep their old centroid. Returns (c, counts).

        The sums are the sparse one-hot product S = A·X, A (k, n) with A[a(i), i] = 1: on CPU scipy's CSC product
        (one pass adding each row to its cluster's sum, as faiss does; a dense one-hot GEMM costs k× the adds), on
        CUDA a dense one-hot GEMM in chunks (deterministic, unlike index_add_'s atomics)."""
        k, d = old.shape
        n = xs.shape[0]
        counts = torch.bincount(assign, minlength=k)  # (k,)
        if xs.device.type == "cpu":
            idx = np.int32 if n < 1 << 31 else np.int64
            onehot = scipy.sparse.csc_array((np.ones(n, np.float32), assign.numpy().astype(idx),
                                             np.arange(n + 1, dtype=idx)), shape=(k, n))  # (k, n)
            sums = torch.from_numpy(np.asarray(onehot @ xs.numpy(), dtype=np.float32))  # (k, d)
        else:
            sums = torch.zeros((k, d), dtype=torch.float32, device=xs.device)
            step = max(1, (1 << 26) // k)
            for s in range(0, n, step):
                a = assign[s : s + step]
                onehot = torch.zeros((k, a.numel()), dtype=torch.float32, device=xs.device)
                onehot.scatter_(0, a[None, :], 1.0)
                sums += onehot @ xs[s : s + step]  # (k, d)
        new = sums / counts.clamp_min(1)[:, None].to(torch.float32)
        return torch.where((counts > 0)[:, None], new, old), counts

    def _finish_fit(self, c: torch.Tensor, assign: torch.Tensor, dist: torch.Tensor, t0: float) -> None:
        k = self.n_clusters
        self.centroids = c.detach().cpu().numpy().astype(np.float32)
        self.labels_ = assign.cpu().numpy()
        self.sizes_ = torch.bincount(assign, minlength=k).cpu().tolist()
        self.inertia_ = float(dist.double().mean())
        self.fit_seconds_ = time.perf_counter() - t0
        if self.verbose:
            log.info("%s: k=%d sizes %d..%d, inertia %.5f, %.2fs (%s on %s)", self.algorithm, k, min(self.sizes_),
                     max(self.sizes_), self.inertia_, self.fit_seconds_, self.backend, self.device)

    def _log_iter(self, it: int, counts: torch.Tensor, t0: float) -> None:
        if self.verbose and ((it + 1) % 5 == 0 or it + 1 == self.n_iter):
            el = time.perf_counter() - t0
            log.debug("iter %d/%d sizes %d..%d (%.1f it/s)", it + 1, self.n_iter, int(counts.min()),
                      int(counts.max()), (it + 1) / max(el, 1e-9))

    # -- prediction ----------------------------------------------------------------------------------------------
    def _stream(self, x: Any, fn, desc: str) -> None:
        """Call fn(start, stop, xb) for consecutive row batches of x (numpy, memmap or torch)."""
        n = x.shape[0]
        step = self._batch_rows(x.shape[1])
        bar = None
        if self.verbose and n > step:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=desc, unit="doc", mininterval=2.0)
        for s in range(0, n, step):
            e = min(n, s + step)
            fn(s, e, _rows(x, s, e, self.device))
            if bar is not None:
                bar.update(e - s)
        if bar is not None:
            bar.close()

    def predict(self, x: Any, return_distance: bool = False, out_distances: np.ndarray | None = None):
        """Nearest centroid for every row of x (n, dim), streamed in batches (x may be a memory-mapped .npy).

        Returns labels (n,) int64, or (labels, distance (n,) float32 squared distance to that centroid) with
        return_distance; `out_distances` (n, n_clusters) float32, if given (e.g. an open_memmap), receives all
        squared distances."""
        x = _check_matrix(x)
        c = self._centroids_t()
        self._check_dim(x)
        search = self._searcher(c)
        n = x.shape[0]
        labels = np.empty(n, dtype=np.int64)
        dist = np.empty(n, dtype=np.float32)

        def step(s, e, xb):
            if out_distances is not None:
                d = search.full(xb)  # (b, k)
                out_distances[s:e] = d.cpu().numpy()
                v, a = d.min(1)
            else:
                cd, ci = search.candidates(xb)
                v, p = cd.min(1)
                a = _cluster_of(ci, p)
            labels[s:e] = a.cpu().numpy()
            dist[s:e] = v.cpu().numpy()

        self._stream(x, step, "predict")
        return (labels, dist) if return_distance else labels

    def squared_distances(self, x: Any, out: np.ndarray | None = None) -> np.ndarray:
        """All squared distances (n, n_clusters) float32, streamed; written into `out` when given."""
        x = _check_matrix(x)
        if out is None:
            out = np.empty((x.shape[0], self.n_clusters), dtype=np.float32)
        self.predict(x, out_distances=out)
        return out

    # -- persistence ---------------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "n_clusters": self.n_clusters,
            "dim": None if self.centroids is None else int(self.centroids.shape[1]),
            "n_iter": self.n_iter,
            "seed": self.seed,
            "fit_sample": self.fit_sample,
            "backend": self.backend,
            "n_candidates": self.n_candidates,
            "sizes": self.sizes_,
            "inertia": self.inertia_,
            "fit_seconds": self.fit_seconds_,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write `centroids.npy` (k, dim) float32 and `config.json` into out_dir (created; no pickle)."""
        if self.centroids is None:
            raise InputError(f"{type(self).__name__} is not fitted yet: nothing to save")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / "centroids.npy", self.centroids.astype(np.float32))
        extra = self._extra_arrays()
        for name, arr in extra.items():
            np.save(out_dir / f"{name}.npy", arr)
        write_json(out_dir / "config.json", self._config())
        return out_dir

    def _extra_arrays(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def load(cls, in_dir: str | Path, device: str = "auto", backend: str = "auto") -> "_KMeansBase":
        """Load what `save` wrote; returns the class named in config.json (BalancedKMeans, ...)."""
        in_dir = Path(in_dir)
        cfg = read_json(in_dir / "config.json")
        kind = _CLASSES.get(cfg.get("algorithm"))
        if kind is None:
            raise InputError(f"{in_dir / 'config.json'}: unknown clustering algorithm {cfg.get('algorithm')!r}")
        if cls is not _KMeansBase and not issubclass(kind, cls):
            raise InputError(f"{in_dir} holds a {kind.__name__}, not a {cls.__name__}")
        try:
            centroids = np.load(in_dir / "centroids.npy", allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {in_dir / 'centroids.npy'}: {e}") from None
        if centroids.ndim != 2 or centroids.shape[0] != cfg["n_clusters"]:
            raise InputError(f"{in_dir / 'centroids.npy'} has shape {centroids.shape}, expected "
                             f"({cfg['n_clusters']}, dim)")
        obj = kind._from_config(cfg, device=device, backend=backend)
        obj.centroids = centroids
        obj.sizes_, obj.inertia_, obj.fit_seconds_ = cfg.get("sizes"), cfg.get("inertia"), cfg.get("fit_seconds")
        obj._load_extra(in_dir)
        return obj

    @classmethod
    def _from_config(cls, cfg: dict, device: str, backend: str):
        return cls(cfg["n_clusters"], n_iter=cfg.get("n_iter", 20), backend=backend, device=device,
                   seed=cfg.get("seed", 0), fit_sample=cfg.get("fit_sample", 1_000_000),
                   n_candidates=cfg.get("n_candidates", 32))

    def _load_extra(self, in_dir: Path) -> None:
        pass


class BalancedKMeans(_KMeansBase):
    """Balanced k-means: Lloyd iterations whose assignment step keeps cluster sizes within `balance`.

    Objective: min Σ_i ‖x_i − c_a(i)‖²  s.t.  lo ≤ |{i : a(i)=j}| ≤ hi for every cluster j, with (lo, hi) from
    `size_bounds` (max/min ≤ balance; balance=1 → exactly ⌊n/k⌋/⌈n/k⌉). Each of the n_iter Lloyd iterations:
    squared distances to the centroids (torch GEMM, or faiss) into one reused (n, k) buffer, an assignment, then
    the mean update. The assignment of the first n_iter − exact_iters iterations is approximate: ≤ 4 damped dual
    (price) steps (`relaxed_prices`, warm-started, on a fixed sample of max(16384, 1024·k) points), then one
    vectorised capped assignment (`capped_assign`: argmin of distance + price, overfull clusters shed their
    lowest-regret points); sizes are near, not within, the bounds. The last
    `exact_iters` iterations (default 2: fewer strand centroids on skewed data) and the final assignment w.r.t.
    the final centroids run the exact `balanced_assign` (dual steps + greedy repair), so the fitted sizes meet
    the bounds exactly. On CPU the per-cluster order statistics are numpy partitions and the big temporaries
    live in reused buffers (`_Scratch`); they select the same points as the sorting (CUDA) path.

    c-BTM (Gururangan et al. 2023) uses the auction assignment of BASE layers (Lewis et al. 2021), which solves the
    same problem by letting clusters bid for their n/k best points; here the dual is solved per cluster in closed
    form (e-th smallest regret), which costs a few passes over the (n, k) cost matrix instead of hundreds of
    auction rounds — see bench/RESULTS.md for the measured comparison.

    With per-point weights (fit(x, weights)), the capacities are weighted: lo ≤ Σ_{a(i)=j} w_i ≤ hi
    (`weighted_size_bounds`), every step above runs its weighted twin (prices per unit of weight, `_w*`
    functions), and without weights the unit-weight code runs unchanged.

    fit(x) fits on a seeded sample of ≤ fit_sample rows; predict(x) streams nearest-centroid assignment;
    assign_balanced(x) streams the capacity-aware assignment of a whole corpus (sizes within `balance` at
    corpus scale, not only on the sample).
    """

    algorithm = "balanced"

    def __init__(self, n_clusters: int, n_iter: int = 20, balance: float = 1.02, backend: str = "auto",
                 device: str = "auto", seed: int = 0, fit_sample: int = 1_000_000, n_candidates: int = 32,
                 price_steps: int = 2, batch_size: int | None = None, verbose: bool = True, exact_iters: int = 2):
        if not (balance >= 1.0):
            raise InputError(f"balance is the allowed max/min cluster-size ratio and must be ≥ 1, got {balance}")
        self.balance, self.price_steps = float(balance), int(price_steps)
        self.exact_iters = max(0, int(exact_iters))  # final Lloyd iterations that use the exact balanced_assign
        self.prices_: np.ndarray | None = None  # (k,) final dual prices, a warm start for assign_balanced
        self.weighted = False  # fitted with per-point weights: prices_ are per unit of weight
        self.weighted_sizes_: list[float] | None = None  # weighted sizes of the fitted sample
        self.max_weight_: float | None = None  # largest weight seen in fit (widens the weighted bounds)
        super().__init__(n_clusters, n_iter=n_iter, backend=backend, device=device, seed=seed,
                         fit_sample=fit_sample, n_candidates=n_candidates, batch_size=batch_size, verbose=verbose)

    def fit(self, x: Any, weights: Any = None) -> "BalancedKMeans":
        """Fit on x (n, dim) numpy/memmap/torch, float16/32. Sets centroids, labels_ (of the sample), sizes_,
        inertia_ (mean squared distance of the sample to its assigned centroid), prices_.

        weights (n,) > 0, optional: per-point weights (e.g. document lengths); the balance then holds for the
        weighted sizes Σ_{a(i)=j} w_i (`weighted_size_bounds`, weighted_sizes_) instead of point counts, with
        prices per unit of weight. The centroids stay plain means of their points."""
        t0 = time.perf_counter()
        if weights is not None:
            weights = _check_weights(weights, _check_matrix(x).shape[0])
        xs, idx = self._fit_sample(x)  # (n, d) float32 on device
        n, k = xs.shape[0], self.n_clusters
        x2 = _sqnorms(xs)  # (n,)
        c = self._init_centroids(xs)  # (k, d)
        w = None if weights is None else torch.from_numpy(weights[idx].astype(np.float32)).to(self.device)  # (n,)
        self.weighted = w is not None
        prices = torch.zeros(k, dtype=torch.float32, device=self.device)
        # intermediate dual steps on a fixed seeded sample of the fitted points (bounds for that many points)
        ns = min(n, max(16_384, _PRICE_SAMPLE * k))
        sub = None if ns == n else torch.from_numpy(
            np.sort(np.random.default_rng(self.seed + 2).choice(n, ns, replace=False))).to(self.device)
        ws = w if w is None or sub is None else w[sub]
        lo, hi = self._bounds(n, w)
        lo_s, hi_s = self._bounds(ns, ws)
        eps, damp = None, torch.full((k,), _DAMP, device=self.device)
        buf = None  # all k distances (n, k) when the searcher computes them: one buffer for every iteration
        scratch = _Scratch()
        buf_s = None if sub is None else torch.empty((ns, k), dtype=torch.float32, device=self.device)
        for it in range(self.n_iter):
            cd, ci = self._searcher(c).candidates(xs, x2, out=buf)
            buf = cd if ci is None else None
            d = _dense(cd, ci, k)  # (n, k)
            if eps is None:
                eps = 1e-6 * float(d.amin(1).mean()) + 1e-12  # tie-breaking price increment
                if w is not None:
                    eps /= float(w.mean())  # prices are per unit of weight
            if it >= self.n_iter - self.exact_iters:  # last iterations: exact bounds, so no centroid is stranded
                assign, _, prices = self._exact(xs, c, cd, ci, lo, hi, prices, x2, scratch, w)
            elif w is None:
                ds = d if sub is None else torch.index_select(d, 0, sub, out=buf_s)
                prices, damp = relaxed_prices(ds, prices, damp, lo_s, hi_s, _RELAX_STEPS, eps, scratch=scratch)
                assign = capped_assign(d, prices, hi, overwrite=True, scratch=scratch)  # nearly balanced; d spent
            else:
                ds = d if sub is None else torch.index_select(d, 0, sub, out=buf_s)
                prices, damp = _wrelaxed_prices(ds, prices, damp, lo_s, hi_s, _RELAX_STEPS, eps, ws, scratch=scratch)
                assign = _wcapped_assign(d, prices, hi, w, overwrite=True)
            del d, cd, ci
            c, counts = self._update(xs, assign, c)
            self._log_iter(it, counts, t0)
        # the final assignment w.r.t. the final centroids is the only one that must meet the bounds exactly
        cd, ci = self._searcher(c).candidates(xs, x2, out=buf)
        assign, dist, prices = self._exact(xs, c, cd, ci, lo, hi, prices, x2, scratch, w)
        self.prices_ = prices.cpu().numpy().astype(np.float32)
        self.weighted_sizes_ = None if w is None else _wcounts(assign, w, k).cpu().tolist()
        self.max_weight_ = None if weights is None else float(weights.max())
        self._finish_fit(c, assign, dist, t0)
        return self

    def _bounds(self, n: int, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Size bounds (lo, hi) (k,) for n points: counts (`size_bounds`, int64), or weighted sizes
        (`weighted_size_bounds`, float64) when weights w (n,) are given."""
        k = self.n_clusters
        if w is None:
            lo, hi = size_bounds(n, k, self.balance)
            dtype = torch.long
        else:
            lo, hi = weighted_size_bounds(float(w.double().sum()), float(w.max()), k, self.balance)
            dtype = torch.float64
        return (torch.full((k,), lo, dtype=dtype, device=self.device),
                torch.full((k,), hi, dtype=dtype, device=self.device))

    def _exact(self, xs, c, cd, ci, lo, hi, prices, x2=None, scratch=None, w=None):
        """The exact assignment within the bounds: `balanced_assign`, or `_wbalanced_assign` with weights."""
        if w is None:
            return balanced_assign(xs, c, cd, ci, lo, hi, prices, self.price_steps, x2, scratch)
        return _wbalanced_assign(xs, c, cd, ci, lo, hi, prices, w, self.price_steps, x2)

    def assign_balanced(self, x: Any, return_distance: bool = False, out_distances: np.ndarray | None = None,
                        weights: Any = None):
        """Capacity-aware assignment of a whole corpus x (n, dim), streamed in batches.

        After N documents have been assigned, cluster j holds between LO(N) and HI(N) of them (`size_bounds` for
        N): each batch of b rows gets per-cluster bounds lo_j = max(0, LO(N+b) − count_j), hi_j = HI(N+b) −
        count_j and is solved with `balanced_assign`, warm-started from the fitted prices. So the final sizes obey
        the tolerance over the whole corpus. With weights (n,) the same holds for weighted sizes: the bounds are
        `weighted_size_bounds` of the weight assigned so far (widened by the largest weight of x) and each batch
        is solved by the weighted assignment. Returns labels (n,) int64 [, distance (n,) float32]; fills
        out_distances (n, n_clusters) when given."""
        x = _check_matrix(x)
        if weights is not None:
            return self._assign_balanced_weighted(x, _check_weights(weights, x.shape[0]), return_distance,
                                                  out_distances)
        c = self._centroids_t()
        self._check_dim(x)
        k = self.n_clusters
        n = x.shape[0]
        if k > n:
            raise InputError(f"n_clusters={k} is larger than the number of documents to assign ({n})")
        search = self._searcher(c)
        labels = np.empty(n, dtype=np.int64)
        dist = np.empty(n, dtype=np.float32)
        counts = torch.zeros(k, dtype=torch.long, device=self.device)
        prices = torch.from_numpy(self.prices_ if self.prices_ is not None else np.zeros(k, np.float32))
        state = {"prices": prices.to(self.device)}

        def step(s, e, xb):
            lo_n, hi_n = size_bounds(e, k, self.balance)
            lo = (lo_n - counts).clamp_min(0)
            hi = hi_n - counts
            if out_distances is not None:
                cd, ci = search.full(xb), None
                out_distances[s:e] = cd.cpu().numpy()
            else:
                cd, ci = search.candidates(xb)
            a, d, state["prices"] = balanced_assign(xb, c, cd, ci, lo, hi, state["prices"], self.price_steps)
            counts.add_(torch.bincount(a, minlength=k))
            labels[s:e] = a.cpu().numpy()
            dist[s:e] = d.cpu().numpy()

        self._stream(x, step, "assign_balanced")
        return (labels, dist) if return_distance else labels

    def _assign_balanced_weighted(self, x, weights: np.ndarray, return_distance: bool, out_distances):
        c = self._centroids_t()
        self._check_dim(x)
        k, n = self.n_clusters, x.shape[0]
        if k > n:
            raise InputError(f"n_clusters={k} is larger than the number of documents to assign ({n})")
        search = self._searcher(c)
        labels = np.empty(n, dtype=np.int64)
        dist = np.empty(n, dtype=np.float32)
        sizes = torch.zeros(k, dtype=torch.float64, device=self.device)
        cum = np.concatenate([[0.0], np.cumsum(weights)])  # (n + 1,) weight of the first N points
        w_max = float(weights.max())
        warm = self.prices_ is not None and self.weighted  # fitted prices are per unit of weight only if weighted
        state = {"prices": torch.from_numpy(self.prices_ if warm else np.zeros(k, np.float32)).to(self.device)}

        def step(s, e, xb):
            lo_n, hi_n = weighted_size_bounds(float(cum[e]), w_max, k, self.balance)
            lo, hi = (lo_n - sizes).clamp_min(0), hi_n - sizes
            if out_distances is not None:
                cd, ci = search.full(xb), None
                out_distances[s:e] = cd.cpu().numpy()
            else:
                cd, ci = search.candidates(xb)
            wb = torch.from_numpy(weights[s:e].astype(np.float32)).to(self.device)
            a, d, state["prices"] = _wbalanced_assign(xb, c, cd, ci, lo, hi, state["prices"], wb, self.price_steps)
            sizes.add_(_wcounts(a, wb, k))
            labels[s:e] = a.cpu().numpy()
            dist[s:e] = d.cpu().numpy()

        self._stream(x, step, "assign_balanced")
        return (labels, dist) if return_distance else labels

    def _config(self) -> dict:
        cfg = {**super()._config(), "balance": self.balance, "price_steps": self.price_steps,
               "size_bounds_fit": None if self.sizes_ is None else
               list(size_bounds(sum(self.sizes_), self.n_clusters, self.balance))}
        if self.weighted:
            cfg.update(weighted=True, weighted_sizes=self.weighted_sizes_, max_weight=self.max_weight_,
                       size_bounds_fit=list(weighted_size_bounds(sum(self.weighted_sizes_), self.max_weight_,
                                                                 self.n_clusters, self.balance)))
        return cfg

    def _extra_arrays(self) -> dict[str, np.ndarray]:
        return {} if self.prices_ is None else {"prices": self.prices_.astype(np.float32)}

    @classmethod
    def _from_config(cls, cfg: dict, device: str, backend: str):
        return cls(cfg["n_clusters"], n_iter=cfg.get("n_iter", 20), balance=cfg.get("balance", 1.02),
                   backend=backend, device=device, seed=cfg.get("seed", 0),
                   fit_sample=cfg.get("fit_sample", 1_000_000), n_candidates=cfg.get("n_candidates", 32),
                   price_steps=cfg.get("price_steps", 2))

    def _load_extra(self, in_dir: Path) -> None:
        p = in_dir / "prices.npy"
        self.prices_ = np.load(p, allow_pickle=False).astype(np.float32) if p.exists() else None
        cfg = read_json(in_dir / "config.json")
        self.weighted = bool(cfg.get("weighted", False))
        self.weighted_sizes_, self.max_weight_ = cfg.get("weighted_sizes"), cfg.get("max_weight")


class UnbalancedKMeans(_KMeansBase):
    """Plain Lloyd k-means (Lloyd 1982): a(i) = argmin_j ‖x_i − c_j‖², c_j = mean of its points. Same interface
    and init as BalancedKMeans; an empty cluster is re-seeded with the point farthest from its centroid."""

    algorithm = "unbalanced"

    def fit(self, x: Any) -> "UnbalancedKMeans":
        t0 = time.perf_counter()
        xs, _ = self._fit_sample(x)
        x2 = _sqnorms(xs)
        c = self._init_centroids(xs)
        for it in range(self.n_iter + 1):
            cd, ci = self._searcher(c).candidates(xs, x2)
            dist, p = cd.min(1)
            assign = _cluster_of(ci, p)
            if it == self.n_iter:
                break
            c, counts = self._update(xs, assign, c)
            empty = (counts == 0).nonzero().squeeze(1)
            if empty.numel():
                far = dist.topk(empty.numel()).indices
                c[empty] = xs[far]
            self._log_iter(it, counts, t0)
        self._finish_fit(c, assign, dist, t0)
        return self

    def assign_balanced(self, x: Any, **kw):
        raise InputError("assign='balanced' needs a balanced clusterer; refit with clusterer='balanced'")


class RandomClusters(_KMeansBase):
    """The paper's random-cluster control: each document gets a uniformly random cluster_id (seeded); centroids
    are the means of the randomly assigned points so that routing code still has centroids to use."""

    algorithm = "random"

    def fit(self, x: Any) -> "RandomClusters":
        t0 = time.perf_counter()
        xs, _ = self._fit_sample(x)
        n, k = xs.shape[0], self.n_clusters
        assign = torch.from_numpy(self.random_labels(n)).to(self.device)
        c, _ = self._update(xs, assign, torch.zeros((k, xs.shape[1]), device=self.device))
        dist = ((xs - c[assign]) ** 2).sum(1)
        self._finish_fit(c, assign, dist, t0)
        return self

    def random_labels(self, n: int, salt: int = 0) -> np.ndarray:
        """n uniform random cluster ids in [0, k), seeded by (seed, salt)."""
        return np.random.default_rng([self.seed, salt]).integers(0, self.n_clusters, size=n)

    def assign_balanced(self, x: Any, **kw):
        raise InputError("assign='balanced' needs a balanced clusterer; refit with clusterer='balanced'")


_CLASSES = {"balanced": BalancedKMeans, "unbalanced": UnbalancedKMeans, "random": RandomClusters}


def load_clusterer(clusters_dir: str | Path, device: str = "auto", backend: str = "auto") -> _KMeansBase:
    """Load a clusterer saved by `fit_clusters` / `.save` (class chosen from config.json)."""
    return _KMeansBase.load(clusters_dir, device=device, backend=backend)


# ----------------------------------------------------------------------------------------------------------------
# stage functions
# ----------------------------------------------------------------------------------------------------------------
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
        model: _KMeansBase = BalancedKMeans(n_clusters, balance=balance, **common)
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
