"""Small file helpers every package uses: atomic writes, JSON, short hashes.

Everything the pipeline writes goes through a temporary path that is renamed when complete, so an
interrupted stage never leaves something that looks finished.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


class InputError(ValueError):
    """Bad user input (a path, a parameter, a file): the message is one clear line naming the problem."""


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
    if final.exists():
        old = temporary_path(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


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
