"""Budget policy: how many tokens, optimizer steps and what global batch the seed, each expert and the dense
baseline train with, so that c-BTM and its dense baseline use the same compute.

The whole budget `train_tokens` is split as in BTM/c-BTM (Li et al. 2022; Gururangan et al. 2023): a seed phase
of `seed_fraction · train_tokens` on all data, then the rest D = (1 − seed_fraction) · train_tokens goes either to
the dense baseline (the seed continued on all data) or, shared out, to the k experts (`compute_budget`).

How the experts share D (`plan_budgets`):

- shares (`cluster_shares`): `proportional` gives expert j the share s_j = T_j / Σ T of cluster j's training tokens
  T_j, so every expert passes over its own data as often as dense passes over all data; `uniform` gives s_j = 1/k.
- compute matching: `steps` (the c-BTM and BTM papers' definition: the c-BTM runs keep clusters × GPUs per expert
  constant) gives every expert the dense model's S optimizer steps with a global batch of b_j = s_j · B blocks
  (B = dense batch in blocks), so steps, wall-clock time on k× fewer devices per expert and total tokens all
  match; `tokens` gives every expert the dense batch B and s_j · S steps, so only the total tokens match.
  Whole numbers are handed out by largest remainders (Hamilton's method), so Σ_j b_j = B (steps) or
  Σ_j S_j = S (tokens) and the experts' tokens add up to the dense model's exactly; what cannot be handed out
  (B not a multiple of the GPUs per expert) is reported as `rounding`. Under `tokens` an expert whose share
  rounds to less than one step is refused with an InputError naming the cluster.
- small shares (`steps` matching): an expert whose share of the dense batch is below one block (per GPU),
  q_j = s_j · B < 1, cannot run the dense model's S steps. `small_share` (`SMALL_SHARES`) says what it does:
  `fewer_steps` (default) trains one block (per GPU) per step for S_j ≈ q_j · S steps, so it still gets its
  share of the tokens (what one block every 1/q_j steps, accumulated, would give, without the idle steps);
  `one_block` gives it one block for all S steps and takes those blocks from the larger experts' batches (equal
  steps, but more than its share of the tokens; needs k ≤ B). Whatever part of a block per step the small
  experts' whole steps leave is `rounding` (< S blocks in all). A small expert trains at least one step, so any
  cluster with data gets an expert (its share of a very small budget may round up to that one block). Empty
  clusters are refused either way.

Every model's budget is whole steps of whole blocks: tokens = steps · batch_blocks · seq_len.
"""
from __future__ import annotations

import math
from typing import Sequence

from corpus.io import InputError

COMPUTE_MATCH = ("steps", "tokens")
SMALL_SHARES = ("fewer_steps", "one_block")
EXPERT_BUDGETS = ("proportional", "uniform")


def compute_budget(train_tokens: int, seed_fraction: float, n_clusters: int) -> dict:
    """Compute-matched token budgets before batching: the whole budget is `train_tokens`.

    seed_tokens = seed_fraction · train_tokens (seed trained on all data, BTM's seed phase);
    expert_tokens = (1 − seed_fraction) · train_tokens / k for each of k equal experts;
    dense_tokens = (1 − seed_fraction) · train_tokens (the seed continued on all data).
    So seed + k · expert == seed + dense == train_tokens (up to integer rounding, reported as `rounding`).
    `plan_budgets` turns these into whole steps and batches, with shares per cluster.
    """
    if train_tokens <= 0:
        raise InputError(f"--train-tokens must be positive, got {train_tokens}")
    if not 0 <= seed_fraction < 1:
        raise InputError(f"--seed-fraction must be in [0, 1), got {seed_fraction}")
    if n_clusters < 1:
        raise InputError(f"--num-clusters must be >= 1, got {n_clusters}")
    seed_tokens = int(round(seed_fraction * train_tokens))
    rest = train_tokens - seed_tokens
    expert_tokens = rest // n_clusters
    return {
        "train_tokens": int(train_tokens),
        "seed_fraction": float(seed_fraction),
        "n_clusters": int(n_clusters),
        "seed_tokens": seed_tokens,
        "expert_tokens": int(expert_tokens),
        "dense_tokens": int(rest),
        "rounding": int(rest - expert_tokens * n_clusters),
    }


def dense_batch_blocks(batch_tokens: int, seq_len: int, micro_batch_size: int) -> int:
    """The dense model's (and seed's) global batch in blocks of seq_len tokens, on its one device:
    batch_tokens // seq_len, or one micro-batch (`micro_batch_size` blocks) when batch_tokens is 0."""
    if seq_len < 1:
        raise InputError(f"--seq-len must be positive, got {seq_len}")
    if not batch_tokens:
        return int(micro_batch_size)
    blocks = batch_tokens // seq_len
    if blocks < 1:
        raise InputError(f"--batch-tokens {batch_tokens} is less than one block of {seq_len} tokens")
    return int(blocks)


