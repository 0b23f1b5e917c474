"""Which models a run evaluates and the stage that produces each (the names are `experts.run_models`').

A run's models: `seed`, `dense`, `expert_003` per cluster, `ensemble_top1` / `ensemble_top2` / `ensemble_topall`
(c-BTM, top_k 1, 2, all, and --top-k when it is another value; duplicates dropped when k is small), `posterior`
(BTM, updating prior, --top-k), `average` (BTM parameter average), `task_arithmetic` / `ties` / `dare_linear` /
`dare_ties` (merges against the seed), `moe` (BTX MoE after finetuning), `dense_moe_compute` (with moe: dense
continued for the MoE finetune's tokens, the MoE's equal-compute baseline). `oracle` is a perplexity-only reference,
not a model: each document scored by the expert of its own cluster (`tasks.perplexity.oracle_perplexity`).
"""
from __future__ import annotations

from corpus.io import InputError
from experts.merging import PARAMETER_MERGES
from experts.run_models import (
    DENSE, DENSE_MOE_COMPUTE, MOE, ORACLE, POSTERIOR, SEED, ensemble_name, ensemble_top_k, expert_cluster, expert_name,
)


def ensemble_variants(num_clusters: int, top_k: str = "2") -> list[str]:
    """top_k ∈ {1, 2, --top-k, all} as names, without repeats (with k = 2, top-2 is called 'all')."""
    wanted = {1, 2, num_clusters} | ({int(top_k)} if str(top_k).isdigit() else set())
    return [("all" if v == num_clusters else str(v)) for v in sorted(wanted) if 1 <= v <= num_clusters]


def model_names(p) -> list[str]:
    names = [SEED, DENSE] + [expert_name(c) for c in range(p.num_clusters)]
    for m in p.methods:
        if m == "ensemble":
            names += [ensemble_name(v) for v in ensemble_variants(p.num_clusters, p.top_k)]
        else:
            names.append(m)
    if "moe" in p.methods:
        names.append(DENSE_MOE_COMPUTE)
    return names


def perplexity_names(p) -> list[str]:
    """What the perplexity evaluation reports: every model, plus the oracle-routing reference."""
    return model_names(p) + [ORACLE]


def model_stage(p, name: str):
    """(stage producing the model, 'hf' | 'ensemble')."""
    from pipeline.merging import FinetuneMoE, MergeExperts
    from pipeline.training import TrainDense, TrainExpert, TrainSeed

    if name == SEED:
        return p.clone(TrainSeed), "hf"
    if name == DENSE:
        return p.clone(TrainDense), "hf"
    if expert_cluster(name) is not None:
        return p.clone(TrainExpert, cluster_id=expert_cluster(name)), "hf"
    if ensemble_top_k(name) is not None:
        return p.clone(MergeExperts, method="ensemble", ensemble_top_k=ensemble_top_k(name)), "ensemble"
    if name == POSTERIOR:
        return p.clone(MergeExperts, method="posterior"), "ensemble"
    if name in PARAMETER_MERGES:
        return p.clone(MergeExperts, method=name), "hf"
    if name == MOE:
        return p.clone(FinetuneMoE), "hf"
    if name == DENSE_MOE_COMPUTE:
        from pipeline.merging import TrainDenseMoECompute

        return p.clone(TrainDenseMoECompute), "hf"
    if name == ORACLE:
        raise InputError("'oracle' is a perplexity reference assembled from the experts' evaluations, not a model "
                         "(EvaluatePerplexity --model oracle); it has no few-shot evaluation")
    raise InputError(f"unknown model {name!r}; models of this run: {', '.join(model_names(p))}")
