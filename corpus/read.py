"""Read a user corpus with `datasets` and write it as the pipeline's corpus folder.

`prepare_corpus(source, out_dir, ...)` accepts
  - a file, a directory or a glob of `.jsonl` / `.jsonl.gz` / `.parquet` / `.txt` files (`.txt`: one document
    per line; a `.json` file of JSON lines is read when named explicitly, never picked up from a folder),
  - a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`,
  - a hub dataset name (`datasets.load_dataset(name)`; needs network or a filled HF cache).
When the corpus brings its own splits (files or folders named `train`, `valid`/`validation`/`dev`, `test`, or a
DatasetDict with such keys) they are kept; a missing valid/test split is carved from train. Otherwise one seeded
split is made with the fractions in `split`.

Writes (atomically) into `out_dir`:
  - `{train,valid,test}.parquet` with columns `id: str`, `text: str` and, when `label_field` is given,
    `label: str`. Ids are the corpus's own `id` field when it has one, else `<split>-<index>`.
  - `stats.json`: the returned statistics (documents per split, dropped empty documents, labels, files read).

Bad input raises `corpus.io.InputError` with one line naming the file and the problem; the input is only read.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
from pathlib import Path

from corpus.io import InputError, atomic_dir, is_write_error, local_files, temporary_path, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid",
                  "dev": "valid", "test": "test", "testing": "test"}
_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet",
             ".txt": "text", ".txt.gz": "text"}

# in a folder, plain .json files are metadata (dataset_info.json, stage.json), not documents
_DIR_SUFFIXES = tuple(s for s in _BUILDERS if not s.startswith(".json") or s.startswith(".jsonl"))


def prepare_corpus(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    text_field: str = "text",
    label_field: str | None = None,
    split: tuple[float, float, float] = (0.9, 0.05, 0.05),
    seed: int = 0,
    max_docs: int | None = None,
) -> dict:
    """Read `source`, split it, drop empty documents, and write `out_dir/{train,valid,test}.parquet` + `stats.json`.

    `label_field` is carried along for reporting only (cluster purity, per-label perplexity). `max_docs` keeps a
    seeded sample of about that many documents in total, in proportion to the split sizes. Returns the stats
    dict written to `stats.json`.
    """
    if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1.0) > 1e-6 or split[0] <= 0:
        raise InputError(f"split fractions must be three non-negative numbers summing to 1 with train > 0, got {split}")
    if max_docs is not None and max_docs < 3:
        raise InputError(f"max_docs must be at least 3 (one document per split), got {max_docs}")

    import datasets

    datasets.disable_progress_bars()
    # arrow cache of this read only, removed below; beside out_dir, where a killed run's next one cleans it up
    cache_dir = str(temporary_path(Path(out_dir).with_name(Path(out_dir).name + "-datasets")))
    Path(cache_dir).mkdir(parents=True)
    try:
        parts, files, split_from = _load(str(source), cache_dir, text_field)  # {split or None: [(origin, Dataset)]}
        per_split = {s: _columns(parts, s, text_field, label_field) for s in parts}
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    n_empty = {}
    for s, docs in per_split.items():
        keep = [i for i, t in enumerate(docs["text"]) if t.strip()]
        n_empty[s or "all"] = len(docs["text"]) - len(keep)
        if n_empty[s or "all"]:
            log.info("dropped %d empty documents (%s)", n_empty[s or "all"], s or "whole corpus")
        per_split[s] = _take(docs, keep)
    if sum(len(d["text"]) for d in per_split.values()) == 0:
        raise InputError(f"empty corpus: {source} has no non-empty documents in field {text_field!r}")
    if None in per_split:  # no split files: one seeded split of everything
        per_split = _seeded_split(per_split[None], split, seed)
    else:
        per_split = _fill_missing(per_split, split, seed, str(source))
    if max_docs is not None:
        per_split = _subsample(per_split, max_docs, seed)
    for s in SPLITS:
        if not per_split[s]["text"]:
            raise InputError(f"corpus {source}: the {s} split is empty after dropping empty documents")
        if per_split[s]["id"] is None:
            per_split[s]["id"] = [f"{s}-{i}" for i in range(len(per_split[s]["text"]))]
    _check_unique_ids(per_split, str(source))

    stats = {
        "source": str(source),
        "files": files,
        "text_field": text_field,
        "label_field": label_field,
        "split_from": split_from,
        "split": list(split),
        "seed": seed,
        "max_docs": max_docs,
        "n_docs": {s: len(per_split[s]["text"]) for s in SPLITS},
        "n_empty_dropped": n_empty,
        "n_chars": {s: sum(map(len, per_split[s]["text"])) for s in SPLITS},
        "n_words": {s: sum(len(t.split()) for t in per_split[s]["text"]) for s in SPLITS},
        "labels": ({s: _counts(per_split[s]["label"]) for s in SPLITS} if label_field else None),
    }
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_dir(out_dir) as tmp:
        for s in SPLITS:
            cols = {"id": pa.array(per_split[s]["id"], pa.string()), "text": pa.array(per_split[s]["text"], pa.string())}
            if label_field:
                cols["label"] = pa.array(per_split[s]["label"], pa.string())
            pq.write_table(pa.table(cols), tmp / f"{s}.parquet")
        write_json(tmp / "stats.json", stats)
    log.info("corpus %s: %s documents (train/valid/test) written to %s", source,
             "/".join(str(stats["n_docs"][s]) for s in SPLITS), out_dir)
    return stats


# ---- locating and loading ----------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(_BUILDERS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _split_of(path: Path, root: Path | None) -> str | None:
    """train/valid/test from the file name (`train.jsonl`, `valid-00001.parquet`) or a parent folder name."""
    stem = path.name[: len(path.name) - len(_suffix(path))].lower()
    head = stem.replace("-", "_").replace(".", "_").split("_")[0]
    if head in _SPLIT_ALIASES:
        return _SPLIT_ALIASES[head]
    parent = path.parent
    while root is not None and parent != root and root in parent.parents:
        if parent.name.lower() in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[parent.name.lower()]
        parent = parent.parent
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load(source: str, cache_dir: str, text_field: str = "text"):
    """→ ({split|None: [(origin, Dataset)]}, files read, how the split was decided)."""
    import datasets

    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        try:
            obj = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - turn any library failure into one line
            raise InputError(f"cannot read save_to_disk folder {path}: {_one_line(e)}") from None
        if isinstance(obj, datasets.DatasetDict):
            return _dict_parts(obj, str(path)), [str(path)], "corpus"
        return {None: [(str(path), obj)]}, [str(path)], "seeded"

    if any(c in source for c in "*?["):
        root = None
        files = local_files(source)  # each file once, no symlink loop followed
        if not files:
            raise InputError(f"corpus glob {source!r} matches no file")
    elif path.is_dir():
        root = path
        files = [p for p in local_files(path) if _suffix(p) in _DIR_SUFFIXES
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise InputError(f"corpus folder {path} holds no .jsonl/.jsonl.gz/.parquet/.txt file")
    elif path.is_file():
        root, files = None, [path]
    elif looks_like_path(source):
        raise InputError(f"corpus path does not exist: {path}")
    else:
        return _load_hub(source, cache_dir), [source], "corpus"

    for f in files:
        if _suffix(f) not in _BUILDERS:
            raise InputError(f"unsupported corpus file {f}: expected .jsonl, .jsonl.gz, .json, .parquet or .txt")
        if not os.access(f, os.R_OK):
            raise InputError(f"corpus file is not readable: {f}")
    files = _drop_empty_files(files, source)
    _check_fields(files, text_field)
    groups: dict[tuple[str | None, str], list[str]] = {}
    splits = {f: _split_of(f, root) for f in files}
    has_splits = any(s is not None for s in splits.values())
    for f in files:
        s = splits[f] if has_splits else None
        if has_splits and s is None:
            log.warning("%s has no split in its name; it goes into train", f)
            s = "train"
        groups.setdefault((s, _BUILDERS[_suffix(f)]), []).append(str(f))
    parts: dict[str | None, list] = {}
    for (s, builder), group in groups.items():
        for f in group:
            _check_utf8(f)
        try:
            ds = datasets.load_dataset(builder, data_files={"data": group}, split="data", cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001
            if is_write_error(e):  # the arrow cache in the run folder could not be written: not the input's fault
                raise
            for f in group:
                _diagnose(f, builder)
            _diagnose_fields(group)
            raise InputError(f"cannot read corpus files {', '.join(group)}: {_one_line(e)}") from None
        if builder == "text" and text_field != "text":  # a .txt line is a document whatever the field is called
            ds = ds.rename_column("text", text_field)
        parts.setdefault(s, []).append((", ".join(group), ds))
    return parts, [str(f) for f in files], ("corpus" if has_splits else "seeded")


def _load_hub(name: str, cache_dir: str):
    import datasets

    try:
        obj = datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot load hub dataset {name!r} (not a local path either): {_one_line(e)}") from None
    if isinstance(obj, datasets.DatasetDict):
        return _dict_parts(obj, name)
    return {None: [(name, obj)]}


def _dict_parts(dd, origin: str) -> dict:
    parts: dict[str | None, list] = {}
    for key, ds in dd.items():
        s = _SPLIT_ALIASES.get(key.lower())
        if s is None:
            log.warning("%s: split %r is not train/valid/test; it goes into train", origin, key)
            s = "train"
        parts.setdefault(s, []).append((f"{origin}[{key}]", ds))
    return parts


def looks_like_path(source: str) -> bool:
    """True when `source` reads as a local path (not a hub dataset name `org/name`)."""
    return (os.sep in source and source.count("/") != 1) or source.startswith((".", "~", "/")) or \
        any(source.lower().endswith(ext) for ext in _BUILDERS)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def _open_text(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _check_utf8(path: str) -> None:
    """Fail with the file and line number of the first non-UTF-8 byte sequence (text formats only)."""
    if _suffix(Path(path)) == ".parquet":
        return
    try:
        with _open_text(path) as f:
            for n, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{path}: line {n} is not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
    except (OSError, EOFError) as e:
        raise InputError(f"cannot read corpus file {path}: {_one_line(e)}") from None


def _has_documents(path: Path) -> bool:
    """False for a file with no rows (parquet) or no non-blank line; True when unsure (errors are reported later)."""
    try:
        if _suffix(path) == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_metadata(path).num_rows > 0
        with _open_text(str(path)) as f:
            return any(line.strip() for line in f)
    except Exception:  # noqa: BLE001 - a broken file is diagnosed when it is read
        return True


def _drop_empty_files(files: list[Path], source: str) -> list[Path]:
    """Leave out files without documents (with a warning); InputError naming them when no file has any."""
    kept = [f for f in files if _has_documents(f)]
    if not kept:
        names = ", ".join(str(f) for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise InputError(f"corpus {source} has no documents: {names} {'is' if len(files) == 1 else 'are'} empty")
    for f in files:
        if f not in kept:
            log.warning("corpus file %s is empty; skipping it", f)
    return kept


def _first_fields(path: Path) -> list[str] | None:
    """The fields of a file's first document (JSON lines, parquet); None for text files or when unreadable."""
    try:
        if _suffix(path) == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if _BUILDERS.get(_suffix(path)) != "json":
            return None
        with _open_text(str(path)) as f:
            for raw in f:
                if raw.strip():
                    obj = json.loads(raw)
                    return list(obj) if isinstance(obj, dict) else None
    except Exception:  # noqa: BLE001 - a broken file is diagnosed when it is read
        return None
    return None


