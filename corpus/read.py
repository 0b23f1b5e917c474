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

import numpy as np

from corpus.io import (InputError, atomic_dir, is_write_error, local_files, read_json, short_hash, temporary_path,
                       write_json)

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid",
                  "dev": "valid", "test": "test", "testing": "test"}
_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet",
             ".txt": "text", ".txt.gz": "text"}

# in a folder, plain .json files are metadata (dataset_info.json, stage.json), not documents
_DIR_SUFFIXES = tuple(s for s in _BUILDERS if not s.startswith(".json") or s.startswith(".jsonl"))


BATCH_ROWS = 4096  # documents per Arrow batch while streaming a corpus through
READ_CHUNK_BYTES = 10 << 20  # bytes of a JSON-lines / text file `datasets` parses at a time (its default)
ROW_GROUP_ROWS = 8192  # documents per row group of the split files (fewer when they hold more than 64 MiB)
_NORMALIZED_VERSION = 1  # bump when the normalized per-file format changes (invalidates cache_dir entries)


def prepare_corpus(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    text_field: str = "text",
    label_field: str | None = None,
    split: tuple[float, float, float] = (0.9, 0.05, 0.05),
    seed: int = 0,
    max_docs: int | None = None,
    workers: int = 1,
    cache_dir: str | os.PathLike | None = None,
    batch_rows: int = BATCH_ROWS,
    streaming: bool = False,
) -> dict:
    """Read `source`, split it, drop empty documents, and write `out_dir/{train,valid,test}.parquet` + `stats.json`.

    `label_field` is carried along for reporting only (cluster purity, per-label perplexity). `max_docs` keeps a
    seeded sample of about that many documents in total, in proportion to the split sizes. Returns the stats
    dict written to `stats.json`.

    Memory is bounded by `batch_rows` documents, whatever the corpus size: each input file is read once into a
    normalized Arrow stream (id?, text, label?; non-empty documents only) by `workers` processes, and the splits
    are written from those streams batch by batch; per document only a split code (1 byte) and an id hash (8
    bytes) are held. With `cache_dir` the normalized stream of each local file is kept there under a key of the
    file's path, size and mtime, so a rerun after one file of many changed reads only that file again.
    `streaming` reads a hub dataset with `datasets`' streaming mode (never downloaded whole). The outputs do not
    depend on `batch_rows` or `workers` (same bytes).
    """
    if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1.0) > 1e-6 or split[0] <= 0:
        raise InputError(f"split fractions must be three non-negative numbers summing to 1 with train > 0, got {split}")
    if max_docs is not None and max_docs < 3:
        raise InputError(f"max_docs must be at least 3 (one document per split), got {max_docs}")

    import datasets

    datasets.disable_progress_bars()
    # arrow caches of this read only, removed below; beside out_dir, where a killed run's next one cleans it up
    scratch = temporary_path(Path(out_dir).with_name(Path(out_dir).name + "-datasets"))
    scratch.mkdir(parents=True)
    try:
        parts, files, split_from, seen = _normalized_parts(str(source), scratch, text_field, label_field, workers,
                                                          cache_dir, batch_rows, streaming)
        n_empty = {(k or "all"): sum(p["n_empty"] for p in ps) for k, ps in parts.items()}
        for k, n in n_empty.items():
            if n:
                log.info("dropped %d empty documents (%s)", n, "whole corpus" if k == "all" else k)
        if sum(p["n_docs"] for ps in parts.values() for p in ps) == 0:
            raise InputError(f"empty corpus: {source} has no non-empty documents in field {text_field!r}")
        dest = _destinations(parts, split, seed, max_docs, str(source))  # {key: int8 (n_docs,) split index or -1}
        stats = {
            "source": str(source), "files": files, "text_field": text_field, "label_field": label_field,
            "split_from": split_from, "split": list(split), "seed": seed, "max_docs": max_docs,
        }
        with atomic_dir(out_dir) as tmp:
            stats.update(_write_splits(parts, dest, tmp, label_field, str(source), batch_rows))
            stats["n_empty_dropped"] = n_empty
            stats = {k: stats[k] for k in ("source", "files", "text_field", "label_field", "split_from", "split", "seed",
                                           "max_docs", "n_docs", "n_empty_dropped", "n_chars", "n_words", "labels")}
            _check_unchanged(seen)
            write_json(tmp / "stats.json", stats)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("corpus %s: %s documents (train/valid/test) written to %s", source,
             "/".join(str(stats["n_docs"][s]) for s in SPLITS), out_dir)
    return stats