def model_budget(tokens: int, batch_blocks: int, seq_len: int, what: str = "model") -> dict:
    """Whole steps of `batch_blocks` blocks within `tokens`: {tokens, steps, batch_blocks, batch_tokens}."""
    batch_tokens = batch_blocks * seq_len
    steps = tokens // batch_tokens if batch_tokens > 0 else 0
    if tokens > 0 and steps < 1:
        raise InputError(f"the {what}'s budget of {tokens} tokens is less than one global batch ({batch_tokens} "
                         "tokens); raise --train-tokens or lower --batch-tokens")
    return {"tokens": steps * batch_tokens, "steps": int(steps), "batch_blocks": int(batch_blocks),
            "batch_tokens": int(batch_tokens)}


def cluster_shares(cluster_tokens: Sequence[int], expert_budget: str = "proportional") -> list[float]:
    """Each expert's share of the experts' budget: T_j / Σ T (`proportional`, T_j = cluster j's training tokens)
    or 1/k (`uniform`). Shares sum to 1. A cluster without training tokens cannot train an expert under either
    policy: InputError naming it."""
    if expert_budget not in EXPERT_BUDGETS:
        raise InputError(f"--expert-budget {expert_budget!r}: choose one of {', '.join(EXPERT_BUDGETS)}")
    tokens = [int(t) for t in cluster_tokens]
    if not tokens:
        raise InputError("no clusters to share the budget between")
    empty = [j for j, t in enumerate(tokens) if t <= 0]
    if empty:
        raise InputError(f"cluster(s) {', '.join(map(str, empty))} have no training tokens, so their expert(s) "
                         f"would train on nothing; use --assign balanced or fewer --num-clusters")
    if expert_budget == "uniform":
        return [1.0 / len(tokens)] * len(tokens)
    total = sum(tokens)
    return [t / total for t in tokens]


def apportion(units: int, shares: Sequence[float]) -> list[int]:
    """Whole numbers n_j summing to `units`, n_j ∈ {⌊s_j·units⌋, ⌈s_j·units⌉}: largest remainders (Hamilton's
    method; ties to the lower index). `shares` must sum to 1."""
    quotas = [s * units for s in shares]
    counts = [int(math.floor(q)) for q in quotas]
    left = units - sum(counts)
    order = sorted(range(len(shares)), key=lambda j: (-(quotas[j] - counts[j]), j))
    for j in order[:left]:
        counts[j] += 1
    return counts


