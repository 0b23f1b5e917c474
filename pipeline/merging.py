"""Merging stages: the c-BTM sparse ensemble, the BTM posterior ensemble, parameter averaging and the task-arithmetic
merges (task arithmetic, TIES, DARE), the BTX MoE (`MergeExperts(method)`, one entry of `METHODS` each), and BTX
finetuning of the MoE (`FinetuneMoE`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import luigi

from corpus.io import InputError, read_json
from corpus.layout import CENTROIDS, MERGE_INFO, SHARDS_META, TRAIN_SPLIT
from pipeline.base import MERGE_METHODS, PARAMETER_MERGES, TASK_VECTOR_MERGES, Stage
from pipeline.clustering import AssignClusters, EmbedCorpus, FitClusters
from pipeline.corpus import PrepareCorpus
from pipeline.training import ShardCorpus, TrainExpert, TrainSeed, _TrainStage


@dataclass(frozen=True)
class MergeMethod:
    """One `--merge-methods` value: `build(stage, out, expert_dirs)` writes the merged model into `out` and returns
    the stamp's result; `hashed` are the run parameters its output depends on beyond the experts (mergekit's
    registry pattern: a method is one entry, not a branch of an if/elif)."""

    build: Callable[["MergeExperts", Path, list[str]], dict]
    hashed: tuple[str, ...]


def _ensemble(stage: "MergeExperts", out: Path, expert_dirs: list[str]) -> dict:
    from experts.ensemble import save_ensemble_config
    from experts.hf_ensemble import write_hf_ensemble

    r = stage.requires()
    top_k = stage.ensemble_top_k or str(stage.top_k)
    save_ensemble_config(out, expert_dirs, kind="sparse",
                         centroids_path=stage.input_path(r["clusters"]) / CENTROIDS,
                         embedder_dir=stage.input_path(r["embeddings"]) / "embedder",
                         top_k=None if top_k == "all" else int(top_k), temperature=stage.temperature,
                         route_every=stage.route_every, route_early=stage.route_early_list,
                         route_weights=stage.route_weights, name=f"ensemble_top{top_k}")
    write_hf_ensemble(out)  # loadable with AutoModelForCausalLM
    return {}


def _posterior(stage: "MergeExperts", out: Path, expert_dirs: list[str]) -> dict:
    from experts.ensemble import save_ensemble_config
    from experts.hf_ensemble import write_hf_ensemble

    save_ensemble_config(out, expert_dirs, kind="posterior", prior="updating", top_k=stage.top_k_value,
                         name="posterior")
    write_hf_ensemble(out)  # loadable with AutoModelForCausalLM
    return {}


def _parameter_merge(stage: "MergeExperts", out: Path, expert_dirs: list[str]) -> dict:
    """`experts.merge.merge_experts`: weights from --merge-weights; λ from --merge-lambda (auto: chosen on the
    valid shards)."""
    from corpus.device import resolve_device
    from experts.merge import LAMBDAS, METHODS, MergeRecipe, merge_experts, sample_blocks

    r = stage.requires()
    uses_seed = METHODS[stage.method].uses_seed
    auto = uses_seed and stage.merge_lambda == "auto"
    recipe = MergeRecipe(lam=1.0 if stage.merge_lambda == "auto" else float(stage.merge_lambda),
                         density=stage.ties_density, drop_rate=stage.dare_drop_rate, seed=stage.seed)
    blocks = sample_blocks(stage.valid_shards()) if auto else None
    merge_experts(expert_dirs, out, stage.method, seed_dir=stage.input_path(r["seed"]) if uses_seed else None,
                  weights=stage.expert_weights(), recipe=recipe, lambdas=LAMBDAS if auto else None,
                  valid_blocks=blocks, device=str(resolve_device(stage.device).device))
    meta = read_json(out / MERGE_INFO)
    return {"recipe": meta["recipe"], "weights": meta["weights"]}


def _moe(stage: "MergeExperts", out: Path, expert_dirs: list[str]) -> dict:
    import numpy as np

    from experts.moe import build_moe

    r = stage.requires()
    centroids = np.load(stage.input_path(r["clusters"]) / CENTROIDS)  # (k, dim)
    shared = {"average": None, "seed": r["seed"]}.get(stage.moe_shared, r.get("shared"))
    build_moe(expert_dirs, out, seed_dir=stage.input_path(r["seed"]), router_init=stage.router_init,
              top_k=min(stage.moe_top_k, stage.num_clusters), centroids=centroids,
              cluster_texts=stage.cluster_texts() if stage.router_init != "random" else None, seed=stage.seed,
              shared_dir=None if shared is None else stage.input_path(shared))
    return {"shared": stage.moe_shared}


RECIPE_FLAGS = {"lam": "merge_lambda", "density": "ties_density", "drop_rate": "dare_drop_rate", "seed": "seed"}
"""The run parameter behind each `experts.merge.MergeRecipe` field."""
_MERGE_PARAMS = {  # the flags behind experts.merge.METHODS[m].params (a test keeps the two in step)
    "average": (), "task_arithmetic": ("merge_lambda",), "ties": ("merge_lambda", "ties_density"),
    "dare_linear": ("merge_lambda", "dare_drop_rate", "seed"), "dare_ties": ("merge_lambda", "dare_drop_rate", "seed")}
METHODS: dict[str, MergeMethod] = {
    "ensemble": MergeMethod(_ensemble, ("ensemble_top_k", "temperature", "route_every", "route_early",
                                        "route_weights")),
    "posterior": MergeMethod(_posterior, ("top_k",)),
    **{m: MergeMethod(_parameter_merge, ("merge_weights",) + p) for m, p in _MERGE_PARAMS.items()},
    "moe": MergeMethod(_moe, ("moe_top_k", "router_init", "seed", "moe_shared")),
}
assert tuple(METHODS) == MERGE_METHODS, "pipeline.base.MERGE_METHODS lists the methods of this registry"


class MergeExperts(Stage):
    """One `--merge-methods` value (an entry of `METHODS`) → `merged-<h>/<method>/`: ensemble|posterior →
    `ensemble.json` (`experts.ensemble.save_ensemble_config`) made a Hugging Face model folder by
    `experts.hf_ensemble.write_hf_ensemble`; average|task_arithmetic|ties|dare_linear|dare_ties →
    `experts.merge.merge_experts`; moe → `experts.moe.build_moe`; the last two are `save_pretrained` folders.
    `ensemble_top_k` ('' = --top-k) lets the evaluation build the top-1/2/all variants of the c-BTM ensemble."""

    folder = "merged"
    method = luigi.Parameter(default="ensemble")
    ensemble_top_k = luigi.Parameter(default="")

    @property
    def hashed(self):
        return ("method",) + (METHODS[self.method].hashed if self.method in METHODS else ())

    @property
    def subpath(self) -> str:
        return self.method

    def _hash_value(self, name):
        if name == "ensemble_top_k":
            return self.ensemble_top_k or str(self.top_k)
        return super()._hash_value(name)

    def validate(self) -> None:
        super().validate()
        if self.method not in METHODS:
            raise InputError(f"unknown merge method {self.method!r}; choose one of {', '.join(METHODS)}")

    @property
    def gpu_stage(self) -> bool:
        if self.device == "cpu":
            return False
        if self.method == "moe":
            return self.router_init == "hidden"
        return self.method in TASK_VECTOR_MERGES and self.merge_lambda == "auto"  # λ chosen by forward passes

    def requires(self):
        req = {"experts": [self.clone(TrainExpert, cluster_id=c) for c in range(self.num_clusters)]}
        if self.method in ("ensemble", "moe"):
            req.update(clusters=self.clone(FitClusters), embeddings=self.clone(EmbedCorpus))
        if self.method in PARAMETER_MERGES:
            req.update(assignments=self.clone(AssignClusters))
        if self.method in TASK_VECTOR_MERGES:
            req.update(seed=self.clone(TrainSeed), shards=self.clone(ShardCorpus))
        if self.method == "moe":
            req.update(seed=self.clone(TrainSeed), corpus=self.clone(PrepareCorpus),
                       assignments=self.clone(AssignClusters))
            if self.moe_shared in TASK_VECTOR_MERGES:
                req.update(shared=self.clone(MergeExperts, method=self.moe_shared))
        return req

    def build(self, out: Path) -> dict:
        expert_dirs = [str(self.input_path(t)) for t in self.requires()["experts"]]
        return {"method": self.method, "experts": expert_dirs, **METHODS[self.method].build(self, out, expert_dirs)}

    def expert_weights(self) -> list[float] | None:
        """--merge-weights: None (uniform) or each cluster's share of the training documents."""
        if self.merge_weights == "uniform":
            return None
        from corpus.read import read_columns

        ids = read_columns(self.input_path(self.requires()["assignments"]) / TRAIN_SPLIT, ["cluster_id"]).column(0)
        counts = [0] * self.num_clusters
        for c in ids.to_pylist():
            counts[c] += 1
        return [n / max(1, sum(counts)) for n in counts]

    def valid_shards(self) -> list[str]:
        """The non-empty validation shards of the clusters (`ShardCorpus`)."""
        from experts.data import shard_name

        shards = self.input_path(self.requires()["shards"])
        meta = read_json(shards / SHARDS_META)
        return [str(shards / shard_name(int(c), "valid")) for c, m in sorted(meta["clusters"].items(), key=lambda x: int(x[0]))
                if m.get("valid", {}).get("n_blocks", 0) > 0]

    def cluster_texts(self, per_cluster: int = 32) -> list[list[str]]:
        """Up to `per_cluster` training documents of each cluster (router initialisation from hidden states)."""
        from corpus.read import read_columns, take_rows

        r = self.requires()
        ids = read_columns(self.input_path(r["assignments"]) / TRAIN_SPLIT, ["cluster_id"]).column(0).to_pylist()
        rows: list[list[int]] = [[] for _ in range(self.num_clusters)]
        for i, c in enumerate(ids):
            if len(rows[c]) < per_cluster:
                rows[c].append(i)
        flat = [i for group in rows for i in group]
        texts = iter(row["text"] for row in take_rows(self.input_path(r["corpus"]) / TRAIN_SPLIT, flat, ["text"]))
        return [[next(texts) for _ in group] for group in rows]