# ---- normalized parts: one Arrow stream (id?, text, label?) of non-empty documents per input ---------------
def _normalized_parts(source: str, scratch: Path, text_field: str, label_field: str | None, workers: int,
                      cache_dir, batch_rows: int, streaming: bool):
    """→ ({split|None: [part]}, files read, how the split was decided, {file: (size, mtime_ns)} as read), where a
    part is {"origin", "path" (Arrow stream), "n_docs", "n_empty", "has_id"}."""
    from corpus.stream import ordered_map

    kind, payload, files, split_from = _locate(source, text_field, streaming)
    parts: dict[str | None, list] = {}
    seen: dict[str, tuple] = {}
    if kind == "files":
        jobs = []
        for i, (s, builder, f) in enumerate(payload):
            st = os.stat(f)
            seen[f] = (st.st_size, st.st_mtime_ns)
            key = short_hash([os.path.abspath(f), st.st_size, st.st_mtime_ns, builder, text_field, label_field,
                              _NORMALIZED_VERSION], 16)
            where = Path(cache_dir) if cache_dir is not None else scratch
            jobs.append((f, builder, text_field, label_field, str(where / f"{key}.arrow"),
                         str(scratch / f"datasets-{i}"), batch_rows))
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        n_work = max(1, min(workers, sum(1 for j in jobs if not _cached(j[4]))))
        for (s, _, f), info in zip(payload, ordered_map(_normalize_file, jobs, n_work)):
            parts.setdefault(s, []).append(info)
    else:
        for s, items in payload.items():
            for i, (origin, ds) in enumerate(items):
                out = scratch / f"part-{s}-{i}.arrow"
                info = _normalize_batches(_dataset_batches(ds, batch_rows), origin, text_field, label_field, out)
                parts.setdefault(s, []).append(info)
    return parts, files, split_from, seen


def _cached(path: str) -> bool:
    return Path(path).is_file() and Path(path + ".json").is_file()


def _normalize_file(job) -> dict:
    """One input file → its normalized Arrow stream (reused when `path` is already there: a cache entry)."""
    f, builder, text_field, label_field, path, ds_cache, batch_rows = job
    if _cached(path):
        log.info("corpus file %s unchanged: reusing %s", f, path)
        return read_json(path + ".json")
    import datasets

    datasets.disable_progress_bars()
    _check_utf8(f)
    try:
        chunk = {"chunksize": READ_CHUNK_BYTES} if builder in ("json", "text") else {}
        ds = datasets.load_dataset(builder, data_files={"data": [f]}, split="data", cache_dir=ds_cache, **chunk)
    except Exception as e:  # noqa: BLE001 - any library failure becomes one line
        if is_write_error(e):  # the arrow cache in the run folder could not be written: not the input's fault
            raise
        _diagnose(f, builder)
        raise InputError(f"cannot read corpus file {f}: {_one_line(e)}") from None
    field = "text" if builder == "text" else text_field  # a .txt line is a document whatever the field is called
    tmp = str(temporary_path(path))
    try:
        info = _normalize_batches(_dataset_batches(ds, batch_rows), f, field, label_field, Path(tmp))
        del ds
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        shutil.rmtree(ds_cache, ignore_errors=True)
    info["path"] = path
    write_json(path + ".json", info)
    return info


def _dataset_batches(ds, batch_rows: int):
    """Arrow tables of ≤ batch_rows rows of a `datasets` Dataset (read from its cache files with ordinary reads,
    not through the memory map, when it has no indices mapping) or IterableDataset (streaming)."""
    import datasets
    import pyarrow as pa

    if getattr(ds, "cache_files", None) and getattr(ds, "_indices", None) is None:
        for cf in ds.cache_files:
            with pa.OSFile(cf["filename"]) as fh:
                reader = pa.ipc.open_stream(fh)
                for batch in reader:
                    for off in range(0, batch.num_rows, batch_rows):
                        yield pa.Table.from_batches([batch.slice(off, batch_rows)])
        return
    if isinstance(ds, datasets.Dataset):  # an in-memory or index-mapped Dataset
        for t in ds.with_format("arrow").iter(batch_size=batch_rows):
            yield t
        return
    for rows in ds.iter(batch_size=batch_rows):  # IterableDataset: dict of lists
        yield pa.table(rows)


