"""Failures in one line: a stage that could not write its run folder (`write_failure`), the stage a Ctrl-C
stopped (`interrupted_stage`), the command that rebuilds one stage (`rebuild_command`), and the luigi log filter
that shows any failure as `<Type>: <message>` with its traceback kept in `<run_dir>/errors/` (`CBTM_DEBUG=1`
logs it too).

Stages are known here by what they do, not by class (this module sits below `pipeline.stage`): `_inputs()`,
`out_path()`, `error_file()`.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from pathlib import Path
from typing import Iterator

import luigi

from corpus.io import InputError
from pipeline.params import cli_flag


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


_INTERRUPTED: list = []  # the stage a Ctrl-C stopped, for the one line pipeline.cli prints


@contextlib.contextmanager
def interruptible(stage: luigi.Task) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        import multiprocessing

        if multiprocessing.parent_process() is not None:  # a luigi worker process (--workers N): the command
            os._exit(130)  # that forked it got the Ctrl-C too and says it in one line; no traceback from here
        _INTERRUPTED.append(stage)
        raise


def interrupted_stage() -> "luigi.Task | None":
    """The stage that was running when Ctrl-C stopped this process (None: between stages)."""
    return _INTERRUPTED[-1] if _INTERRUPTED else None


_MODEL_STAGES = ("TrainSeed", "TrainExpert", "TrainDense", "MergeExperts", "FinetuneMoE")


def upstream(stages) -> Iterator[luigi.Task]:
    """`stages` and every stage they depend on, transitively, each once (depth first)."""
    seen, todo = set(), list(stages)
    while todo:
        t = todo.pop()
        if t.task_id in seen:
            continue
        seen.add(t.task_id)
        todo.extend(t._inputs())
        yield t


def upstream_named_in(stage: luigi.Task, message: str) -> "luigi.Task | None":
    """The training/merge stage upstream of `stage` (or `stage` itself) whose output folder `message` names."""
    best = None
    for t in upstream([stage]):
        if t.task_family not in _MODEL_STAGES:
            continue
        for path in {str(t.out_path()), str(t.out_path().resolve())}:
            if re.search(re.escape(path) + r"(?![\w.-])", message) and (best is None or len(path) > best[1]):
                best = (t, len(path))
    return best[0] if best else None


def rebuild_command(stage: luigi.Task) -> str:
    """`luigi --module pipeline <Stage> ... --force-stage <Stage>`: rebuilds `stage` alone with the parameters it
    has now (those different from their defaults), replacing its output when the new one is complete."""
    import shlex

    words = ["luigi", "--module", "pipeline", stage.task_family, "--local-scheduler"]
    for name, param in stage.get_params():
        value = getattr(stage, name)
        if name == "force_stage" or (name != "run_dir" and value == param._default):
            continue
        words += [cli_flag(name), str(value)]
    words += ["--force-stage", stage.task_family]
    return " ".join(shlex.quote(w) for w in words)


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
            task = next((a for a in record.args if isinstance(a, luigi.Task) and hasattr(a, "error_file")), None) \
                if isinstance(record.args, tuple) else None
            where = f"traceback in {task.error_file()}" if task is not None else f"{DEBUG_ENV}=1 shows the traceback"
            lines = str(exc).strip().splitlines()
            record.msg = f"{record.getMessage()}\n{type(exc).__name__}: {lines[0] if lines else ''} ({where})"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def error_file(run_dir, task_id: str) -> Path:
    """Where a failed stage keeps its traceback: `<run_dir>/errors/<task id>.txt`."""
    return Path(run_dir) / "errors" / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", task_id)[:200] + ".txt")


def install_log_filter() -> None:
    logger = logging.getLogger("luigi-interface")
    if not any(isinstance(f, _OneLineInputErrors) for f in logger.filters):
        logger.addFilter(_OneLineInputErrors())
