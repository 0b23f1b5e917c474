"""Training stages: tokenizer, token streams of the whole corpus, per-cluster shards, the seed (BTM's seed phase),
one expert per cluster, the dense baseline. Budgets come from `experts.budget` (compute matching: seed + k experts
== seed + dense); seed and dense train on the whole corpus's blocks and do not depend on the clustering."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import luigi

from corpus.io import ConfigError, InputError, load_array, read_json
from corpus.layout import CENTROIDS, SHARDS_META
from pipeline.params import (COMPILE, EVALS_PER_RUN, BudgetParams, ExpertParams, RunParams, SeedModelParams,
                             TemperatureParams, carries, cli_flag)
from pipeline.stage import Stage, check_force_stage
from pipeline.stamps import files_fingerprint
from pipeline.clustering import AssignClusters, FitClusters
from pipeline.corpus import PrepareCorpus

log = logging.getLogger("luigi-interface")


@carries(PrepareCorpus)
class TrainTokenizer(Stage, SeedModelParams):
    """`experts.tokenizer.train_tokenizer` (byte-level BPE on the train split) for `--seed-model scratch`; for an
    HF seed its own tokenizer is copied → `tokenizer-<h>/`."""

    folder = "tokenizer"
    hashed = ("seed_model", "vocab_size")

    def requires(self):
        return self.clone(PrepareCorpus)

    def extra_hash(self):
        """A local seed model's files (name, size, mtime), e.g. `<other run>/dense-<h>/`: retraining it in place
        reruns everything built from it (the seed, experts and dense model all hash this stage)."""
        return None if self.seed_model == "scratch" else files_fingerprint(self.seed_model)

    def build(self, out: Path) -> dict:
        from experts.tokenizer import tokenizer_for_corpus

        return tokenizer_for_corpus(self.input_path(self.requires()), out, self.seed_model, self.vocab_size)


class _SeqLen:
    """The block length of shards: --seq-len, or the scratch preset's / the HF seed's context (≤ 1024)."""

    def resolved_seq_len(self) -> int:
        if self.seq_len:
            return self.seq_len
        if self.seed_model == "scratch":
            from experts.model import get_preset

            return get_preset(self.model_size).seq_len
        from experts.families import context_length, seed_config

        return min(context_length(seed_config(self.seed_model)) or 1024, 1024)


@carries(PrepareCorpus, TrainTokenizer)
class TokenizeCorpus(_SeqLen, Stage):
    """`experts.data.tokenize_corpus` → `tokens-<h>/` the whole corpus's token streams and blocks (`corpus.npy`,
    `valid_corpus.npy`), independent of the clustering: the seed and dense models train on these, so a grid over
    --num-clusters reuses one tokenizer, one seed and one dense model."""

    folder = "tokens"
    hashed = ("seq_len", "model_size", "seed_model")

    def requires(self):
        return {"corpus": self.clone(PrepareCorpus), "tokenizer": self.clone(TrainTokenizer)}

    def build(self, out: Path) -> dict:
        from experts.data import tokenize_corpus

        r = {k: self.input_path(t) for k, t in self.requires().items()}
        meta = tokenize_corpus(r["corpus"], r["tokenizer"], out, self.resolved_seq_len(),
                               num_proc=self.data_workers_value)
        return {"splits": meta["splits"]}


@carries(PrepareCorpus, AssignClusters, TrainTokenizer, TokenizeCorpus)
class ShardCorpus(_SeqLen, Stage):
    """`experts.data.shard_corpus` (from `TokenizeCorpus`'s streams, no second tokenization) →
    `shards-<h>/cluster_{id:03d}.npy`, `valid_cluster_{id:03d}.npy`, meta.json."""

    folder = "shards"
    hashed = ("seq_len", "model_size", "seed_model")

    def requires(self):
        return {"corpus": self.clone(PrepareCorpus), "assignments": self.clone(AssignClusters),
                "tokenizer": self.clone(TrainTokenizer), "tokens": self.clone(TokenizeCorpus)}

    def build(self, out: Path) -> dict:
        from experts.data import shard_corpus

        r = {k: self.input_path(t) for k, t in self.requires().items()}
        return shard_corpus(r["corpus"], r["assignments"], r["tokenizer"], out, self.resolved_seq_len(),
                            tokens_dir=r["tokens"], num_proc=self.data_workers_value)


TRAIN_CONFIG_FLAGS = {
    "seed": "seed", "device": "device", "sharding": "sharding", "global_batch_tokens": "batch_tokens",
    "micro_batch_size": "micro_batch_size", "compile": "compile", "lr": "learning_rate", "min_lr": "learning_rate",
    "eval_every": "eval_every", "keep_best": "keep_best", "trainable": "expert_trainable",
    "experts_per_gpu": "experts_per_gpu"}
"""The run parameter behind each `experts.training.TrainConfig` field the training stages set from a flag (the
others, e.g. train_tokens and the schedule, are budgets and schedules the pipeline works out)."""


def config_error(e: ConfigError, params) -> InputError:
    """`e` (a `TrainConfig` field out of range) as one line naming the flag of `params` (a stage) that set it:
    `--learning-rate 1e-3: TrainConfig.min_lr must be ...`; a field no flag sets is named with '(set by the
    pipeline)'."""
    name = TRAIN_CONFIG_FLAGS.get(e.field.rpartition(".")[2])
    if name is None or not params.carries(name):
        return InputError(f"{e.field} (set by the pipeline) {e.detail}")
    return InputError(f"{cli_flag(name)} {getattr(params, name)}: {e.field} {e.detail}")