def _normalize_batches(tables, origin: str, text_field: str, label_field: str | None, out: Path) -> dict:
    """Write the non-empty documents of `tables` as an Arrow stream `out` with string columns text, id (when the
    input has one), label (when `label_field`); InputError naming `origin` for a missing field or a non-text or
    null text. Returns {"origin", "path", "n_docs", "n_empty", "has_id"}."""
    import pyarrow as pa
    import pyarrow.compute as pc

    writer = None
    n_rows = n_docs = 0
    has_id = None
    try:
        for table in tables:
            cols = table.column_names
            if text_field not in cols:
                raise InputError(f"{origin}: documents have no text field {text_field!r} (fields: {', '.join(cols)}); "
                                 "pass --text-field")
            if label_field and label_field not in cols:
                raise InputError(f"{origin}: documents have no label field {label_field!r} (fields: {', '.join(cols)})")
            text = table.column(text_field)
            if text.null_count:
                first = int(np.flatnonzero(pc.is_null(text).to_numpy(zero_copy_only=False))[0])
                raise InputError(f"{origin}: document {n_rows + first + 1} has no text field {text_field!r}")
            if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
                raise InputError(f"{origin}: field {text_field!r} holds {text.type} values, expected text")
            keep = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0)
            cols_out = {"text": text.cast(pa.string())}
            if has_id is None:
                has_id = "id" in cols
            if has_id and "id" in cols:
                cols_out["id"] = _as_text(table.column("id"), "None")
            elif has_id:
                raise InputError(f"{origin}: some documents have an id field and some do not")
            if label_field:
                cols_out["label"] = _as_text(table.column(label_field), "")
            kept = pa.table(cols_out).filter(keep)
            if writer is None:
                writer = pa.ipc.new_stream(str(out), kept.schema)
            writer.write_table(kept)
            n_rows += table.num_rows
            n_docs += kept.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # no batch at all: an empty stream with the expected columns
        schema = pa.schema([("text", pa.string())] + ([("label", pa.string())] if label_field else []))
        with pa.ipc.new_stream(str(out), schema):
            pass
    return {"origin": origin, "path": str(out), "n_docs": n_docs, "n_empty": n_rows - n_docs, "has_id": bool(has_id)}


def _as_text(col, null: str):
    """A column as strings the way `str(value)` writes them (null → `null`)."""
    import pyarrow as pa

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_integer(col.type):
        return col.cast(pa.string()).fill_null(null)
    return pa.array([null if v is None else str(v) for v in col.to_pylist()], pa.string())


def _read_part(part: dict, batch_rows: int):
    import pyarrow as pa

    with pa.OSFile(part["path"]) as fh:
        for batch in pa.ipc.open_stream(fh):
            for off in range(0, batch.num_rows, batch_rows):
                yield batch.slice(off, batch_rows)


def _check_unchanged(seen: dict) -> None:
    """InputError naming the first input file that vanished or changed (size, mtime) since it was read."""
    for f, (size, mtime) in seen.items():
        try:
            st = os.stat(f)
        except OSError:
            raise InputError(f"corpus file {f} vanished while the corpus was read; nothing was written") from None
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            raise InputError(f"corpus file {f} changed while the corpus was read; nothing was written, run again")


# ---- splits ----------------------------------------------------------------------------------------------------
def _key_order(parts: dict) -> list:
    return [k for k in ("train", "valid", "test", None) if k in parts]


