"""Run `luigi --module pipeline ...` as a user does, with an optional kill -9 at a chosen point of a stage.

`run_cli(args, cwd)` runs luigi's command line (`luigi.retcodes.run_with_retcodes`, what the `luigi` script
calls) in a forked child of the test process, so each run skips the seconds of importing torch and transformers;
the child starts with luigi's instance cache and logging reset, writes its output to a file, and `os._exit`s with
luigi's exit code. `run_subprocess` starts a fresh `python -m luigi` instead (exit codes from another folder,
concurrent runs).

A `Kill(family, nth, point, k)` makes the child SIGKILL itself inside the `nth` run of stage `family`:
  start          when the stage starts (luigi's START event; nothing written yet)
  commit         before the stage's `k`-th file rename (`os.replace`: every atomic write's commit — a checkpoint,
                 a library's own atomic folder — counts; with k = the last one this is `publish`)
  publish        before the rename that puts the stage's output in place
  after-publish  right after it (an evaluation's stamp and every stage's stage_log line are not written yet)
For RunAll the output is `<run_dir>/report.json`. `count_commits` runs a build that records how many renames
each stage makes, so that `k` can be drawn (seeded) among the real ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VOLATILE = {"created", "published", "timings", "wall_time_s", "gpu_hours", "cbtm_gpu_hours", "dense_gpu_hours",
            "tokens_per_s", "prompts_per_s", "mfu", "run_dir"}


@dataclass(frozen=True)
class Kill:
    family: str
    nth: int = 1
    point: str = "publish"
    k: int = 1

    def __str__(self) -> str:
        return f"{self.family}#{self.nth}:{self.point}" + (f"-{self.k}" if self.point == "commit" else "")


@dataclass
class Result:
    code: int  # exit code; -9 when the kill landed
    out: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.out.splitlines() if "InputError: " in line or line.startswith("luigi: error:")]


def flags(params: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]


def run_cli(args: list[str], cwd: Path, kill: Kill | None = None, count_to: Path | None = None,
            checkpoint_every: int | None = None, setup=None, timeout: float = 600) -> Result:
    """`luigi --module pipeline <args>` in a forked child (module doc); returns its exit code and output.
    `setup()` runs in the child first (a test's fault injection)."""
    log = Path(cwd) / f".luigi-out-{os.getpid()}-{len(list(Path(cwd).glob('.luigi-out-*')))}.txt"
    pid = os.fork()
    if pid == 0:  # child
        code = 98
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            os.chdir(cwd)
            _fresh_luigi()
            if checkpoint_every:
                _checkpoint_every(checkpoint_every)
            if setup is not None:
                setup()
            if kill is not None or count_to is not None:
                _install_hooks(kill, count_to)
            from luigi.retcodes import run_with_retcodes

            run_with_retcodes(["--module", "pipeline", *args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - report, then leave the child
            traceback.print_exc()
            code = 97
        finally:
            try:
                from pipeline.lock import release_all

                release_all()  # what the interpreter's exit would do (atexit does not run on os._exit)
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    import time

    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"luigi {' '.join(args[:2])} ran over {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    out = log.read_text(errors="replace") if log.exists() else ""
    log.unlink(missing_ok=True)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return Result(code, out)


def run_subprocess(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600) -> Result:
    """A fresh `python -m luigi --module pipeline <args>` in `cwd` (no luigi.cfg there unless the test puts one)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    env.pop("LUIGI_CONFIG_PATH", None)
    p = subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout + p.stderr)


def popen(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("LUIGI_CONFIG_PATH", None)
    return subprocess.Popen([sys.executable, "-m", "luigi", "--module", "pipeline", *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


# ---- the child's set-up ---------------------------------------------------------------------------------------
def _fresh_luigi() -> None:
    import logging

    import luigi
    import luigi.setup_logging

    luigi.task_register.Register.clear_instance_cache()
    luigi.setup_logging.InterfaceLogging._configured = False
    for name in ("luigi-interface", "luigi", ""):
        logging.getLogger(name).handlers.clear()
    import torch

    torch.set_num_threads(1)


def _checkpoint_every(n: int) -> None:
    """Training stages checkpoint every `n` steps (the pipeline's default, 200, is more than a tiny run makes)."""
    from pipeline.training import _TrainStage

    original = _TrainStage.train_config

    def train_config(self, tokens, **kw):
        return original(self, tokens, **{"checkpoint_every": n, **kw})

    _TrainStage.train_config = train_config


def _target(task) -> Path:
    from pipeline.stage import Stage

    return task.out_path() if isinstance(task, Stage) else Path(task.run_dir) / "report.json"


def _install_hooks(kill: Kill | None, count_to: Path | None) -> None:
    import luigi

    state = {"runs": {}, "active": None, "events": 0, "counts": {}}

    def die():
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    @luigi.Task.event_handler(luigi.Event.START)
    def on_start(task):
        state["runs"][task.task_family] = n = state["runs"].get(task.task_family, 0) + 1
        state["active"], state["events"] = task, 0
        if kill is not None and task.task_family == kill.family and n == kill.nth and kill.point == "start":
            die()

    @luigi.Task.event_handler(luigi.Event.SUCCESS)
    def on_success(task):
        if count_to is not None:
            key = f"{task.task_family}#{state['runs'][task.task_family]}"
            state["counts"][key] = state["events"]
            Path(count_to).write_text(json.dumps(state["counts"], indent=1))
        state["active"] = None

    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        task = state["active"]
        if task is None:
            return real_replace(src, dst, *a, **kw)
        state["events"] += 1
        armed = kill is not None and task.task_family == kill.family and state["runs"][kill.family] == kill.nth
        publish = Path(dst) == _target(task)
        if armed and (kill.point == "publish" and publish or kill.point == "commit" and state["events"] == kill.k):
            die()
        out = real_replace(src, dst, *a, **kw)
        if armed and kill.point == "after-publish" and publish:
            die()
        return out

    os.replace = replace


# ---- comparing runs ---------------------------------------------------------------------------------------------
def normalized_report(run_dir: Path) -> dict:
    """report.json without what differs between two runs of the same thing (times, run ids, the folder)."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in VOLATILE}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    report = json.loads((Path(run_dir) / "report.json").read_text())
    report["run"].pop("params", None)  # compared separately where it matters (it names the run folder)
    return strip(report)


def digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (or of `path`), by relative name."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if p != path else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def leftovers(run_dir: Path) -> list[str]:
    """Temporary or working folders/files a finished run should not have."""
    from corpus.io import temporary_of

    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob(".*")
                  if temporary_of(p.name) is not None or p.name == ".cbtm-lock"
                  or any(s in p.name for s in (".partial", ".ckpt", ".launch.json")))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst
