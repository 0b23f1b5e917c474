"""`train_model`: the training recipe for seeds, experts and the dense baseline (also BTX MoE finetuning).

`TrainRecipe` reads top to bottom as torchtune's `full_finetune_single_device` recipe: `setup` loads the model,
opens the data (`_setup_data`), readies the model (`_setup_model`), builds the optimizer (`_setup_optimizer`) and
resumes from a checkpoint (`_resume`); `train` runs the steps, each of them micro-batches through `_loss_step`,
evaluates (`evaluate`), writes resumable checkpoints (`save_checkpoint`) and at the end the model (`save_model`).

Plain PyTorch: AdamW (fused on CUDA), linear warmup then cosine/linear decay to `min_lr` (`schedule`), bf16
autocast on CUDA, SDPA attention with is_causal=True and no materialised mask (`patches`), optional
`torch.compile`, gradient accumulation that covers a global batch in tokens exactly with micro-batches of at
most `TrainConfig.micro_batch_size` blocks (`auto`: the largest that fits, `experts.microbatch`), gradient
clipping, seeded data order read ahead on a background thread (`experts.data.Prefetcher`), and no host
synchronisation per step. The loss is a chunked fused linear + cross-entropy that never materialises the
(B, T, V) logits in fp32 (`loss`). On one GPU the model computes with bf16 weights while AdamW updates fp32
master weights (`optim.MasterWeights`, whose clipping + AdamW + bf16 copy compile into one update), RoPE reads
cos/sin from tables (`patches.cache_rotary`), and backbone + loss compile as one graph (bench/RESULTS.md).
Resumable checkpoints: `checkpoint`; several GPUs (DDP, FSDP2): `distributed`. Budgets (tokens, steps, global
batch of the seed, each expert and the dense baseline) are decided in `experts.budget`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from corpus.device import resolve_device
from corpus.io import InputError, atomic_dir, write_json
from corpus.layout import TRAINING_INFO
from experts.compat import make_portable
from experts.data import PackedBlocks, Prefetcher
from experts.microbatch import (
    CPU_MICRO_BATCH, accumulation_weight, cuda_fits, describe, largest_fitting, memory_fraction, no_fit_message,
    optimizer_reserve_bytes,
)
from experts.model import check_compatible, count_params, flops_per_token, load_causal_lm
from experts.tokenizer import load_tokenizer
from experts.training.checkpoint import checkpoint_dir, full_state, load_checkpoint, save_checkpoint, tied_like
from experts.training.config import TrainConfig
from experts.training.distributed import dist_info, shard_model
from experts.training.events import LiveMetrics
from experts.training.loss import CausalLMLoss
from experts.training.metrics import RouterStats
from experts.training.optim import MasterWeights
from experts.training.patches import cache_rotary, restore_attention, restore_rotary, sdpa_context, use_causal_sdpa
from experts.training.schedule import Throughput, lr_at, peak_flops, plan_training

log = logging.getLogger(__name__)


def train_model(
    init,
    shard_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: TrainConfig,
    valid_paths: Sequence[str | os.PathLike] | None = None,
    tokenizer=None,
    on_step: Callable[[int, "TrainState"], None] | None = None,
) -> dict:
    """Train `init` on the packed blocks of `shard_paths` for `config.train_tokens` tokens; write `out_dir`.

    `init`: a `save_pretrained` directory (seed, another expert, or an `experts.merge.branch_average` output for
    `--branch-from average`), a hub name, or a `PreTrainedModel` (trained in place). `tokenizer`: object or
    directory saved beside the model (default: the one in `init`, if any). `on_step(step, state)` is called
    after every optimizer step with the run's `TrainState` (tests use it to simulate a kill).
    Writes `out_dir/` (save_pretrained model + tokenizer + training.json) atomically; resumes from
    `<out_dir>.ckpt/` when present. Returns the training.json dict.
    """
    recipe = TrainRecipe(config, out_dir, on_step)
    recipe.setup(init, shard_paths, valid_paths, tokenizer)
    return recipe.train()


@dataclass
class TrainState:
    """What a run has done so far: written into every checkpoint's trainer_state.json (in this field order) and
    read back when the run resumes."""

    step: int = 0
    tokens_seen: int = 0
    wall_time_s: float = 0.0
    loss_curve: list[list] = field(default_factory=list)
    """[step, training loss] of every step."""
    valid_curve: list[list] = field(default_factory=list)
    """[step, validation loss] of every evaluation before the last step."""
    resumed_at: list[int] = field(default_factory=list)
    """The steps this run resumed from, in order."""
    best: dict | None = None
    """{"step", "loss"} of the best evaluation so far (the overfitting guard, `TrainConfig.keep_best`)."""
    plan: dict | None = None
    """The `TrainPlan` (as a dict) the state belongs to: a resume with another batch plan is refused."""

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "TrainState":
        """The state of `load_checkpoint`'s dict (which also holds what `save_checkpoint` adds beside it)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


