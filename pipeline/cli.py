"""What `luigi --module pipeline ...` needs from luigi wherever it runs, installed by `register()`, which
`pipeline/__init__.py` calls (luigi imports that module).

- `DEFAULTS`: the [retcode], [core], [worker], [scheduler] and [resources] settings the pipeline relies on, so
  a failure exits non-zero from any folder (luigi reads `luigi.cfg` from the working directory only, and its
  own exit codes are all 0). A luigi.cfg that sets one of them still wins.
- `--run-lock-wait SECONDS` (`pipeline.lock.run_lock`): wait for another run that holds the run folder.
- `--help` of a stage lists every run flag once, grouped by concern (`pipeline.params.PARAMETER_GROUPS`: run,
  corpus, clustering, training, merging, evaluation, execution; then the Slurm settings), each with its default
  (after luigi.cfg's `[cbtm]` overrides) and marked when the stage does not use it; `--help-all` is luigi's own
  listing. A stage's command line accepts the run flags it does not carry and leaves them out, so that one stage
  reruns with a run's whole command line.
- Threads: the luigi worker's `--workers` is kept (`concurrent_stages`) so that each stage process gives itself
  the cores ÷ that many CPU threads (`corpus.threads.size_threads`, called by `Stage.run`); with more than one,
  the worker imports torch and transformers once before it forks the stage processes (`warm_imports`).
- Flags must be spelled out: luigi's command-line parser accepts any unambiguous prefix (`--num-cluster 8`
  would set --num-clusters); here an unknown or abbreviated flag stops the command with one line naming it and
  the flags it may have meant, exit code 2; a misspelled task name is one line too (exit code 1).
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import sys

import luigi
import luigi.cmdline_parser
import luigi.interface

from pipeline.lock import run_lock  # noqa: F401 - registers --run-lock-wait with luigi's parser
from pipeline.params import cli_flag

DEFAULTS = {
    # exit codes: stages run by another worker (a central luigid with several workers) are not failures
    "retcode": {"already_running": "0", "missing_data": "20", "not_run": "0", "task_failed": "30",
                "scheduling_error": "35", "unhandled_exception": "40"},
    "core": {"autoload_range": "false", "parallel_scheduling": "false"},
    "worker": {"keep_alive": "true", "wait_interval": "1.0", "retry_external_tasks": "false"},
    "scheduler": {"retry_count": "0"},
    "resources": {"gpu": "1"},
}
BAD_FLAG_EXIT = 2
INTERRUPTED_EXIT = 130  # Ctrl-C: 128 + SIGINT


def register(task_names: list[str]) -> None:
    """Everything `luigi --module pipeline ...` needs from luigi, installed once by `pipeline/__init__.py` (the
    module luigi imports; the patches are idempotent): the one-line log filter (`pipeline.failures`), `DEFAULTS`,
    strict flags and --help by concern (`install_strict_flags`), one line for a misspelled task name of
    `task_names` or a Ctrl-C (`install_task_name_hook`), and the worker count (`install_worker_count`)."""
    from pipeline.failures import install_log_filter

    install_log_filter()
    install_defaults()  # exit codes and scheduler settings from code: the same from any folder
    install_strict_flags()  # no abbreviated flags (--num-cluster), run flags a stage does not carry accepted
    install_task_name_hook(task_names)
    install_worker_count()  # each stage sizes its CPU threads to the cores ÷ --workers (corpus.threads)


def install_defaults() -> None:
    """Fill in `DEFAULTS` where no luigi config file set the option."""
    cfg = luigi.configuration.get_config()
    for section, options in DEFAULTS.items():
        for option, value in options.items():
            if not cfg.has_option(section, option):
                if not cfg.has_section(section):
                    cfg.add_section(section)
                cfg.set(section, option, value)


_WORKERS = {"processes": 1}


def install_worker_count() -> None:
    """Remember how many stages this luigi worker runs at once (`--workers`, or `luigi.build(workers=N)`), for the
    stage processes it forks: each sizes its CPU threads to the cores ÷ that number (`corpus.threads`)."""
    import luigi.worker

    init = luigi.worker.Worker.__init__
    if getattr(init, "_cbtm", False):
        return

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _WORKERS["processes"] = max(1, int(getattr(self, "worker_processes", 1) or 1))
        if _WORKERS["processes"] > 1:
            warm_imports()

    counting_init._cbtm = True
    luigi.worker.Worker.__init__ = counting_init


def warm_imports() -> None:
    """With --workers > 1 luigi forks a process per stage: import the heavy libraries once in the worker, before it
    forks, so that each stage starts with them loaded (about 5 CPU-seconds per stage otherwise: torch,
    transformers' Llama and tokenizers, scikit-learn). Importing initialises no CUDA context and starts no threads."""
    import importlib

    for name in ("torch", "transformers", "transformers.models.llama.modeling_llama", "tokenizers", "sklearn.cluster",
                 "pyarrow.parquet"):
        try:
            importlib.import_module(name)
        except ImportError:  # an optional one missing: the stage that needs it says so
            pass


def concurrent_stages() -> int:
    """Stages the luigi worker of this process runs at once (1 outside a worker, e.g. in a Slurm job)."""
    return _WORKERS["processes"]


def install_strict_flags() -> None:
    """luigi builds a fresh argparse parser for every parse (`CmdlineParser._build_parser`); this makes each one
    refuse abbreviations, report a bad flag in one line, accept the run flags a stage does not carry (so one
    stage reruns with the run's whole command line) and group a stage's --help by concern.

    This patches a private luigi method, on purpose: luigi's command line (`luigi --module pipeline ...`, what the
    README tells users to run) builds its parser there and offers no hook for it (luigi/cmdline_parser.py calls it
    "internal"; `luigi.run` takes arguments, not a parser). The patch wraps luigi's own parser, so luigi's flags and
    parsing stay as they are."""
    parser_cls = luigi.cmdline_parser.CmdlineParser
    if getattr(parser_cls._build_parser, "_cbtm_strict", False):
        return
    build = parser_cls._build_parser

    def strict_build_parser(root_task=None, help_all=False):
        parser = build(root_task=root_task, help_all=help_all)
        parser.allow_abbrev = False
        parser.error = lambda message: _flag_error(parser, message)
        if root_task and not help_all:
            _accept_run_flags(parser, root_task)
            _group_help(parser, root_task)
        return parser

    strict_build_parser._cbtm_strict = True
    parser_cls._build_parser = staticmethod(strict_build_parser)


def install_task_name_hook(task_names: list[str]) -> None:
    """A misspelled task name (`luigi --module pipeline RunAl`) makes luigi raise before its own error handling:
    print one line naming the tasks there are instead of a traceback (exit code 1; CBTM_DEBUG=1 keeps it).
    Ctrl-C (KeyboardInterrupt, which luigi passes on) prints one line saying what was interrupted and that the
    same command resumes, and exits with `INTERRUPTED_EXIT` (130, as a shell reports SIGINT); SIGTERM keeps its
    default: the process ends quietly with 143."""
    from luigi.task_register import TaskClassNotFoundException

    from pipeline.failures import debugging

    previous = sys.excepthook
    if getattr(previous, "_cbtm", False):
        return

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt) and not debugging():
            _interrupted()
        if issubclass(kind, TaskClassNotFoundException) and not debugging():
            text = str(value).strip().splitlines()
            head = text[0] if text else ""  # "No task RunAl. Did you mean:"
            name = head[len("No task "):].split(". ")[0].rstrip(".") if head.startswith("No task ") else head
            close = difflib.get_close_matches(name, task_names, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            print(f"luigi: error: no task {name!r}; {hint}tasks: {', '.join(task_names)}", file=sys.stderr)
            return
        previous(kind, value, tb)

    hook._cbtm = True
    sys.excepthook = hook


def _interrupted() -> None:
    """After Ctrl-C: one line, the exit handlers (the run folder's lock, logging), exit code 130."""
    import atexit

    from pipeline.failures import interrupted_stage

    stage = interrupted_stage()
    if stage is None:
        what = "the run was interrupted (Ctrl-C)"
    else:
        what = f"{stage.task_family} was interrupted (Ctrl-C) while writing {stage.out_path()}"
        if stage.resumable:
            what += " (its training resumes from the last checkpoint it saved)"
    print(f"{what}; finished stages are kept: run the same command again to resume", file=sys.stderr, flush=True)
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT)