def plan_budgets(
    train_tokens: int,
    seed_fraction: float,
    cluster_tokens: Sequence[int],
    seq_len: int,
    batch_blocks: int,
    compute_match: str = "steps",
    expert_budget: str = "proportional",
    gpus_per_expert: int = 1,
    cluster_blocks: Sequence[int] | None = None,
    small_share: str = "fewer_steps",
) -> dict:
    """Tokens, steps and global batch of the seed, the dense model and each expert (see the module docstring).

    cluster_tokens: training tokens of each cluster (shares); cluster_blocks: its packed training blocks (for the
    epochs figures; default cluster_tokens // seq_len); batch_blocks: the dense batch B in blocks
    (`dense_batch_blocks`); an expert's batch is a multiple of gpus_per_expert blocks (one share per GPU).
    Returns a JSON-able dict: the settings, `seed`, `dense` and `experts` (one per cluster: cluster_id, share,
    effective_share = its tokens / Σ expert tokens, tokens, steps, batch_blocks, batch_tokens, data_tokens, epochs,
    small: whether its share was below one block of the dense batch), `small_share` (the rule those follow),
    `expert_tokens_total`, `rounding` = dense tokens − Σ expert tokens (≥ 0), and compute_budget's train_tokens,
    seed_fraction, n_clusters, seed_tokens and dense_tokens (the budgets before whole steps).
    """
    if compute_match not in COMPUTE_MATCH:
        raise InputError(f"--compute-match {compute_match!r}: choose one of {', '.join(COMPUTE_MATCH)}")
    if gpus_per_expert < 1:
        raise InputError(f"--gpus-per-expert {gpus_per_expert}: must be ≥ 1")
    k = len(cluster_tokens)
    base = compute_budget(train_tokens, seed_fraction, k)
    shares = cluster_shares(cluster_tokens, expert_budget)
    seed = model_budget(base["seed_tokens"], batch_blocks, seq_len, "seed") if base["seed_tokens"] else \
        {"tokens": 0, "steps": 0, "batch_blocks": int(batch_blocks), "batch_tokens": int(batch_blocks * seq_len)}
    dense = model_budget(base["dense_tokens"], batch_blocks, seq_len, "dense model")
    blocks = list(cluster_blocks) if cluster_blocks is not None else [t // seq_len for t in cluster_tokens]
    w = gpus_per_expert
    if small_share not in SMALL_SHARES:
        raise InputError(f"--small-share {small_share!r}: choose one of {', '.join(SMALL_SHARES)}")
    small: set[int] = set()
    if compute_match == "steps":
        units = batch_blocks // w  # an expert's batch is whole blocks on each of its w GPUs
        if units < 1:
            raise InputError(f"the dense batch of {batch_blocks} blocks does not give one block to each of "
                             f"--gpus-per-expert {w} GPUs; raise --batch-tokens")
        per_units, small = _steps_matching(units, dense["steps"], shares, small_share, seq_len * w)
        per_expert = [(steps, n * w) for steps, n in per_units]
    else:
        b = (batch_blocks // w) * w
        if b < 1:
            raise InputError(f"the dense batch of {batch_blocks} blocks does not give one block to each of "
                             f"--gpus-per-expert {w} GPUs; raise --batch-tokens")
        steps_total = dense["tokens"] // (b * seq_len)
        short = [(j, s * steps_total) for j, s in enumerate(shares) if s * steps_total < 1]
        if short:
            j, q = min(short, key=lambda t: t[1])
            raise InputError(
                f"cluster {j}'s share {shares[j]:.3f} of the dense model's {steps_total} steps is {q:.2f} step(s), "
                "less than one under --compute-match tokens; raise --train-tokens, lower --batch-tokens, or use "
                "--compute-match steps")
        per_expert = [(n, b) for n in apportion(steps_total, shares)]
    experts = []
    for j, ((steps, bj), share) in enumerate(zip(per_expert, shares)):
        tokens = steps * bj * seq_len
        data = int(blocks[j]) * seq_len
        experts.append({"cluster_id": j, "share": share, "tokens": int(tokens), "steps": int(steps),
                        "batch_blocks": int(bj), "batch_tokens": int(bj * seq_len), "data_tokens": data,
                        "epochs": tokens / data if data else None, "small": j in small})
    total = sum(e["tokens"] for e in experts)
    for e in experts:
        e["effective_share"] = e["tokens"] / total if total else 0.0
    return {
        **{key: v for key, v in base.items() if key not in ("expert_tokens", "rounding")},
        "compute_match": compute_match,
        "expert_budget": expert_budget,
        "small_share": small_share,
        "seq_len": int(seq_len),
        "gpus_per_expert": int(w),
        "seed": seed,
        "dense": dense,
        "experts": experts,
        "expert_tokens_total": int(total),
        "rounding": int(dense["tokens"] - total),
    }


def _steps_matching(units: int, steps: int, shares: Sequence[float], small_share: str,
                    unit_tokens: int) -> tuple[list[tuple[int, int]], set[int]]:
    """(steps, batch in units) per expert under steps matching, and the experts whose share of the dense batch
    q_j = s_j · units is below one unit (one block per GPU). Without those, every expert runs `steps` steps with
    Hamilton's apportionment of the units. With them, under `fewer_steps` the small experts share the block-steps
    round(Σ_small q_j · steps) (Hamilton, one unit per step, at least one step each) and the others the whole
    units left, ⌊units − that / steps⌋; under `one_block` each small expert gets one unit and the others the
    units left. An expert that the others' apportionment leaves with no unit joins the small ones."""
    k = len(shares)
    small = {j for j in range(k) if shares[j] * units < 1}
    while True:
        if small_share == "one_block":
            if len(small) > units:
                raise InputError(
                    f"--small-share one_block gives each of the {len(small)} clusters whose share is below one block "
                    f"a block of the dense batch's {units}; use --small-share fewer_steps or a larger --batch-tokens")
            small_steps = {j: steps for j in small}
            left = units - len(small)
        else:
            quota = sum(shares[j] for j in small) * units * steps  # the small experts' block-steps
            order = sorted(small)
            counts = apportion(int(round(quota)), [shares[j] / sum(shares[i] for i in order) for j in order]) \
                if order else []
            counts = [max(1, n) for n in counts]  # a cluster with data trains at least one block
            if sum(counts) > units * steps:
                raise InputError(
                    f"the dense model's {units * steps} block-steps ({units * steps * unit_tokens} tokens) cannot "
                    f"give one block to each of the {len(counts)} experts whose share is below one block; raise --train-tokens "
                    "or use fewer --num-clusters")
            small_steps = dict(zip(order, counts))
            left = units - math.ceil(sum(counts) / steps) if counts else units
        big = [j for j in range(k) if j not in small]
        total = sum(shares[j] for j in big)
        counts_big = apportion(left, [shares[j] / total for j in big]) if big else []
        newly = {j for j, n in zip(big, counts_big) if n < 1}
        if not newly:
            break
        small |= newly
    per = {j: (n, 1) for j, n in small_steps.items()}
    per.update({j: (steps, n) for j, n in zip(big, counts_big)})
    return [per[j] for j in range(k)], small