class TrainRecipe:
    """One training run: `setup(init, shard_paths, valid_paths, tokenizer)`, then `train()`, which returns the
    training.json dict. Device, compilation and bf16 master weights are decided once, here, from the config."""

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike,
                 on_step: Callable[[int, TrainState], None] | None = None):
        self.config = config
        self.on_step = on_step
        self.world, self.rank, local_rank = dist_info()
        self.device_setup, self.device = _setup_device(config, self.world, local_rank)
        self.fsdp = self.world > 1 and config.sharding == "fsdp"
        self.use_compile = config.compile if config.compile is not None else self.device.type == "cuda"
        self.use_bf16 = config.bf16_params if config.bf16_params is not None else (
            self.device.type == "cuda" and self.device_setup.dtype == torch.bfloat16 and self.world == 1)
        if self.use_bf16 and self.world > 1:
            raise InputError("--bf16-params needs a single process (its gradient hooks bypass DDP's all-reduce); use --no-bf16-params under torchrun")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.out_dir = Path(out_dir)
        self.ckpt = checkpoint_dir(self.out_dir)

    # ---- setup -------------------------------------------------------------------------------------------------

    def setup(self, init, shard_paths: Sequence[str | os.PathLike],
              valid_paths: Sequence[str | os.PathLike] | None = None, tokenizer=None) -> None:
        """Load `init` (and its tokenizer), open the shards, seed the RNGs, ready the model, build the optimizer and
        resume from `<out_dir>.ckpt/` when it holds a checkpoint."""
        self.init = init
        self.model, self.tokenizer = _load_init(init, tokenizer)
        self.init_dtype = upcast_to_fp32(self.model, self.out_dir.name)
        if self.tokenizer is not None:
            check_compatible(self.model, self.tokenizer)
        self._setup_data([str(p) for p in shard_paths], valid_paths)
        torch.manual_seed(self.config.seed)
        np.random.seed(self.config.seed % 2**32)
        random.seed(self.config.seed)
        self._setup_model()
        self._setup_optimizer()
        self._resume()
        self.metrics = LiveMetrics(self.out_dir, resume_step=self.state.step, enabled=self.rank == 0,  # TensorBoard
                                   step_offset=self.config.schedule_start)  # scalars against the schedule's step
        compile_update = self.config.compile_update if self.config.compile_update is not None else self.use_compile
        self.masters = (MasterWeights(self.model, torch.bfloat16, accumulate=self.plan.grad_accum > 1,
                                      compile=compile_update)
                        if self.use_bf16 else None)  # after the fp32 checkpoint is loaded
        self.ddp_module = self.loss_module
        if self.world > 1 and not self.fsdp:
            self.ddp_module = DDP(self.loss_module,
                                  device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.top_k = int(getattr(self.model.config, "num_experts_per_tok", 2) or 2)
        self.router_stats = RouterStats()
        self.flops_per_token = flops_per_token(self.model.config, self.data.seq_len)

    def _setup_data(self, shard_paths: list[str], valid_paths) -> None:
        """Training blocks, validation blocks (or None) and the batch plan, with InputErrors for shards that do not
        fit the model (vocabulary, context) or hold less than one global batch over all devices."""
        config = self.config
        _check_shard_vocab(shard_paths, self.model)
        self.shard_paths = shard_paths
        self.valid_paths = [str(p) for p in valid_paths] if valid_paths else []
        self.data = PackedBlocks(shard_paths, seed=config.seed)
        self.plan = plan_training(config, self.data.seq_len, self.world)
        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if max_pos is not None and self.data.seq_len > max_pos:
            raise InputError(f"shards have blocks of {self.data.seq_len} tokens but the model's context is {max_pos}; reshard with --seq-len {max_pos}")
        if self.data.n_blocks < self.plan.blocks_per_step:
            raise InputError(
                f"shard(s) {', '.join(shard_paths)} hold {self.data.n_tokens} tokens, fewer than one global batch "
                f"({self.plan.tokens_per_step} tokens); give small clusters their share with --assign balanced, use fewer "
                "--num-clusters, or lower --batch-tokens/--micro-batch-size"
            )
        valid = PackedBlocks(self.valid_paths, seq_len=self.data.seq_len, shuffle=False) if valid_paths else None
        if valid is not None and valid.n_blocks == 0:
            log.warning("validation shards %s hold no full block; no validation loss", valid_paths)
            valid = None
        self.valid = valid

    def _setup_model(self) -> None:
        """The model on its device in training mode, patched for training (causal SDPA, RoPE tables; undone by
        `_hand_back`), wrapped in the loss module, and sharded under FSDP."""
        model, config = self.model, self.config
        if not self.fsdp:  # FSDP moves each rank's shards to the device itself (the whole model may not fit there)
            model.to(self.device)
        model.train()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        self.prev_attn = use_causal_sdpa(model, self.data.seq_len) if config.causal_sdpa else None
        self.prev_rotary = cache_rotary(model, self.data.seq_len) if config.cache_rope else None
        self.loss_module = CausalLMLoss.build(model, config, self.use_compile)
        if self.fsdp:  # before the optimizer is built: sharding replaces every parameter by a DTensor
            shard_model(self.loss_module, model, self.device, self.device_setup.dtype)

    def _setup_optimizer(self) -> None:
        """AdamW over the trainable parameters (`config.trainable`), weight decay on matrices only, fused on CUDA;
        then, before any optimizer state exists, the micro-batch size (`auto` on CUDA: `_fit_micro_batch`)."""
        model, config = self.model, self.config
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if config.trainable == "ffn" and ".mlp." not in name:
                p.requires_grad_(False)  # FlexOlmo: the seed's attention, norms and embeddings stay as they are
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        if not decay + no_decay:
            raise InputError(f"--expert-trainable {config.trainable}: {type(model).__name__} has no such parameters to train")
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=config.betas, eps=config.eps, fused=self.device.type == "cuda",
        )
        self.micro_info: dict[str, Any] = {"requested": config.micro_batch_size}  # training.json's "micro_batch"
        if config.micro_batch_size == "auto" and self.device.type == "cuda":
            micro = self._fit_micro_batch()
            self.plan = plan_training(config, self.data.seq_len, self.world, micro_batch_size=micro)
        self.micro_info["micro_batches"] = self.plan.micro_batches
        log.info("%s: micro-batches of %s blocks per step and device (--micro-batch-size %s)", self.out_dir.name,
                 describe(self.plan.micro_batches), config.micro_batch_size)

    def _fit_micro_batch(self) -> int:
        """`micro_batch_size='auto'` on CUDA: the largest micro-batch (blocks) whose forward + backward fits this
        process's memory next to the optimizer state (`experts.microbatch`), the same on every rank. Fills
        `micro_info` (probes, memory limit) for training.json; InputError when not even one block fits."""
        config, device, info = self.config, self.device, self.micro_info
        per_device = self.plan.blocks_per_device
        if self.fsdp:  # a probe would run FSDP's collectives, which one rank's out-of-memory error would leave hanging
            info["note"] = "not probed under FSDP"
            return min(per_device, CPU_MICRO_BATCH)
        total = torch.cuda.get_device_properties(device).total_memory
        share = memory_fraction(config.experts_per_gpu, total) if config.experts_per_gpu > 1 else 1.0
        limit = int(share * total)
        n_params = count_params(self.model)
        reserve = optimizer_reserve_bytes(n_params, self.use_bf16, ddp=self.world > 1)
        params = [p for p in self.model.parameters() if p.requires_grad]
        probe_module = CausalLMLoss.build(self.model, config, compile=False)  # eager: no compilation per probed size
        probes: list[dict] = []
        autocast = self.device_setup.autocast
        fits = cuda_fits(probe_module, params, self.plan.seq_len, device, autocast, reserve, limit,
                         sdpa_ctx=lambda: sdpa_context(config.sdpa_backend))
        micro = largest_fitting(per_device, fits, probes) or 0
        if self.world > 1:  # every rank takes the smallest choice (0: some rank fits nothing)
            t = torch.tensor([micro], device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            micro = int(t)
        info.update(probes=probes, limit_gib=round(limit / 2**30, 2), reserve_gib=round(reserve / 2**30, 3),
                    experts_per_gpu=config.experts_per_gpu)
        if micro == 0:
            need = None
            if config.experts_per_gpu > 1:  # what one block takes with the whole GPU, for the message
                torch.cuda.set_per_process_memory_fraction(1.0, device)
                torch.cuda.reset_peak_memory_stats(device)
                if cuda_fits(probe_module, params, self.plan.seq_len, device, autocast, 0, 0)(1):
                    need = torch.cuda.max_memory_allocated(device) + reserve
                torch.cuda.set_per_process_memory_fraction(share, device)
            raise InputError(no_fit_message(n_params, self.plan.seq_len, torch.cuda.get_device_name(device), limit,
                                            total, config.experts_per_gpu, need))
        return micro

    def _resume(self) -> None:
        """`state` and the best weights so far: from `<out_dir>.ckpt/` when it holds a checkpoint (model, optimizer
        and RNG states restored), else a fresh start."""
        self.state = TrainState()
        self.best_weights: dict | None = None  # overfitting guard: CPU copy of the weights at state.best["step"]
        if (self.ckpt / "trainer_state.json").is_file():
            saved = load_checkpoint(self.ckpt, self.model, self.optimizer, self.device, fsdp=self.fsdp)
            self.state = TrainState.from_checkpoint(saved)
            if self.config.keep_best and (self.ckpt / "best.safetensors").is_file():
                self.best_weights = load_file(str(self.ckpt / "best.safetensors"))
            if self.state.plan and not self.plan.same_schedule(self.state.plan):
                raise InputError(f"checkpoint {self.ckpt} was written for a different batch plan {self.state.plan}; delete it to restart")
            self.state.resumed_at.append(self.state.step)
            log.info("resuming %s from step %d (%s)", self.out_dir, self.state.step, self.ckpt)
        self.state.plan = asdict(self.plan)

    # ---- training ----------------------------------------------------------------------------------------------

    def _loss_step(self, x: torch.Tensor):
        """(total loss, LM loss, router logits | None) of one micro-batch x (B, T) under the device's autocast."""
        with self.device_setup.autocast():
            return self.ddp_module(x)

    def train(self) -> dict:
        """Train the remaining steps, then evaluate, hand the model back and save it (`save_model`). Returns the
        training.json dict."""
        config, plan, state, device = self.config, self.plan, self.state, self.device
        self._bar = tqdm(total=plan.steps, initial=state.step, desc=f"train {self.out_dir.name}", unit="step",
                         disable=self.rank != 0, mininterval=2.0)
        self._pending: list[tuple[int, Any, Any]] = []  # (step, loss on the device, CUDA event after the step | None)
        self._t_start = time.perf_counter()
        self._wall_before = state.wall_time_s
        start_step = state.step
        meter = Throughput(plan, device, self.flops_per_token, peak_flops(device), self.world, start_step)
        sizes = plan.micro_batches
        self._uniform = len(set(sizes)) == 1
        self._divisors = [accumulation_weight(sizes, i) for i in range(len(sizes))]  # Σ lossᵢ / divisorᵢ = mean
        # the micro-batches of every remaining step, read and pinned ahead of the loop on a background thread
        batches = Prefetcher(self.data, ((plan.micro_start(step, i, self.rank), size)
                                         for step in range(start_step, plan.steps) for i, size in enumerate(sizes)),
                             pin=device.type == "cuda", depth=max(4, 2 * plan.grad_accum), device=device)
        try:
            for step in range(start_step, plan.steps):
                lr = lr_at(step, config, plan)
                loss = self._train_step(batches, lr)
                done = step + 1
                state.step = done
                state.tokens_seen = done * plan.tokens_per_step
                event = None
                if device.type == "cuda":
                    event = torch.cuda.Event()
                    event.record()
                self._pending.append((done, loss, event))
                self.metrics.scalar("train/lr", lr, done)
                meter.step_done(done)
                self._bar.update(1)
                if config.log_every and done % config.log_every == 0:
                    self._log_progress(done, lr, meter)
                if self.valid is not None and config.eval_every and done % config.eval_every == 0 and done < plan.steps:
                    self._evaluate_and_keep_best(done)
                if config.checkpoint_every and done % config.checkpoint_every == 0 and done < plan.steps:
                    self.save_checkpoint(done)
                if self.on_step is not None:
                    self.on_step(done, state)
        except torch.OutOfMemoryError:
            self._hand_back()
            raise InputError(
                f"CUDA out of memory with micro-batches of {plan.micro_batch_size} x {self.data.seq_len} tokens "
                f"(--micro-batch-size {config.micro_batch_size}); try --micro-batch-size {max(1, plan.micro_batch_size // 2)} "
                "(gradient accumulation keeps the global batch)"
            ) from None
        except BaseException:
            self._hand_back()
            raise
        finally:
            batches.close()
            self._bar.close()
        return self._finish(meter)

    def _train_step(self, batches: Prefetcher, lr: float) -> torch.Tensor:
        """One optimizer step at learning rate `lr` over this device's micro-batches; returns the step's mean LM
        loss over all devices, still on the device."""
        config, plan = self.config, self.plan
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        sizes = plan.micro_batches
        loss_acc = torch.zeros((), device=self.device)
        for i, size in enumerate(sizes):
            x = batches.next().to(self.device, non_blocking=True)  # (size, T); pinned: the copy does not stall the host
            sync = (self.ddp_module.no_sync() if (self.world > 1 and not self.fsdp and i < len(sizes) - 1)
                    else nullcontext())
            with sync, sdpa_context(config.sdpa_backend):
                total, lm, router_logits = self._loss_step(x)
                (total / self._divisors[i]).backward()
            loss_acc += lm.detach() if self._uniform else lm.detach() * size
            if router_logits is not None:
                self.router_stats.update(router_logits, self.top_k)
        if self.masters is not None:  # clipping, AdamW on the fp32 masters and the bf16 copy in one update
            self.masters.step(self.optimizer, config.grad_clip)
        else:
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_acc /= plan.grad_accum if self._uniform else plan.blocks_per_device
        if self.world > 1:
            torch.distributed.all_reduce(loss_acc)
            loss_acc /= self.world
        return loss_acc

    def _flush_losses(self, wait: bool = True) -> None:
        """Move step losses to the host: all of them (wait), or only those whose step has finished on the GPU,
        so that logging never stalls the host on queued kernels. The losses' one trip to the host: a non-finite
        one stops training before any checkpoint of its step is written."""
        pending, state = self._pending, self.state
        while pending and (wait or pending[0][2] is None or pending[0][2].query()):
            s, t, _ = pending.pop(0)
            if not math.isfinite(float(t)):
                pending.clear()
                last = state.loss_curve[-1][0] if state.loss_curve else 0
                kept = (f"last good checkpoint {self.ckpt} kept" if (self.ckpt / "trainer_state.json").is_file()
                        else "no checkpoint yet")
                raise InputError(f"training {self.out_dir} stopped: loss {float(t)} at step {s} (finite up to step {last}; "
                                 f"{kept}); lower the learning rate or check the data")
            state.loss_curve.append([s, float(t)])
            self.metrics.scalar("train/loss", state.loss_curve[-1][1], s)

    def _log_progress(self, done: int, lr: float, meter: Throughput) -> None:
        """The log line, progress bar and tokens/s scalar of the latest step whose loss is known (no host sync)."""
        self._flush_losses(wait=False)
        if not self.state.loss_curve:
            return
        last_step, last_loss = self.state.loss_curve[-1]
        tps = meter.logged_rate(last_step)
        mfu = meter.logged_mfu(tps)
        self._bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        self.metrics.scalar("train/tokens_per_s", tps or None, last_step)
        log.info("step %d/%d loss %.4f (step %d) lr %.2e %.0f tok/s%s", done, self.plan.steps, last_loss,
                 last_step, lr, tps, f" MFU {mfu:.1%}" if mfu else "")

    def evaluate(self) -> float | None:
        """Mean validation loss over up to `config.eval_tokens` tokens of the validation blocks, over all ranks;
        None without validation blocks."""
        valid, config, plan, device, world = self.valid, self.config, self.plan, self.device, self.world
        if valid is None:
            return None
        n = min(valid.n_blocks, max(1, config.eval_tokens // self.data.seq_len))
        if self.fsdp:  # every rank must run as many forwards (each all-gathers weights): a multiple of world blocks
            n = max(world, n - n % world)
        mine = list(range(self.rank, n, world))
        total = torch.zeros(2, dtype=torch.float64, device=device)
        loss_module = self.loss_module
        loss_module.eval()
        with torch.no_grad(), sdpa_context(config.sdpa_backend):
            for i in range(0, len(mine), plan.micro_batch_size):  # an expert's small batch: still full calls
                idx = mine[i : i + plan.micro_batch_size]
                x = torch.from_numpy(np.stack([valid.blocks(j, 1)[0] for j in idx])).to(device)
                with self.device_setup.autocast():
                    _, lm, _ = (loss_module(x) if self.fsdp or not loss_module.fused
                                else _eval_loss(loss_module, x))
                total[0] += lm.detach().double() * len(idx)  # stays on the device: one host sync per evaluation
                total[1] += len(idx)
        loss_module.train()
        if world > 1:
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else None

    def _evaluate_and_keep_best(self, done: int) -> None:
        """An evaluation between steps: the validation curve, and with keep_best a copy of better weights."""
        vl = self.evaluate()
        self.state.valid_curve.append([done, vl])
        log.info("step %d valid loss %.4f", done, vl)
        self.metrics.scalar("valid/loss", vl, done)
        self.metrics.flush()
        if self.config.keep_best and (self.state.best is None or vl < self.state.best["loss"]):
            self.state.best, self.best_weights = {"step": done, "loss": vl}, self._snapshot()

    def _snapshot(self) -> dict:
        """A CPU copy of the current (fp32) weights: the overfitting guard's best so far. Under FSDP a collective
        gathering the full state (rank 0 holds it)."""
        if self.fsdp:
            weights = full_state(self.model, fsdp=True)[0]
        else:
            with self.masters.fp32_model() if self.masters is not None else nullcontext():
                weights = self.model.state_dict()
        return {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}

    def _wall_time(self) -> float:
        """Seconds this run has trained, over all its resumes."""
        return self._wall_before + time.perf_counter() - self._t_start

    def save_checkpoint(self, done: int) -> None:
        """The resumable state after step `done` into `<out_dir>.ckpt/` (`checkpoint.save_checkpoint`), after every
        pending loss has been checked: fp32 weights, optimizer, RNGs, `state`, data position and config."""
        self._flush_losses()
        self.state.wall_time_s = self._wall_time()
        if self.rank == 0 or self.fsdp:  # under FSDP every rank takes part in gathering the full state
            with self.masters.fp32_model() if self.masters is not None else nullcontext():
                save_checkpoint(self.ckpt, self.model, self.optimizer,
                                {**asdict(self.state), "data_position": done * self.plan.blocks_per_step,
                                 "config": self.config.to_dict()}, fsdp=self.fsdp, best=self.best_weights)
        if self.world > 1:
            torch.distributed.barrier()

    def _hand_back(self) -> None:
        """Undo what only training needs: attention name, rotary tables, bf16 weights, event writer."""
        self.metrics.close()
        restore_attention(self.model, self.prev_attn)
        restore_rotary(self.model, self.prev_rotary)
        if self.masters is not None:
            self.masters.restore()  # the fp32 master weights are what is saved and handed back

    def _finish(self, meter: Throughput) -> dict:
        """After the last step: the final evaluation, the weights to keep (keep_best), the model handed back and
        saved with its training.json (`save_model`)."""
        config, state, device = self.config, self.state, self.device
        self._flush_losses()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tps, mfu = meter.final()
        valid_loss = self.evaluate()
        final_valid = valid_loss
        self.metrics.scalar("valid/loss", final_valid, state.step)
        self.metrics.scalar("train/tokens_per_s", tps or None, state.step)
        kept = state.step
        if config.keep_best and valid_loss is not None:
            if state.best is not None and state.best["loss"] <= valid_loss:
                kept, valid_loss = state.best["step"], state.best["loss"]  # an earlier evaluation was better
            else:
                self.best_weights = None  # the last weights are the best
        self._hand_back()
        if kept != state.step and not self.fsdp:
            self.model.load_state_dict(self.best_weights)
        wall = self._wall_time()
        n_gpus = self.world if device.type == "cuda" else 0
        init = self.init
        result = {
            "init": init if isinstance(init, (str, os.PathLike)) else type(init).__name__,
            "shard_paths": self.shard_paths,
            "valid_paths": self.valid_paths,
            "tokens_seen": state.tokens_seen,
            "steps": state.step,
            "wall_time_s": wall,
            "gpu_hours": wall * n_gpus / 3600,
            "n_gpus": n_gpus,
            "world_size": self.world,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "n_params": count_params(self.model),
            "flops_per_token": self.flops_per_token,
            "tokens_per_s": tps,
            "mfu": mfu,
            "compiled": bool(self.use_compile),
            "bf16_params": bool(self.use_bf16),
            "init_dtype": self.init_dtype,
            "loss_curve": state.loss_curve,
            "final_loss": state.loss_curve[-1][1] if state.loss_curve else None,
            "valid_curve": state.valid_curve + ([[state.step, final_valid]] if final_valid is not None else []),
            "valid_loss": valid_loss,
            "final_valid_loss": final_valid,
            "keep_best": bool(config.keep_best),
            "kept_step": kept,
            "data_tokens": self.data.n_tokens,
            "resumed_at": state.resumed_at,
            "plan": asdict(self.plan),
            "micro_batch": self.micro_info,
            "config": config.to_dict(),
        }
        router = self.router_stats.summary()
        if router is not None:
            result["router"] = router
        self.save_model(result, best=kept != state.step)
        return result

    def save_model(self, result: dict, best: bool) -> None:
        """Write `out_dir/` atomically (rank 0): the model (save_pretrained; under FSDP the full state gathered
        from every rank, or the kept `best` weights), tokenizer, training.json (`result`) and the event files;
        then remove the checkpoint folder."""
        full = full_state(self.model, fsdp=True)[0] if self.fsdp else None  # a collective: every rank gathers
        if self.fsdp and best and self.rank == 0:
            full = tied_like(full, self.best_weights)
        if self.rank == 0:
            with atomic_dir(self.out_dir) as tmp:
                self.model.save_pretrained(tmp, state_dict=full)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
                make_portable(tmp)  # use_cache back on, files that older transformers read (experts.compat)
                write_json(tmp / TRAINING_INFO, result)
                self.metrics.move_into(tmp)  # the event files, closed by _hand_back(), become <out_dir>/tensorboard/
            shutil.rmtree(self.ckpt, ignore_errors=True)
            log.info("trained %s: %d steps, %d tokens, %.1f s, final loss %.4f, valid %s", self.out_dir,
                     result["steps"], result["tokens_seen"], result["wall_time_s"],
                     result["final_loss"] or float("nan"), result["valid_loss"])
        if self.world > 1:
            torch.distributed.barrier()


def _setup_device(config: TrainConfig, world: int, local_rank: int):
    """(device setup, device) of this process: `config.device`, or under torchrun cuda:`local_rank`; a CUDA device
    becomes the current one and, with `config.experts_per_gpu` > 1, caps this process's share of its memory."""
    setup = resolve_device(config.device)
    device = setup.device
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # compiled kernels and RNG state stay on this GPU when experts share a host
    elif device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # memory limits and threads need the index
    if device.type == "cuda" and config.experts_per_gpu > 1:  # this process's share of a GPU several experts use
        total_memory = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_fraction(config.experts_per_gpu, total_memory), device)
    return setup, device


def upcast_to_fp32(model, name: str) -> str:
    """Cast a checkpoint stored in bf16 / fp16 to fp32 in place, so that the optimizer updates fp32 weights: on CPU
    the model trains in fp32, on a GPU `MasterWeights` makes bf16 copies of these fp32 masters. Returns the dtype
    the checkpoint had (e.g. "torch.bfloat16")."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = sorted(str(d) for d in dtypes if d != torch.float32)
    if low:
        log.info("%s: the initial weights are %s; training keeps fp32 master weights", name, ", ".join(low))
        model.float()
    return low[0] if len(low) == 1 and len(dtypes) == 1 else ("mixed" if low else "torch.float32")


def _load_init(init, tokenizer):
    """(model, tokenizer) from `init` (a folder, a hub name or a model) and `tokenizer` (object, folder or None)."""
    if isinstance(init, (str, os.PathLike)):
        model, _ = load_causal_lm(init, load_tokenizer=False)
        if tokenizer is None and any((Path(init) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = load_tokenizer(init)
    else:
        model = init
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    return model, tokenizer


def _check_shard_vocab(shard_paths: Sequence[str], model) -> None:
    """InputError when the shards' meta.json declares a larger vocabulary than `model` embeds."""
    n_embed = model.get_input_embeddings().weight.shape[0]
    for p in {Path(p).parent for p in shard_paths}:
        meta = p / "meta.json"
        if meta.is_file():
            vocab = int(json.loads(meta.read_text()).get("vocab_size", 0))
            if vocab > n_embed:
                raise InputError(
                    f"tokenizer/vocab mismatch: shards in {p} use a {vocab}-token vocabulary but the model embeds "
                    f"only {n_embed}; reshard with the seed model's tokenizer"
                )


def _eval_loss(loss_module, x):
    """Validation forward without the fused loss's gradient work: full logits, mean CE."""
    model = loss_module.model
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]  # (B, T−1, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
    return loss, loss, None
