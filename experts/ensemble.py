"""Ensembles of expert LMs behind the one scoring interface: c-BTM sparse ensemble and BTM posterior ensemble.

`SparseEnsemble` (c-BTM; Gururangan et al. 2023, "Scaling Expert Language Models with Unsupervised Domain
Discovery"): for each position t,

    p(x_t | x_<t) = Σ_j w_j(x_<t) · p_j(x_t | x_<t)
    w(x_<t)       = softmax_j(−‖e(x_<t) − c_j‖² / T)   over the top_k nearest centroids only (zero elsewhere)

e(·) is the clusterer's embedder applied to the *prefix* text, c_j the cluster centroids, T the temperature: the
routing of `clustering.router.CentroidRouter`, which holds the formula.
Routing is recomputed on a schedule (`RoutingSchedule`): after o tokens of a row for o ∈ {0} ∪ route_early ∪
{R, 2R, …} (R = `route_every`; e.g. route_early = 1, 2, 4, 8 refreshes a young prefix often). The chunk that
starts at routing point p predicts the targets up to the next point and is routed on x_<p (plus the row's
`prefix_texts`), so routing never sees a token it predicts. The mixture is of probabilities (logsumexp of
log w + log p), not of logits. Execution is truly sparse: routing is computed first, then each expert runs
once on just the rows (truncated after their last chunk that needs it) that routed to it; unselected experts
never run. A prefix with no routing signal (its embedding is the zero vector: empty text at the start of a
document, or no word the embedder knows) gets all experts, weighted by the `prior` (uniform by default); it
costs the extra experts only that first chunk.

`route_weights="posterior"` (the default) multiplies those weights by the routed experts' likelihood of the row
so far, BTM's domain posterior restricted to the experts routing selected (`posterior_weights`):

    w_j(t) ∝ w_j(x_<p) · Π_{1≤s<t} p_j(x_s | x_<s)        over the experts routed at target t

Each routed expert runs from position 0 of its rows anyway, so the likelihood costs no expert call; in the
no-signal first chunk every expert runs, so there it is BTM's full posterior from the prior. Routing stays
causal and sparse; `route_weights="distance"` keeps the c-BTM weights alone.

`PosteriorEnsemble` (BTM; Li et al. 2022, "Branch-Train-Merge"): weights from the domain posterior
p(j | x_<t) ∝ p(j) · Π_{s<t} p_j(x_s | x_<s); `prior="cached"` fixes the weights to a prior estimated once
on held-out text by an exponential moving average (BTM: ~100 sequences, α = 0.3); `prior="updating"`
applies Bayes' rule on the prefix at every position. Both keep the top_k experts and renormalise.

The folder format (`ensemble.json`, written by `save_ensemble_config`, read back by `load_ensemble`) is
`experts.ensemble_folder`'s; this module is the ensembles themselves.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clustering.router import ROUTE_EVERY, ROUTE_WEIGHTS, TEMPERATURE, TOP_K, CentroidRouter, check_top_k
from corpus.io import InputError, read_json
from experts.families import folder_context_length
from experts.scoring import HFCausalLM, ScoringModel, document_windows

log = logging.getLogger(__name__)

PRIORS = ("cached", "updating")  # PosteriorEnsemble's priors (module docstring)
ALPHA = 0.3  # the cached prior's moving-average rate (BTM)


# ---- experts: loaded lazily, optionally offloaded ---------------------------------------------------------
class ExpertSlot:
    """One expert: a ready ScoringModel, or a `save_pretrained` directory loaded on first use.

    With `offload=True` an HFCausalLM's weights live on the CPU between uses and move to `device` for a call.
    """

    def __init__(self, source: ScoringModel | str | os.PathLike, device: str | torch.device = "cpu",
                 offload: bool = False, dtype: torch.dtype | None = None, max_length: int | None = None):
        self.model: ScoringModel | None = source if isinstance(source, ScoringModel) else None
        self.path: Path | None = None if self.model is not None else Path(source)
        if self.path is not None and not (self.path / "config.json").is_file():
            raise InputError(f"expert directory missing or not a model directory (no config.json): {self.path}")
        self.device = torch.device(device) if self.model is None else self.model.device
        self.offload = offload
        self.dtype = dtype
        self.max_length = max_length
        self.name = self.model.name if self.model is not None else str(self.path)

    def vocab_size(self) -> int:
        if self.path is not None:
            return int(read_json(self.path / "config.json")["vocab_size"])
        inner = getattr(self.model, "model", None)
        if inner is not None and hasattr(inner, "config"):
            return int(inner.config.vocab_size)
        return len(self.model.tokenizer)

    def get(self) -> ScoringModel:
        if self.model is None:
            from experts.model import load_causal_lm

            model, tokenizer = load_causal_lm(self.path, dtype=self.dtype)
            dev = "cpu" if self.offload else self.device
            self.model = HFCausalLM(model, tokenizer, device=dev, name=str(self.path), max_length=self.max_length)
            log.info("loaded expert %s", self.path)
        if self.offload and isinstance(self.model, HFCausalLM) and self.model.device != self.device:
            self.model.to(self.device)
        return self.model

    def release(self) -> None:
        if self.offload and isinstance(self.model, HFCausalLM) and self.model.device.type != "cpu":
            self.model.to("cpu")


def _load_tokenizer(slot: ExpertSlot):
    if slot.model is not None:
        return slot.model.tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(slot.path)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot load the tokenizer of expert {slot.path}: {str(e).splitlines()[0][:200]}") from None


def _make_slots(experts, devices, offload, dtype, max_length) -> list[ExpertSlot]:
    if len(experts) == 0:
        raise InputError("an ensemble needs at least one expert")
    if devices is None or isinstance(devices, (str, torch.device)):
        devices = [devices or "cpu"] * len(experts)
    if len(devices) != len(experts):
        raise InputError(f"{len(devices)} devices given for {len(experts)} experts")
    slots = [ExpertSlot(e, d, offload, dtype, max_length) for e, d in zip(experts, devices)]
    check_vocabularies([s.name for s in slots], [s.vocab_size() for s in slots])
    return slots


def check_vocabularies(names: Sequence, sizes: Sequence, owner: str = "experts") -> None:
    """InputError naming the first expert whose vocab_size differs from the first one's: an ensemble mixes
    distributions over one vocabulary."""
    for name, v in zip(names[1:], sizes[1:]):
        if v != sizes[0]:
            raise InputError(f"{owner} have different vocabularies: {names[0]} has vocab_size {sizes[0]}, "
                             f"{name} has {v}")


# ---- routing ---------------------------------------------------------------------------------------------
def check_prior_weights(prior, k: int) -> list[float]:
    """k non-negative numbers with a positive sum, normalised to sum to 1."""
    w = np.asarray(prior, dtype=np.float64)
    if w.shape != (k,) or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise InputError(f"the routing prior must be {k} non-negative numbers with a positive sum, got {list(prior)}")
    return (w / w.sum()).tolist()


def check_prior_kind(prior: str) -> str:
    """prior, one of `PRIORS` (PosteriorEnsemble); InputError otherwise."""
    if prior not in PRIORS:
        raise InputError(f"prior must be 'cached' or 'updating', got {prior!r}")
    return prior


def _row_lengths(attention_mask, B: int, T: int) -> torch.Tensor:
    """(B,) real tokens per right-padded row, on the CPU (waits for the device only if the mask lives there)."""
    if attention_mask is None:
        return torch.full((B,), T, dtype=torch.long)
    return attention_mask.sum(1).cpu().long()


def check_route_weights(route_weights: str) -> str:
    """route_weights, one of `clustering.router.ROUTE_WEIGHTS`; InputError otherwise."""
    if route_weights not in ROUTE_WEIGHTS:
        raise InputError(f"route_weights must be one of {', '.join(ROUTE_WEIGHTS)}, got {route_weights!r}")
    return route_weights


class RoutingSchedule:
    """Where a row's routing is recomputed: after n tokens of the row's scored part, for n in
    {0} ∪ {e ∈ early : e < every} ∪ {every, 2·every, …}. `early` refreshes a young prefix (e.g. 1, 2, 4, 8), when a
    few more words change the routing most; `every` is the steady refresh interval."""

    def __init__(self, every: int, early: Sequence[int] = ()):
        if isinstance(every, bool) or int(every) != every or int(every) < 1:
            raise InputError(f"route_every must be an integer ≥ 1 (tokens), got {every!r}")
        bad = [e for e in early if isinstance(e, bool) or int(e) != e or int(e) < 1]
        if bad:
            raise InputError(f"route_early values must be integers ≥ 1 (tokens into the row), got {bad[0]!r}")
        self.every = int(every)
        self.early = tuple(sorted({int(e) for e in early if int(e) < self.every}))
        self._starts = torch.tensor((0,) + self.early)  # chunk starts before `every`

    def offsets(self, n: int) -> list[int]:
        """Routing offsets o < n (n = scored targets of a row), ascending."""
        head = [o for o in (0,) + self.early if o < n]
        return head + list(range(self.every, n, self.every))

    def last(self, n: int) -> int:
        """The latest routing offset ≤ n: the one that serves the target n tokens into the row."""
        if n >= self.every:
            return (n // self.every) * self.every
        return max(o for o in (0,) + self.early if o <= n)

    def chunk_index(self, o: torch.Tensor) -> torch.Tensor:
        """Index of the chunk serving offset o ≥ 0 among a row's chunks (`offsets` order); any shape."""
        starts = self._starts.to(o.device)
        head = torch.searchsorted(starts, o.contiguous(), right=True) - 1
        return torch.where(o < self.every, head, len(starts) - 1 + torch.div(o, self.every, rounding_mode="floor"))