class _TrainStage(Stage):
    """Shared wiring of the stages that call `experts.launch.launch_training`."""

    resumable = True
    gpu_stage = True

    def shards(self) -> Path:
        return self.clone(ShardCorpus).out_path()

    def tokens_dir(self) -> Path:
        return self.clone(TokenizeCorpus).out_path()

    def _hash_value(self, name: str):
        if name == "batch_tokens" and not self.batch_tokens:
            # one micro-batch per GPU is then the global batch; the default 8 keeps the hashes runs already have
            micro = self.micro_batch_value  # 'auto' means 8 blocks per GPU here, as the old fixed default
            return f"{micro} blocks per GPU" if micro not in (8, "auto") else 0
        if name == "gpus_per_expert":  # experts' batches are whole blocks per GPU; 1 keeps earlier hashes
            return self.gpus_per_expert if self.gpus_per_expert > 1 else None
        return super()._hash_value(name)

    @staticmethod
    def summary(info, keys=("tokens_seen", "steps", "wall_time_s", "gpu_hours", "final_loss", "valid_loss",
                            "kept_step")) -> dict:
        """The stage.json `result`: the headline fields of the training result."""
        return {k: info.get(k) for k in keys} if isinstance(info, dict) else {}

    def shard_paths(self, cluster_ids=None, split: str = "train") -> list[str]:
        """Per-cluster shards (`ShardCorpus`) of `cluster_ids` (default: every cluster with blocks)."""
        from experts.data import shard_paths

        return shard_paths(self.shards(), cluster_ids, split)

    def corpus_shard_paths(self, split: str = "train") -> list[str]:
        """The whole corpus's blocks (`TokenizeCorpus`), whatever the clustering: what seed and dense train on."""
        from experts.data import corpus_shard_paths

        return corpus_shard_paths(self.tokens_dir(), split)

    def seq_len_of_shards(self) -> int:
        return int(read_json(self.tokens_dir() / SHARDS_META)["seq_len"])

    def dense_batch_blocks(self) -> int:
        from experts.budget import dense_batch_blocks

        micro = self.micro_batch_value  # with --batch-tokens 0, 'auto' means one micro-batch of 8 blocks per GPU
        return dense_batch_blocks(self.batch_tokens, self.seq_len_of_shards(), 8 if micro == "auto" else micro)

    def model_budget(self, which: str) -> dict:
        """{tokens, steps, batch_blocks, batch_tokens} of the seed or the dense model (no clustering involved)."""
        from experts.budget import compute_budget, model_budget

        tokens = compute_budget(self.train_tokens, self.seed_fraction, 1)[f"{which}_tokens"]  # the same for any k
        return model_budget(tokens, self.dense_batch_blocks(), self.seq_len_of_shards(),
                            "seed" if which == "seed" else "dense model")

    def train_config(self, tokens: int, **kw):
        """The `TrainConfig` of this training; a field it refuses (`ConfigError`) is named by the flag behind it
        (`config_error`)."""
        from experts.training import TrainConfig

        opts = dict(train_tokens=tokens, seed=self.seed, device=self.device, sharding=self.sharding,
                    global_batch_tokens=self.batch_tokens or None, micro_batch_size=self.micro_batch_value,
                    compile=COMPILE[self.compile])
        opts.update(kw)
        if self.learning_rate_value:
            opts["lr"] = self.learning_rate_value
            opts["min_lr"] = self.learning_rate_value / 10
        try:
            return TrainConfig(**opts)
        except ConfigError as e:
            raise config_error(e, self) from None

    def guarded_config(self, budget: dict, **kw):
        """The training config of seed, dense or an expert: its budget (whole steps of its global batch) and the
        same overfitting guard for all three (validation every --eval-every steps, the best weights kept)."""
        eval_every = self.eval_every or max(1, budget["steps"] // EVALS_PER_RUN)
        return self.train_config(budget["tokens"], global_batch_tokens=budget["batch_tokens"],
                                 eval_every=eval_every, keep_best=self.keep_best, **kw)

    def branch_schedule_kw(self, branch_steps: int, branch: bool = True) -> dict:
        """TrainConfig's schedule fields under --branch-schedule continue: the seed phase's steps and a branch's
        (dense or expert) `branch_steps` are one schedule; the seed starts it (`branch=False`), the branch goes on
        from where the seed stopped. {} with restart, or without a seed phase."""
        seed_steps = self.model_budget("seed")["steps"] if self.seed_fraction > 0 else 0
        if self.branch_schedule == "restart" or seed_steps == 0:
            return {}
        return {"schedule_steps": seed_steps + branch_steps, "schedule_start": seed_steps if branch else 0}

    def branch_lr(self) -> float | None:
        """The learning rate the branches (dense, experts) start at under --branch-schedule continue: the seed's
        schedule one step past the seed phase. None with restart or without a seed phase."""
        from experts.training.schedule import lr_at, plan_training

        schedule = self.branch_schedule_kw(self.model_budget("dense")["steps"], branch=False)
        if not schedule:
            return None
        seed = self.model_budget("seed")
        config = self.guarded_config(seed, **schedule)
        return lr_at(seed["steps"], config, plan_training(config, self.seq_len_of_shards()))

    def shares_gpu(self) -> bool:
        """Whether this stage trains in one of --experts-per-gpu slots of a GPU (experts only)."""
        return False

    def launch(self, init, out: Path, config, shard_paths: list[str], valid_paths: list[str],
               tokenizer=None) -> dict:
        """Train `init` on `shard_paths` with `config` on this stage's GPUs: whole GPUs, or with
        --experts-per-gpu N > 1 one slot of a GPU, chosen so the GPUs get similar tokens per step; in a Slurm job
        the job's GPUs, on all its nodes (`pipeline.slurm.job_launch`). On CPU an expert with --gpus-per-expert N
        trains as N gloo processes."""
        from experts.launch import launch_training
        from experts.training import TrainConfig
        from pipeline.slurm import cpu_ranks, job_launch

        shared = self.shares_gpu()
        if shared:
            config = TrainConfig.from_dict({**config.to_dict(), "experts_per_gpu": self.experts_per_gpu})
        with self.gpu_slots(shared=shared, weight=float(config.train_tokens)) as gpus:  # weight: this training's work
            return launch_training(init, shard_paths, out, config, valid_paths=valid_paths or None,
                                   tokenizer=tokenizer, gpus=gpus or None, cpu_procs=cpu_ranks(self),
                                   **job_launch(self))


_GUARD = ("eval_every", "keep_best")


@carries(TokenizeCorpus, TrainTokenizer)
class TrainSeed(_TrainStage, BudgetParams):
    """BTM's seed phase: `seed_fraction × train_tokens` on the whole corpus (`TokenizeCorpus`, not the clusters),
    from a scratch Llama preset or from an HF causal LM → `seed-<h>/` (save_pretrained + training.json)."""

    folder = "seed"

    @property
    def hashed(self) -> tuple[str, ...]:
        # --branch-schedule continue decays the seed's LR over the whole budget; restart (the schedule of earlier
        # versions) keeps the folders those runs have
        h = ("seed_model", "model_size", "train_tokens", "seed_fraction", "batch_tokens", "learning_rate", "seed")
        return h + _GUARD + (("branch_schedule",) if self.branch_schedule != "restart" else ())

    def requires(self):
        return {"tokens": self.clone(TokenizeCorpus), "tokenizer": self.clone(TrainTokenizer)}

    def build(self, out: Path) -> dict:
        from experts.model import build_scratch_model, save_initial_seed

        tokenizer_dir = self.input_path(self.requires()["tokenizer"])
        meta = read_json(self.tokens_dir() / SHARDS_META)
        if self.seed_model == "scratch":
            init = build_scratch_model(self.model_size, vocab_size=meta["vocab_size"], seq_len=meta["seq_len"],
                                       seed=self.seed)
        else:
            init = self.seed_model
        if self.seed_fraction == 0:  # the seed is the initial model itself (no seed phase)
            return save_initial_seed(init, out, tokenizer_dir)
        schedule = self.branch_schedule_kw(self.model_budget("dense")["steps"], branch=False)
        return self.launch(init, out, self.guarded_config(self.model_budget("seed"), **schedule),
                           self.corpus_shard_paths(), self.corpus_shard_paths("valid"), tokenizer=str(tokenizer_dir))


@carries(ShardCorpus, TrainSeed, FitClusters)
class TrainExpert(_TrainStage, ExpertParams, TemperatureParams):
    """Branch from the seed (or, `--branch-from average`, from the centroid-distance-weighted average of the
    first half of the experts, BTM's way to add a domain) and train on cluster `cluster_id`'s shard with the budget
    `experts.budget.plan_budgets` gives it (--compute-match, --expert-budget) → `experts-<h>/cluster_{id:03d}/`;
    with `--expert-trainable ffn` only the feed-forward blocks train (FlexOlmo)."""

    folder = "experts"
    cluster_id = luigi.IntParameter(description="the cluster this expert trains on, in [0, --num-clusters)")

    @property
    def hashed(self) -> tuple[str, ...]:  # the temperature weights the average that later experts branch from
        budget = ("compute_match", "expert_budget", "gpus_per_expert") + \
            (("small_share",) if self.small_share != "fewer_steps" else ())  # the default keeps earlier folders
        h = ("branch_from", "temperature") if self.branch_from == "average" else ("branch_from",)
        return h + budget + (("expert_trainable",) if self.expert_trainable != "all" else ())

    def train_config(self, tokens: int, **kw):
        return super().train_config(tokens, trainable=self.expert_trainable, **kw)

    def budget_plan(self) -> dict:
        """`experts.budget.plan_budgets` for this run: seed, dense and every expert (reads the shards' meta); the
        report and the model cards show it too."""
        from experts.budget import plan_budgets

        meta = read_json(self.shards() / SHARDS_META)
        clusters = [meta["clusters"].get(str(c), {}).get("train", {}) for c in range(self.num_clusters)]
        return plan_budgets(self.train_tokens, self.seed_fraction, [c.get("n_tokens", 0) for c in clusters],
                            int(meta["seq_len"]), self.dense_batch_blocks(), compute_match=self.compute_match,
                            expert_budget=self.expert_budget, gpus_per_expert=self.gpus_per_expert,
                            cluster_blocks=[c.get("n_blocks", 0) for c in clusters], small_share=self.small_share)

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.cluster_id < self.num_clusters:
            raise InputError(f"--cluster-id {self.cluster_id}: must be in [0, {self.num_clusters})")

    @property
    def subpath(self) -> str:
        return f"cluster_{self.cluster_id:03d}"

    def gpu_count(self) -> int:
        return self.gpus_per_expert

    def shares_gpu(self) -> bool:
        return self.experts_per_gpu > 1

    def gpu_units(self) -> int:
        # with --experts-per-gpu > 1 the GPU slots (file locks) share each GPU between expert stages; a Luigi unit
        # would let only one expert run per GPU
        return 0 if self.shares_gpu() else self.gpu_count()

    def first_phase(self) -> list[int]:
        """Experts that branch from the seed when --branch-from average (the others average these)."""
        return list(range(max(1, self.num_clusters // 2)))

    def branches_from_average(self) -> bool:
        return self.branch_from == "average" and self.cluster_id not in self.first_phase()

    def requires(self):
        req = {"shards": self.clone(ShardCorpus), "seed": self.clone(TrainSeed), "clusters": self.clone(FitClusters)}
        if self.branches_from_average():
            req["experts"] = [self.clone(TrainExpert, cluster_id=j) for j in self.first_phase()]
        return req

    def hash_inputs(self):
        r = self.requires()
        return [r["shards"], r["seed"], r["clusters"]]  # the same for every cluster_id: one experts-<h>/ folder

    def build(self, out: Path) -> dict:
        plan = self.budget_plan()  # InputError for empty clusters
        budget = plan["experts"][self.cluster_id]
        small = [e for e in plan["experts"] if e["small"]]
        if small and self.cluster_id == small[0]["cluster_id"]:  # said once per run, by the first such expert
            log.info("%d of %d clusters have less than one block of the dense batch (%d blocks) as their share; "
                     "--small-share %s: %s", len(small), len(plan["experts"]), plan["dense"]["batch_blocks"],
                     self.small_share, "each trains one block per step for its share of the dense model's "
                     f"{plan['dense']['steps']} steps (the same tokens; steps "
                     f"{', '.join(str(e['steps']) for e in small)})" if self.small_share == "fewer_steps" else
                     "each trains one block per step for all steps, taken from the larger experts' batches")
        r = self.requires()
        init = self.input_path(r["seed"])
        if self.branches_from_average():
            from experts.merge import branch_average

            centroids = load_array(self.input_path(r["clusters"]) / CENTROIDS)  # (k, dim)
            init = branch_average([self.input_path(t) for t in r["experts"]], centroids[self.first_phase()],
                                  centroids[self.cluster_id], self.temperature, out.parent / f"{out.name}.branch-init")
        try:
            info = self.launch(str(init), out, self.guarded_config(budget, **self.branch_schedule_kw(budget["steps"])),
                               self.shard_paths([self.cluster_id]), self.shard_paths([self.cluster_id], "valid"))
        finally:  # the averaged start is this stage's own copy; a rerun averages again
            if init != self.input_path(r["seed"]):
                shutil.rmtree(init, ignore_errors=True)
        return self.summary(info)


@carries(TokenizeCorpus, TrainSeed)
class TrainDense(_TrainStage):
    """The compute-matched dense baseline: the same seed continued on the whole corpus (`TokenizeCorpus`) for
    `(1 − seed_fraction) × train_tokens` tokens at the dense batch → `dense-<h>/`. Independent of the clustering."""

    folder = "dense"
    hashed = _GUARD

    def requires(self):
        return {"tokens": self.clone(TokenizeCorpus), "seed": self.clone(TrainSeed)}

    def build(self, out: Path) -> dict:
        budget = self.model_budget("dense")
        info = self.launch(str(self.input_path(self.requires()["seed"])), out,
                           self.guarded_config(budget, **self.branch_schedule_kw(budget["steps"])),
                           self.corpus_shard_paths(), self.corpus_shard_paths("valid"))
        return self.summary(info)


class TrainExperts(RunParams, luigi.WrapperTask):
    """Every `TrainExpert(cluster_id)` of the run. On several hosts sharing the run folder, start
    `luigi --module pipeline TrainExperts --scheduler-host <luigid host> --workers N` on each: every worker picks
    up the next expert that nobody trains yet."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.validate()
        check_force_stage(self.force_stage)
        from pipeline.preflight import claim_for_command_line

        claim_for_command_line(self)

    def requires(self):
        return [self.clone(TrainExpert, cluster_id=c) for c in range(self.num_clusters)]
