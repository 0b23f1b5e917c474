"""Small file helpers every package uses: atomic writes, JSON, short hashes.

Everything the pipeline writes goes through a temporary path that is renamed when complete, so an
interrupted stage never leaves something that looks finished.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Iterator


class InputError(ValueError):
    """Bad user input (a path, a parameter, a file): the message is one clear line naming the problem."""


class ConfigError(InputError):
    """A library config's value is out of range: `field` names the config field (`TrainConfig.min_lr`), so a caller
    that set it from a flag can say which flag (`pipeline` maps fields to flags)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field = field
        self.detail = message


# Temporaries: `.<name>.cbtm-tmp-<8 hex>` (being written) and `.<name>.cbtm-old-<8 hex>` (being replaced). Only
# names of exactly this form are ever removed as leftovers of an interrupted run (pipeline.preflight.clean_stale),
# and only inside a folder that carries the run-folder marker (corpus.layout.RUN_MARKER).
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.cbtm-(?:tmp|old)-[0-9a-f]{8}$")


def temporary_path(final: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh temporary name beside `final`: `.<name>.cbtm-<kind>-<8 hex>` (kind: tmp or old)."""
    final = Path(final)
    return final.parent / f".{final.name}.cbtm-{kind}-{uuid.uuid4().hex[:8]}"


def temporary_of(name: str) -> str | None:
    """The final name a temporary name (from `temporary_path`) stands for; None for any other name."""
    m = _TEMPORARY.match(name)
    return m["name"] if m else None


def short_hash(obj: Any, length: int = 8) -> str:
    """Stable hex digest of a JSON-serializable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; rename it to `final` when the block succeeds.

    On an exception the temporary directory is removed and `final` is left untouched. If `final`
    already exists it is replaced (the caller decided to rebuild it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


def publish_dir(work: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished folder `work` to `final`, replacing what is there through a `.cbtm-old-` temporary, so
    that at every moment `final` is either the old output or the new one (a crash leaves the old one, or the old
    one under a temporary name that `pipeline.preflight.clean_stale` removes)."""
    final = Path(final)
    if final.exists() or final.is_symlink():
        old = temporary_path(final, "old")
        os.replace(final, old)
        os.replace(work, final)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(work, final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `final` for writing; rename it over `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"missing file: {path}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"corrupt JSON file {path}: {e}") from None


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def is_write_error(exc: BaseException) -> bool:
    """True when `exc`, or an error it was raised from, is a failed write: no space, quota, read-only, file size
    limit (a reader that writes a cache must not blame its input for these)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_array(path: str | os.PathLike, mmap_mode: str | None = None):
    """`np.load` of a `.npy` array file, never unpickling; InputError naming the file when it is missing or no
    array (a damaged run folder: a file replaced, truncated, or of pickled objects)."""
    import numpy as np

    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"missing file: {path}") from None
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path} is not a readable NumPy array file ({str(e).strip().splitlines()[0]}); it was "
                         "replaced or damaged") from None


# ---- local files behind a path, a folder or a glob ------------------------------------------------------------
_MAGIC = re.compile(r"[*?[]")


def local_files(spec: str | os.PathLike) -> list[Path] | None:
    """The local files behind `spec`, sorted, each file once: the file itself, every file under a folder, or
    every file a glob matches (glob.glob's rules: `**` is any number of folders, wildcards skip dot-names).

    Symlinked folders below the path given are not entered by a folder or a `**` (`os.walk(followlinks=False)`),
    so a link loop (`ln -s . loop/self`) lists its files once instead of forever; a file reached under two names
    (a symlink, a hard link) is listed once, under its first name in sorted order. None when `spec` (after `~`)
    is no existing file or folder and no glob."""
    text = os.path.expanduser(str(spec))
    if not _MAGIC.search(text):
        path = Path(text)
        if path.is_file():
            return [path]
        return _once(_walk(path, None)) if path.is_dir() else None
    parts = Path(text).parts
    first = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
    base = Path(*parts[:first]) if first else Path(".")
    return _once(_walk(base, parts[first:])) if base.is_dir() else []


def glob_reaches(spec: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when `spec` (a folder, or a glob) could list files inside `folder`: `folder` lies under the folder
    `spec` names, or under a glob's fixed part where the pattern can descend into it."""
    text = os.path.abspath(os.path.expanduser(str(spec)))
    folder = Path(os.path.abspath(os.path.expanduser(str(folder))))
    parts = Path(text).parts
    first = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), None)
    if first is None:
        return Path(text).is_dir() and (folder == Path(text) or Path(text) in folder.parents)
    base, pattern = Path(*parts[:first]), parts[first:]
    if folder != base and base not in folder.parents:
        return False
    rel = folder.relative_to(base).parts
    for i, name in enumerate(rel):
        if i >= len(pattern) or pattern[i] == "**":
            return i < len(pattern)
        if not fnmatch.fnmatchcase(name, pattern[i]):
            return False
    return len(pattern) > len(rel)


def _walk(base: Path, pattern: tuple[str, ...] | None) -> Iterator[Path]:
    """Files under `base` whose path relative to `base` matches `pattern` (all files when None). Without `**` the
    walk goes no deeper than the pattern and enters symlinked folders (`data/*/train.jsonl` with links to the
    data); a folder (no pattern) or a `**` pattern never enters them."""
    depth = None if pattern is None or "**" in pattern else len(pattern) - 1
    for folder, dirs, files in os.walk(base, followlinks=depth is not None):
        rel = Path(folder).relative_to(base).parts
        if depth is not None and len(rel) >= depth:
            dirs[:] = []
        for name in files:
            if pattern is None or _matches((*rel, name), pattern):
                yield Path(folder, name)


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":  # zero or more folders (never dot-folders), then the rest
        for j in range(len(parts) + 1):
            if j and parts[j - 1].startswith("."):
                return False
            if _matches(parts[j:], rest):
                return True
        return False
    if not parts or (parts[0].startswith(".") and not head.startswith(".") and _MAGIC.search(head)):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _matches(parts[1:], rest)


def _once(paths) -> list[Path]:
    """Existing regular files (links followed) of `paths`, sorted, each (st_dev, st_ino) once."""
    seen, out = set(), []
    for p in sorted(paths):
        try:
            st = p.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(p)
    return out