def _check_fields(files: list[Path], text_field: str) -> None:
    """Before reading: every JSON-lines/parquet file's first document must have the text field. Files that
    disagree (`text` in one, `content` in another) are named together, since --text-field cannot fit both."""
    fields = {f: _first_fields(f) for f in files}
    known = {f: k for f, k in fields.items() if k is not None}
    missing = [f for f, k in known.items() if text_field not in k]
    if not missing:
        return
    having = [f for f, k in known.items() if text_field in k]
    if having:
        raise InputError(f"corpus files have different fields: {missing[0]} has {', '.join(known[missing[0]])}, "
                         f"{having[0]} has {', '.join(known[having[0]])}; every file needs the text field "
                         f"{text_field!r} (--text-field)")
    if len({tuple(known[f]) for f in missing}) == 1:
        raise InputError(f"{missing[0]}: documents have no text field {text_field!r} (fields: "
                         f"{', '.join(known[missing[0]])}); pass --text-field")
    raise InputError(f"corpus files have different fields and none has {text_field!r}: {missing[0]} has "
                     f"{', '.join(known[missing[0]])}, {missing[1]} has {', '.join(known[missing[1]])}")


def _diagnose_fields(group: list[str]) -> None:
    """After `datasets` failed on several files: name two whose first documents have different fields."""
    seen: dict[tuple, str] = {}
    for f in group:
        k = _first_fields(Path(f))
        if k is not None:
            seen.setdefault(tuple(sorted(k)), f)
    if len(seen) > 1:
        (ka, fa), (kb, fb) = list(seen.items())[:2]
        raise InputError(f"corpus files have different fields: {fa} has {', '.join(ka)}, {fb} has {', '.join(kb)}; "
                         "give every file the same fields")