def _destinations(parts: dict, split, seed: int, max_docs: int | None, source: str) -> dict:
    """{key: int8 (n_docs,)}: the output split (0 train, 1 valid, 2 test; -1 left out by max_docs) of every
    document of the parts under key, in read order. No split files: one seeded split of everything; otherwise the
    corpus's own splits, with a missing valid/test carved from train."""
    n = {k: sum(p["n_docs"] for p in ps) for k, ps in parts.items()}
    dest: dict = {}
    if None in parts:
        dest[None] = _seeded_codes(n[None], split, seed)
    else:
        if "train" not in parts:
            raise InputError(f"corpus {source} has split files but none named train")
        missing = [s for s in ("valid", "test") if s not in parts]
        for s in ("valid", "test"):
            if s in parts:
                dest[s] = np.full(n[s], SPLITS.index(s), np.int8)
        if missing:
            log.info("corpus %s has no %s split; carving it from train (seed %d)", source, "/".join(missing), seed)
            codes = _seeded_codes(n["train"], split, seed)
            for s in ("valid", "test"):
                if s not in missing:  # only one was missing: train keeps what was carved for the other
                    codes[codes == SPLITS.index(s)] = 0
            dest["train"] = codes
        else:
            dest["train"] = np.zeros(n["train"], np.int8)
    if max_docs is not None:
        _subsample(parts, dest, max_docs, seed)
    return dest


def _seeded_codes(n: int, split, seed: int) -> np.ndarray:
    if n < 3:
        raise InputError(f"corpus has {n} documents; need at least 3 for a train/valid/test split")
    perm = np.random.default_rng(seed).permutation(n)
    n_valid = max(1, int(round(n * split[1]))) if split[1] > 0 else 0
    n_test = max(1, int(round(n * split[2]))) if split[2] > 0 else 0
    if n_valid == 0 or n_test == 0:
        raise InputError(f"split {tuple(split)} leaves valid or test empty; both are needed for evaluation")
    codes = np.zeros(n, np.int8)
    codes[perm[:n_valid]] = 1
    codes[perm[n_valid: n_valid + n_test]] = 2
    return codes


def _subsample(parts: dict, dest: dict, max_docs: int, seed: int) -> None:
    """Keep a seeded sample of about max_docs documents, in proportion to the split sizes (others get -1)."""
    keys = _key_order(parts)
    flat = np.concatenate([dest[k] for k in keys])
    total = int((flat >= 0).sum())
    if total <= max_docs:
        return
    rng = np.random.default_rng(seed + 1)
    for code, s in enumerate(SPLITS):
        pos = np.flatnonzero(flat == code)
        keep = max(1, int(round(len(pos) * max_docs / total)))
        chosen = np.zeros(len(pos), bool)
        chosen[rng.choice(len(pos), size=min(len(pos), keep), replace=False)] = True
        flat[pos[~chosen]] = -1
    log.info("kept a seeded sample of %d of %d documents (max_docs=%d)", int((flat >= 0).sum()), total, max_docs)
    start = 0
    for k in keys:
        dest[k] = flat[start: start + len(dest[k])]
        start += len(dest[k])


