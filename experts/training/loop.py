"""`train_model`: the training loop for seeds, experts and the dense baseline (also BTX MoE finetuning), as one
recipe that calls the package's components.

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
from dataclasses import asdict
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
from experts.training.checkpoint import _full_state, _tied_like, checkpoint_dir, load_checkpoint, save_checkpoint
from experts.training.config import TrainConfig
from experts.training.distributed import _dist_info, shard_model
from experts.training.events import LiveMetrics
from experts.training.loss import CausalLMLoss
from experts.training.metrics import RouterStats
from experts.training.optim import MasterWeights
from experts.training.patches import cache_rotary, restore_attention, restore_rotary, sdpa_context, use_causal_sdpa
from experts.training.schedule import TrainPlan, _logged_rate, _throughput, lr_at, peak_flops, plan_training

log = logging.getLogger(__name__)


def train_model(
    init,
    shard_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: TrainConfig,
    valid_paths: Sequence[str | os.PathLike] | None = None,
    tokenizer=None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train `init` on the packed blocks of `shard_paths` for `config.train_tokens` tokens; write `out_dir`.

    `init`: a `save_pretrained` directory (seed, another expert, or an `experts.average` output for
    `--branch-from average`), a hub name, or a `PreTrainedModel` (trained in place). `tokenizer`: object or
    directory saved beside the model (default: the one in `init`, if any). `on_step(step, info)` is called
    after every optimizer step (tests use it to simulate a kill).
    Writes `out_dir/` (save_pretrained model + tokenizer + training.json) atomically; resumes from
    `<out_dir>.ckpt/` when present. Returns the training.json dict.
    """
    world, rank, local_rank = _dist_info()
    setup, device = _setup_device(config, world, local_rank)
    fsdp = world > 1 and config.sharding == "fsdp"
    use_compile = config.compile if config.compile is not None else device.type == "cuda"
    use_bf16 = config.bf16_params if config.bf16_params is not None else (
        device.type == "cuda" and setup.dtype == torch.bfloat16 and world == 1)
    if use_bf16 and world > 1:
        raise InputError("--bf16-params needs a single process (its gradient hooks bypass DDP's all-reduce); use --no-bf16-params under torchrun")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out_dir = Path(out_dir)
    model, tokenizer = _load_init(init, tokenizer)
    init_dtype = upcast_to_fp32(model, out_dir.name)
    if tokenizer is not None:
        check_compatible(model, tokenizer)
    shard_paths = [str(p) for p in shard_paths]
    data, valid, plan = _open_shards(shard_paths, valid_paths, model, config, world)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    if not fsdp:  # FSDP moves each rank's shards to the device itself (the whole model may not fit there)
        model.to(device)
    model.train()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False

    prev_attn = use_causal_sdpa(model, data.seq_len) if config.causal_sdpa else None
    prev_rotary = cache_rotary(model, data.seq_len) if config.cache_rope else None
    loss_module = CausalLMLoss.build(model, config, use_compile)
    if fsdp:  # before the optimizer is built: sharding replaces every parameter by a DTensor
        shard_model(loss_module, model, device, setup.dtype)
    optimizer = _build_optimizer(model, config, device)
    micro_info: dict[str, Any] = {"requested": config.micro_batch_size}
    if config.micro_batch_size == "auto" and device.type == "cuda":  # before any optimizer state exists
        micro = _auto_micro_batch(model, config, plan, device, setup, use_bf16, world, fsdp, micro_info)
        plan = plan_training(config, data.seq_len, world, micro_batch_size=micro)
    micro_info["micro_batches"] = plan.micro_batches
    log.info("%s: micro-batches of %s blocks per step and device (--micro-batch-size %s)", out_dir.name,
             describe(plan.micro_batches), config.micro_batch_size)
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "wall_time_s": 0.0, "loss_curve": [], "valid_curve": [],
                             "resumed_at": [], "best": None}
    best_weights: dict | None = None  # overfitting guard: CPU copy of the weights at state["best"]["step"]
    ckpt = checkpoint_dir(out_dir)
    if (ckpt / "trainer_state.json").is_file():
        state = load_checkpoint(ckpt, model, optimizer, device, fsdp=fsdp)
        if config.keep_best and (ckpt / "best.safetensors").is_file():
            best_weights = load_file(str(ckpt / "best.safetensors"))
        if state.get("plan") and not plan.same_schedule(state["plan"]):
            raise InputError(f"checkpoint {ckpt} was written for a different batch plan {state['plan']}; delete it to restart")
        state["resumed_at"].append(state["step"])
        log.info("resuming %s from step %d (%s)", out_dir, state["step"], ckpt)
    state["plan"] = asdict(plan)
    metrics = LiveMetrics(out_dir, resume_step=state["step"], enabled=rank == 0,  # TensorBoard scalars, live,
                          step_offset=config.schedule_start)  # against the global step of the schedule
    compile_update = config.compile_update if config.compile_update is not None else use_compile
    masters = (MasterWeights(model, torch.bfloat16, accumulate=plan.grad_accum > 1, compile=compile_update)
               if use_bf16 else None)  # after the fp32 checkpoint is loaded

    def hand_back():  # undo what only training needs: attention name, rotary tables, bf16 weights, event writer
        metrics.close()
        restore_attention(model, prev_attn)
        restore_rotary(model, prev_rotary)
        if masters is not None:
            masters.restore()  # the fp32 master weights are what is saved and handed back

    ddp_module = loss_module
    if world > 1 and not fsdp:
        ddp_module = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    top_k = int(getattr(model.config, "num_experts_per_tok", 2) or 2)
    router_stats = RouterStats()
    fpt = flops_per_token(model.config, data.seq_len)
    peak = peak_flops(device)

    def evaluate() -> float | None:
        if valid is None:
            return None
        n = min(valid.n_blocks, max(1, config.eval_tokens // data.seq_len))
        if fsdp:  # every rank must run as many forwards (each all-gathers weights): a multiple of world blocks
            n = max(world, n - n % world)
        mine = list(range(rank, n, world))
        total = torch.zeros(2, dtype=torch.float64, device=device)
        loss_module.eval()
        with torch.no_grad(), sdpa_context(config.sdpa_backend):
            for i in range(0, len(mine), plan.micro_batch_size):  # an expert's small batch: still full calls
                idx = mine[i : i + plan.micro_batch_size]
                x = torch.from_numpy(np.stack([valid.blocks(j, 1)[0] for j in idx])).to(device)
                with setup.autocast():
                    _, lm, _ = loss_module(x) if fsdp or not hasattr(loss_module, "_backbone") else _eval_loss(loss_module, x)
                total[0] += lm.detach().double() * len(idx)  # stays on the device: one host sync per evaluation
                total[1] += len(idx)
        loss_module.train()
        if world > 1:
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else None

    bar = tqdm(total=plan.steps, initial=state["step"], desc=f"train {out_dir.name}", unit="step",
               disable=rank != 0, mininterval=2.0)
    pending: list[tuple[int, Any, Any]] = []  # (step, loss on the device, CUDA event after the step | None)

    def flush_losses(wait: bool = True):
        """Move step losses to the host: all of them (wait), or only those whose step has finished on the GPU,
        so that logging never stalls the host on queued kernels. The losses' one trip to the host: a non-finite
        one stops training before any checkpoint of its step is written."""
        while pending and (wait or pending[0][2] is None or pending[0][2].query()):
            s, t, _ = pending.pop(0)
            if not math.isfinite(float(t)):
                pending.clear()
                last = state["loss_curve"][-1][0] if state["loss_curve"] else 0
                kept = f"last good checkpoint {ckpt} kept" if (ckpt / "trainer_state.json").is_file() else "no checkpoint yet"
                raise InputError(f"training {out_dir} stopped: loss {float(t)} at step {s} (finite up to step {last}; "
                                 f"{kept}); lower the learning rate or check the data")
            state["loss_curve"].append([s, float(t)])
            metrics.scalar("train/loss", state["loss_curve"][-1][1], s)

    def snapshot() -> dict:
        """A CPU copy of the current (fp32) weights: the overfitting guard's best so far. Under FSDP a collective
        gathering the full state (rank 0 holds it)."""
        if fsdp:
            weights = _full_state(model, fsdp=True)[0]
        else:
            with masters.fp32_model() if masters is not None else nullcontext():
                weights = model.state_dict()
        return {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}

    t_start = time.perf_counter()
    wall_before = state["wall_time_s"]
    t_measure, steps_measured, measure_step = None, 0, 0
    start_step = state["step"]
    sizes = plan.micro_batches
    uniform = len(set(sizes)) == 1
    divisors = [accumulation_weight(sizes, i) for i in range(len(sizes))]  # Σ lossᵢ / divisorᵢ = the batch's mean
    # the micro-batches of every remaining step, read and pinned ahead of the loop on a background thread
    batches = Prefetcher(data, ((plan.micro_start(step, i, rank), size) for step in range(start_step, plan.steps)
                                for i, size in enumerate(sizes)),
                         pin=device.type == "cuda", depth=max(4, 2 * plan.grad_accum), device=device)
    try:
        for step in range(start_step, plan.steps):
            lr = lr_at(step, config, plan)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_acc = torch.zeros((), device=device)
            for i, size in enumerate(sizes):
                x = batches.next().to(device, non_blocking=True)  # (size, T); pinned: the copy does not stall the host
                sync = ddp_module.no_sync() if (world > 1 and not fsdp and i < len(sizes) - 1) else nullcontext()
                with sync, sdpa_context(config.sdpa_backend):
                    with setup.autocast():
                        total, lm, router_logits = ddp_module(x)
                    (total / divisors[i]).backward()
                loss_acc += lm.detach() if uniform else lm.detach() * size
                if router_logits is not None:
                    router_stats.update(router_logits, top_k)
            if masters is not None:  # clipping, AdamW on the fp32 masters and the bf16 copy in one update
                masters.step(optimizer, config.grad_clip)
            else:
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_acc /= plan.grad_accum if uniform else plan.blocks_per_device
            if world > 1:
                torch.distributed.all_reduce(loss_acc)
                loss_acc /= world
            done = step + 1
            state["step"] = done
            state["tokens_seen"] = done * plan.tokens_per_step
            event = None
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            pending.append((done, loss_acc, event))
            metrics.scalar("train/lr", lr, done)
            if t_measure is None and done - start_step >= (3 if plan.steps - start_step > 6 else 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # once: the timed window starts with an empty queue
                t_measure, steps_measured, measure_step = time.perf_counter(), 0, done  # excludes compile steps
            else:
                steps_measured += 1
            bar.update(1)
            if config.log_every and done % config.log_every == 0:
                flush_losses(wait=False)  # the latest finished step's loss; no host sync
                if state["loss_curve"]:
                    last_step, last_loss = state["loss_curve"][-1]
                    tps = _logged_rate(t_measure, measure_step, last_step, plan)
                    mfu = tps * fpt / (peak * world) if peak and tps else None
                    bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
                    metrics.scalar("train/tokens_per_s", tps or None, last_step)
                    log.info("step %d/%d loss %.4f (step %d) lr %.2e %.0f tok/s%s", done, plan.steps, last_loss,
                             last_step, lr, tps, f" MFU {mfu:.1%}" if mfu else "")
            if valid is not None and config.eval_every and done % config.eval_every == 0 and done < plan.steps:
                vl = evaluate()
                state["valid_curve"].append([done, vl])
                log.info("step %d valid loss %.4f", done, vl)
                metrics.scalar("valid/loss", vl, done)
                metrics.flush()
                if config.keep_best and (state.get("best") is None or vl < state["best"]["loss"]):
                    state["best"], best_weights = {"step": done, "loss": vl}, snapshot()
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < plan.steps:
                flush_losses()
                state["wall_time_s"] = wall_before + time.perf_counter() - t_start
                if rank == 0 or fsdp:  # under FSDP every rank takes part in gathering the full state
                    with masters.fp32_model() if masters is not None else nullcontext():
                        save_checkpoint(ckpt, model, optimizer, {**state, "data_position": done * plan.blocks_per_step,
                                                                  "config": config.to_dict()}, fsdp=fsdp,
                                         best=best_weights)
                if world > 1:
                    torch.distributed.barrier()
            if on_step is not None:
                on_step(done, state)
    except torch.OutOfMemoryError:
        hand_back()
        raise InputError(
            f"CUDA out of memory with micro-batches of {plan.micro_batch_size} x {data.seq_len} tokens "
            f"(--micro-batch-size {config.micro_batch_size}); try --micro-batch-size {max(1, plan.micro_batch_size // 2)} "
            "(gradient accumulation keeps the global batch)"
        ) from None
    except BaseException:
        hand_back()
        raise
    finally:
        batches.close()
        bar.close()
    flush_losses()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tps, mfu = _throughput(t_measure, steps_measured, plan, device, fpt, peak, world)
    valid_loss = evaluate()
    final_valid = valid_loss
    metrics.scalar("valid/loss", final_valid, state["step"])
    metrics.scalar("train/tokens_per_s", tps or None, state["step"])
    kept = state["step"]
    if config.keep_best and valid_loss is not None:
        if state.get("best") is not None and state["best"]["loss"] <= valid_loss:
            kept, valid_loss = state["best"]["step"], state["best"]["loss"]  # an earlier evaluation was better
        else:
            best_weights = None  # the last weights are the best
    hand_back()
    if kept != state["step"] and not fsdp:
        model.load_state_dict(best_weights)
    wall = wall_before + time.perf_counter() - t_start
    n_gpus = world if device.type == "cuda" else 0
    result = {
        "init": init if isinstance(init, (str, os.PathLike)) else type(init).__name__,
        "shard_paths": shard_paths,
        "valid_paths": [str(p) for p in valid_paths] if valid_paths else [],
        "tokens_seen": state["tokens_seen"],
        "steps": state["step"],
        "wall_time_s": wall,
        "gpu_hours": wall * n_gpus / 3600,
        "n_gpus": n_gpus,
        "world_size": world,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "n_params": count_params(model),
        "flops_per_token": fpt,
        "tokens_per_s": tps,
        "mfu": mfu,
        "compiled": bool(use_compile),
        "bf16_params": bool(use_bf16),
        "init_dtype": init_dtype,
        "loss_curve": state["loss_curve"],
        "final_loss": state["loss_curve"][-1][1] if state["loss_curve"] else None,
        "valid_curve": state["valid_curve"] + ([[state["step"], final_valid]] if final_valid is not None else []),
        "valid_loss": valid_loss,
        "final_valid_loss": final_valid,
        "keep_best": bool(config.keep_best),
        "kept_step": kept,
        "data_tokens": data.n_tokens,
        "resumed_at": state["resumed_at"],
        "plan": asdict(plan),
        "micro_batch": micro_info,
        "config": config.to_dict(),
    }
    router = router_stats.summary()
    if router is not None:
        result["router"] = router
    full_state = _full_state(model, fsdp=True)[0] if fsdp else None  # a collective: every rank gathers
    if fsdp and kept != state["step"] and rank == 0:
        full_state = _tied_like(full_state, best_weights)
    if rank == 0:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, state_dict=full_state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            make_portable(tmp)  # use_cache back on, files that older transformers read (experts.compat)
            write_json(tmp / TRAINING_INFO, result)
            metrics.move_into(tmp)  # the event files, closed by hand_back(), become <out_dir>/tensorboard/
        shutil.rmtree(ckpt, ignore_errors=True)
        log.info("trained %s: %d steps, %d tokens, %.1f s, final loss %.4f, valid %s", out_dir, result["steps"],
                 result["tokens_seen"], wall, result["final_loss"] or float("nan"), valid_loss)
    if world > 1:
        torch.distributed.barrier()
    return result


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


def _open_shards(shard_paths: list[str], valid_paths, model, config: TrainConfig, world: int):
    """(training blocks, validation blocks or None, plan) of the shards, with InputErrors for shards that do not
    fit `model` (vocabulary, context) or hold less than one global batch over `world` devices."""
    _check_shard_vocab(shard_paths, model)
    data = PackedBlocks(shard_paths, seed=config.seed)
    plan = plan_training(config, data.seq_len, world)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and data.seq_len > max_pos:
        raise InputError(f"shards have blocks of {data.seq_len} tokens but the model's context is {max_pos}; reshard with --seq-len {max_pos}")
    if data.n_blocks < plan.blocks_per_step:
        raise InputError(
            f"shard(s) {', '.join(shard_paths)} hold {data.n_tokens} tokens, fewer than one global batch "
            f"({plan.tokens_per_step} tokens); give small clusters their share with --assign balanced, use fewer "
            "--num-clusters, or lower --batch-tokens/--micro-batch-size"
        )
    valid = PackedBlocks([str(p) for p in valid_paths], seq_len=data.seq_len, shuffle=False) if valid_paths else None
    if valid is not None and valid.n_blocks == 0:
        log.warning("validation shards %s hold no full block; no validation loss", valid_paths)
        valid = None
    return data, valid, plan


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


def _build_optimizer(model, config: TrainConfig, device):
    """AdamW over `model`'s trainable parameters (`config.trainable`), weight decay on matrices only; fused on CUDA."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if config.trainable == "ffn" and ".mlp." not in name:
            p.requires_grad_(False)  # FlexOlmo: the seed's attention, norms and embeddings stay as they are
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay + no_decay:
        raise InputError(f"--expert-trainable {config.trainable}: {type(model).__name__} has no such parameters to train")
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas, eps=config.eps, fused=device.type == "cuda",
    )


def _auto_micro_batch(model, config: TrainConfig, plan: TrainPlan, device, setup, bf16_params: bool, world: int,
                      fsdp: bool, info: dict) -> int:
    """`--micro-batch-size auto` on CUDA: the largest micro-batch (blocks) whose forward + backward fits this
    process's memory next to the optimizer state (`experts.microbatch`), the same on every rank. Fills `info`
    (probes, memory limit) for training.json; InputError when not even one block fits."""
    per_device = plan.blocks_per_device
    if fsdp:  # a probe would run FSDP's collectives, which one rank's out-of-memory error would leave hanging
        info["note"] = "not probed under FSDP"
        return min(per_device, CPU_MICRO_BATCH)
    total = torch.cuda.get_device_properties(device).total_memory
    share = memory_fraction(config.experts_per_gpu, total) if config.experts_per_gpu > 1 else 1.0
    limit = int(share * total)
    n_params = count_params(model)
    reserve = optimizer_reserve_bytes(n_params, bf16_params, ddp=world > 1)
    params = [p for p in model.parameters() if p.requires_grad]
    probe_module = CausalLMLoss.build(model, config, compile=False)  # eager: no compilation per probed size
    probes: list[dict] = []
    fits = cuda_fits(probe_module, params, plan.seq_len, device, setup.autocast, reserve, limit,
                     sdpa_ctx=lambda: sdpa_context(config.sdpa_backend))
    micro = largest_fitting(per_device, fits, probes) or 0
    if world > 1:  # every rank takes the smallest choice (0: some rank fits nothing)
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
            if cuda_fits(probe_module, params, plan.seq_len, device, setup.autocast, 0, 0)(1):
                need = torch.cuda.max_memory_allocated(device) + reserve
            torch.cuda.set_per_process_memory_fraction(share, device)
        raise InputError(no_fit_message(n_params, plan.seq_len, torch.cuda.get_device_name(device), limit, total,
                                        config.experts_per_gpu, need))
    return micro


def _eval_loss(loss_module, x):
    """Validation forward without the fused loss's gradient work: full logits, mean CE."""
    model = loss_module.model
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]  # (B, T−1, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
    return loss, loss, None