def _task_class(root_task: str):
    """The class of a `Params` task (a stage, RunAll, ...) named `root_task`, or None."""
    from luigi.task_register import Register, TaskClassNotFoundException

    from pipeline.params import Params

    try:
        task_cls = Register.get_task_cls(root_task)
    except TaskClassNotFoundException:
        return None
    return task_cls if issubclass(task_cls, Params) else None


def _accept_run_flags(parser: argparse.ArgumentParser, root_task: str) -> None:
    """Let a stage's command line carry the run flags the stage does not use (`TrainTokenizer --num-clusters 8`):
    parsed as luigi parses them, then left out (`pipeline.stage.Stage.get_param_values`)."""
    from pipeline.params import PARAMETER_GROUPS

    task_cls = _task_class(root_task)
    if task_cls is None:
        return
    carried = {n for n, _ in task_cls.get_params()}
    for g in PARAMETER_GROUPS:
        for name, param in vars(g).items():
            if isinstance(param, luigi.Parameter) and name not in carried:
                parser.add_argument(cli_flag(name), help=argparse.SUPPRESS, **param._parser_kwargs(name))


def help_sections(task_cls) -> list[tuple[str, str, dict]]:
    """(title, description, {flag: parameter}) of each section of `task_cls`'s --help: the stage's own parameters,
    one section per concern of `pipeline.params.PARAMETER_GROUPS` (the title its groups' docstrings start with;
    execution with luigi's --local-scheduler, --workers and --run-lock-wait), and the Slurm settings. Run
    parameters the task does not carry are listed too (they are accepted and left out: `_accept_run_flags`)."""
    from pipeline.params import PARAMETER_GROUPS, RUN_PARAMETERS
    from pipeline.slurm import slurm

    params = dict(task_cls.get_params())
    grouped = {n for g in PARAMETER_GROUPS for n in vars(g)}
    head = (task_cls.__doc__ or "").strip().split("\n\n")[0]
    if not RUN_PARAMETERS <= set(params):  # a stage that does not carry every run flag
        head += (f"\n\nFlags marked 'not used here' are accepted and left out, so that {task_cls.__name__} runs with a "
                 "run's whole command line and resolves the run's folders.")
    sections = [(task_cls.__name__, head, {cli_flag(n): p for n, p in params.items() if n not in grouped})]
    core = dict(luigi.interface.core.get_params())
    concerns: dict[str, tuple[str, dict]] = {}
    for g in PARAMETER_GROUPS:
        title, _, text = (g.__doc__ or "").partition(":")
        section = concerns.setdefault(title, (text.strip(), {}))[1]
        section.update({cli_flag(n): p for n, p in vars(g).items() if isinstance(p, luigi.Parameter)})
    for title, (text, section) in concerns.items():
        if title == "execution":
            section.update({"--local-scheduler": core["local_scheduler"], "--workers": core["workers"],
                            "--run-lock-wait": dict(run_lock.get_params())["wait"]})
        sections.append((title, text, section))
    sections.append(("slurm", (slurm.__doc__ or "").strip(), {cli_flag(f"slurm_{n}"): p for n, p in slurm.get_params()}))
    return sections


