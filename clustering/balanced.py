"""The capacitated (balanced) assignment step of balanced k-means, shared by every search backend.

Assign n points to k clusters with size bounds lo_j ≤ size_j ≤ hi_j, minimising the squared distances: dual (price)
steps solved per cluster in closed form, then an exact greedy repair (`balanced_assign` gives the formulas).
`relaxed_prices` and `capped_assign` are the cheaper approximate step of the intermediate Lloyd iterations.

A cluster's size is the sum of its points' weights w_i (`cluster_sizes`): with per-point weights (document lengths)
the bounds come from `weighted_size_bounds` (float64) and the prices are per unit of weight (cost d_ij + w_i·λ_j);
without them (w=None) every point weighs 1, sizes are point counts with bounds from `size_bounds` (int64), and the
solver runs the counting forms of its selections (`clustering.select`: numpy partitions on CPU instead of running
weight sums) and no division by w — the same points as weight 1 would pick, at the cost of a count.
"""
from __future__ import annotations

import math

import torch

from clustering.search import sqdist, sqnorms, to_dense
from clustering.select import (group_kth, group_wkth, rank_within, row_kth, row_wkth, select_per_group,
                               wselect_per_group, wsorted_groups)

DAMP = 0.5  # Jacobi damping of the dual steps
_RELAX_SLACK = 0.05  # intermediate Lloyd iterations: sizes within the bounds ±5% are good enough


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


def cluster_sizes(assign: torch.Tensor, w: torch.Tensor | None, k: int) -> torch.Tensor:
    """Cluster sizes (k,): Σ of w over the points of each cluster (float64), or point counts (int64) when w is None."""
    if w is None:
        return torch.bincount(assign, minlength=k)
    return torch.bincount(assign, weights=w.double(), minlength=k)


