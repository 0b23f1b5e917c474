"""Micro-batches: how one optimizer step's blocks are split into forward/backward passes, and the largest
micro-batch that fits the device (`--micro-batch-size auto`).

A global batch of G blocks per device is split into a = ⌈G / m⌉ micro-batches of ⌊G/a⌋ or ⌈G/a⌉ blocks
(`split_blocks`), so gradient accumulation always covers exactly G blocks: micro-batch i's mean loss is weighted by
sᵢ / G, and Σᵢ (sᵢ / G) · meanᵢ is the mean over the whole batch (equal sizes: 1 / a, as plain accumulation).

The largest m that fits is found as accelerate's `find_executable_batch_size` and Lightning's batch-size finder
do: try a forward + backward at a candidate size and keep the largest that does not run out of memory
(`largest_fitting`, a bisection over the sizes ⌈G/a⌉, a = 1, 2, …). On CUDA the probe (`cuda_fits`) runs the
eager, fp32-weight model — never smaller than what the compiled bf16-weight training step needs — while holding
back the memory that only exists after the first optimizer step (AdamW moments, bf16 weight copies) plus a
margin. On CPU nothing is probed: `CPU_MICRO_BATCH` blocks.
"""
from __future__ import annotations

from typing import Callable

from corpus.io import InputError

CPU_MICRO_BATCH = 8
"""Micro-batch (blocks) of `--micro-batch-size auto` on CPU, and the global batch per device when no
--batch-tokens is given (what the fixed default of 8 gave before `auto`)."""
MARGIN = 0.10
"""Fraction of the device's (or this process's share of) memory kept free by the probe: allocator
fragmentation, the validation pass, compiled kernels' workspaces."""
_CONTEXT_BYTES = 768 << 20
"""Memory a CUDA context takes outside torch's allocator (driver, kernels, cuBLAS handles), per process."""


