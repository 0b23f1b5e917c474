"""Order statistics within groups, without a Python loop over items: the selection primitives of the balanced
solver (`clustering.balanced`). Each answers "per group (cluster), which items / which value at rank e", for unit
weights (`select_per_group`, `group_kth`, `row_kth`) and for weighted items (`wselect_per_group`, `group_wkth`,
`row_wkth`, ranks by running weight). On CUDA by sorting; on CPU by numpy partitions (the same selections)."""
from __future__ import annotations

import numpy as np
import torch


def group_order(keys: torch.Tensor, groups: torch.Tensor, descending: bool = False) -> torch.Tensor:
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


def rank_within(keys: torch.Tensor, groups: torch.Tensor, descending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Order items by (group, key) (`group_order`) and return (order, rank of each ordered item within its group).

    No Python loop; ±inf keys sort last / first as usual."""
    n = keys.numel()
    if n == 0:
        e = torch.zeros(0, dtype=torch.long, device=keys.device)
        return e, e
    order = group_order(keys, groups, descending).to(keys.device)
    g = groups[order]
    cnt = torch.bincount(g)
    start = torch.cumsum(cnt, 0) - cnt  # first position of each group in the order
    return order, torch.arange(n, device=g.device) - start[g]


def _select_by_rank(keys: torch.Tensor, groups: torch.Tensor, quota: torch.Tensor, largest: bool) -> torch.Tensor:
    """`select_per_group` by sorting: keep the items whose rank within their group (`rank_within`) < quota."""
    order, rank = rank_within(keys, groups, descending=largest)
    keep = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    keep[order[rank < quota[groups[order]]]] = True
    return keep


def select_per_group(keys: torch.Tensor, groups: torch.Tensor, quota: torch.Tensor, largest: bool) -> torch.Tensor:
    """Mask (s,) of the items kept when every group g keeps its quota[g] items of largest (or smallest) key, ties
    going to the earlier item; quota ≤ 0 keeps none. keys (s,) without NaN, groups (s,) int64 < len(quota).

    Same set as `rank < quota[group]` with `rank_within` (used on CUDA). On CPU only the groups over their quota
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
    """`group_kth` by sorting the members of the asked groups by (group, value)."""
    asked = torch.zeros(n_groups, dtype=torch.bool, device=values.device)
    asked[ids] = True
    sel = asked[groups].nonzero().squeeze(1)  # members of the asked groups
    vals, g = values[sel], groups[sel]
    order = group_order(vals, g).to(values.device)
    cnt = torch.bincount(g, minlength=n_groups)[ids]
    starts = torch.cumsum(cnt, 0) - cnt  # ids ascending → segment of ids[t] starts here
    return vals[order][starts + torch.minimum(kth, cnt).clamp_min(1) - 1]


def group_kth(values: torch.Tensor, groups: torch.Tensor, ids: torch.Tensor, kth: torch.Tensor,
              n_groups: int) -> torch.Tensor:
    """For each group id in `ids` (ascending), the kth-smallest (1-based, clamped to the group's size) of `values`
    over its members. values, groups (s,) with groups < n_groups; every group in `ids` has a member. On CUDA the
    members of the asked groups are sorted by (group, value) (`group_order`) and each answer is read at its
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


def row_kth(g: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """kth[t]-th smallest (1-based) value of row t of g (u, n) → (u,): one topk on CUDA, numpy partition on CPU."""
    n = g.shape[1]
    kth = kth.clamp(1, n)
    if g.is_cuda:
        top = g.topk(int(kth.max()), dim=1, largest=False).values  # (u, max kth) ascending
        return top.gather(1, (kth - 1)[:, None]).squeeze(1)
    gn = g.numpy()
    return torch.tensor([np.partition(gn[t], e - 1)[e - 1] for t, e in enumerate(kth.tolist())], dtype=g.dtype)


def wsorted_groups(keys: torch.Tensor, w: torch.Tensor, groups: torch.Tensor, descending: bool = False):
    """Items ordered by (group, key) (`group_order`) → (order, weight of the items of the same group up to and
    including each ordered item (float64), group of each ordered item)."""
    order = group_order(keys, groups, descending).to(keys.device)
    g = groups[order]
    cw = torch.cumsum(w[order].double(), 0)  # (s,) running weight over all groups
    cnt = torch.bincount(g)
    start = torch.cumsum(cnt, 0) - cnt
    before = torch.where(start > 0, cw[(start - 1).clamp_min(0)], torch.zeros_like(cw[:1]))  # weight of earlier groups
    return order, cw - before[g], g


def wselect_per_group(keys: torch.Tensor, w: torch.Tensor, groups: torch.Tensor, quota: torch.Tensor,
                      largest: bool) -> torch.Tensor:
    """Mask (s,) of the items kept when every group g keeps its items of largest (or smallest) key for as long as
    their running weight stays ≤ quota[g] (the weighted `select_per_group`; ties: the earlier item)."""
    keep = torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
    if keys.numel() == 0:
        return keep
    order, within, g = wsorted_groups(keys, w, groups, descending=largest)
    keep[order[within <= quota[g].double() * (1 + 1e-12)]] = True
    return keep


def group_wkth(values: torch.Tensor, w: torch.Tensor, groups: torch.Tensor, ids: torch.Tensor,
               need: torch.Tensor, n_groups: int) -> torch.Tensor:
    """For each group id in `ids` (ascending), the smallest value t of its members such that the members with value
    ≤ t weigh ≥ need (clamped to the group's largest value): the weighted `group_kth`."""
    asked = torch.zeros(n_groups, dtype=torch.bool, device=values.device)
    asked[ids] = True
    sel = asked[groups].nonzero().squeeze(1)
    order, within, g = wsorted_groups(values[sel], w[sel], groups[sel])
    vals = values[sel][order]
    out = torch.empty(len(ids), dtype=values.dtype, device=values.device)
    for t, (j, e) in enumerate(zip(ids.tolist(), need.tolist())):  # k groups at most
        seg = (g == j).nonzero().squeeze(1)
        pos = int(torch.searchsorted(within[seg], torch.tensor([e], dtype=torch.float64, device=within.device)))
        out[t] = vals[seg[min(pos, seg.numel() - 1)]]
    return out


def row_wkth(g: torch.Tensor, w: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Per row t of g (u, n): the smallest value whose row-sorted running weight (weights w (n,)) reaches need[t]
    (the weighted `row_kth`; +inf when the finite values weigh too little)."""
    order = torch.argsort(g, dim=1, stable=True)  # (u, n)
    cw = torch.cumsum(w.double()[order], 1)  # (u, n)
    pos = torch.searchsorted(cw, need.double()[:, None].contiguous()).clamp_max(g.shape[1] - 1)  # (u, 1)
    return g.gather(1, order.gather(1, pos)).squeeze(1)