class FinetuneMoE(_TrainStage):
    """BTX: `experts.moe.finetune_moe` trains the merged MoE on all clusters with the load-balancing loss for
    `--moe-tokens` (default 25% of --train-tokens) → `moe-finetuned-<h>/`. This is compute beyond the matched
    budget that c-BTM and dense get; the report says how much. bench/RESULTS.md ("Merges that survive
    specialization") has the measurements behind the default."""

    folder = "moe-finetuned"
    hashed = ("moe_tokens", "train_tokens", "batch_tokens", "learning_rate", "seed")

    def requires(self):
        return {"moe": self.clone(MergeExperts, method="moe"), "shards": self.clone(ShardCorpus)}

    def tokens(self) -> int:
        return self.moe_tokens or max(1, self.train_tokens // 4)

    def _hash_value(self, name: str):
        if name == "moe_tokens":  # the resolved budget, so that a new default never reuses an old finetune
            return self.tokens()
        return super()._hash_value(name)

    def build(self, out: Path) -> dict:
        from experts.moe import finetune_moe

        with self.gpu_slots(1) as gpus:
            config = self.train_config(self.tokens(), **({"device": f"cuda:{gpus[0]}"} if gpus else {}))
            info = finetune_moe(self.input_path(self.requires()["moe"]), self.shard_paths(), out, config,
                                valid_paths=self.shard_paths(split="valid") or None)
        return self.summary(info, ("tokens_seen", "steps", "wall_time_s", "gpu_hours", "routing"))
