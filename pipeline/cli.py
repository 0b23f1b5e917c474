"""What `luigi --module pipeline ...` needs from luigi wherever it runs, set when `pipeline` is imported.

- `DEFAULTS`: the [retcode], [core], [worker], [scheduler] and [resources] settings the pipeline relies on, so
  a failure exits non-zero from any folder (luigi reads `luigi.cfg` from the working directory only, and its
  own exit codes are all 0). A luigi.cfg that sets one of them still wins.
- `--run-lock-wait SECONDS` (`pipeline.lock.run_lock`): wait for another run that holds the run folder.
- Flags must be spelled out: luigi's command-line parser accepts any unambiguous prefix (`--num-cluster 8`
  would set --num-clusters); here an unknown or abbreviated flag stops the command with one line naming it and
  the flags it may have meant, exit code 2; a misspelled task name is one line too (exit code 1).
"""
from __future__ import annotations

import difflib
import os
import sys

import luigi
import luigi.cmdline_parser

from pipeline.lock import run_lock  # noqa: F401 - registers --run-lock-wait with luigi's parser

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


def install_defaults() -> None:
    """Fill in `DEFAULTS` where no luigi config file set the option."""
    cfg = luigi.configuration.get_config()
    for section, options in DEFAULTS.items():
        for option, value in options.items():
            if not cfg.has_option(section, option):
                if not cfg.has_section(section):
                    cfg.add_section(section)
                cfg.set(section, option, value)


def install_strict_flags() -> None:
    """luigi builds a fresh argparse parser for every parse (`CmdlineParser._build_parser`); this makes each one
    refuse abbreviations and report a bad flag in one line."""
    parser_cls = luigi.cmdline_parser.CmdlineParser
    if getattr(parser_cls._build_parser, "_cbtm_strict", False):
        return
    build = parser_cls._build_parser

    def strict_build_parser(*args, **kwargs):
        parser = build(*args, **kwargs)
        parser.allow_abbrev = False
        parser.error = lambda message: _flag_error(parser, message)
        return parser

    strict_build_parser._cbtm_strict = True
    parser_cls._build_parser = staticmethod(strict_build_parser)


def install_task_name_hook() -> None:
    """A misspelled task name (`luigi --module pipeline RunAl`) makes luigi raise before its own error handling:
    print one line naming the tasks there are instead of a traceback (exit code 1; CBTM_DEBUG=1 keeps it)."""
    from luigi.task_register import TaskClassNotFoundException

    previous = sys.excepthook
    if getattr(previous, "_cbtm", False):
        return

    def hook(kind, value, tb):
        if issubclass(kind, TaskClassNotFoundException) and not os.environ.get("CBTM_DEBUG"):
            import pipeline

            text = str(value).strip().splitlines()
            head = text[0] if text else ""  # "No task RunAl. Did you mean:"
            name = head[len("No task "):].split(". ")[0].rstrip(".") if head.startswith("No task ") else head
            close = difflib.get_close_matches(name, pipeline.__all__, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            print(f"luigi: error: no task {name!r}; {hint}tasks: {', '.join(pipeline.__all__)}", file=sys.stderr)
            return
        previous(kind, value, tb)

    hook._cbtm = True
    sys.excepthook = hook


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