def _diagnose(path: str, builder: str) -> None:
    """After `datasets` failed: find the first bad line of `path` and raise a one-line InputError about it."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_schema(path)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{path} is not a valid parquet file: {_one_line(e)}") from None
        return
    if builder == "json":
        with _open_text(path) as f:
            for n, raw in enumerate(f, 1):
                if raw.strip():
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError as e:
                        if n == 1 and raw.lstrip().startswith(b"["):
                            return  # a JSON array file; let the generic message speak
                        raise InputError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict):
                        raise InputError(f"{path}: line {n} is a JSON {type(obj).__name__}, expected an object")


# ---- columns, splits -----------------------------------------------------------------------------------
def _columns(parts: dict, s, text_field: str, label_field: str | None) -> dict[str, list]:
    """Concatenate one split's datasets into plain lists {id, text, label}; checks the fields."""
    out: dict[str, list | None] = {"id": [], "text": [], "label": []}
    for origin, ds in parts[s]:
        cols = ds.column_names
        if text_field not in cols:
            raise InputError(f"{origin}: documents have no text field {text_field!r} (fields: {', '.join(cols)}); "
                             f"pass --text-field")
        if label_field and label_field not in cols:
            raise InputError(f"{origin}: documents have no label field {label_field!r} (fields: {', '.join(cols)})")
        texts = ds[text_field]
        for i, t in enumerate(texts):
            if t is None:
                raise InputError(f"{origin}: document {i + 1} has no text field {text_field!r}")
            if not isinstance(t, str):
                raise InputError(f"{origin}: field {text_field!r} holds {type(t).__name__} values, expected text")
        out["text"].extend(texts)
        out["label"].extend("" if v is None else str(v) for v in (ds[label_field] if label_field else [None] * len(texts)))
        if out["id"] is not None and "id" in cols:
            out["id"].extend(str(v) for v in ds["id"])
        else:
            out["id"] = None
    return out


