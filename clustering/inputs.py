"""Input matrices of the clusterers: checks (a 2-D matrix of numbers, finite, positive weights) and rows read onto
the compute device in float32, from numpy arrays, memory-mapped .npy files or torch tensors, in bounded chunks."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from corpus.io import InputError

BATCH_BYTES = 1 << 28  # ~256 MiB of (rows × (dim + n_clusters)) float32 per streamed batch
_STAGE_BYTES = 1 << 26  # 64 MiB per pinned staging buffer of host → GPU copies (two, used by turns)


def check_matrix(x: Any, name: str = "x") -> Any:
    """Return `x` (numpy array, memmap or torch tensor) after checking it is a 2-D float/int matrix."""
    if isinstance(x, torch.Tensor):
        if x.ndim != 2:
            raise InputError(f"{name} must be a 2-D matrix (n_docs, dim), got shape {tuple(x.shape)}")
        if x.is_sparse:
            raise InputError(f"{name} is a sparse tensor; densify it (embedders return dense arrays)")
        return x
    if hasattr(x, "toarray"):
        raise InputError(f"{name} is a sparse matrix; densify it first (embedders return dense arrays)")
    x = x if isinstance(x, np.ndarray) else np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{name} must be a 2-D matrix (n_docs, dim), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputError(f"{name} must hold numbers, got dtype {x.dtype}")
    return x


def first_nonfinite_row(xb: torch.Tensor) -> int | None:
    """Index of the first row of xb (b, d) holding a NaN or ±inf, or None. A row sum is finite only if every entry
    is (inf and NaN propagate), so one cheap row sum finds the candidate rows and only those are checked entry-wise
    (a finite row can sum to inf by overflow); `torch.isfinite` over the whole matrix costs ~20× more on CPU."""
    cand = (~torch.isfinite(xb.sum(1))).nonzero().squeeze(1)  # (r,) rows whose sum is not finite
    if cand.numel() == 0:
        return None
    bad = cand[~torch.isfinite(xb[cand]).all(1)]
    return int(bad[0]) if bad.numel() else None


def _host_tensor(x: Any) -> torch.Tensor:
    """A CPU tensor viewing the numpy array / memmap `x` (no copy; a read-only memmap is only ever read)."""
    if isinstance(x, torch.Tensor):
        return x
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we never write through this view
        return torch.from_numpy(np.ascontiguousarray(x) if not x.flags.c_contiguous else x)


def _host_to_cuda(x: Any, device: torch.device, start: int = 0, stop: int | None = None,
                  idx: np.ndarray | None = None) -> torch.Tensor:
    """Rows [start, stop) of a host matrix `x` (numpy, memmap or CPU tensor), or rows `idx`, as float32 on the
    CUDA `device`, without a pageable (synchronous, staged by the driver) copy: chunks of `_STAGE_BYTES` are
    gathered by torch's multi-threaded copy/index_select into two pinned buffers by turns, and each goes to the
    GPU by an asynchronous copy on a side stream, so the host fills one buffer while the other crosses the bus.
    Returns once the copies are queued; the current stream waits for them."""
    src = _host_tensor(x)
    stop = x.shape[0] if stop is None else stop
    n = len(idx) if idx is not None else stop - start
    d = x.shape[1]
    out = torch.empty((n, d), dtype=torch.float32, device=device)
    if n == 0:
        return out
    rows = max(1, _STAGE_BYTES // (4 * max(1, d)))
    n_bufs = min(2, -(-n // rows))
    bufs = [torch.empty((min(rows, n), d), dtype=torch.float32, pin_memory=True) for _ in range(n_bufs)]
    sent: list[torch.cuda.Event | None] = [None] * n_bufs
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # `out` is allocated on the current stream
    for j, s in enumerate(range(0, n, rows)):
        e = min(n, s + rows)
        slot = j % n_bufs
        if sent[slot] is not None:
            sent[slot].synchronize()  # that buffer's previous chunk has reached the GPU
        buf = bufs[slot][: e - s]
        if idx is None:
            buf.copy_(src[start + s : start + e])  # converts float16 etc. to float32 on the way
        else:
            part = torch.from_numpy(np.ascontiguousarray(idx[s:e], dtype=np.int64))
            if src.dtype == torch.float32:
                torch.index_select(src, 0, part, out=buf)
            else:
                buf.copy_(src[part])
        with torch.cuda.stream(stream):
            out[s:e].copy_(buf, non_blocking=True)
            sent[slot] = torch.cuda.Event()
            sent[slot].record(stream)
    torch.cuda.current_stream(device).wait_stream(stream)
    return out


def rows_to_device(x: Any, start: int, stop: int, device: torch.device, name: str = "x") -> torch.Tensor:
    """Rows [start, stop) of `x` as a float32 tensor on `device`; InputError on NaN/inf."""
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        xb = x[start:stop].to(device=device, dtype=torch.float32, non_blocking=True)
    elif device.type == "cuda":
        xb = _host_to_cuda(x, device, start, stop)
    elif isinstance(x, torch.Tensor):
        xb = x[start:stop].to(dtype=torch.float32)
    else:
        xb = torch.from_numpy(np.array(x[start:stop], dtype=np.float32))
    bad = first_nonfinite_row(xb)
    if bad is not None:
        raise InputError(f"{name} has NaN or infinite values (first at row {start + bad}); fix the embeddings first")
    return xb


def take_rows(x: Any, idx: np.ndarray, device: torch.device, name: str = "x") -> torch.Tensor:
    """Rows `idx` (sorted int64) of `x` as float32 on `device`, read in chunks (works on memory-mapped .npy).
    All rows of a float32 C-contiguous matrix already on `device` are used as they are, without a copy; a host
    matrix goes to a CUDA device through pinned, overlapped chunk copies (`_host_to_cuda`)."""
    everything = len(idx) == x.shape[0]
    if everything:
        if isinstance(x, np.ndarray) and device.type == "cpu" and x.dtype == np.float32 and \
                x.flags.c_contiguous and x.flags.writeable:
            x = torch.from_numpy(x)
        if isinstance(x, torch.Tensor) and x.device == device and x.dtype == torch.float32 and x.is_contiguous():
            bad = first_nonfinite_row(x)
            if bad is not None:
                raise InputError(f"{name} has NaN or infinite values (first at row {bad}); fix the embeddings first")
            return x
    if device.type == "cuda" and not (isinstance(x, torch.Tensor) and x.device.type != "cpu"):
        out = _host_to_cuda(x, device, idx=None if everything else idx)
        bad = first_nonfinite_row(out)  # one check (one sync) over the whole matrix, on the GPU
        if bad is not None:
            raise InputError(f"{name} has NaN or infinite values (first at row {int(idx[bad])}); "
                             "fix the embeddings first")
        return out
    out = torch.empty((len(idx), x.shape[1]), dtype=torch.float32, device=device)
    step = max(1, BATCH_BYTES // (4 * max(1, x.shape[1])))
    for s in range(0, len(idx), step):
        part = idx[s : s + step]
        if isinstance(x, torch.Tensor):
            xb = x[torch.as_tensor(part, device=x.device)].to(device=device, dtype=torch.float32)
        else:
            xb = torch.from_numpy(np.array(x[part], dtype=np.float32)).to(device)
        bad = first_nonfinite_row(xb)
        if bad is not None:
            raise InputError(f"{name} has NaN or infinite values (first at row {int(part[bad])}); "
                             "fix the embeddings first")
        out[s : s + len(part)] = xb
    return out


def check_weights(weights: Any, n: int) -> np.ndarray:
    """Per-point weights as float64 (n,), all finite and > 0; InputError otherwise."""
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n:
        raise InputError(f"weights has {w.shape[0]} entries for {n} points")
    if not np.isfinite(w).all() or (w <= 0).any():
        raise InputError("weights must be finite and > 0 (a document's weight is its length)")
    return w