def _group_help(parser: argparse.ArgumentParser, root_task: str) -> None:
    """Regroup the help of `root_task` (a stage) into `help_sections`, each flag once (luigi lists every one twice,
    as --x and --<Task>-x, which stays accepted) with its default."""
    task_cls = _task_class(root_task)
    if task_cls is None:
        return
    from pipeline.params import RUN_PARAMETERS

    unused = {cli_flag(n) for n in RUN_PARAMETERS} - {cli_flag(n) for n, _ in task_cls.get_params()}
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for flag, action in by_flag.items():
        if flag.startswith(f"--{root_task}-"):
            action.help = argparse.SUPPRESS
    moved = set()
    for title, text, section in help_sections(task_cls):
        group = parser.add_argument_group(title, text)
        for flag, param in section.items():
            action = by_flag.get(flag)
            if action is not None:
                note = "; not used here" if flag in unused else ""
                action.help, action.metavar = _with_default(param, note), _metavar(param)
                group._group_actions.append(action)
                moved.add(action)
    for group in parser._action_groups[:2]:  # argparse's positional and optional sections: what is left there
        group._group_actions[:] = [a for a in group._group_actions if a not in moved]
    parser.usage = f"luigi --module pipeline {root_task} [--local-scheduler] [--workers N] [FLAG VALUE ...]"
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, max_help_position=26)


def _metavar(param) -> str:
    kinds = ((luigi.BoolParameter, "BOOL"), (luigi.IntParameter, "N"), (luigi.FloatParameter, "X"))
    return next((name for kind, name in kinds if isinstance(param, kind)), "TEXT")


def _with_default(param, note: str = "") -> str:
    """The parameter's description and its default (after luigi.cfg's overrides), then `note`, for --help."""
    text, default = param.description or "", param._default
    if default is luigi.parameter._no_value:
        return f"{text} (required{note})"
    shown = param.serialize(default) if default is not None else ""
    return f"{text} (default: {shown!r}{note})" if shown == "" else f"{text} (default: {shown}{note})"


def _flag_error(parser, message: str) -> None:
    # the run's own flags, not luigi's per-task copies (--RunAll-temperature)
    flags = sorted(s for a in parser._actions for s in a.option_strings if s[2:3].islower())
    words = [w.split("=", 1)[0] for w in message.replace(",", " ").split() if w.startswith("--")]
    hints = []
    for w in words:
        close = [f for f in flags if f.startswith(w)] or difflib.get_close_matches(w, flags, n=2)
        if close:
            hints.append(f"{w}: did you mean {' or '.join(close[:2])}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    print(f"luigi: error: {message}{hint}", file=sys.stderr)
    sys.exit(BAD_FLAG_EXIT)
