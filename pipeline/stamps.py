"""What stages keep in the run folder beside their outputs, and how they read it back.

- `relative_run_ids`: the input keys of a stamp (`stage.json`), relative to the run folder;
- `append_stage_log` / `read_stage_log`: `<run_dir>/stage_log.jsonl`, one JSON line per finished stage (stage,
  task id, pid, host, start, wall time), read by the tests (the report sums the stamps' wall times instead);
- `normal_modes`: the file modes a plain `open()` gives, for outputs shared between users;
- `files_fingerprint`: (path, size, mtime) of the local files behind a path, which enters the hashes of the stages
  that read them; `remove_path`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import stat
from pathlib import Path

from corpus.io import local_files

STAGE_LOG = "stage_log.jsonl"  # <run_dir>/: one line per finished stage (append_stage_log)


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


def remove_path(p: Path) -> None:
    """Remove a file or a folder tree, whatever is there (nothing when it is gone)."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


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



def append_stage_log(run_dir: Path, record: dict) -> None:
    """One JSON line per finished stage; O_APPEND keeps lines whole across worker processes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(run_dir / STAGE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_stage_log(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / STAGE_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
