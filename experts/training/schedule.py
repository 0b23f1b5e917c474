"""What a run's budget becomes: batch geometry and step counts (`TrainPlan`), the learning-rate schedule, and the
throughput and MFU that the loop logs (`Throughput`)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from corpus.io import InputError
from experts.microbatch import CPU_MICRO_BATCH, split_blocks
from experts.training.config import TrainConfig


@dataclass
class TrainPlan:
    """Derived batch geometry and step counts of a run. Each device runs the micro-batches `micro_batches`
    (sizes in blocks; `experts.microbatch.split_blocks`) per optimizer step."""

    seq_len: int
    micro_batch_size: int
    world_size: int
    grad_accum: int
    tokens_per_step: int
    steps: int
    warmup_steps: int
    micro_batches: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.micro_batches:
            self.micro_batches = [self.micro_batch_size] * self.grad_accum

    @property
    def blocks_per_device(self) -> int:
        return sum(self.micro_batches)

    @property
    def blocks_per_step(self) -> int:
        return self.blocks_per_device * self.world_size

    def micro_start(self, step: int, i: int, rank: int) -> int:
        """Data position of micro-batch i of `step` on `rank`: the step's blocks are dealt out micro-batch by
        micro-batch, each one rank after rank."""
        return step * self.blocks_per_step + sum(self.micro_batches[:i]) * self.world_size + rank * self.micro_batches[i]

    def same_schedule(self, other: dict) -> bool:
        """Whether a checkpoint's plan (a dict) trains the same optimizer steps: block length, tokens per step,
        steps and warmup. The micro-batch split may differ (e.g. `auto` on another device)."""
        keys = ("seq_len", "tokens_per_step", "steps", "warmup_steps")
        return all(other.get(k) == getattr(self, k) for k in keys)


def plan_training(config: TrainConfig, seq_len: int, world_size: int = 1, micro_batch_size: int | None = None) -> TrainPlan:
    """Steps, micro-batches and warmup from the config (raises InputError for impossible budgets).

    Blocks per device and step: G = global_batch_tokens // (seq_len · world_size), or one micro-batch when
    global_batch_tokens is None (CPU_MICRO_BATCH blocks with micro_batch_size 'auto'). They are split into
    micro-batches of at most `micro_batch_size` blocks (the argument: what `auto` chose; else the config's
    number; else CPU_MICRO_BATCH)."""
    fixed = config.micro_batch_size if isinstance(config.micro_batch_size, int) else None
    micro = micro_batch_size or fixed or CPU_MICRO_BATCH
    if config.global_batch_tokens is None:
        per_device = fixed or CPU_MICRO_BATCH
    else:
        per_device = config.global_batch_tokens // (seq_len * world_size)
        if per_device < 1:
            raise InputError(
                f"--batch-tokens {config.global_batch_tokens} is smaller than one block per device "
                f"({seq_len} tokens x {world_size} device(s)); raise --batch-tokens"
            )
    sizes = split_blocks(per_device, micro)
    tokens_per_step = per_device * seq_len * world_size
    steps = config.train_tokens // tokens_per_step
    if config.max_steps is not None:
        steps = min(steps, config.max_steps) if steps else config.max_steps
    if steps < 1:
        raise InputError(
            f"--train-tokens {config.train_tokens} is less than one global batch ({tokens_per_step} tokens); "
            "raise the budget or lower --batch-tokens/--micro-batch-size"
        )
    total = config.schedule_steps or steps  # the whole schedule this run is part of
    warmup = config.warmup_steps if config.warmup_steps is not None else int(round(config.warmup_fraction * total))
    if config.schedule_start == 0 and warmup >= steps and warmup > 0:
        raise InputError(
            f"budget too small for warmup: {warmup} warmup steps but --train-tokens {config.train_tokens} gives only "
            f"{steps} steps of {tokens_per_step} tokens; lower --warmup-steps or raise --train-tokens"
        )
    return TrainPlan(seq_len, max(sizes), world_size, len(sizes), tokens_per_step, steps, warmup, sizes)


def lr_at(step: int, config: TrainConfig, plan: TrainPlan) -> float:
    """LR of optimizer step `step` (0-based) of this run: linear warmup to lr, then cosine or linear decay to
    min_lr, over the schedule's `config.schedule_steps` steps (default: this run's) from `config.schedule_start`."""
    s = step + config.schedule_start
    if s < plan.warmup_steps:
        return config.lr * (s + 1) / plan.warmup_steps
    span = max(1, (config.schedule_steps or plan.steps) - plan.warmup_steps)
    progress = min(1.0, (s - plan.warmup_steps) / span)
    if config.decay == "cosine":
        return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))
    return config.lr - (config.lr - config.min_lr) * progress


def peak_flops(device) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU, by name (H100/H200 SXM 989e12, H100 PCIe 756e12, A100 312e12)."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    if "H100" in name or "H200" in name or "H800" in name:
        return 989e12
    if "A100" in name or "A800" in name:
        return 312e12
    if "L40S" in name:
        return 362e12
    if "4090" in name:
        return 165e12
    return None


class Throughput:
    """Tokens/s and MFU of a run's steps, measured without a host sync per step. The timed window starts once
    the first steps after `start_step` are done (3, or 1 in a run of at most 6 steps: they compile and warm up),
    with one sync so that it starts with an empty queue; MFU = tokens/s · `flops_per_token` / (`peak` FLOP/s ·
    `world` devices), None without a known peak."""

    def __init__(self, plan: TrainPlan, device, flops_per_token: float, peak: float | None, world: int,
                 start_step: int):
        self.plan, self.device, self.flops_per_token, self.peak, self.world = plan, device, flops_per_token, peak, world
        self.start_step = start_step
        self.t_start: float | None = None  # host time the window started
        self.first_step = 0  # the step done when the window started
        self.steps = 0  # steps done since then

    def step_done(self, done: int) -> None:
        """Count step `done` (1-based) as finished on the host; the first call past the warm-up opens the window."""
        if self.t_start is None and done - self.start_step >= (3 if self.plan.steps - self.start_step > 6 else 1):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # once: the timed window starts with an empty queue
            self.t_start, self.steps, self.first_step = time.perf_counter(), 0, done  # excludes compile steps
        else:
            self.steps += 1

    def logged_rate(self, last_done: int) -> float:
        """Tokens/s for a log line without a host sync: steps known to be finished since the window began
        (`last_done`: the latest step whose loss reached the host), over the host time since then (a lower bound
        while the GPU runs behind the host); 0 before the window."""
        if self.t_start is None or last_done <= self.first_step:
            return 0.0
        return (last_done - self.first_step) * self.plan.tokens_per_step / max(1e-9, time.perf_counter() - self.t_start)

    def logged_mfu(self, tps: float) -> float | None:
        """MFU of a log line's `tps`; None without a known peak or rate."""
        return tps * self.flops_per_token / (self.peak * self.world) if self.peak and tps else None

    def final(self) -> tuple[float, float | None]:
        """(tokens/s, MFU or None) of the window, after waiting for the GPU; (0.0, None) without one."""
        if self.t_start is None or self.steps == 0:
            return 0.0, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        tps = self.steps * self.plan.tokens_per_step / (time.perf_counter() - self.t_start)
        return tps, self.logged_mfu(tps)  # tps > 0 here: one or more steps