def _write_splits(parts: dict, dest: dict, out: Path, label_field: str | None, source: str, batch_rows: int) -> dict:
    """Stream the parts into `out/{split}.parquet` (RowGroupWriter: the bytes do not depend on batch_rows); ids are
    the corpus's own when every part feeding a split has them, else `<split>-<index>`. → the split statistics."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from corpus.stream import RowGroupWriter

    keys = _key_order(parts)
    feeds = {code: [p for k in keys if (dest[k] == code).any() for p in parts[k]] for code in range(3)}
    for code, s in enumerate(SPLITS):
        if not feeds[code]:
            raise InputError(f"corpus {source}: the {s} split is empty after dropping empty documents")
    own_ids = {code: all(p["has_id"] for p in feeds[code]) for code in range(3)}
    schema = pa.schema([("id", pa.string()), ("text", pa.string())] + ([("label", pa.string())] if label_field else []))
    writers = {code: RowGroupWriter(out / f"{s}.parquet", schema, rows=ROW_GROUP_ROWS) for code, s in enumerate(SPLITS)}
    n_docs, n_chars, n_words = [0, 0, 0], [0, 0, 0], [0, 0, 0]
    labels: list[dict] = [{}, {}, {}]
    id_hashes: list[np.ndarray] = []
    try:
        for k in keys:
            start = 0
            for part in parts[k]:
                for batch in _read_part(part, batch_rows):
                    codes = dest[k][start: start + batch.num_rows]
                    start += batch.num_rows
                    table = pa.Table.from_batches([batch])
                    for code in np.unique(codes[codes >= 0]):
                        sel = table.filter(pa.array(codes == code))
                        if own_ids[code]:
                            ids = sel.column("id")
                        else:  # `<split>-<index>`, joined by Arrow (the same strings as an f-string per row)
                            index = pa.array(np.arange(n_docs[code], n_docs[code] + sel.num_rows, dtype=np.int64))
                            ids = pc.binary_join_element_wise(f"{SPLITS[code]}-", index.cast(pa.string()), "")
                        cols = {"id": ids, "text": sel.column("text")}
                        if label_field:
                            cols["label"] = sel.column("label")
                            for v, c in zip(*pc.value_counts(sel.column("label")).flatten()):
                                labels[code][v.as_py()] = labels[code].get(v.as_py(), 0) + c.as_py()
                        writers[code].write(pa.table(cols, schema=schema))
                        id_hashes.append(np.fromiter((hash(i) for i in ids.to_pylist()), np.int64, sel.num_rows))
                        n_docs[code] += sel.num_rows
                        n_chars[code] += int(pc.sum(pc.utf8_length(sel.column("text"))).as_py() or 0)
                        n_words[code] += int(pc.sum(pc.count_substring_regex(sel.column("text"), r"\S+")).as_py() or 0)
    finally:
        for w in writers.values():
            w.close()
    _check_unique_ids(np.concatenate(id_hashes) if id_hashes else np.zeros(0, np.int64), out, source)
    return {"n_docs": dict(zip(SPLITS, n_docs)), "n_chars": dict(zip(SPLITS, n_chars)),
            "n_words": dict(zip(SPLITS, n_words)),
            "labels": {s: dict(sorted(labels[c].items())) for c, s in enumerate(SPLITS)} if label_field else None}


def _check_unique_ids(hashes: np.ndarray, out: Path, source: str) -> None:
    """InputError naming a document id written twice (hashes compared first; only a clash reads the ids back)."""
    hashes = np.sort(hashes)
    clash = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not clash:
        return
    import pyarrow.parquet as pq

    seen: set[str] = set()
    for s in SPLITS:
        for batch in pq.ParquetFile(out / f"{s}.parquet").iter_batches(columns=["id"]):
            for i in batch.column(0).to_pylist():
                if hash(i) in clash:
                    if i in seen:
                        raise InputError(f"corpus {source}: document id {i!r} occurs more than once")
                    seen.add(i)


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


def _locate(source: str, text_field: str = "text", streaming: bool = False):
    """→ ("files", [(split|None, builder, file)], files, how the split was decided) for local files, or
    ("datasets", {split|None: [(origin, Dataset)]}, [source], ...) for a save_to_disk folder or a hub dataset."""
    import datasets

    path = Path(source).expanduser()
    if path.is_dir() and _is_saved_dataset(path):
        try:
            obj = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - turn any library failure into one line
            raise InputError(f"cannot read save_to_disk folder {path}: {_one_line(e)}") from None
        if isinstance(obj, datasets.DatasetDict):
            return "datasets", _dict_parts(obj, str(path)), [str(path)], "corpus"
        return "datasets", {None: [(str(path), obj)]}, [str(path)], "seeded"

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
        return "datasets", _load_hub(source, streaming), [source], "corpus"

    for f in files:
        if _suffix(f) not in _BUILDERS:
            raise InputError(f"unsupported corpus file {f}: expected .jsonl, .jsonl.gz, .json, .parquet or .txt")
        if not os.access(f, os.R_OK):
            raise InputError(f"corpus file is not readable: {f}")
    files = _drop_empty_files(files, source)
    _check_fields(files, text_field)
    splits = {f: _split_of(f, root) for f in files}
    has_splits = any(s is not None for s in splits.values())
    jobs = []
    for f in files:
        s = splits[f] if has_splits else None
        if has_splits and s is None:
            log.warning("%s has no split in its name; it goes into train", f)
            s = "train"
        jobs.append((s, _BUILDERS[_suffix(f)], str(f)))
    return "files", jobs, [str(f) for f in files], ("corpus" if has_splits else "seeded")


def _load_hub(name: str, streaming: bool = False):
    """The hub dataset `name` as {split: [(origin, Dataset or IterableDataset)]}; `streaming` never downloads it
    whole (documents are read batch by batch as the corpus is prepared)."""
    import datasets

    try:
        obj = datasets.load_dataset(name, streaming=streaming)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot load hub dataset {name!r} (not a local path either): {_one_line(e)}") from None
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
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
    from corpus.stream import iter_batches

    for batch in iter_batches(pf, batch_size, columns):
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
