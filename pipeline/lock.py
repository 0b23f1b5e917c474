"""One writer per run folder: an advisory lock (`flock`) on `<run_dir>/.cbtm-lock`.

A pipeline invocation with its own scheduler (`--local-scheduler`, or `luigi.build(..., local_scheduler=True)`
inside `run_dir_lock`) holds the lock exclusively, so a second invocation on the same folder stops at once with
one line naming the holder (pid, host, command, start time), or waits for it with `--run-lock-wait SECONDS`.
Workers of a central `luigid` hold it shared: luigid already hands each stage to one worker, so any number of
them work on one folder together, while an exclusive holder keeps them all out (and they keep it out).

The lock belongs to the process that took it and to the worker processes it forks (they inherit it); it is
released when that process exits, however it exits (the kernel drops a `flock` with its last file
descriptor, so a `kill -9` leaves no stale lock), and taking it again in the same process is a no-op. The
lock file is removed on a clean release; a waiting process that finds its file replaced takes the new one.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

import luigi

from corpus.io import InputError

log = logging.getLogger("luigi-interface")

LOCK_NAME = ".cbtm-lock"
_HELD: dict[str, dict] = {}  # realpath of the run folder → {"fd", "shared", "depth", "pid"}


class run_lock(luigi.Config):
    """`--run-lock-wait SECONDS` (or `[run_lock] wait` in luigi.cfg): how long a run waits for another run that
    holds its run folder; 0 stops at once, `inf` waits as long as it takes."""

    wait = luigi.FloatParameter(default=0.0, description="seconds to wait for another run that holds the run "
                                "folder (inf = as long as it takes); 0 = stop at once with a message")


class RunFolderBusy(InputError):
    """Another process holds the run folder's lock."""


def lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOCK_NAME


def is_held(run_dir: str | os.PathLike) -> bool:
    """True when this process (or the process that forked it) holds the run folder's lock."""
    return _key(run_dir) in _HELD


def acquire(run_dir: str | os.PathLike, wait: float = 0.0, shared: bool = False) -> None:
    """Take the run folder's lock (creating the folder), re-entrantly; raise `RunFolderBusy` after `wait` seconds.

    Also the first check that the folder can be written: a folder that cannot be created or written raises
    an InputError naming --run-dir.
    """
    import math

    if wait is None or math.isnan(wait) or wait < 0:
        raise InputError(f"--run-lock-wait {wait}: must be a number of seconds ≥ 0 (or inf)")
    key = _key(run_dir)
    if key in _HELD:
        held = _HELD[key]
        if held["shared"] and not shared and held["pid"] == os.getpid():
            raise InputError(f"run folder {run_dir} is already held shared by this process; cannot hold it alone")
        held["depth"] += 1
        return
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--run-dir {run_dir} is not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--run-dir {run_dir}: cannot create it ({_reason(e)})") from None
    if not run_dir.is_dir():
        raise InputError(f"--run-dir {run_dir} is not a folder")
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            fd = os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"--run-dir {run_dir} is not writable ({_reason(e)})") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(f"--run-dir {run_dir}: cannot lock {lock_path(run_dir)} ({_reason(e)})") from None
            if time.monotonic() >= deadline:
                raise RunFolderBusy(_busy_message(run_dir, wait)) from None
            if not told:
                log.warning("%s; waiting for it (up to %s s)", _holder_text(run_dir), wait)
                told = True
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
            continue
        if _same_file(fd, lock_path(run_dir)):
            break
        os.close(fd)  # the holder removed the file while we waited: lock the one that is there now
    _HELD[key] = {"fd": fd, "shared": shared, "depth": 1, "pid": os.getpid()}
    _write_holder(fd, shared)


def release(run_dir: str | os.PathLike) -> None:
    """Undo one `acquire`; the last one of the process that took the lock removes the lock file and unlocks."""
    key = _key(run_dir)
    held = _HELD.get(key)
    if held is None:
        return
    held["depth"] -= 1
    if held["depth"] > 0:
        return
    del _HELD[key]
    if held["pid"] != os.getpid():  # a forked worker: the lock is its parent's
        return
    fd = held["fd"]
    try:
        if held["shared"]:  # remove the file only when no other holder is left
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, lock_path(run_dir)):
            os.unlink(lock_path(run_dir))
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, wait: float = 0.0, shared: bool = False) -> Iterator[Path]:
    """`with run_dir_lock(run_dir): luigi.build(...)` — hold the run folder for the block (see the module doc)."""
    acquire(run_dir, wait=wait, shared=shared)
    try:
        yield Path(run_dir)
    finally:
        release(run_dir)


def hold_until_exit(run_dir: str | os.PathLike, wait: float = 0.0, shared: bool = False) -> None:
    """Take the lock for the rest of this process (command-line runs); released at exit."""
    if is_held(run_dir):
        return
    acquire(run_dir, wait=wait, shared=shared)
    if not getattr(release_all, "_registered", False):
        atexit.register(release_all)
        release_all._registered = True


def release_all() -> None:
    """Release every lock this process took (at exit)."""
    for key, held in list(_HELD.items()):
        if held["pid"] == os.getpid():
            held["depth"] = 1
            release(key)


# ---- helpers ------------------------------------------------------------------------------------------------
def _key(run_dir) -> str:
    return os.path.realpath(os.fspath(run_dir))


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_holder(fd: int, shared: bool) -> None:
    """Who holds the folder, for the message a second run gets (shared holders leave the file empty)."""
    info = {} if shared else {"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": _command()}
    try:
        os.ftruncate(fd, 0)
        if info:
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:  # a full disk: the lock holds all the same; the disk check says what is wrong
        pass


def _command() -> str:
    argv = [Path(sys.argv[0]).name] + sys.argv[1:] if sys.argv and sys.argv[0] else []
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def _holder_text(run_dir: Path) -> str:
    try:
        info = json.loads(lock_path(run_dir).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return f"run folder {run_dir} is in use by workers of a central scheduler (luigid)"
    return (f"run folder {run_dir} is in use by pid {info.get('pid')} on {info.get('host')} since "
            f"{info.get('started')} ({info.get('command') or 'command unknown'})")


def _busy_message(run_dir: Path, wait: float) -> str:
    waited = f" after waiting {wait:g} s" if wait else ""
    return (f"{_holder_text(run_dir)}{waited}; one run writes a run folder at a time: wait for it to finish, "
            f"pass --run-lock-wait SECONDS (inf = until it is free), or use another --run-dir")