def _take(docs: dict, idx) -> dict:
    return {k: (None if v is None else [v[i] for i in idx]) for k, v in docs.items()}


def _seeded_split(docs: dict, split, seed: int) -> dict:
    import numpy as np

    n = len(docs["text"])
    if n < 3:
        raise InputError(f"corpus has {n} documents; need at least 3 for a train/valid/test split")
    perm = np.random.default_rng(seed).permutation(n)
    n_valid = max(1, int(round(n * split[1]))) if split[1] > 0 else 0
    n_test = max(1, int(round(n * split[2]))) if split[2] > 0 else 0
    if n_valid == 0 or n_test == 0:
        raise InputError(f"split {tuple(split)} leaves valid or test empty; both are needed for evaluation")
    parts = {"valid": perm[:n_valid], "test": perm[n_valid: n_valid + n_test], "train": perm[n_valid + n_test:]}
    return {s: _take(docs, sorted(parts[s].tolist())) for s in SPLITS}


def _fill_missing(per_split: dict, split, seed: int, source: str) -> dict:
    """Keep the corpus's own splits; carve a missing valid/test from train with the split fractions."""
    if "train" not in per_split:
        raise InputError(f"corpus {source} has split files but none named train")
    missing = [s for s in ("valid", "test") if s not in per_split]
    if not missing:
        return per_split
    log.info("corpus %s has no %s split; carving it from train (seed %d)", source, "/".join(missing), seed)
    carved = _seeded_split(per_split["train"], split, seed)
    out = {"train": carved["train"]}
    for s in ("valid", "test"):
        out[s] = per_split[s] if s in per_split else carved[s]
    if "valid" in per_split or "test" in per_split:  # only one was missing: give train back what we did not use
        kept = [s for s in ("valid", "test") if s in per_split]
        for s in kept:
            for k in out["train"]:
                if out["train"][k] is not None and carved[s][k] is not None:
                    out["train"][k] = out["train"][k] + carved[s][k]
    return out


