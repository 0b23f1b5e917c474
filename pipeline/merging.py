"""Merging stages: the c-BTM sparse ensemble, the BTM posterior ensemble, parameter averaging and the task-arithmetic
merges (task arithmetic, TIES, DARE), the BTX MoE (`MergeExperts(method)`, one entry of
`experts.merging.MERGE_METHODS` each: its `needs` are this stage's inputs, its `params` the flags it hashes), and
BTX finetuning of the MoE (`FinetuneMoE`)."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import luigi

from corpus.io import InputError, read_json, write_json
from corpus.layout import MERGE_FAILED
from experts.merging import MERGE_METHODS, TASK_VECTOR_MERGES, MergeInputs, get_method, merge, needs
from experts.run_models import ensemble_name
from pipeline.params import MergeParams, MoEFinetuneParams, MoEParams, RoutingParams, carries
from pipeline.stage import Stage
from pipeline.clustering import AssignClusters, EmbedCorpus, FitClusters
from pipeline.corpus import PrepareCorpus
from pipeline.training import ShardCorpus, TokenizeCorpus, TrainDense, TrainExpert, TrainSeed, _TrainStage

log = logging.getLogger("luigi-interface")

INPUT_STAGES = {"clusters": FitClusters, "embeddings": EmbedCorpus, "assignments": AssignClusters,
                "seed": TrainSeed, "shards": ShardCorpus, "corpus": PrepareCorpus}
"""The stage behind each folder `experts.merging.needs` names (`shared` is another MergeExperts)."""
FLAGS = {name: m.flags for name, m in MERGE_METHODS.items()}
"""The run parameters each merge method's output depends on beyond the experts: its registry entry's `params`."""


@carries(TrainExpert, *INPUT_STAGES.values())
class MergeExperts(Stage, RoutingParams, MoEParams, MergeParams):
    """`experts.merging.merge` with one `--merge-methods` value → `merged-<h>/<method>/`: ensemble|posterior →
    `ensemble.json` made a Hugging Face model folder; average|task_arithmetic|ties|dare_linear|dare_ties|moe →
    `save_pretrained` folders. `ensemble_top_k` ('' = --top-k) lets the evaluation build the top-1/2/all variants
    of the c-BTM ensemble."""

    folder = "merged"
    method = luigi.Parameter(default="ensemble", description="one of " + ", ".join(MERGE_METHODS))
    ensemble_top_k = luigi.Parameter(default="", description="method ensemble: experts per prefix, an integer or "
                                     "'all'; '' = --top-k")

    @property
    def hashed(self):
        centroid_router = self.method == "moe" and self.router_init == "centroids"
        return ("method",) + FLAGS.get(self.method, ()) + (("router_fit",) if centroid_router else ())

    def _hash_value(self, name):
        if name == "router_fit":  # the least-squares router init (issue 24) replaced a silent hidden-state fallback
            return "least-squares-v2"
        if name == "ensemble_top_k":
            return self.ensemble_top_k or str(self.top_k)
        return super()._hash_value(name)

    @property
    def subpath(self) -> str:
        return self.method

    def validate(self) -> None:
        super().validate()
        get_method(self.method)  # InputError naming the methods

    @property
    def gpu_stage(self) -> bool:
        if self.device == "cpu":
            return False
        if self.method == "moe":
            return self.router_init in ("hidden", "centroids")  # hidden states of documents
        return self.method in TASK_VECTOR_MERGES and self.merge_lambda == "auto"  # λ chosen by forward passes

    def requires(self):
        req = {"experts": [self.clone(TrainExpert, cluster_id=c) for c in range(self.num_clusters)]}
        for name in needs(self.method, self.moe_shared):
            req[name] = self.clone(MergeExperts, method=self.moe_shared) if name == "shared" else \
                self.clone(INPUT_STAGES[name])
        return req

    def input_value(self, field: str, flag: str):
        """The `MergeInputs.<field>` value of run flag `flag` (the value the folder hash holds, typed)."""
        value = self._hash_value(flag)
        if field == "top_k":
            return None if str(value).lower() == "all" else int(value)
        if field == "lam":
            return None if value == "auto" else float(value)
        if field == "route_early":
            return tuple(self.route_early_list)
        return value

    def build(self, out: Path) -> dict:
        r = self.requires()
        expert_dirs = [str(self.input_path(t)) for t in r["experts"]]
        model = ensemble_name(self._hash_value('ensemble_top_k')) if self.method == "ensemble" else self.method
        inputs = MergeInputs(  # the method's parameters only: what the folder hash holds is all it reads
            expert_dirs, folders={name: self.input_path(t) for name, t in r.items() if name != "experts"},
            name=model, device=self.device,
            **{field: self.input_value(field, flag) for field, flag in get_method(self.method).params.items()})
        try:
            return {"method": self.method, "experts": expert_dirs, **merge(self.method, out, inputs)}
        except Exception as e:  # noqa: BLE001 - one method's failure must not stop the report and the other models
            failed = record_failure(out, self.method, e)
            log.error("merge %s failed: %s; the report and model cards go on without it (fix: %s)", self.method,
                      failed["error"], failed["fix"])
            return {"method": self.method, "experts": expert_dirs, "failed": failed}


def record_failure(out: Path, method: str, error: BaseException) -> dict:
    """Empty `out` and write `<out>/failed.json` = {method, error, fix} in place of the model; returns it."""
    import shutil

    for p in Path(out).iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    first = str(error).strip().splitlines()[0][:400] if str(error).strip() else type(error).__name__
    kind = "" if isinstance(error, InputError) else f"{type(error).__name__}: "
    failed = {"method": method, "error": kind + first,
              "fix": f"remove the cause above, then rerun with --force-stage MergeExperts (or leave {method} out of "
                     "--merge-methods)"}
    write_json(Path(out) / MERGE_FAILED, failed)
    return failed


def merge_failure(folder: Path) -> dict | None:
    """The failure a merge folder records (`record_failure`), or None when it holds a model."""
    f = Path(folder) / MERGE_FAILED
    return read_json(f) if f.is_file() else None


@carries(MergeExperts, ShardCorpus)
class FinetuneMoE(_TrainStage, MoEFinetuneParams):
    """BTX: `experts.moe.finetune_moe` trains the merged MoE on all clusters with the load-balancing loss for
    `--moe-tokens` (default 25% of --train-tokens) → `moe-finetuned-<h>/`. This is compute beyond the matched
    budget that c-BTM and dense get; the report says how much. With --branch-schedule continue its peak learning
    rate is the one the branches started at (`branch_lr`), not the seed's. bench/RESULTS.md ("Merges that survive
    specialization") has the measurements behind the default."""

    folder = "moe-finetuned"

    @property
    def hashed(self) -> tuple[str, ...]:  # continue: the finetune peaks at the branches' starting LR
        h = ("moe_tokens", "train_tokens", "batch_tokens", "learning_rate", "seed")
        return h + (("branch_schedule",) if self.branch_schedule != "restart" else ())

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

        failed = merge_failure(self.input_path(self.requires()["moe"]))
        if failed:  # nothing to finetune: pass the merge's failure on to the evaluations and the report
            write_json(out / MERGE_FAILED, failed)
            return {"failed": failed}

        with self.gpu_slots(1) as gpus:
            config = self.train_config(self.tokens(), **({"device": f"cuda:{gpus[0]}"} if gpus else {}))
            lr = self.branch_lr()  # --branch-schedule continue: no warmup back to the seed's peak LR
            if lr is not None:
                config = replace(config, lr=lr, min_lr=lr / 10)
            info = finetune_moe(self.input_path(self.requires()["moe"]), self.shard_paths(), out, config,
                                valid_paths=self.shard_paths(split="valid") or None)
        return self.summary(info, ("tokens_seen", "steps", "wall_time_s", "gpu_hours", "routing"))


