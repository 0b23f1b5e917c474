"""Merging stages: the c-BTM sparse ensemble, the BTM posterior ensemble, parameter averaging, the BTX MoE
(`MergeExperts(method)`), and BTX finetuning of the MoE (`FinetuneMoE`)."""
from __future__ import annotations

from pathlib import Path

import luigi

from corpus.io import InputError
from pipeline.base import Stage, gpu_slots
from pipeline.clustering import AssignClusters, EmbedCorpus, FitClusters
from pipeline.corpus import PrepareCorpus
from pipeline.training import ShardCorpus, TrainExpert, TrainSeed, _TrainStage

_METHOD_PARAMS = {  # what each method's output depends on, beyond the experts
    "ensemble": ("ensemble_top_k", "temperature", "route_every", "route_early", "route_weights"),
    "posterior": ("top_k",),
    "average": (),
    "moe": ("moe_top_k", "router_init", "seed"),
}


class MergeExperts(Stage):
    """method=ensemble|posterior → `merged-<h>/<method>/ensemble.json` (`experts.ensemble.save_ensemble_config`);
    average → `experts.average.average_experts`; moe → `experts.moe.build_moe`, both `save_pretrained` folders.
    `ensemble_top_k` ('' = --top-k) lets the evaluation build the top-1/2/all variants of the c-BTM ensemble."""

    folder = "merged"
    method = luigi.Parameter(default="ensemble")
    ensemble_top_k = luigi.Parameter(default="")

    @property
    def hashed(self):
        return ("method",) + _METHOD_PARAMS.get(self.method, ())

    @property
    def subpath(self) -> str:
        return self.method

    def _hash_value(self, name):
        if name == "ensemble_top_k":
            return self.ensemble_top_k or str(self.top_k)
        return super()._hash_value(name)

    @property
    def gpu_stage(self) -> bool:
        return self.method == "moe" and self.router_init == "hidden" and self.device != "cpu"

    def requires(self):
        req = {"experts": [self.clone(TrainExpert, cluster_id=c) for c in range(self.num_clusters)]}
        if self.method in ("ensemble", "moe"):
            req.update(clusters=self.clone(FitClusters), embeddings=self.clone(EmbedCorpus))
        if self.method == "moe":
            req.update(seed=self.clone(TrainSeed), corpus=self.clone(PrepareCorpus),
                       assignments=self.clone(AssignClusters))
        return req

    def build(self, out: Path) -> dict:
        if self.method not in _METHOD_PARAMS:
            raise InputError(f"unknown merge method {self.method!r}; choose one of {', '.join(_METHOD_PARAMS)}")
        r = self.requires()
        expert_dirs = [str(self.input_path(t)) for t in r["experts"]]
        if self.method == "ensemble":
            from experts.ensemble import save_ensemble_config

            top_k = self.ensemble_top_k or str(self.top_k)
            save_ensemble_config(out, expert_dirs, kind="sparse",
                                 centroids_path=self.input_path(r["clusters"]) / "centroids.npy",
                                 embedder_dir=self.input_path(r["embeddings"]) / "embedder",
                                 top_k=None if top_k == "all" else int(top_k), temperature=self.temperature,
                                 route_every=self.route_every, route_early=self.route_early_list,
                                 route_weights=self.route_weights, name=f"ensemble_top{top_k}")
        elif self.method == "posterior":
            from experts.ensemble import save_ensemble_config

            save_ensemble_config(out, expert_dirs, kind="posterior", prior="updating", top_k=self.top_k_value,
                                 name="posterior")
        elif self.method == "average":
            from experts.average import average_experts

            average_experts(expert_dirs, out)
        else:
            import numpy as np

            from experts.moe import build_moe

            centroids = np.load(self.input_path(r["clusters"]) / "centroids.npy")  # (k, dim)
            build_moe(expert_dirs, out, seed_dir=self.input_path(r["seed"]), router_init=self.router_init,
                      top_k=min(self.moe_top_k, self.num_clusters), centroids=centroids,
                      cluster_texts=self._cluster_texts() if self.router_init != "random" else None, seed=self.seed)
        return {"method": self.method, "experts": expert_dirs}

    def _cluster_texts(self, per_cluster: int = 32) -> list[list[str]]:
        """Up to `per_cluster` training documents of each cluster (router initialisation from hidden states)."""
        from corpus.read import read_columns, take_rows

        r = self.requires()
        ids = read_columns(self.input_path(r["assignments"]) / "train.parquet", ["cluster_id"]).column(0).to_pylist()
        rows: list[list[int]] = [[] for _ in range(self.num_clusters)]
        for i, c in enumerate(ids):
            if len(rows[c]) < per_cluster:
                rows[c].append(i)
        flat = [i for group in rows for i in group]
        texts = iter(row["text"] for row in take_rows(self.input_path(r["corpus"]) / "train.parquet", flat, ["text"]))
        return [[next(texts) for _ in group] for group in rows]


class FinetuneMoE(_TrainStage):
    """BTX: `experts.moe.finetune_moe` trains the merged MoE on all clusters with the load-balancing loss for
    `--moe-tokens` (default 10% of --train-tokens, on top of the compute-matched budget) → `moe-finetuned-<h>/`."""

    folder = "moe-finetuned"
    hashed = ("moe_tokens", "train_tokens", "batch_tokens", "learning_rate", "seed")

    def requires(self):
        return {"moe": self.clone(MergeExperts, method="moe"), "shards": self.clone(ShardCorpus)}

    def tokens(self) -> int:
        return self.moe_tokens or max(1, self.train_tokens // 10)

    def build(self, out: Path) -> dict:
        from experts.moe import finetune_moe

        with gpu_slots(1 if self.device != "cpu" else 0, Path(self.run_dir) / ".gpu-locks") as gpus:
            config = self.train_config(self.tokens(), **({"device": f"cuda:{gpus[0]}"} if gpus else {}))
            info = finetune_moe(self.input_path(self.requires()["moe"]), self.shard_paths(), out, config,
                                valid_paths=self.shard_paths(split="valid") or None)
        return self.summary(info, ("tokens_seen", "steps", "wall_time_s", "gpu_hours", "routing"))
