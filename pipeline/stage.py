"""What every stage shares: hashed output folders, completion stamps, atomic writes, GPUs.

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

`validate` (`pipeline.params`) checks the stage's parameters (types, NaN, ranges, names, paths) when it is built,
before any work; the root task of a command line also claims the run folder (`pipeline.preflight`: lock, stale
temporaries, free disk space). Failures are one line: an InputError as it is, anything else as `<Type>:
<message>` with its traceback in `<run_dir>/errors/` (`pipeline.failures`; `CBTM_DEBUG=1` logs it too).

Heavy libraries (torch, transformers, sklearn, datasets) are imported only inside `build`; `requires`,
`output` and `complete` read small JSON files and never touch CUDA. Every finished run appends one line to
`<run_dir>/stage_log.jsonl` (stage, task id, pid, host, start, wall time), which the tests read
(`pipeline.stamps`).
"""
from __future__ import annotations

import contextlib
import errno
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

from corpus.io import (InputError, atomic_dir, publish_dir, read_json, short_hash, temporary_of, temporary_path,
                       write_json)
from corpus.layout import STAGE_STAMP
from pipeline.failures import error_file, interruptible, rebuild_command, upstream_named_in, write_failure
from pipeline.params import RUN_PARAMETERS, ExecutionParams, Params, RunFolderParams, warn_once
from pipeline.preflight import claim_for_command_line
from pipeline.stamps import append_stage_log, normal_modes, relative_run_ids, remove_path

log = logging.getLogger("luigi-interface")


class Stage(Params, RunFolderParams, ExecutionParams, luigi.Task):
    """Base of all stages. Subclasses set `folder`, `hashed`, `requires()` and `build(out: Path) -> dict|None`.

    Every stage carries the run folder's and the execution parameters; a stage adds the parameter groups it uses
    as bases (`class FitClusters(Stage, ClusterParams)`) and the parameters of the stages it requires with
    `pipeline.params.carries`, so `clone()` hands them down. Keyword arguments that are run parameters a stage does
    not carry are left out (`get_param_values`): a run's whole set of flags builds any of its stages.

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
        claim_for_command_line(self)  # a stage run alone from the command line: lock, clean, check disk

    @classmethod
    def get_param_values(cls, params, args, kwargs):
        """luigi's, after leaving out the run parameters this stage does not carry (any other unknown name still
        fails)."""
        carried = {name for name, _ in params}
        kwargs = {k: v for k, v in kwargs.items() if k in carried or k not in RUN_PARAMETERS}
        return super().get_param_values(params, args, kwargs)

    def clone(self, cls=None, **kwargs):
        """luigi's `clone`, refused (TypeError) when `cls` carries a run parameter this stage does not carry and
        `kwargs` do not set: it would take its default, and the clone would name another folder."""
        missing = ({n for n, _ in (cls or type(self)).get_params()} & RUN_PARAMETERS) - set(kwargs) - \
            {n for n, _ in self.get_params()}
        if missing:
            raise TypeError(f"{self.task_family} cannot clone {(cls or type(self)).__name__}: it does not carry "
                            f"{', '.join(sorted(missing))} (add the stage to its @carries)")
        return super().clone(cls, **kwargs)

    def __hash__(self):  # luigi hashes the task_id it computed from all parameters; keep hash and == consistent
        return hash(self.task_id)

    def validate(self) -> None:
        super().validate()
        check_force_stage(self.force_stage)

    @property
    def data_workers_value(self) -> int:
        """--data-workers, or (0) the cores this process may use divided among the stages its luigi worker runs at
        once (`pipeline.cli.concurrent_stages`, as the stage's CPU threads are in `run`)."""
        if self.data_workers > 0:
            return int(self.data_workers)
        from corpus.threads import available_cores
        from pipeline.cli import concurrent_stages

        return max(1, available_cores() // concurrent_stages())

    def error_file(self) -> Path:
        """Where the traceback of this stage's last failure is kept (`pipeline.failures`)."""
        return error_file(self.run_dir, self.task_id)

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
        """`complete()` over the graph upstream: `memo` holds {task_id: fresh} and {(task_id, "run_id"): the
        run_id of the stamp read}, so each stamp is read once per call however many stages depend on it."""
        if self.task_id in memo:
            return memo[self.task_id]
        memo[self.task_id] = False  # guards against cycles while computing
        ok = self.out_path().exists() and self.stamp_path().is_file()
        if ok:
            try:
                stamp = read_json(self.stamp_path())
                recorded = relative_run_ids(stamp.get("inputs_run_ids", {}), (stamp.get("params") or {}).get("run_dir"))
                memo[self.task_id, "run_id"] = stamp.get("run_id")
            except (InputError, AttributeError, TypeError):
                stamp, recorded, ok = {}, {}, False
            if self._forced_since is not None and stamp.get("started_unix", 0) < self._forced_since:
                ok = False
            if ok and self._damaged(stamp):
                ok = False
            for t in self._inputs():
                # an input found fresh had its stamp read just now: its run_id is in the memo
                if not t._fresh(memo) or recorded.get(self.rel_path(t)) != memo.get((t.task_id, "run_id")):
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
        if bad:
            shown = "; ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            warn_once(f"damaged {self.out_path()}", "%s output %s is damaged (%s): rebuilding it and what depends "
                      "on it (alone: %s)", self.task_family, self.out_path(), shown, rebuild_command(self))
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
        with interruptible(self), self._clear_failures(), self._workdir(final, stamp["inputs_run_ids"]) as work:
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
        append_stage_log(Path(self.run_dir), {k: stamp[k] for k in ("stage", "task_id", "hash", "run_id", "host", "pid",
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
                for stale in final.parent.glob(f".{globlib.escape(final.name)}.partial*"):
                    remove_path(stale)
            write_json(marker, inputs_run_ids)
            work.mkdir(exist_ok=True)
            yield work
            publish_dir(work, final)  # a rebuilt (--force-stage) output replaces the old one without a gap
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
            culprit = upstream_named_in(self, str(e))
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
            path = self.error_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(traceback.format_exc())
        return super().on_failure(exception)




_PATH_VALUES = ("corpus", "seed_model", "encoder_model", "task")  # hashed by `path_key`


def path_key(value: str) -> str:
    """How a path parameter enters stage hashes: a local path (or glob) as its absolute path, so a relative and an
    absolute spelling of one file give the same folders (an absolute spelling keeps the folders it had);
    names ('demo', 'scratch', hub names, '') as they are."""
    text = os.path.expanduser(str(value))
    if text in ("", "demo", "scratch") or not (any(c in text for c in "*?[") or os.path.exists(text)):
        return value
    return os.path.abspath(text)



def _names(value: str) -> set[str]:
    return {v.strip() for v in str(value).split(",") if v.strip()}


def stage_families() -> list[str]:
    """The names of every stage class (a Stage subclass not named `_...`), in the order they were defined."""
    out, todo = [], list(Stage.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo[:0] = cls.__subclasses__()
        if not cls.__name__.startswith("_") and cls.__name__ not in out:
            out.append(cls.__name__)
    return out


def check_force_stage(force_stage: str) -> None:
    """--force-stage names stages only (one line naming the others)."""
    unknown = sorted(_names(force_stage) - set(stage_families()))
    if unknown:
        raise InputError(f"--force-stage {', '.join(unknown)}: not a stage; stages: {', '.join(stage_families())}")
