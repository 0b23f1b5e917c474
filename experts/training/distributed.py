"""Training on several devices. When `torch.distributed` is initialised (torchrun, see `experts.launch`), each
rank reads its own micro-batches of the same global batch and only rank 0 writes. `TrainConfig.sharding="ddp"`
wraps the model in DDP (a full copy per GPU); `sharding="fsdp"` shards weights, gradients and AdamW moments with
FSDP2 (`shard_model`), for models that do not fit on one GPU.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from corpus.io import InputError


def dist_info() -> tuple[int, int, int]:
    """(world size, rank, local rank) of this process; (1, 0, 0) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    return 1, 0, 0


def shard_model(loss_module, model, device, dtype) -> None:
    """Shard `model` in place with FSDP2 (`torch.distributed.fsdp.fully_shard`; Zhao et al. 2023, "PyTorch FSDP").

    One FSDP unit per decoder layer, then `loss_module` (the `CausalLMLoss` around `model`) as the root unit,
    which holds the embeddings, the final norm and lm_head (tied or not). Every parameter becomes a DTensor of
    which each of the ranks keeps one dim-0 chunk, and so do its gradient and AdamW moments: memory per
    GPU ≈ 16·N/world_size bytes + one unsharded layer. A unit's weights are all-gathered just before its forward and
    backward and freed after; gradients are reduce-scattered. On CUDA the gathered weights are `dtype` (bf16)
    and gradients are reduced in fp32 (`MixedPrecisionPolicy`); on CPU (gloo, tests) everything stays fp32.
    The root is the loss module, not the model, because the fused loss reads lm_head's weight outside the
    model's forward. Parameters move from wherever they are (CPU) to `device` one unit at a time, so the full
    model never has to fit on one GPU.
    """
    # FSDP only: its modules are slow to import, and fully_shard needs torch >= 2.6
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise InputError(f"--sharding fsdp needs torch >= 2.6 (FSDP2 fully_shard); this is torch {torch.__version__}") from None
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if layers is None:
        raise InputError(f"--sharding fsdp needs a decoder with a `layers` list; {type(model).__name__} has none (use --sharding ddp)")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    kw = {"mesh": mesh}
    if device.type == "cuda" and dtype != torch.float32:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(loss_module, **kw)