def _rows(w: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    """w[idx], or None without weights."""
    return None if w is None else w[idx]


class Scratch:
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


def scratch_empty(scratch: Scratch | None, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """scratch.get(...) or a fresh tensor of like's dtype and device."""
    if scratch is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return scratch.get(name, shape, like)


# ----------------------------------------------------------------------------------------------------------------
# the balanced assignment step (shared by every backend); w (n,) per-point weights, None: weight 1 per point
# ----------------------------------------------------------------------------------------------------------------
def _priced(d: torch.Tensor, prices: torch.Tensor, w: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Price-adjusted costs (n, k) d_ij + w_i·λ_j (λ per unit of weight), d_ij + λ_j without weights; into `out`
    when given (may be d itself)."""
    if w is None:
        return torch.add(d, prices, out=out)
    return torch.addcmul(d, w[:, None], prices[None, :], out=out)


def _priced_argmin(d: torch.Tensor, prices: torch.Tensor, w: torch.Tensor | None = None,
                   out: torch.Tensor | None = None):
    """cost = `_priced` (n, k) (into `out` when given), each point's cheapest cluster and cost, and the cluster
    sizes. Returns (cost, v0 (n,), a (n,) int64, sizes (k,): `cluster_sizes`)."""
    cost = _priced(d, prices, w, out)  # (n, k)
    v0, a = cost.min(1)  # (n,), (n,)
    return cost, v0, a, cluster_sizes(a, w, d.shape[1])


def _keep_largest(keys: torch.Tensor, w: torch.Tensor | None, groups: torch.Tensor,
                  quota: torch.Tensor) -> torch.Tensor:
    """Mask (s,) of the items each group g keeps: those of largest key while their weight stays ≤ quota[g]
    (`wselect_per_group`), or its quota[g] items of largest key without weights (`select_per_group`)."""
    if w is None:
        return select_per_group(keys, groups, quota, largest=True)
    return wselect_per_group(keys, w, groups, quota, largest=True)


def _gains(cost: torch.Tensor, v0: torch.Tensor, donors: torch.Tensor, cols: torch.Tensor,
           d_t: torch.Tensor | None = None, prices: torch.Tensor | None = None,
           scratch: Scratch | None = None) -> torch.Tensor:
    """g[t, i] = cost[i, cols_t] − v0[i] (u, ·) over the points flagged in `donors` (n,) bool. On CUDA only the
    donors' columns (u, s); on CPU all n points with +inf at the others (no kth-smallest changes), read from
    d_t (k, n) = dᵀ when given (cost = d + prices: contiguous rows instead of strided columns), else from cost's
    columns."""
    if cost.is_cuda:
        don = donors.nonzero().squeeze(1)
        return cost[don][:, cols].T.contiguous() - v0[None, don]
    g = scratch_empty(scratch, "gains", (cols.numel(), cost.shape[0]), cost)  # (u, n)
    if d_t is not None:
        torch.index_select(d_t, 0, cols, out=g).add_(prices[cols, None])  # = cost[:, cols]ᵀ
    else:
        torch.index_select(cost.T, 0, cols, out=g)
    return g.sub_(v0[None, :]).masked_fill_(~donors[None, :], float("inf"))


def _price_delta(cost: torch.Tensor, v0: torch.Tensor, best: torch.Tensor, sizes: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor, eps: float, d_t: torch.Tensor | None = None, prices: torch.Tensor | None = None,
                 scratch: Scratch | None = None, w: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """The undamped Jacobi step δ (k,) of `dual_step` from its `_priced_argmin`; (δ, sizes within bounds).
    d_t (k, n) = dᵀ and the prices of cost = d + prices, optional (unweighted only): a faster source of cost's
    columns on CPU. With weights, raising λ_j by δ costs member i δ·w_i, so regrets and gains are per unit of weight
    ((min_{l∉O} cost_il − cost_ij)/w_i) and the e-th smallest becomes the smallest value at which the points it
    moves weigh ≥ the excess W_j − hi_j (≥ lo_j − W_j): `group_wkth`, `row_wkth` instead of `group_kth`, `row_kth`."""
    k = cost.shape[1]
    excess, deficit = sizes - hi, lo - sizes
    is_over, is_under = excess > 0, deficit > 0  # (k,)
    over, under = is_over.nonzero().squeeze(1), is_under.nonzero().squeeze(1)
    delta = torch.zeros(k, dtype=cost.dtype, device=cost.device)
    if (over.numel() == 0 and under.numel() == 0) or k < 2:
        return delta, True
    if over.numel() and over.numel() < k:  # λ_j += e_j-th smallest regret of its members
        sel = is_over[best].nonzero().squeeze(1)  # members of overfull clusters
        open_ = (~is_over).nonzero().squeeze(1)
        alt = torch.index_select(cost, 1, open_, out=scratch_empty(scratch, "open", (cost.shape[0], open_.numel()), cost))
        alt = alt.amin(1)[sel]  # (s,) cost of the best cluster that is not overfull
        if w is None:
            kv = group_kth(alt - v0[sel], best[sel], over, excess[over], k)
        else:
            kv = group_wkth((alt - v0[sel]) / w[sel], w[sel], best[sel], over, excess[over], k)
        delta[over] = torch.nan_to_num(kv, posinf=0.0) + eps
    if under.numel() and under.numel() < k:  # λ_j −= f_j-th smallest gain among points of other clusters
        if w is None:
            g = _gains(cost, v0, ~is_under[best], under, d_t, prices, scratch)  # (u, ·) over the points that may move
            kv = row_kth(g, deficit[under])  # (u,)
        else:
            don = (~is_under[best]).nonzero().squeeze(1)
            g = (cost[don][:, under].T - v0[None, don]) / w[None, don]  # (u, s) gain per unit weight
            kv = row_wkth(g, w[don], deficit[under])
        if not bool(torch.isfinite(kv).all()):  # fewer finite gains than needed: take the largest finite one
            fin_max = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).amax(1)
            kv = torch.where(torch.isfinite(kv), kv, fin_max)
        delta[under] = -(kv + eps)
    return delta, False


def dual_step(
    d: torch.Tensor, prices: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: float,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """One Jacobi step of dual (price) ascent for the capacitated assignment; no loop over points.

    d (n, k) squared distances (+inf: not a candidate), prices λ (k,), size bounds lo, hi (k,). Every point
    takes a(i) = argmin_j d_ij + λ_j. Let O (U) be the clusters above hi (below lo). For j ∈ O with
    e_j = count_j − hi_j, λ_j rises by the e_j-th smallest regret min_{l∉O} (d_il + λ_l) − (d_ij + λ_j) among its
    members: the coordinate-wise optimum of the dual, at which exactly e_j of them would rather move to a cluster
    that can take them (Bertsekas 1988, auction; Tavenard et al. 2011 for k-means). For j ∈ U with
    f_j = lo_j − count_j, λ_j falls by the f_j-th smallest gain d_ij + λ_j − min_l (d_il + λ_l) among the points
    of clusters ∉ U. (Regrets towards other overfull clusters, or gains from other underfull ones, would let two
    neighbouring overfull clusters raise their prices in lockstep and never shed a point.) All clusters move at
    once, so callers damp the step (λ += damp·δ). The e-th smallest values: a sort on CUDA, a numpy partition per
    cluster on CPU (`group_kth`, `row_kth`). With weights w (n,) the sizes are weighted and the prices per unit of
    weight (cost d_ij + w_i·λ_j; `_price_delta`).
    Returns (a (n,) int64 under the input prices, sizes (k,), δ (k,) undamped step, feasible: sizes within bounds).
    """
    cost, v0, best, sizes = _priced_argmin(d, prices, w)
    delta, feasible = _price_delta(cost, v0, best, sizes, lo, hi, eps, w=w)
    return best, sizes, delta, feasible


def relaxed_prices(
    d: torch.Tensor, prices: torch.Tensor, damp: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, max_steps: int,
    eps: float, slack: float = _RELAX_SLACK, scratch: Scratch | None = None, w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual prices for the Lloyd iterations before the exact ones: up to `max_steps` `dual_step`s (at least one),
    warm-started from the previous iteration's prices, stopping once the sizes are within the bounds widened by
    `slack` (lo·(1−slack), hi·(1+slack), rounded outwards for counts). d (n, k) is a fixed random sample of the
    fitted points, lo, hi the bounds for that many points (w (n,): their weights). Per-cluster step sizes `damp`
    (k,) (state kept across calls, as in Rprop, Riedmiller & Braun 1993): a cluster whose violation changed sign
    since the step before halves its step, otherwise it grows ×1.5 up to 1/2 — Jacobi steps on clusters that
    share one dense blob otherwise overshoot back and forth. Returns (prices (k,), damp (k,)) after the last step
    (keeping instead the best prices tried was measured worse on CPU: 1M × 100 mixture, k = 64, seeds 0–2,
    inertia 122.6–125.8 vs 120.1–123.1, bench/RESULTS.md); the iteration then assigns every point to
    argmin_j d_ij + λ_j with no exact repair (`capped_assign`): sizes are close to, not always within, the
    bounds. Only the final assignments (`balanced_assign`) must be exact; the means of a nearly balanced
    partition are as good a centroid step (bench/RESULTS.md)."""
    lo_r, hi_r = lo.double() * (1 - slack), hi.double() * (1 + slack)
    if w is None:  # counts are whole numbers
        lo_r, hi_r = lo_r.floor().long(), hi_r.ceil().long()
    last = torch.zeros_like(prices)  # sign of the last step per cluster
    buf = scratch_empty(scratch, "cost", d.shape, d)
    d_t = None  # (k, n) = dᵀ for `_gains` on CPU (cost = d + prices only without weights)
    if not d.is_cuda and w is None:
        d_t = scratch_empty(scratch, "d_t", d.shape[::-1], d).copy_(d.T)
    for s in range(max(1, max_steps)):
        cost, v0, a, sizes = _priced_argmin(d, prices, w, out=buf)
        delta, feasible = _price_delta(cost, v0, a, sizes, lo, hi, eps, d_t, prices, scratch, w)
        if feasible or (s > 0 and bool(((sizes >= lo_r) & (sizes <= hi_r)).all())):
            break  # the prices that gave these sizes are good enough
        prices, damp, last = _damped_step(prices, delta, damp, last)
    return prices, damp


def _damped_step(prices: torch.Tensor, delta: torch.Tensor, damp: torch.Tensor, last: torch.Tensor):
    """One price update with per-cluster damping: halved where the step's sign flips, grown ×1.5 (up to DAMP)
    where it keeps its sign. Returns (prices, damp, last sign)."""
    sign = torch.sign(delta)
    flip = sign * last < 0
    damp = torch.where(flip, damp * 0.5, torch.where(sign != 0, (damp * 1.5).clamp_max(DAMP), damp))
    return prices + damp * delta, damp, torch.where(sign != 0, sign, last)


def capped_assign(d: torch.Tensor, prices: torch.Tensor, hi: torch.Tensor, overwrite: bool = False,
                  scratch: Scratch | None = None, w: torch.Tensor | None = None) -> torch.Tensor:
    """One vectorised round of capacity-capped assignment, for the Lloyd iterations before the exact ones.

    d (n, k), prices (k,), hi (k,); overwrite=True reuses d's memory for the costs. Every point takes
    argmin_j d_ij + λ_j (+ w_i·λ_j with weights w (n,)); a cluster j above hi_j keeps its members of largest
    regret (cost of the best cluster that is not overfull minus own cost, per unit of weight; ties: the earlier
    point) while they fit in hi_j and sends the others to that best cluster that is not overfull — no further
    rounds, so those may end a little above hi. This stops one cluster from swallowing a neighbour's points (two
    clusters on one dense blob would otherwise get the same points, the same mean, and stay identical).
    Returns a (n,) int64."""
    k = d.shape[1]
    cost = _priced(d, prices, w, out=d if overwrite else None)  # (n, k)
    own, best = cost.min(1)  # (n,)
    is_over = cluster_sizes(best, w, k) > hi  # (k,)
    if not bool(is_over.any()) or bool(is_over.all()):
        return best
    sel = is_over[best].nonzero().squeeze(1)  # members of overfull clusters
    rows = torch.index_select(cost, 0, sel, out=scratch_empty(scratch, "rows", (sel.numel(), k), cost))  # (s, k)
    alt_v = rows.masked_fill_(is_over[None, :], float("inf")).amin(1)  # (s,) best cost elsewhere
    regret, ws = alt_v - own[sel], _rows(w, sel)
    keep = _keep_largest(regret if ws is None else regret / ws, ws, best[sel], hi)  # largest regret stays
    moved = sel[~keep]
    best[moved] = cost[moved].masked_fill_(is_over[None, :], float("inf")).argmin(1)
    return best


def _greedy_capacity(cost: torch.Tensor, remaining: torch.Tensor, scratch: Scratch | None = None,
                     w: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy capacity-constrained assignment by regret (deferred acceptance, accept-final).

    cost (n, k) price-adjusted costs (+inf: not allowed; overwritten); remaining (k,) free room (updated in
    place; float64 with weights w (n,), else int64 slots). Each round every open point proposes to its cheapest
    cluster with room for it (remaining_j ≥ w_i; > 0 without weights); a cluster asked for more than its room
    accepts the proposers of largest regret (second-cheapest minus cheapest open cost, per unit of weight: the
    points that lose most by going elsewhere, Vogel's rule; ties: the earlier point) while they fit, and is then
    full. The proposer of largest regret always fits, so every round places a point; without weights ≤ k+1
    rounds, each over the still open points only. Returns assign (n,) int64, −1 where every allowed cluster filled
    up.
    """
    n, k = cost.shape
    dev = cost.device
    assign = torch.full((n,), -1, dtype=torch.long, device=dev)
    active = torch.arange(n, device=dev)
    masked = torch.zeros(k, dtype=torch.bool, device=dev)  # columns already set to +inf in c (no weights)
    wa = None if w is None else w.double()  # (a,) weights of the open points
    c, rnd = cost, 0
    while active.numel():
        if wa is None:
            full = remaining <= 0  # (k,)
            if bool((full & ~masked).any()):
                c.masked_fill_(full[None, :], float("inf"))  # (a, k)
                masked |= full
        else:
            c.masked_fill_(wa[:, None] > remaining[None, :], float("inf"))  # (a, k) no room for the point
        if k < 2:
            v0, p0 = c[:, 0], torch.zeros(c.shape[0], dtype=torch.long, device=dev)
            regret = torch.full_like(v0, float("inf"))
        else:
            if c.is_cuda and wa is None:  # (weighted: min + masked min on CUDA too, as it was measured)
                v, p = c.topk(2, dim=1, largest=False)  # (a, 2)
                v0, p0, v1 = v[:, 0], p[:, 0], v[:, 1]
            else:  # a CPU topk over rows of k is 3× slower than min + masked min
                v0, p0 = c.min(1)
                v1 = scratch_empty(scratch, "second", c.shape, c).copy_(c).scatter_(1, p0[:, None], float("inf")).amin(1)
            regret = v1 - v0 if wa is None else (v1 - v0) / wa.to(v0.dtype)
            regret = torch.nan_to_num(regret, nan=0.0, posinf=float("inf"))
        ok = torch.isfinite(v0)  # (a,) points that still have an open cluster
        prop = torch.where(ok, p0, torch.zeros_like(p0))  # (a,)
        over = cluster_sizes(prop[ok], _rows(wa, ok), k) > remaining  # (k,) asked for more than their room
        accept = ok & ~over[prop]
        contested = (ok & over[prop]).nonzero().squeeze(1)
        if contested.numel():
            won = _keep_largest(regret[contested], _rows(wa, contested), prop[contested], remaining)
            accept[contested[won]] = True
        assign[active[accept]] = prop[accept]
        remaining -= cluster_sizes(prop[accept], _rows(wa, accept), k)
        keep = ok & ~accept  # rejected: the cluster they asked is now full, so they ask another next round
        if not bool(keep.any()):
            break  # the rest were accepted or have no open cluster left (assign −1)
        keep = keep.nonzero().squeeze(1)
        rows = scratch_empty(scratch, f"greedy{rnd % 2}", (keep.numel(), k), c)  # never the buffer c lives in
        active, c, wa = active[keep], torch.index_select(c, 0, keep, out=rows), _rows(wa, keep)
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
    scratch: Scratch | None = None,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign n points to k clusters with lo_j ≤ size_j ≤ hi_j exactly, minimising Σ ‖x_i − c_a(i)‖².

    Inputs: x (n, d) and centroids (k, d) float32 on one device; cand_dist (n, m) squared distances to each point's
    m candidate centroids, cand_idx (n, m) their ids (None: all k, column j = cluster j); lo, hi (k,) size bounds
    with Σlo ≤ total ≤ Σhi: point counts (int64, `size_bounds`), or with weights w (n,) > 0 weighted sizes
    Σ_{a(i)=j} w_i (`weighted_size_bounds`); prices (k,) float32 warm-start dual prices. Returns (assign (n,) int64,
    dist (n,) float32 squared distance to the assigned centroid, prices (k,)).

    The capacitated assignment LP  min Σ_ij d_ij z_ij  s.t. Σ_j z_ij = 1, lo_j ≤ Σ_i w_i z_ij ≤ hi_j  has the dual
    max Σ_i min_j (d_ij + w_i λ_j) − Σ_j (λ_j⁺ hi_j − λ_j⁻ lo_j): with the right prices λ (per unit of weight) each
    point simply takes argmin_j (d_ij + w_i λ_j) (w_i = 1 without weights). Three steps:
      1. If the nearest-centroid assignment already satisfies the bounds it is optimal (λ = 0): return it.
      2. `price_steps` damped Jacobi steps of dual ascent (`dual_step`), warm-started from `prices`.
      3. Exact repair: greedy capacity assignment on the price-adjusted costs (`_greedy_capacity`, largest regret
         first; points whose m candidates all filled up fall back to all k centroids), then every cluster below lo_j
         pulls the points whose move costs least (per unit of weight), d(x, c_j) − d(x, c_a(x)), from clusters that
         stay ≥ their own lo (`_fill_lower`).
    After step 3 the bounds hold exactly, whatever the prices did. No Python loop runs over points; `BalancedKMeans`
    calls this in its last Lloyd iterations and once per batch in `assign_balanced`.
    """
    k = centroids.shape[0]
    if w is not None:
        lo, hi = lo.double(), hi.double()
    d = to_dense(cand_dist, cand_idx, k)  # (n, k), +inf outside the candidates
    # 1. nearest centroid
    dist0, near = d.min(1)  # (n,)
    sizes = cluster_sizes(near, w, k)
    if bool(((sizes >= lo) & (sizes <= hi)).all()):
        return near, dist0, torch.zeros_like(prices)
    # 2. dual ascent on both bounds (`dual_step`)
    eps = 1e-6 * float(dist0.mean()) + 1e-12
    if w is not None:
        eps /= float(w.mean())  # prices are per unit of weight
    buf = scratch_empty(scratch, "cost", d.shape, d)
    for _ in range(price_steps):
        cost, v0, a, sz = _priced_argmin(d, prices, w, out=buf)
        delta, feasible = _price_delta(cost, v0, a, sz, lo, hi, eps, scratch=scratch, w=w)
        if feasible:
            break
        prices = prices + DAMP * delta
    # 3a. greedy repair with the upper bounds
    remaining = hi.clone()
    assign = _greedy_capacity(_priced(d, prices, w, out=buf), remaining, scratch, w)  # (n,)
    dist = d.gather(1, assign.clamp_min(0)[:, None]).squeeze(1)  # (n,)
    lost = (assign < 0).nonzero().squeeze(1)
    if lost.numel():  # all m candidates full: use every centroid
        dl = sqdist(x[lost], centroids)  # (r, k)
        a2 = _greedy_capacity(_priced(dl, prices, _rows(w, lost)), remaining, w=_rows(w, lost))
        assign[lost] = a2
        dist[lost] = dl.gather(1, a2.clamp_min(0)[:, None]).squeeze(1)
    if bool((assign < 0).any()):  # unreachable with Σhi ≥ the total size; keep every point placed regardless
        stray = (assign < 0).nonzero().squeeze(1)
        dist[stray], assign[stray] = sqdist(x[stray], centroids).min(1)
    # 3b. fill clusters below their lower bound with the cheapest moves from clusters above theirs
    _fill_lower(x, centroids, d, cand_idx, x2, assign, dist, lo, w)
    return assign, dist, prices


def _fill_lower(x: torch.Tensor, centroids: torch.Tensor, d: torch.Tensor, cand_idx: torch.Tensor | None,
                x2: torch.Tensor | None, assign: torch.Tensor, dist: torch.Tensor, lo: torch.Tensor,
                w: torch.Tensor | None) -> None:
    """Step 3b of `balanced_assign`, in place on assign, dist (n,): every cluster j below lo_j takes the points of
    least increase (dj − dist)/w (d (n, k) dense distances, +inf outside the candidates: then dj is computed) from
    clusters that stay ≥ their own lo, until its size reaches lo_j."""
    k = d.shape[1]
    sizes = cluster_sizes(assign, w, k)
    short = lo - sizes  # (k,) how far each cluster is below its lower bound
    if x2 is None and cand_idx is not None and bool((short > 0).any()):
        x2 = sqnorms(x)
    wd = None if w is None else w.double()
    for j in (short > 0).nonzero().squeeze(1).tolist():
        slack = sizes - lo  # (k,) size each cluster can give away
        donor = (assign != j) & (slack[assign] > 0 if w is None else slack[assign] >= wd)  # (n,) may give a point
        dj = d[:, j] if cand_idx is None else sqdist(x, centroids[j : j + 1], x2).squeeze(1)  # (n,)
        inc = dj - dist if w is None else (dj - dist) / w
        inc = inc.masked_fill(~donor, float("inf"))  # (n,) cost (per unit of weight) of moving each point to j
        if w is None:
            pick = _cheapest_moves(inc, assign, slack, int(short[j]))
        else:
            pick = _cheapest_weighted_moves(inc, w, assign, slack, float(short[j]))
        sizes -= cluster_sizes(assign[pick], _rows(wd, pick), k)
        sizes[j] += pick.numel() if w is None else wd[pick].sum()
        dist[pick] = dist[pick] + inc[pick] if w is None else dj[pick]  # weighted inc is per unit of weight
        assign[pick] = j


def _cheapest_moves(inc: torch.Tensor, assign: torch.Tensor, slack: torch.Tensor, need: int) -> torch.Tensor:
    """The `need` points of least increase inc (n,) (+inf: may not move) whose clusters each give at most slack
    (k,) of them, in ascending increase. A top-k shortlist first: the cheapest `take` moves usually contain `need`
    that respect the donors' lower bounds."""
    n = inc.shape[0]
    take = min(n, max(4 * need, 1024))
    while True:
        cand = inc.topk(take, largest=False).indices  # (take,) ascending increase
        cand = cand[torch.isfinite(inc[cand])]
        order, rank = rank_within(inc[cand], assign[cand], descending=False)
        ok = rank < slack[assign[cand][order]]
        pick = order[ok]
        if pick.numel() >= need or take >= n:
            break
        take = min(n, take * 4)
    return cand[pick[torch.argsort(inc[cand][pick], stable=True)][:need]]


def _cheapest_weighted_moves(inc: torch.Tensor, w: torch.Tensor, assign: torch.Tensor, slack: torch.Tensor,
                             need: float) -> torch.Tensor:
    """`_cheapest_moves` with weights w (n,): the points of least increase per unit of weight inc (n,), each
    cluster giving points while their weight stays ≤ its slack (k,) float64, until they weigh ≥ need."""
    cand = torch.isfinite(inc).nonzero().squeeze(1)
    if cand.numel() == 0:
        return cand
    order, within, g = wsorted_groups(inc[cand], w[cand], assign[cand])
    ok = cand[order[within <= slack[g] * (1 + 1e-12)]]  # donors stay ≥ their own lower bound
    ok = ok[torch.argsort(inc[ok], stable=True)]
    cw = torch.cumsum(w.double()[ok], 0)
    return ok[: int(torch.searchsorted(cw, torch.tensor([need], dtype=torch.float64, device=cw.device))) + 1]