@carries(TrainDense, TokenizeCorpus, FinetuneMoE)
class TrainDenseMoECompute(_TrainStage):
    """The MoE's equal-compute dense baseline (model `dense_moe_compute`): the compute-matched dense model continued
    on the whole corpus (`TokenizeCorpus`) for the tokens the BTX finetune adds (`FinetuneMoE.tokens`), with the
    finetune's batch and learning rate → `moe-compute-dense-<h>/`. Seed + dense + this = seed + experts + the MoE
    finetune, so the MoE against this model is the comparison at equal training tokens."""

    folder = "moe-compute-dense"
    hashed = FinetuneMoE.hashed

    def requires(self):
        return {"dense": self.clone(TrainDense), "tokens": self.clone(TokenizeCorpus)}

    def tokens(self) -> int:
        return self.clone(FinetuneMoE).tokens()

    def _hash_value(self, name: str):
        if name == "moe_tokens":  # the resolved budget, as FinetuneMoE hashes it
            return self.tokens()
        return super()._hash_value(name)

    def build(self, out: Path) -> dict:
        config = self.train_config(self.tokens())
        lr = self.branch_lr()  # the finetune's learning rate (FinetuneMoE.build)
        if lr is not None:
            config = replace(config, lr=lr, min_lr=lr / 10)
        info = self.launch(str(self.input_path(self.requires()["dense"])), out, config, self.corpus_shard_paths(),
                           self.corpus_shard_paths("valid"))
        return self.summary(info)