def posterior_weights(logw: torch.Tensor, lp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BTM's domain posterior restricted to the routed experts (Li et al. 2022, eq. 3, with a routing prior):

        log w'_j(t) = log_softmax_j ( log w_j(t) + Σ_{1≤s<t} log p_j(x_s | x_<s) )   over j with w_j(t) > 0

    logw (B, T-1, k): routing log-weights of target t = 1..T-1 (−inf: expert j not routed there); lp (B, T-1, k):
    log p_j(x_t | x_<t), read only where expert j is routed at a later target of the row (it ran from position 0);
    valid (B, T-1): real targets. Target t reads lp of targets s < t only (causal). Returns (B, T-1, k).
    """
    lp = torch.where(valid[..., None], lp, torch.zeros_like(lp))
    prefix_ll = torch.cumsum(lp, 1) - lp  # (B, T-1, k) Σ_{s<t}
    routed = torch.isfinite(logw)
    score = torch.where(routed, logw + prefix_ll, torch.full_like(logw, -math.inf))
    out = torch.log_softmax(score, -1)  # NaN where nothing is routed
    return torch.where(routed, out, torch.full_like(out, -math.inf))


def expert_calls(needs: Sequence[int], max_rows: int, T: int) -> list[int]:
    """Sizes of consecutive expert calls over rows sorted by need, longest first (needs[i]: input length row i
    needs). A call runs its rows padded to its longest need L, so it holds only rows needing more than L / 2 (a row
    is never computed past twice its need: rows that need an expert only for their first chunk do not ride along
    with full-length ones), and at most max_rows × T tokens (max_rows full rows, or proportionally more short
    ones). Within each such length class, as few calls as the cap allows, as even as possible: 41 equal rows with
    max_rows = 32 run as 21 + 20, not 32 + 9, since a small call costs as much host time as a full one."""
    needs = [max(int(x), 1) for x in needs]
    cap = max(1, int(max_rows)) * max([int(T)] + needs[:1])

    def greedy(seg: list[int], budget: int) -> list[int]:
        sizes, i = [], 0
        while i < len(seg):
            n = max(1, min(budget // seg[i], len(seg) - i))
            sizes.append(n)
            i += n
        return sizes

    sizes, i = [], 0
    while i < len(needs):
        j = i
        while j < len(needs) and 2 * needs[j] > needs[i]:
            j += 1
        seg = needs[i:j]
        fewest = len(greedy(seg, cap))
        lo, hi = seg[0], cap  # the smallest budget that still needs only `fewest` calls
        while lo < hi:
            mid = (lo + hi) // 2
            if len(greedy(seg, mid)) <= fewest:
                hi = mid
            else:
                lo = mid + 1
        sizes += greedy(seg, lo)
        i = j
    return sizes


class _ExpertsMixin:
    """Shared plumbing: run one expert on a subset of rows, stats, sparse mixing."""

    slots: list[ExpertSlot]
    expert_batch_size: int | None = None  # rows per expert call (None: all rows routed to it at once)

    def _setup_experts(self, experts, device, devices, offload, dtype, max_length, expert_batch_size, name) -> None:
        """Slots (lazily loaded experts), the shared tokenizer, max_length, stats: what both ensembles need."""
        from corpus.device import resolve_device

        self.device = resolve_device(device).device
        self.slots = _make_slots(experts, devices if devices is not None else self.device, offload, dtype, max_length)
        self.expert_batch_size = expert_batch_size
        self.tokenizer = _load_tokenizer(self.slots[0])
        first = self.slots[0].model
        if not max_length:
            max_length = first.max_length if first is not None else folder_context_length(self.slots[0].path)
        self.max_length = int(max_length)
        self.name = name
        self.reset_stats()

    @torch.no_grad()
    def token_logprobs(self, input_ids, attention_mask=None, prefix_texts=None):
        return self.score_tokens(input_ids, attention_mask, prefix_texts)[0]

    def reset_stats(self) -> None:
        """stats: expert_calls / rows / tokens per expert index, routing_texts embedded."""
        self.stats = {"expert_calls": Counter(), "rows": Counter(), "tokens": Counter(), "routing_texts": 0}

    # ---- non-finite scores are errors ----
    def _flag_nonfinite(self, j, lp, mask, distribution: bool = False) -> None:
        """Record (on the device, without waiting for it) whether expert j gave a non-finite log-probability to
        a real target of this call (padding targets, mask 0, are excluded), or a NaN in a full distribution
        (`distribution=True`: there −inf, probability 0, is a legal value)."""
        bad = torch.isnan(lp) if distribution else ~torch.isfinite(lp)  # (n, L-1) or (n, V)
        if mask is not None:
            bad &= mask[:, 1:].to(bad.device).bool()
        if getattr(self, "_nonfinite", None) is None or self._nonfinite.device != lp.device:
            self._nonfinite = torch.zeros(len(self.slots), dtype=torch.bool, device=lp.device)
        self._nonfinite[j] |= bad.any()

    def check_finite(self) -> None:
        """Raise a one-line error naming each expert that gave a NaN/inf log-probability to a real target since
        the last check. Waits for the device; the ensembles call it at the end of a call on the CPU, and at the
        start of the next call's expert phase elsewhere (so a GPU call never waits; call this after the last one)."""
        flags = getattr(self, "_nonfinite", None)
        if flags is None or not bool(flags.any()):
            return
        bad = [self.slots[j].name for j in torch.nonzero(flags.cpu()).flatten().tolist()]
        self._nonfinite = None
        raise InputError(f"expert {', '.join(bad)} gave non-finite (NaN/inf) log-probabilities to real tokens: its "
                         f"weights are corrupt or its training diverged; retrain it")

    def _check_finite_if_cheap(self) -> None:
        if self.device.type == "cpu":
            self.check_finite()

    def _run_expert(self, j, ids, mask, full_at):
        """Expert j on rows ids (n, L) (mask None: no padding); log-probs (n, L-1) and full distributions."""
        expert = self.slots[j].get()
        dev = expert.device
        lp, full = expert.score_tokens(ids.to(dev, non_blocking=True),
                                       None if mask is None else mask.to(dev, non_blocking=True), None,
                                       full_at=None if full_at is None else full_at.to(dev))
        self.slots[j].release()
        self.stats["expert_calls"][j] += 1
        self.stats["rows"][j] += int(ids.shape[0])
        self.stats["tokens"][j] += int(ids.numel())
        lp = lp.float().to(self.device)
        self._flag_nonfinite(j, lp, mask)
        if full is not None:
            full = full.float().to(self.device)
            self._flag_nonfinite(j, full, None, distribution=True)
        return lp, full

    def _mix(self, input_ids, attention_mask, logw, need, lengths, full_at, posterior: bool = False):
        """Σ_j w_j p_j where logw (B, T-1, k) is −inf for unused (row, target, expert); sparse execution.

        need (B, k), CPU: the input length row i needs from expert j (its last target routed to j, plus 1; 0 if
        none); lengths (B,), CPU: real tokens per row. Expert j runs on its rows from position 0, in the calls
        `expert_calls` plans (longest need first, each call truncated to its longest need; no attention mask
        when no row is padded there). With `posterior`, the weights of target t become
        log_softmax_j(log w_j + Σ_{1≤s<t} log p_j(x_s | x_<s)) over the experts routed there (`posterior_weights`):
        each expert runs from position 0 of its rows anyway, so its likelihood of the row's prefix costs nothing.
        The plan is on the CPU, so nothing here waits for the device (a non-finite score of the previous call is
        raised here, `check_finite`): routing the next batch on the CPU overlaps these expert calls when the
        caller passes CPU tensors. Targets no expert was routed to (padding, before score_from) are 0. The weights
        used are kept in `self.last_weights` (B, T-1, k).
        """
        B, T = input_ids.shape
        k = need.shape[1]
        self.check_finite()  # the previous call's flags: its device work is done or nearly so
        lp_all = torch.zeros((B, T - 1, k), device=self.device)  # log p_j(x_t | x_<t) where expert j ran
        fulls = []  # (j, rows, positions (n_j, L-1) bool, full (N_j, V))
        if full_at is not None:
            full_at = full_at.to(self.device)
        for j in range(k):
            rows_j = torch.nonzero(need[:, j] > 0).flatten()
            if len(rows_j) == 0:
                continue
            rows_j = rows_j[torch.argsort(need[rows_j, j], descending=True, stable=True)]  # similar lengths together
            sizes = expert_calls(need[rows_j, j].tolist(), self.expert_batch_size or len(rows_j), T)
            for rows in torch.split(rows_j, sizes):
                L = int(need[rows, j].max())
                padded = bool((lengths[rows] < L).any())
                rows_dev = rows.to(self.device, non_blocking=True)
                sub_ids = input_ids[rows_dev, :L]  # (n_j, L)
                sub_mask = attention_mask[rows_dev, :L] if padded else None
                sub_full = None
                if full_at is not None:
                    sub_full = full_at[rows_dev, : L - 1] & torch.isfinite(logw[rows_dev, : L - 1, j])
                lp, full = self._run_expert(j, sub_ids, sub_mask, sub_full)  # (n_j, L-1)
                lp_all[rows_dev, : L - 1, j] = lp
                if full is not None:
                    fulls.append((j, rows_dev, sub_full, full))
        routed = torch.isfinite(logw).any(-1)  # (B, T-1)
        if posterior:
            valid = torch.arange(1, T, device=self.device)[None, :] < lengths.to(self.device)[:, None]  # (B, T-1)
            logw = posterior_weights(logw, lp_all, valid)
        self.last_weights = logw  # (B, T-1, k) what this call mixed with: for diagnostics and tests
        mixed = torch.logsumexp(logw + lp_all, -1)  # (B, T-1)
        # a non-finite expert score at a routed target makes the mixture NaN there, even before it is raised
        broken = (~torch.isfinite(lp_all) & torch.isfinite(logw)).any(-1)  # (B, T-1)
        mixed = torch.where(broken, torch.full_like(mixed, math.nan), mixed)
        mixed = torch.where(routed, mixed, torch.zeros_like(mixed))  # unrouted targets are undefined: 0
        acc_full = None
        if fulls:
            flat_index = torch.cumsum(full_at.flatten().long(), 0).view(B, T - 1) - 1  # (B, T-1)
            acc_full = torch.full((int(full_at.sum()), fulls[0][3].shape[1]), -math.inf, device=self.device)
            for j, rows_dev, pos, full in fulls:
                g = flat_index[rows_dev, : pos.shape[1]][pos]  # (N_j,)
                w = logw[rows_dev, : pos.shape[1], j][pos]  # (N_j,)
                acc_full[g] = torch.logaddexp(acc_full[g], w[:, None] + full)
        self._check_finite_if_cheap()
        return mixed, acc_full

    def _mix_next(self, input_ids, attention_mask, idx, w, posterior: bool = False):
        """Full next-token distributions mixed over the selected experts; idx, w (B, m) (zero weights skipped).

        With `posterior`, w_j is multiplied by p_j(row) (the likelihood of the row's tokens under expert j) and
        renormalised over the row's selected experts, as `_mix` does for every target."""
        B = input_ids.shape[0]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        score = torch.full(idx.shape, -math.inf, device=self.device)  # (B, m) log weights
        dists: dict[int, tuple] = {}
        for j in torch.unique(idx).tolist():
            rows, col = torch.nonzero((idx == j) & (w > 0), as_tuple=True)
            if len(rows) == 0:
                continue
            expert = self.slots[j].get()
            ids_j, mask_j = input_ids[rows].to(expert.device), mask[rows].to(expert.device)
            lp = expert.next_token_logprobs(ids_j, mask_j).float().to(self.device)  # (n_j, V)
            ll = 0.0
            if posterior:
                tok = expert.token_logprobs(ids_j, mask_j).float().to(self.device)  # (n_j, T-1)
                self._flag_nonfinite(j, tok, mask_j)
                ll = torch.where(mask_j[:, 1:].to(self.device).bool(), tok, torch.zeros_like(tok)).sum(1)
            self.slots[j].release()
            self.stats["expert_calls"][j] += 1
            self.stats["rows"][j] += len(rows)
            self._flag_nonfinite(j, lp, None, distribution=True)
            score[rows, col] = torch.log(w[rows, col].to(self.device)) + ll
            dists[j] = (rows, col, lp)
        logw = torch.log_softmax(score, -1)  # (B, m)
        out = None
        for j, (rows, col, lp) in dists.items():
            if out is None:
                out = torch.full((B, lp.shape[1]), -math.inf, device=self.device)
            out[rows] = torch.logaddexp(out[rows], logw[rows, col][:, None] + lp)
        self._check_finite_if_cheap()
        return out

    def _gen_mix(self, ids, prompt_len, selected, weights, caches):
        """One generation step mixing the selected experts (KV caches per expert kept in `caches`); weights are
        probabilities, or log-weights when given as a tensor. Also returns each expert's distribution (dict)."""
        parts, dists = [], {}
        logw = weights if isinstance(weights, torch.Tensor) else torch.tensor(weights).log()
        for j, lw in zip(selected, logw.tolist()):
            expert = self.slots[j].get()
            lp, caches[j] = expert.generation_step(ids, prompt_len, caches.get(j))
            self.slots[j].release()
            self.stats["expert_calls"][j] += 1
            lp = lp.float().to(self.device)
            self._flag_nonfinite(j, lp, None, distribution=True)
            dists[j] = lp
            parts.append(lw + lp)
        self._check_finite_if_cheap()
        return torch.logsumexp(torch.stack(parts), 0), dists  # (V,)


# ---- c-BTM sparse ensemble --------------------------------------------------------------------------------
class SparseEnsemble(_ExpertsMixin, ScoringModel):
    """c-BTM ensemble (formula and routing in the module docstring); only the routed experts run.

    experts: ScoringModels or expert directories (loaded lazily on `devices`, one per expert or one for all;
    `offload=True` keeps weights on the CPU between calls). centroids (k, d) with k = number of experts, row j
    is expert j's cluster. embedder: anything with `.transform(texts) -> (n, d)`.
    Routing options (module docstring): `route_every` and `route_early` (`RoutingSchedule`), `route_weights`
    ("posterior": BTM's posterior over the routed experts, "distance": the c-BTM weights alone), `prior` (k,)
    for prefixes without routing signal (None: uniform; e.g. the clusters' training sizes).
    `expert_batch_size` caps one expert call at that many full rows (`expert_calls`: rows sorted by how far they
    need the expert; more rows when they are short); give the ensemble large batches (≈ batch × k / top_k) so each
    expert still sees full batches. `stats` counts expert calls, rows and tokens per expert (`reset_stats()`).
    """

    def __init__(
        self,
        experts: Sequence[ScoringModel | str | os.PathLike],
        centroids: np.ndarray,
        embedder,
        top_k: int = TOP_K,
        temperature: float = TEMPERATURE,
        route_every: int = ROUTE_EVERY,
        route_early: Sequence[int] = (),
        route_weights: str = ROUTE_WEIGHTS[0],
        prior: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        devices: Sequence[str | torch.device] | str | None = None,
        offload: bool = False,
        dtype: torch.dtype | None = None,
        max_length: int | None = None,
        name: str = "ensemble",
        expert_batch_size: int | None = None,
    ):
        centroids = np.asarray(centroids, dtype=np.float32)
        if centroids.ndim != 2:
            raise InputError(f"centroids must be a (k, d) matrix, got shape {centroids.shape}")
        if centroids.shape[0] != len(experts):
            raise InputError(f"{centroids.shape[0]} centroids but {len(experts)} experts; they must match one to one")
        self.router = CentroidRouter(embedder, centroids, temperature, top_k)
        check_route_weights(route_weights)
        self.schedule = RoutingSchedule(route_every, route_early)
        self.top_k = self.router.top_k
        self.prior = None if prior is None else check_prior_weights(prior, len(experts))
        self._setup_experts(experts, device, devices, offload, dtype, max_length, expert_batch_size, name)
        self.route_weights = route_weights

    @property
    def route_every(self) -> int:
        return self.schedule.every

    @property
    def posterior(self) -> bool:
        return self.route_weights == "posterior"

    # ---- routing ----
    def pooled_rows(self, rows_per_call: int) -> int:
        """k / top_k × rows_per_call: each routed expert then gets about rows_per_call of them."""
        return rows_per_call * len(self.slots) // self.top_k

    def routing_weights(self, texts: Sequence[str]) -> np.ndarray:
        """Dense (n, k) routing weights of texts (≥ 0, rows sum to 1, zero outside the top_k), before any
        likelihood term (`route_weights="posterior"` reweights them by the experts' likelihood of the row)."""
        idx, w = self.route_texts(texts)
        return torch.zeros(len(texts), len(self.slots)).scatter_(1, idx, w).numpy()

    def set_fixed_routing(self, texts: Sequence[str]) -> None:
        """One weight vector for every input (the paper's per-task variant): the mean of the texts' routing
        weights, restricted to its top_k and renormalised. Undo with `clear_fixed_routing()`."""
        self.fixed_routing = None
        mean = torch.as_tensor(self.routing_weights(texts)).mean(0)  # (k,)
        w, idx = torch.topk(mean, self.top_k)
        self.fixed_routing = (idx, w / w.sum())

    def clear_fixed_routing(self) -> None:
        self.fixed_routing = None

    def route_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx (n, m), w (n, m)) for routing texts, m = top_k, or k when a text has no routing signal (its
        embedding is zero: it gets the prior over all k experts; the other rows pad with zero weights).
        Identical texts are embedded once."""
        if getattr(self, "fixed_routing", None) is not None:
            idx, w = self.fixed_routing
            return idx.expand(len(texts), -1), w.expand(len(texts), -1)
        uniq = list(dict.fromkeys(texts))
        emb = self.router.embed(uniq)  # (n_unique, d)
        self.stats["routing_texts"] += len(uniq)
        idx, w = self.router.route(emb)
        empty = torch.as_tensor(np.linalg.norm(emb, axis=1) < 1e-8)  # (n_unique,) no routing signal
        k = len(self.slots)
        if empty.any():
            if self.top_k < k:  # all k experts for those rows; the others keep their top_k (zero-weight padding)
                idx_all = self.router.ranking(emb)  # (n_unique, k)
                w_all = torch.zeros(len(uniq), k)
                w_all[:, : self.top_k] = w
                idx, w = idx_all, w_all
            prior = torch.full((k,), 1.0 / k) if self.prior is None else torch.tensor(self.prior, dtype=torch.float32)
            w[empty] = prior[idx[empty]]
        where = {t: i for i, t in enumerate(uniq)}
        sel = torch.tensor([where[t] for t in texts], dtype=torch.long)
        return idx[sel], w[sel]

    def _prefix_text(self, prefix: str, ids: torch.Tensor) -> str:
        return prefix + (self.tokenizer.decode(ids.tolist(), skip_special_tokens=True) if len(ids) else "")

    def routing_plan(self, input_ids, attention_mask=None, prefix_texts=None, score_from=None) -> torch.Tensor:
        """Routing log-weights as a (B, T-1, k) tensor: entry [i, t-1, j] is log w_j for target x_t of row i (−inf
        if unused), before the posterior's likelihood term.

        Row i's routing points are p = a_i + o for the schedule's offsets o (a_i = score_from[i], default 1);
        targets from p to the next point use the prefix prefix_texts[i] + decode(x_<p). Targets before a_i and past
        the row end stay −inf.
        """
        B, T = input_ids.shape
        return self._route(input_ids, _row_lengths(attention_mask, B, T), prefix_texts, score_from)[0]

    def _route(self, input_ids, lengths, prefix_texts, score_from) -> tuple[torch.Tensor, torch.Tensor]:
        """(logw (B, T-1, k) on self.device, need (B, k) on the CPU: input length each row needs per expert).

        One routing text per chunk; the (n_chunks, k) weight table is spread over targets on the device by each
        target's chunk index c = first_i + schedule.chunk_index(t − a_i), so no (B, T-1, k) tensor is built on
        the CPU.
        """
        B, T = input_ids.shape
        k = len(self.slots)
        cpu_ids = input_ids.cpu()
        starts = torch.ones(B, dtype=torch.long) if score_from is None else score_from.cpu().long().clamp_min(1)
        prefix_texts = prefix_texts or [""] * B
        texts, rows, ends = [], [], []  # per chunk: routing text, row, end target (exclusive)
        for i in range(B):
            a, L = int(starts[i]), int(lengths[i])
            offsets = self.schedule.offsets(L - a)
            for c, o in enumerate(offsets):
                texts.append(self._prefix_text(prefix_texts[i] or "", cpu_ids[i, : a + o]))
                rows.append(i)
                ends.append(a + offsets[c + 1] if c + 1 < len(offsets) else L)
        n = len(texts)
        table = torch.full((n + 1, k), -math.inf)  # (n_chunks + 1, k); the last row serves unrouted targets
        need = torch.zeros((B, k), dtype=torch.long)
        if n:
            idx, w = self.route_texts(texts)
            table[:n].scatter_(1, idx, w.log())
            used_end = torch.where(torch.isfinite(table[:n]), torch.tensor(ends)[:, None], 0)  # (n, k)
            need.scatter_reduce_(0, torch.tensor(rows)[:, None].expand(n, k), used_end, "amax")
        n_row = torch.bincount(torch.tensor(rows, dtype=torch.long), minlength=B)  # (B,) chunks per row
        dev = self.device
        first = (torch.cumsum(n_row, 0) - n_row).to(dev, non_blocking=True)
        a, L = starts.to(dev, non_blocking=True), lengths.to(dev, non_blocking=True)
        t = torch.arange(1, T, device=dev)  # target positions
        inside = (t[None, :] >= a[:, None]) & (t[None, :] < L[:, None])  # (B, T-1)
        offset = (t[None, :] - a[:, None]).clamp_min(0)  # (B, T-1)
        chunk = torch.where(inside, first[:, None] + self.schedule.chunk_index(offset), n)
        return table.to(dev, non_blocking=True)[chunk], need

    # ---- scoring ----
    @torch.no_grad()
    def score_tokens(self, input_ids, attention_mask=None, prefix_texts=None, score_from=None, full_at=None):
        """Routing on the CPU, then each expert on its rows (`_mix`). CPU inputs let this call return before the
        device finishes, so the caller's next batch is routed while these experts run."""
        B, T = input_ids.shape
        lengths = _row_lengths(attention_mask, B, T)
        logw, need = self._route(input_ids, lengths, prefix_texts, score_from)  # (B, T-1, k), (B, k)
        dev = self.device
        mask = None if attention_mask is None else attention_mask.to(dev, non_blocking=True)
        return self._mix(input_ids.to(dev, non_blocking=True), mask, logw, need, lengths, full_at, self.posterior)

    @torch.no_grad()
    def next_token_logprobs(self, input_ids, attention_mask=None, prefix_texts=None):
        """Mixture of full distributions for the next token; routed like target t = row length."""
        B, T = input_ids.shape
        lengths = (attention_mask.sum(1) if attention_mask is not None else torch.full((B,), T)).tolist()
        prefix_texts = prefix_texts or [""] * B
        texts = []
        for i in range(B):
            p = 1 + self.schedule.last(int(lengths[i]) - 1)
            texts.append(self._prefix_text(prefix_texts[i] or "", input_ids[i, :p].cpu()))
        idx, w = self.route_texts(texts)
        self.check_finite()
        return self._mix_next(input_ids.to(self.device), attention_mask, idx, w, self.posterior)

    @torch.no_grad()
    def generation_step(self, ids, prompt_len, state=None):
        """Routing from the prompt, refreshed on the schedule as tokens are generated; per-expert KV caches. With
        posterior weights, each selected expert's log-likelihood of ids[1:] is kept up to date in the state."""
        p = prompt_len + self.schedule.last(len(ids) - prompt_len)
        if state is None or state["point"] != p:
            idx, w = self.route_texts([self._prefix_text("", torch.tensor(ids[:p]))])
            keep = w[0] > 0
            old = state or {"caches": {}, "ll": {}, "last": {}}
            state = {"point": p, "selected": idx[0][keep].tolist(), "logw": w[0][keep].log(), "caches": old["caches"],
                     "ll": old["ll"], "last": old["last"]}
        self.check_finite()
        logw = state["logw"]
        if self.posterior:
            ll = torch.stack([self._prefix_ll(j, ids, state) for j in state["selected"]])  # (m,)
            logw = torch.log_softmax(logw + ll, 0)
        lp, state["last"] = self._gen_mix(ids, prompt_len, state["selected"], logw, state["caches"])
        return lp, state

    def _prefix_ll(self, j, ids, state) -> torch.Tensor:
        """Σ_{1≤s<len(ids)} log p_j(x_s | x_<s): extended by the last step's distribution when expert j ran at the
        previous length, else recomputed in one pass (an expert newly selected at a routing point)."""
        ll, n = state["ll"].get(j, (None, 0))
        if ll is not None and n == len(ids) - 1 and j in state["last"]:
            ll = ll + state["last"][j][ids[-1]].cpu()
        elif ll is None or n != len(ids):
            row = torch.tensor([ids[-self.max_length :]])
            ll = self._run_expert(j, row, None, None)[0].sum().cpu() if row.shape[1] > 1 else torch.tensor(0.0)
        state["ll"][j] = (ll, len(ids))
        return ll


