"""The capacitated (balanced) assignment step of balanced k-means, shared by every search backend.

Assign n points to k clusters with size bounds lo_j ≤ |cluster j| ≤ hi_j (`size_bounds`), minimising the squared
distances: dual (price) steps solved per cluster in closed form, then an exact greedy repair (`balanced_assign`
gives the formulas). `relaxed_prices` and `capped_assign` are the cheaper approximate step of the intermediate
Lloyd iterations. With per-point weights (document lengths) the sizes are weighted (`weighted_size_bounds`) and
the `w*` twins (`wbalanced_assign`, ...) run instead, with prices per unit of weight.
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
# the balanced assignment step (shared by every backend)
# ----------------------------------------------------------------------------------------------------------------
def _priced_argmin(d: torch.Tensor, prices: torch.Tensor, out: torch.Tensor | None = None):
    """cost = d + λ (n, k) (into `out` when given), each point's cheapest cluster and cost, and the cluster sizes.
    Returns (cost, v0 (n,), a (n,) int64, counts (k,))."""
    cost = torch.add(d, prices, out=out)  # (n, k)
    v0, a = cost.min(1)  # (n,), (n,)
    return cost, v0, a, torch.bincount(a, minlength=d.shape[1])


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


def _price_delta(cost: torch.Tensor, v0: torch.Tensor, best: torch.Tensor, counts: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor, eps: float, d_t: torch.Tensor | None = None, prices: torch.Tensor | None = None,
                 scratch: Scratch | None = None) -> tuple[torch.Tensor, bool]:
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
        alt = torch.index_select(cost, 1, open_, out=scratch_empty(scratch, "open", (cost.shape[0], open_.numel()), cost))
        alt = alt.amin(1)[sel]  # (s,) cost of the best cluster that is not overfull
        kv = group_kth(alt - v0[sel], best[sel], over, excess[over], k)
        delta[over] = torch.nan_to_num(kv, posinf=0.0) + eps
    if under.numel() and under.numel() < k:  # λ_j −= f_j-th smallest gain among points of other clusters
        g = _gains(cost, v0, ~is_under[best], under, d_t, prices, scratch)  # (u, ·) over the points that may move
        kv = row_kth(g, deficit[under])  # (u,)
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
    cluster on CPU (`group_kth`, `row_kth`).
    Returns (a (n,) int64 under the input prices, counts (k,), δ (k,) undamped step, feasible: counts within bounds).
    """
    cost, v0, best, counts = _priced_argmin(d, prices)
    delta, feasible = _price_delta(cost, v0, best, counts, lo, hi, eps)
    return best, counts, delta, feasible


def relaxed_prices(
    d: torch.Tensor, prices: torch.Tensor, damp: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, max_steps: int,
    eps: float, slack: float = _RELAX_SLACK, scratch: Scratch | None = None,
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
    buf = scratch_empty(scratch, "cost", d.shape, d)
    d_t = None if d.is_cuda else scratch_empty(scratch, "d_t", d.shape[::-1], d).copy_(d.T)  # (k, n) for `_gains`
    for s in range(max(1, max_steps)):
        cost, v0, a, counts = _priced_argmin(d, prices, out=buf)
        delta, feasible = _price_delta(cost, v0, a, counts, lo, hi, eps, d_t, prices, scratch)
        if feasible or (s > 0 and bool(((counts >= lo_r) & (counts <= hi_r)).all())):
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
                  scratch: Scratch | None = None) -> torch.Tensor:
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
    rows = torch.index_select(cost, 0, sel, out=scratch_empty(scratch, "rows", (sel.numel(), k), cost))  # (s, k)
    alt_v = rows.masked_fill_(is_over[None, :], float("inf")).amin(1)  # (s,) best cost elsewhere
    keep = select_per_group(alt_v - own[sel], best[sel], hi, largest=True)  # largest regret stays
    moved = sel[~keep]
    best[moved] = cost[moved].masked_fill_(is_over[None, :], float("inf")).argmin(1)
    return best


