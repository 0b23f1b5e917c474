"""Streaming building blocks of the data stages: bounded memory whatever the corpus size, every core.

- `WorkerPool` / `ordered_map(fn, items, workers, ...)`: `map` over a process pool with at most `2 × workers`
  items in flight, results in input order (so outputs do not depend on the pool size); `workers <= 1` runs in
  this process.
- `NpyWriter`: appends rows to a `.npy` file whose length is only known at the end (header written on close),
  through ordinary file writes: no memory map, so the resident set stays one chunk.
- `iter_npy_rows(path, rows)`: reads a `.npy` matrix back in chunks of rows through ordinary file reads.
- `RowGroupWriter`: a parquet writer whose row groups are cut by the rows themselves (at most `rows` rows or
  `max_bytes` of the measured column), never by how the caller batched them: the file is the same bytes
  whether it was written in one chunk or many.
"""
from __future__ import annotations

import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

_NPY_HEADER = 128  # bytes reserved for a .npy header (magic, version, length, dict): fits any shape of ≤ 3 dims


class WorkerPool:
    """A process pool for one stage, started once and used for every split: `with WorkerPool(n, init, args) as
    pool: pool.map(fn, items)`. `map` yields `fn(item)` in input order with at most `in_flight` (default
    `2 × workers`) items submitted ahead of the one returned, so memory holds a few items whatever the length
    of `items`. Workers are spawned (no inherited threads or CUDA state) and each runs `initializer(*initargs)`
    once, e.g. to load a model from disk; `workers <= 1` runs everything in this process. `fn` and
    `initializer` must be importable module-level functions."""

    def __init__(self, workers: int = 1, initializer: Callable | None = None, initargs: tuple = ()):
        self.workers, self.initializer, self.initargs = max(1, int(workers)), initializer, initargs
        self._pool = None
        self._here = False  # the initializer has run in this process

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _start(self) -> None:
        import multiprocessing as mp

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the pool is the parallelism
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                         initializer=self.initializer, initargs=self.initargs)

    def _inline(self, fn: Callable, item) -> Any:
        if not self._here and self.initializer is not None:
            self.initializer(*self.initargs)
        self._here = True
        return fn(item)

    def map(self, fn: Callable, items: Iterable, in_flight: int | None = None) -> Iterator[Any]:
        """`fn(item)` for every item, in order. Work of a single item (a small corpus) runs in this process: the
        pool's processes start only once there are two items to spread."""
        from collections import deque

        it = iter(items)
        first = next(it, _NOTHING)
        if first is _NOTHING:
            return
        second = next(it, _NOTHING)
        if second is _NOTHING or self.workers <= 1:
            for item in itertools.chain((first,), () if second is _NOTHING else itertools.chain((second,), it)):
                yield self._inline(fn, item)
            return
        if self._pool is None:
            self._start()
        limit = max(1, in_flight or 2 * self.workers)
        pending: deque = deque()
        for item in itertools.chain((first, second), it):
            pending.append(self._pool.submit(fn, item))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


_NOTHING = object()


def ordered_map(fn: Callable, items: Iterable, workers: int = 1, initializer: Callable | None = None,
                initargs: tuple = (), in_flight: int | None = None) -> Iterator[Any]:
    """`WorkerPool(workers, initializer, initargs).map(fn, items)` for a pool used once."""
    with WorkerPool(workers, initializer, initargs) as pool:
        yield from pool.map(fn, items, in_flight)


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    """A version-1.0 .npy header padded to exactly `_NPY_HEADER` bytes (so it can be written last, in place)."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    text = repr(d).encode("latin1")
    n = _NPY_HEADER - 10  # magic (6) + version (2) + header length (2)
    if len(text) + 1 > n:
        raise ValueError(f"shape {shape} does not fit a {_NPY_HEADER}-byte .npy header")
    text = text + b" " * (n - len(text) - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + n.to_bytes(2, "little") + text


class NpyWriter:
    """Write a C-order `.npy` array of `dtype` with rows of shape `row_shape`, row chunk by row chunk.

    `write(chunk)` appends rows ((n, *row_shape), or (n,) for 1-D); `close(keep_rows=None)` writes the header
    with the number of rows written (or only the first `keep_rows`, truncating the file: blocks cut from a
    stream drop their tail). `np.load(path, mmap_mode="r")` reads the result."""

    def __init__(self, path: str | os.PathLike, dtype, row_shape: tuple = ()):
        self.path, self.dtype, self.row_shape = Path(path), np.dtype(dtype), tuple(row_shape)
        self.rows = 0
        self._f = open(self.path, "wb")
        self._f.write(b"\0" * _NPY_HEADER)

    def write(self, chunk: np.ndarray) -> None:
        chunk = np.ascontiguousarray(chunk, dtype=self.dtype)
        if chunk.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {chunk.shape[1:]}, expected {self.row_shape}")
        self._f.write(chunk.tobytes())
        self.rows += chunk.shape[0]

    def close(self, keep_rows: int | None = None, shape: tuple | None = None) -> int:
        """Finish the file; `shape` (default (rows, *row_shape)) reshapes the kept rows, e.g. a token stream of
        n_blocks × seq_len tokens saved as (n_blocks, seq_len). Returns the rows kept."""
        rows = self.rows if keep_rows is None else min(self.rows, int(keep_rows))
        if rows < self.rows:
            self._f.truncate(_NPY_HEADER + rows * self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64)))
        self._f.seek(0)
        self._f.write(_npy_header(self.dtype, shape if shape is not None else (rows, *self.row_shape)))
        self._f.close()
        return rows


def _read_header(f) -> tuple:
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


def iter_npy_rows(path: str | os.PathLike, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start row, rows [start, start + rows)) of the C-order .npy matrix or vector at `path`, read with ordinary
    file reads (no memory map: the pages read do not stay in this process's resident set)."""
    with open(path, "rb") as f:
        shape, fortran, dtype = _read_header(f)
        if fortran:
            raise ValueError(f"{path}: Fortran-order arrays are not streamed")
        row_shape = tuple(shape[1:])
        per_row = int(np.prod(row_shape, dtype=np.int64)) if row_shape else 1
        for start in range(0, shape[0], rows):
            n = min(rows, shape[0] - start)
            yield start, np.fromfile(f, dtype=dtype, count=n * per_row).reshape((n, *row_shape))