# ---- BTM posterior ensemble -------------------------------------------------------------------------------
class PosteriorEnsemble(_ExpertsMixin, ScoringModel):
    """BTM ensemble weighted by the domain posterior (module docstring).

    prior="cached": w = top_k of the cached prior π (estimate it with `estimate_cached_prior(texts)` or pass
    `prior_weights`); only those top_k experts run, and `prefix_texts` change nothing (the weights are fixed).
    prior="updating": every expert runs, and for every target t of row i

        log p(j | prefix_i, x_<t) = log π_j + log p_j(prefix_i) + Σ_{1≤s<t} log p_j(x_s | x_<s) − log Z

    (π uniform unless a cached prior was estimated), top_k over it, renormalised. log p_j(prefix_i) scores the
    prefix text as a document is scored (`loglikelihood_rolling`: [BOS] + its tokens in max_length windows), so
    window w > 0 of a long document starts from the posterior after the windows before it: BTM conditions on
    the whole history, not on one window. The row's first token x_0 only conditions; it enters neither term.
    Window scores are cached by content, since successive prefixes of one document share their full windows.
    """

    def __init__(
        self,
        experts: Sequence[ScoringModel | str | os.PathLike],
        prior: str = "updating",
        top_k: int | None = None,
        prior_weights: Sequence[float] | None = None,
        alpha: float = ALPHA,
        device: str | torch.device = "cpu",
        devices=None,
        offload: bool = False,
        dtype: torch.dtype | None = None,
        max_length: int | None = None,
        name: str = "posterior",
        expert_batch_size: int | None = None,
    ):
        check_prior_kind(prior)
        if not 0 < alpha <= 1:
            raise InputError(f"alpha must be in (0, 1], got {alpha}")
        self._setup_experts(experts, device, devices, offload, dtype, max_length, expert_batch_size, name)
        self.top_k = check_top_k(top_k, len(self.slots))
        self.prior = prior
        self.alpha = float(alpha)
        self.prior_weights = None
        if prior_weights is not None:
            self.set_prior(prior_weights)
        self._window_ll: dict[bytes, torch.Tensor] = {}  # window digest → (k,) Σ log p_j over its targets

    def set_prior(self, weights: Sequence[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(self.slots),) or (w < 0).any() or not w.sum() > 0:
            raise InputError(f"prior_weights must be {len(self.slots)} non-negative numbers with a positive sum")
        self.prior_weights = (w / w.sum()).tolist()

    def _log_prior(self) -> torch.Tensor:  # (k,)
        if self.prior_weights is None:
            if self.prior == "cached":
                raise InputError("prior='cached' needs a prior: call estimate_cached_prior(texts) or pass prior_weights")
            return torch.full((len(self.slots),), -math.log(len(self.slots)), device=self.device)
        return torch.tensor(self.prior_weights, device=self.device).log()

    @torch.no_grad()
    def estimate_cached_prior(self, texts: Sequence[str], max_sequences: int = 100, batch_size: int = 8) -> list[float]:
        """BTM cached prior: for n = 1..N held-out sequences, post_n ∝ π_{n−1} · p_j(x^(n)) and
        π_n = (1 − α) π_{n−1} + α post_n, from π_0 uniform. Sets and returns π_N (k,)."""
        texts = [t for t in texts if t.strip()][:max_sequences]
        if not texts:
            raise InputError("estimate_cached_prior needs at least one non-empty held-out text")
        rows = [(self.bos_ids() + self._encode(t))[: self.max_length] for t in texts]
        ll = torch.zeros(len(rows), len(self.slots))  # (n, k) sequence log-likelihoods
        pad = self.tokenizer.pad_token_id or 0
        for b in range(0, len(rows), batch_size):
            chunk = rows[b : b + batch_size]
            T = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, seq in enumerate(chunk):
                ids[r, : len(seq)], mask[r, : len(seq)] = torch.tensor(seq), 1
            for j in range(len(self.slots)):
                lp, _ = self._run_expert(j, ids, mask, None)  # (b, T-1)
                ll[b : b + len(chunk), j] = (lp.cpu() * mask[:, 1:]).sum(1)
        prior = torch.full((len(self.slots),), 1.0 / len(self.slots), dtype=torch.float64)
        for n in range(len(rows)):
            post = torch.softmax(prior.log() + ll[n].double(), 0)
            prior = (1 - self.alpha) * prior + self.alpha * post
        self.set_prior(prior.tolist())
        log.info("cached prior from %d sequences: %s", len(rows), [round(p, 4) for p in self.prior_weights])
        return list(self.prior_weights)

    def _cached_selection(self) -> torch.Tensor:  # (k,) CPU log w: −inf outside the top_k of the cached prior
        logp = self._log_prior().cpu()
        top = torch.topk(logp, self.top_k).indices
        logw = torch.full_like(logp, -math.inf)
        logw[top] = torch.log_softmax(logp[top], 0)
        return logw

    max_cached_windows = 100_000  # bound on the window-score cache of `_prefix_evidence`

    def _prefix_evidence(self, prefix_texts, B: int) -> torch.Tensor:
        """(B, k) log p_j(prefix_i) on self.device: Σ over the windows of [BOS] + tokens(prefix_i); 0 if empty."""
        k = len(self.slots)
        out = torch.zeros(B, k)
        if not prefix_texts or not any(prefix_texts):
            return out.to(self.device)
        row_keys, todo = [], {}  # row_keys[i]: digests of row i's prefix windows; todo: digest → window ids
        for text in prefix_texts:
            keys = []
            if text:
                for _, win in document_windows(self.bos_ids() + self._encode(text), self.max_length):
                    key = hashlib.blake2b(np.asarray(win, dtype=np.int64).tobytes(), digest_size=16).digest()
                    keys.append(key)
                    if key not in self._window_ll:
                        todo[key] = win
            row_keys.append(keys)
        if len(self._window_ll) + len(todo) > self.max_cached_windows:
            keep = {key for keys in row_keys for key in keys}
            self._window_ll = {key: ll for key, ll in self._window_ll.items() if key in keep}
        items = sorted(todo.items(), key=lambda kv: -len(kv[1]))  # longest first: little padding per call
        pad = self.tokenizer.pad_token_id or 0
        step = self.expert_batch_size or max(len(items), 1)
        for b in range(0, len(items), step):
            chunk = items[b : b + step]
            T = len(chunk[0][1])
            lengths = torch.tensor([len(win) for _, win in chunk])  # (n,)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            for r, (_, win) in enumerate(chunk):
                ids[r, : len(win)] = torch.tensor(win)
            mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (n, T)
            sub_mask = mask if bool((lengths < T).any()) else None
            ll = torch.stack([(self._run_expert(j, ids, sub_mask, None)[0].cpu() * mask[:, 1:]).sum(1)
                              for j in range(k)], 1)  # (n, k)
            for r, (key, _) in enumerate(chunk):
                self._window_ll[key] = ll[r]
        for i, keys in enumerate(row_keys):
            for key in keys:
                out[i] += self._window_ll[key]
        return out.to(self.device)

    @torch.no_grad()
    def score_tokens(self, input_ids, attention_mask=None, prefix_texts=None, score_from=None, full_at=None):
        B, T = input_ids.shape
        k = len(self.slots)
        lengths = _row_lengths(attention_mask, B, T)  # (B,) CPU
        input_ids = input_ids.to(self.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        valid = mask[:, 1:].bool()  # (B, T-1)
        if self.prior == "cached":
            sel = self._cached_selection()  # (k,)
            logw = sel.to(self.device)[None, None, :].expand(B, T - 1, k).clone()
            logw[~valid] = -math.inf
            need = torch.where(torch.isfinite(sel)[None, :] & (lengths[:, None] >= 2), lengths[:, None], 0)  # (B, k)
            return self._mix(input_ids, mask, logw, need, lengths, full_at)
        # updating: every expert on every row; posterior from the prefix text and the row's earlier targets
        lps, fulls = [], []
        padded = bool((lengths < T).any())
        for j in range(k):
            lp, full = self._run_expert(j, input_ids, mask if padded else None, full_at)
            lps.append(lp)
            fulls.append(full)
        lp = torch.stack(lps, -1)  # (B, T-1, k)
        prefix_ll = torch.cumsum(torch.where(valid[..., None], lp, torch.zeros_like(lp)), 1) - lp  # Σ_{s<t}
        evidence = self._prefix_evidence(prefix_texts, B)[:, None, :]  # (B, 1, k) log p_j(prefix text)
        post = torch.log_softmax(self._log_prior() + evidence + prefix_ll, -1)  # (B, T-1, k)
        logw = self._top_k_renorm(post)
        mixed = torch.logsumexp(logw + lp, -1)
        mixed = torch.where(valid, mixed, torch.zeros_like(mixed))
        full = None
        if full_at is not None and fulls[0] is not None:
            fa = full_at.to(self.device)
            full = torch.logsumexp(torch.stack(fulls, 0) + logw[fa].T[:, :, None], 0)  # (N, V)
        return mixed, full

    def _top_k_renorm(self, logpost):  # (..., k) → log weights, −inf outside the top_k
        top = torch.topk(logpost, self.top_k, dim=-1).indices
        keep = torch.zeros_like(logpost, dtype=torch.bool).scatter_(-1, top, True)
        return torch.log_softmax(logpost.masked_fill(~keep, -math.inf), -1)

    @torch.no_grad()
    def next_token_logprobs(self, input_ids, attention_mask=None, prefix_texts=None):
        B, T = input_ids.shape
        k = len(self.slots)
        if self.prior == "cached":
            logw = self._cached_selection()
            top = torch.nonzero(torch.isfinite(logw)).flatten()
            idx = top[None, :].expand(B, -1)
            return self._mix_next(input_ids.to(self.device), attention_mask, idx, logw[top].exp()[None, :].expand(B, -1))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        lp_tok, lp_next = [], []
        for j in range(k):
            expert = self.slots[j].get()
            lp_tok.append(expert.token_logprobs(input_ids.to(expert.device), mask.to(expert.device)).float().to(self.device))
            lp_next.append(expert.next_token_logprobs(input_ids.to(expert.device), mask.to(expert.device)).float().to(self.device))
            self.slots[j].release()
        lp = torch.stack(lp_tok, -1) * mask[:, 1:, None].to(self.device)  # (B, T-1, k)
        post = torch.log_softmax(self._log_prior() + self._prefix_evidence(prefix_texts, B) + lp.sum(1), -1)  # (B, k)
        logw = self._top_k_renorm(post)
        return torch.logsumexp(logw[:, :, None] + torch.stack(lp_next, 1), 1)  # (B, V)

    @torch.no_grad()
    def generation_step(self, ids, prompt_len, state=None):
        k = len(self.slots)
        if self.prior == "cached":
            logw = self._cached_selection()
            sel = torch.nonzero(torch.isfinite(logw)).flatten().tolist()
            state = state or {"caches": {}}
            return self._gen_mix(ids, prompt_len, sel, logw[sel].exp().tolist(), state["caches"])[0], state
        if state is None:  # prefix log-likelihood of the prompt under each expert
            x = torch.tensor([ids])
            ll = torch.stack([self._run_expert(j, x, None, None)[0].sum() for j in range(k)])
            state = {"ll": ll, "caches": {}, "n": len(ids), "last": None}
        elif state["last"] is not None:  # add log p_j of the token appended since the last step
            tok = ids[state["n"]]
            state["ll"] = state["ll"] + torch.stack([d[tok] for d in state["last"]])
            state["n"] = len(ids)
        dists = []
        for j in range(k):
            lp, state["caches"][j] = self.slots[j].get().generation_step(ids, prompt_len, state["caches"].get(j))
            self.slots[j].release()
            dists.append(lp.float().to(self.device))
        state["last"] = dists
        logw = self._top_k_renorm(torch.log_softmax(self._log_prior() + state["ll"], 0))
        return torch.logsumexp(logw[:, None] + torch.stack(dists), 0), state