def split_blocks(global_blocks: int, max_micro: int) -> list[int]:
    """Sizes of the micro-batches that cover `global_blocks` with at most `max_micro` blocks each, as equal as
    possible: a = ⌈G / m⌉ parts of ⌊G/a⌋ or ⌈G/a⌉ blocks, larger first. split_blocks(17, 8) == [6, 6, 5]."""
    if global_blocks < 1 or max_micro < 1:
        raise ValueError(f"split_blocks needs positive sizes, got {global_blocks}, {max_micro}")
    a = -(-global_blocks // max_micro)
    q, r = divmod(global_blocks, a)
    return [q + 1] * r + [q] * (a - r)


def candidate_sizes(global_blocks: int) -> list[int]:
    """The micro-batch sizes worth trying for a global batch of G blocks, largest first: ⌈G/a⌉ for a = 1, 2, …
    (every other size needs as many accumulation steps as the next larger candidate)."""
    out: list[int] = []
    for a in range(1, global_blocks + 1):
        m = -(-global_blocks // a)
        if not out or m < out[-1]:
            out.append(m)
    return out


def largest_fitting(global_blocks: int, fits: Callable[[int], bool], log: list | None = None) -> int | None:
    """The largest candidate size m (`candidate_sizes`) with fits(m), by bisection (fits is assumed monotone:
    a size fits if a larger one does). None when not even 1 block fits. Each probe is appended to `log` as
    {"micro_batch": m, "fits": bool}."""
    cands = candidate_sizes(global_blocks)  # descending

    def probe(m: int) -> bool:
        ok = bool(fits(m))
        if log is not None:
            log.append({"micro_batch": m, "fits": ok})
        return ok

    if probe(cands[0]):
        return cands[0]
    lo, hi = 1, len(cands) - 1  # cands[lo - 1] does not fit; find the first index that fits in [lo, hi]
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if probe(cands[mid]):
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    return None if best is None else cands[best]


def memory_fraction(experts_per_gpu: int, total_bytes: int) -> float:
    """Share of a GPU's memory one of `experts_per_gpu` training processes may allocate: what is left after
    every process's CUDA context, divided evenly."""
    usable = max(0.0, total_bytes - experts_per_gpu * _CONTEXT_BYTES)
    return max(0.01, min(1.0, usable / experts_per_gpu / total_bytes))


def optimizer_reserve_bytes(n_params: int, bf16_params: bool, ddp: bool) -> int:
    """Bytes that training allocates beyond a probe's forward + backward of the fp32 model: AdamW's two fp32
    moments (8 B/param), with bf16 weights their bf16 copies and bf16 gradients (4 B/param), under DDP its
    gradient buckets (4 B/param)."""
    return n_params * (8 + (4 if bf16_params else 0) + (4 if ddp else 0))


def cuda_fits(loss_module, params, seq_len: int, device, autocast, reserve_bytes: int, limit_bytes: int,
              sdpa_ctx=None) -> Callable[[int], bool]:
    """fits(m): does a forward + backward of `loss_module` on m blocks of `seq_len` tokens run on `device` while
    `reserve_bytes` + MARGIN · `limit_bytes` are held back? Gradients and cached blocks are freed after each
    probe; the model's weights are not changed (no optimizer step) and no RNG is drawn (token id 0)."""
    import contextlib

    import torch

    def attempt(m: int) -> bool:
        hold = torch.empty(reserve_bytes + int(MARGIN * limit_bytes), dtype=torch.uint8, device=device)
        x = torch.zeros((m, seq_len), dtype=torch.long, device=device)
        with sdpa_ctx() if sdpa_ctx is not None else contextlib.nullcontext():
            with autocast():
                total, _, _ = loss_module(x)
            total.backward()
        torch.cuda.synchronize(device)
        del hold, x, total
        return True

    def fits(m: int) -> bool:
        try:
            ok = attempt(m)
        except torch.OutOfMemoryError:
            ok = False  # the failed attempt's frames (and tensors) are released when this handler ends
        for p in params:
            p.grad = None
        torch.cuda.empty_cache()
        return ok

    return fits


def no_fit_message(n_params: int, seq_len: int, device_name: str, limit_bytes: int, total_bytes: int,
                   experts_per_gpu: int, need_bytes: int | None) -> str:
    """One line for `--micro-batch-size auto` when not even one block fits: the model, the block length, the
    memory this process may use and, with several experts per GPU, how many would fit."""
    gib = 2**30
    what = f"one block of {seq_len} tokens of the {n_params / 1e6:.0f}M-parameter model"
    if experts_per_gpu > 1:
        fit = ""
        if need_bytes:
            k = int(total_bytes // (need_bytes / (1 - MARGIN) + _CONTEXT_BYTES))
            fit = f"; at most {k} fit on this GPU (one needs about {need_bytes / gib:.1f} GiB)" if k >= 1 else \
                "; not even one expert fits on this GPU"
        return (f"--experts-per-gpu {experts_per_gpu} leaves each expert {limit_bytes / gib:.1f} GiB of "
                f"{device_name} ({total_bytes / gib:.0f} GiB), too little for {what}{fit}: "
                f"lower --experts-per-gpu")
    return (f"{what} does not fit on {device_name} ({limit_bytes / gib:.1f} GiB usable) with weights, gradients "
            "and AdamW state: use a smaller --model-size or --seq-len, or shard it over GPUs with "
            "--gpus-per-expert N --sharding fsdp")


def accumulation_weight(sizes: list[int], i: int) -> float:
    """Divisor of micro-batch i's mean loss so that the accumulated gradient is the global batch's mean:
    G / sᵢ (= the number of micro-batches a when they are equal, exactly)."""
    total = sum(sizes)
    return float(len(sizes)) if len(set(sizes)) == 1 else total / sizes[i]


def describe(sizes: list[int]) -> str:
    """'3 × 6' or '6+6+5' for logs."""
    return f"{len(sizes)} × {sizes[0]}" if len(set(sizes)) == 1 else "+".join(map(str, sizes))