def read_npy_range(path: str | os.PathLike, start: int, stop: int) -> np.ndarray:
    """Elements [start, stop) of the 1-D .npy at `path`, by one seek and one read."""
    with open(path, "rb") as f:
        shape, _, dtype = _read_header(f)
        f.seek(f.tell() + int(start) * dtype.itemsize)
        return np.fromfile(f, dtype=dtype, count=max(0, int(stop) - int(start)))


class RowGroupWriter:
    """`pyarrow.parquet.ParquetWriter` whose row groups hold `rows` rows, or fewer once `max_bytes` of column
    `measure` are reached (a row group of long documents stays small); cut by the rows, not by how the tables
    came, so one chunk or many give the same file."""

    def __init__(self, path: str | os.PathLike, schema, rows: int = 8192, max_bytes: int = 64 << 20,
                 measure: str | None = "text"):
        import pyarrow.parquet as pq

        self.schema, self.rows, self.max_bytes, self.measure = schema, int(rows), int(max_bytes), measure
        self._writer = pq.ParquetWriter(str(path), schema)
        self._parts: list = []
        self._n = 0
        self._bytes = 0
        self.n_rows = 0

    def _sizes(self, table) -> np.ndarray:
        import pyarrow.compute as pc

        if self.measure is None:
            return np.zeros(table.num_rows, np.int64)
        col = table.column(self.measure)
        return pc.binary_length(pc.cast(col, "binary")).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)

    def write(self, table) -> None:
        table = table.cast(self.schema) if table.schema != self.schema else table
        self.n_rows += table.num_rows
        sizes = np.cumsum(self._sizes(table))
        start = 0
        while start < table.num_rows:
            done = sizes[start - 1] if start else 0
            room_rows = self.rows - self._n
            over = np.nonzero(sizes[start:] - done + self._bytes >= self.max_bytes)[0]
            take = min(room_rows, int(over[0]) + 1 if len(over) else table.num_rows - start)
            self._parts.append(table.slice(start, take))
            self._n += take
            self._bytes += int(sizes[start + take - 1] - done)
            start += take
            if self._n >= self.rows or self._bytes >= self.max_bytes:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._n:
            self._writer.write_table(pa.concat_tables(self._parts).combine_chunks(), row_group_size=self._n)
        self._parts, self._n, self._bytes = [], 0, 0

    def close(self) -> None:
        self._flush()
        self._writer.close()


def iter_batches(pf, batch_size: int, columns: list[str] | None = None) -> Iterator:
    """Record batches of ≤ batch_size rows of the ParquetFile `pf`, read one row group at a time
    (`ParquetFile.iter_batches` over a whole file holds more and more memory as it goes: ~20 MiB extra over a
    30 MB file of 100 row groups, measured with pyarrow 26)."""
    for g in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=batch_size, columns=columns, row_groups=[g])


def exact_tables(pf, columns: list[str], rows: int) -> Iterator:
    """Arrow tables of exactly `rows` rows (the last one shorter) of `columns` of the ParquetFile `pf`, whatever
    its row groups: two files of the same documents are read in step."""
    import pyarrow as pa

    buf, n = [], 0
    for batch in iter_batches(pf, rows, columns):
        buf.append(pa.Table.from_batches([batch]))
        n += len(batch)
        while n >= rows:
            whole = pa.concat_tables(buf)
            rest = whole.slice(rows)
            yield whole.slice(0, rows)
            buf, n = ([rest] if len(rest) else []), len(rest)
    if n:
        yield pa.concat_tables(buf)


def exact_batches(pf, column: str, rows: int) -> Iterator:
    """`exact_tables` of one column, as arrays."""
    for t in exact_tables(pf, [column], rows):
        yield t.column(0).combine_chunks()