def _greedy_capacity(cost: torch.Tensor, remaining: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
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
                v1 = scratch_empty(scratch, "second", c.shape, c).copy_(c).scatter_(1, p0[:, None], float("inf")).amin(1)
            regret = torch.nan_to_num(v1 - v0, nan=0.0, posinf=float("inf"))
        ok = torch.isfinite(v0)  # (a,) points that still have an open cluster
        prop = torch.where(ok, p0, torch.zeros_like(p0))  # (a,)
        demand = torch.bincount(prop[ok], minlength=k)
        over = demand > remaining  # (k,)
        accept = ok & ~over[prop]
        contested = (ok & over[prop]).nonzero().squeeze(1)
        if contested.numel():
            won = select_per_group(regret[contested], prop[contested], remaining, largest=True)
            accept[contested[won]] = True
        assign[active[accept]] = prop[accept]
        remaining -= torch.bincount(prop[accept], minlength=k)
        keep = ok & ~accept  # rejected: the cluster they asked is now full, so they ask another next round
        if not bool(keep.any()):
            break  # the rest were accepted or have no open cluster left (assign −1)
        keep = keep.nonzero().squeeze(1)
        rows = scratch_empty(scratch, f"greedy{rnd % 2}", (keep.numel(), k), c)  # never the buffer c lives in
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
    scratch: Scratch | None = None,
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
    d = to_dense(cand_dist, cand_idx, k)  # (n, k), +inf outside the candidates
    # 1. nearest centroid
    dist0, near = d.min(1)  # (n,)
    counts = torch.bincount(near, minlength=k)
    if bool(((counts >= lo) & (counts <= hi)).all()):
        return near, dist0, torch.zeros_like(prices)
    # 2. dual ascent on both bounds (`dual_step`)
    eps = 1e-6 * float(dist0.mean()) + 1e-12
    buf = scratch_empty(scratch, "cost", d.shape, d)
    for _ in range(price_steps):
        cost, v0, a, cnt = _priced_argmin(d, prices, out=buf)
        delta, feasible = _price_delta(cost, v0, a, cnt, lo, hi, eps, scratch=scratch)
        if feasible:
            break
        prices = prices + DAMP * delta
    # 3a. greedy repair with the upper bounds
    remaining = hi.clone()
    assign = _greedy_capacity(torch.add(d, prices, out=buf), remaining, scratch)  # (n,)
    dist = d.gather(1, assign.clamp_min(0)[:, None]).squeeze(1)  # (n,)
    lost = (assign < 0).nonzero().squeeze(1)
    if lost.numel():  # all m candidates full: use every centroid
        dl = sqdist(x[lost], centroids)  # (r, k)
        a2 = _greedy_capacity(dl + prices[None, :], remaining)
        assign[lost] = a2
        dist[lost] = dl.gather(1, a2.clamp_min(0)[:, None]).squeeze(1)
    # 3b. fill clusters below their lower bound with the cheapest moves from clusters above theirs
    counts = torch.bincount(assign, minlength=k)
    need = lo - counts
    if x2 is None and cand_idx is not None and bool((need > 0).any()):
        x2 = sqnorms(x)
    for j in (need > 0).nonzero().squeeze(1).tolist():
        nj = int(need[j])
        donor = (counts[assign] > lo[assign]) & (assign != j)  # (n,)
        dj = d[:, j] if cand_idx is None else sqdist(x, centroids[j : j + 1], x2).squeeze(1)  # (n,)
        inc = (dj - dist).masked_fill(~donor, float("inf"))  # (n,) cost of moving each point to j
        take = min(n, max(4 * nj, 1024))
        while True:  # the cheapest `take` moves usually contain `need` that respect the donors' lower bounds
            cand = inc.topk(take, largest=False).indices  # (take,) ascending increase
            cand = cand[torch.isfinite(inc[cand])]
            order, rank = rank_within(inc[cand], assign[cand], descending=False)
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


def wcounts(assign: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Weighted cluster sizes (k,) float64: Σ of w over the points of each cluster."""
    return torch.bincount(assign, weights=w.double(), minlength=k)


def _wpriced_argmin(d: torch.Tensor, prices: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None):
    """cost = d + w_i·λ_j (n, k) (λ is a price per unit of weight), each point's cheapest cluster and cost, and the
    weighted sizes. Returns (cost, v0 (n,), a (n,) int64, sizes (k,) float64)."""
    cost = torch.addcmul(d, w[:, None], prices[None, :], out=out)  # (n, k)
    v0, a = cost.min(1)
    return cost, v0, a, wcounts(a, w, d.shape[1])


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
        kv = group_wkth((alt - v0[sel]) / w[sel], w[sel], best[sel], over, excess[over], k)
        delta[over] = torch.nan_to_num(kv, posinf=0.0) + eps
    if under.numel() and under.numel() < k:
        don = (~is_under[best]).nonzero().squeeze(1)
        g = (cost[don][:, under].T - v0[None, don]) / w[None, don]  # (u, s) gain per unit weight
        kv = row_wkth(g, w[don], deficit[under])
        if not bool(torch.isfinite(kv).all()):
            fin_max = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).amax(1)
            kv = torch.where(torch.isfinite(kv), kv, fin_max)
        delta[under] = -(kv + eps)
    return delta, False


def wrelaxed_prices(d, prices, damp, lo, hi, max_steps, eps, w, slack=_RELAX_SLACK, scratch=None):
    """`relaxed_prices` with weighted sizes (weights w (n,) of the sampled points; lo, hi their weighted bounds)."""
    lo_r, hi_r = lo.double() * (1 - slack), hi.double() * (1 + slack)
    last = torch.zeros_like(prices)
    buf = scratch_empty(scratch, "cost", d.shape, d)
    for s in range(max(1, max_steps)):
        cost, v0, a, sizes = _wpriced_argmin(d, prices, w, out=buf)
        delta, feasible = _wprice_delta(cost, v0, a, sizes, lo, hi, eps, w)
        if feasible or (s > 0 and bool(((sizes >= lo_r) & (sizes <= hi_r)).all())):
            break
        prices, damp, last = _damped_step(prices, delta, damp, last)
    return prices, damp


def wcapped_assign(d: torch.Tensor, prices: torch.Tensor, hi: torch.Tensor, w: torch.Tensor,
                   overwrite: bool = False) -> torch.Tensor:
    """`capped_assign` with weighted sizes: an overfull cluster keeps its members of largest regret per unit weight
    while their weight stays ≤ hi_j and sends the others to their best cluster that is not overfull."""
    k = d.shape[1]
    cost = torch.addcmul(d, w[:, None], prices[None, :], out=d if overwrite else None)  # (n, k)
    own, best = cost.min(1)
    is_over = wcounts(best, w, k) > hi.double()
    if not bool(is_over.any()) or bool(is_over.all()):
        return best
    sel = is_over[best].nonzero().squeeze(1)
    alt_v = cost[sel].masked_fill_(is_over[None, :], float("inf")).amin(1)
    keep = wselect_per_group((alt_v - own[sel]) / w[sel], w[sel], best[sel], hi, largest=True)
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
            won = wselect_per_group(regret[contested], wa[contested], prop[contested], remaining, largest=True)
            accept[contested[won]] = True
        assign[active[accept]] = prop[accept]
        remaining -= torch.bincount(prop[accept], weights=wa[accept], minlength=k)
        keep = (ok & ~accept).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        active, c, wa = active[keep], c[keep], wa[keep]
    return assign


def wbalanced_assign(x, centroids, cand_dist, cand_idx, lo, hi, prices, w, price_steps=2, x2=None):
    """`balanced_assign` with weighted sizes: lo_j ≤ Σ_{a(i)=j} w_i ≤ hi_j (bounds from `weighted_size_bounds`),
    minimising Σ ‖x_i − c_a(i)‖². The LP's dual now prices capacity per unit of weight: each point takes
    argmin_j d_ij + w_i·λ_j. Same three steps: nearest centroid if feasible; damped dual steps (`_wprice_delta`);
    exact repair by the weighted greedy (`_wgreedy_capacity`), then every cluster below lo_j pulls the points of
    cheapest increase per unit weight (d(x, c_j) − d(x, c_a(x)))/w from clusters that stay ≥ their own lo."""
    n, k = cand_dist.shape[0], centroids.shape[0]
    lo, hi = lo.double(), hi.double()
    d = to_dense(cand_dist, cand_idx, k)
    dist0, near = d.min(1)
    sizes = wcounts(near, w, k)
    if bool(((sizes >= lo) & (sizes <= hi)).all()):
        return near, dist0, torch.zeros_like(prices)
    eps = (1e-6 * float(dist0.mean()) + 1e-12) / float(w.mean())
    for _ in range(price_steps):
        cost, v0, a, sz = _wpriced_argmin(d, prices, w)
        delta, feasible = _wprice_delta(cost, v0, a, sz, lo, hi, eps, w)
        if feasible:
            break
        prices = prices + DAMP * delta
    remaining = hi.clone()
    assign = _wgreedy_capacity(torch.addcmul(d, w[:, None], prices[None, :]), remaining, w)
    dist = d.gather(1, assign.clamp_min(0)[:, None]).squeeze(1)
    lost = (assign < 0).nonzero().squeeze(1)
    if lost.numel():  # all m candidates full: use every centroid
        dl = sqdist(x[lost], centroids)
        a2 = _wgreedy_capacity(torch.addcmul(dl, w[lost][:, None], prices[None, :]), remaining, w[lost])
        assign[lost] = a2
        dist[lost] = dl.gather(1, a2.clamp_min(0)[:, None]).squeeze(1)
    if bool((assign < 0).any()):  # unreachable with weighted_size_bounds; keep every point placed regardless
        stray = (assign < 0).nonzero().squeeze(1)
        dist[stray], assign[stray] = sqdist(x[stray], centroids).min(1)
    sizes = wcounts(assign, w, k)
    if x2 is None and cand_idx is not None and bool((lo - sizes > 0).any()):
        x2 = sqnorms(x)
    wd = w.double()
    for j in (lo - sizes > 0).nonzero().squeeze(1).tolist():
        need = float(lo[j] - sizes[j])
        slack = sizes - lo  # (k,) weight each cluster can give away
        donor = (assign != j) & (slack[assign] >= wd)
        dj = d[:, j] if cand_idx is None else sqdist(x, centroids[j : j + 1], x2).squeeze(1)
        inc = ((dj - dist) / w).masked_fill(~donor, float("inf"))  # (n,) cost per unit weight of moving to j
        cand = torch.isfinite(inc).nonzero().squeeze(1)
        if cand.numel() == 0:
            continue
        order, within, g = wsorted_groups(inc[cand], w[cand], assign[cand])
        ok = cand[order[within <= slack[g] * (1 + 1e-12)]]  # donors stay ≥ their own lower bound
        ok = ok[torch.argsort(inc[ok], stable=True)]
        cw = torch.cumsum(wd[ok], 0)
        pick = ok[: int(torch.searchsorted(cw, torch.tensor([need], dtype=torch.float64, device=cw.device))) + 1]
        sizes -= torch.bincount(assign[pick], weights=wd[pick], minlength=k)
        sizes[j] += wd[pick].sum()
        dist[pick] = dj[pick]
        assign[pick] = j
    return assign, dist, prices