def _subsample(per_split: dict, max_docs: int, seed: int) -> dict:
    import numpy as np

    total = sum(len(per_split[s]["text"]) for s in SPLITS)
    if total <= max_docs:
        return per_split
    rng = np.random.default_rng(seed + 1)
    out = {}
    for s in SPLITS:
        n = len(per_split[s]["text"])
        keep = max(1, int(round(n * max_docs / total)))
        out[s] = _take(per_split[s], sorted(rng.choice(n, size=min(n, keep), replace=False).tolist()))
    log.info("kept a seeded sample of %d of %d documents (max_docs=%d)", sum(len(out[s]["text"]) for s in SPLITS), total, max_docs)
    return out


def _check_unique_ids(per_split: dict, source: str) -> None:
    seen: set[str] = set()
    for s in SPLITS:
        for i in per_split[s]["id"]:
            if i in seen:
                raise InputError(f"corpus {source}: document id {i!r} occurs more than once")
            seen.add(i)


def _counts(values: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def parquet_file(path: str | os.PathLike, columns: list[str] | None = None):
    """`pyarrow.parquet.ParquetFile` of a prepared folder's file; one-line InputError when the file is missing,
    unreadable or lacks one of `columns`."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InputError(f"missing file: {path}")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt files
        raise InputError(f"unreadable parquet file {path}: {str(e).splitlines()[0] if str(e) else e}") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise InputError(f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(names)})")
    return pf


def read_columns(path: str | os.PathLike, columns: list[str]):
    """The `columns` of a parquet file of a prepared folder as a pyarrow Table (errors as `parquet_file`)."""
    import pyarrow.parquet as pq

    parquet_file(path, columns)
    return pq.read_table(path, columns=columns)


def take_rows(path: str | os.PathLike, indices, columns: list[str] | None = None, batch_size: int = 8192) -> list[dict]:
    """Rows `indices` (any order, repeats allowed) of a parquet file as dicts, in the order given (errors as
    `parquet_file`).

    Reads one record batch at a time and stops after the last row asked for, so memory holds one batch and the
    rows taken, never the whole file (a corpus split of millions of documents)."""
    pf = parquet_file(path, columns)
    want = sorted({int(i) for i in indices})
    if want and (want[0] < 0 or want[-1] >= pf.metadata.num_rows):
        raise InputError(f"{path} has {pf.metadata.num_rows} rows; asked for row {want[0] if want[0] < 0 else want[-1]}")
    found: dict[int, dict] = {}
    start = j = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
        if j == len(want):
            break
        end = start + batch.num_rows
        picked = []
        while j < len(want) and want[j] < end:
            picked.append(want[j])
            j += 1
        if picked:
            found.update(zip(picked, batch.take([i - start for i in picked]).to_pylist()))
        start = end
    return [found[int(i)] for i in indices]
