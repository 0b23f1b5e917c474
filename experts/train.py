"""The training loop for seeds, experts and the dense baseline (also BTX MoE finetuning).

Plain PyTorch: AdamW (fused on CUDA), linear warmup then cosine/linear decay to `min_lr`, bf16 autocast on
CUDA, SDPA attention with is_causal=True and no materialised mask (`causal_sdpa_attention`), optional
`torch.compile`, gradient accumulation that covers a global batch in tokens exactly with micro-batches of at
most `--micro-batch-size` blocks (`auto`: the largest that fits, `experts.microbatch`), gradient clipping, seeded
data order read ahead on a background thread (`experts.data.Prefetcher`), and no host synchronisation per step.
The loss is computed by a chunked fused linear + cross-entropy so the (B, T, V) logits are never materialised in fp32 (the same idea as Liger-Kernel's FusedLinearCrossEntropy).
On one GPU the model computes with bf16 weights while AdamW updates fp32 master weights (`MasterWeights`, whose
clipping + AdamW + bf16 copy compile into one update), RoPE reads cos/sin from tables (`cache_rotary`), and
backbone + loss compile as one graph (bench/RESULTS.md).

Resume: every `checkpoint_every` steps the full state (weights, AdamW moments, step/schedule, RNG states,
data position, loss history) is written atomically to `<out_dir>.ckpt/` as safetensors + JSON (no pickle).
Calling `train_model` again with the same arguments continues from there; on CPU the loss curve and final
weights equal those of an uninterrupted run bit for bit. The folder is removed once `out_dir` is complete.

Multi-GPU: when `torch.distributed` is initialised (torchrun, see `experts.launch`), each rank reads its own
micro-batches of the same global batch and only rank 0 writes. `sharding="ddp"` wraps the model in DDP (a full
copy per GPU); `sharding="fsdp"` shards weights, gradients and AdamW moments with FSDP2 (`shard_model`), for
models that do not fit on one GPU; its checkpoints hold the same full (unsharded) tensors, gathered to rank 0.

Budgets (tokens, steps, global batch of the seed, each expert and the dense baseline) are decided in
`experts.budget`.
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

from corpus.io import InputError, atomic_dir, read_json, write_json
from experts.training.config import TrainConfig
from experts.training.loss import CausalLMLoss
from experts.training.optim import MasterWeights
from experts.training.schedule import TrainPlan, _logged_rate, _throughput, lr_at, peak_flops, plan_training

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    """Where resumable state of `out_dir` lives while training: `<out_dir>.ckpt/`."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.ckpt"


def shard_model(loss_module, model, device, dtype) -> None:
    """Shard `model` in place with FSDP2 (`torch.distributed.fsdp.fully_shard`; Zhao et al. 2023, "PyTorch FSDP").

    One FSDP unit per decoder layer, then `loss_module` (the `CausalLMLoss` around `model`) as the root unit,
    which holds the embeddings, the final norm and lm_head (tied or not). Every parameter becomes a DTensor of
    which each of the `world` ranks keeps one dim-0 chunk, and so do its gradient and AdamW moments: memory per
    GPU ≈ 16·N/world bytes + one unsharded layer. A unit's weights are all-gathered just before its forward and
    backward and freed after; gradients are reduce-scattered. On CUDA the gathered weights are `dtype` (bf16)
    and gradients are reduced in fp32 (`MixedPrecisionPolicy`); on CPU (gloo, tests) everything stays fp32.
    The root is the loss module, not the model, because the fused loss reads lm_head's weight outside the
    model's forward. Parameters move from wherever they are (CPU) to `device` one unit at a time, so the full
    model never has to fit on one GPU.
    """
    import torch
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


def _full_state(model, optimizer=None, fsdp: bool = False) -> tuple[dict, dict | None]:
    """(model state dict, optimizer state dict) with whole CPU tensors.

    Plain/DDP: `state_dict()`, optimizer state keyed by parameter index. FSDP: gathered from the shards with
    `torch.distributed.checkpoint.state_dict` (full_state_dict, cpu_offload) and keyed by parameter name; a
    collective that every rank must call, of which only rank 0 gets the tensors (the others get empty dicts).
    """
    if not fsdp:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for tied in names.values():  # tied weights (embeddings = lm_head) share one tensor, as in state_dict()
        for name in tied[1:]:
            if tied[0] in model_state and name in model_state:
                model_state[name] = model_state[tied[0]]
    return model_state, get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None


def _tied_like(reference: dict, weights: dict) -> dict:
    """`weights` with the names that share one tensor in `reference` (tied embeddings) sharing one again."""
    first: dict[int, str] = {}
    out = dict(weights)
    for name, t in reference.items():
        key = t.data_ptr()
        if key in first and name in out:
            out[name] = out[first[key]]
        first.setdefault(key, name)
    return out


def _save_checkpoint(path: Path, model, optimizer, state: dict, fsdp: bool = False, best: dict | None = None) -> None:
    """Write `path/` (model.safetensors, optimizer.safetensors, rng.safetensors, trainer_state.json, and
    best.safetensors = the `best` weights of the overfitting guard when given) atomically.

    Under FSDP every rank calls this (the full state is gathered, `_full_state`) and rank 0 writes the same
    files as a single process would, except that the optimizer's state is keyed by parameter name
    ("optimizer_keys": "names") instead of index; a resume must then use FSDP again (any world size).
    """
    import torch
    from safetensors.torch import save_file

    model_state, opt = _full_state(model, optimizer, fsdp)
    if fsdp and torch.distributed.get_rank() != 0:
        return
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        if best is not None:
            save_file({k: v.clone().contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
        tensors, scalars = {}, {}
        for pid, st in opt["state"].items():
            for name, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{pid}.{name}"] = v.detach().cpu().clone().contiguous()
                else:
                    scalars[f"{pid}.{name}"] = v
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["torch_cuda"] = torch.cuda.get_rng_state()  # this process's GPU only: others are not touched
        save_file(rng, str(tmp / "rng.safetensors"))
        np_state = np.random.get_state()
        py_state = random.getstate()
        write_json(tmp / "trainer_state.json", {
            **state,
            "optimizer_keys": "names" if fsdp else "ids",
            "optimizer_param_groups": opt["param_groups"],
            "optimizer_scalars": scalars,
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        })


def _load_checkpoint(path: Path, model, optimizer, device, fsdp: bool = False) -> dict:
    """Restore model, optimizer and RNG states from `_save_checkpoint`'s folder; return the trainer state.

    Under FSDP every rank reads the whole files and keeps its own shards (`set_model_state_dict` /
    `set_optimizer_state_dict` with full_state_dict).
    """
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    def corrupt(e: BaseException) -> InputError:
        return InputError(f"corrupt training checkpoint {path} ({str(e).splitlines()[0]}); delete it to restart")

    try:
        state = read_json(path / "trainer_state.json")
    except (OSError, InputError) as e:
        raise corrupt(e) from None
    keys = state.pop("optimizer_keys", "ids")
    if keys != ("names" if fsdp else "ids"):
        raise InputError(f"training checkpoint {path} was written with --sharding {'fsdp' if keys == 'names' else 'ddp'}; "
                         "resume with the same --sharding, or delete it to restart")
    try:
        weights = load_file(str(path / "model.safetensors"), device="cpu" if fsdp else str(device))
        if fsdp:
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(weights)
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, RuntimeError, KeyError) as e:
        raise corrupt(e) from None
    opt_state: dict[int | str, dict] = {}
    for key, v in [*tensors.items(), *state.pop("optimizer_scalars").items()]:
        pid, name = key.rsplit(".", 1)  # "<index>.<name>" or, under FSDP, "<parameter name>.<name>"
        opt_state.setdefault(int(pid) if pid.isdigit() else pid, {})[name] = v
    opt_sd = {"state": opt_state, "param_groups": state.pop("optimizer_param_groups")}
    if fsdp:
        set_optimizer_state_dict(model, optimizer, opt_sd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(opt_sd)
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    npr = state.pop("numpy_rng")
    np.random.set_state((npr[0], np.asarray(npr[1], dtype=np.uint32), *npr[2:]))
    pyr = state.pop("python_rng")
    random.setstate((pyr[0], tuple(pyr[1]), pyr[2]))
    return state


# ---------------------------------------------------------------------------------------------- attention
CAUSAL_SDPA = "cbtm_causal_sdpa"
"""Name under which `causal_sdpa_attention` is registered in transformers' AttentionInterface."""
_CAUSAL_SDPA_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "mixtral", "qwen2_moe", "phi3"}


def causal_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Causal self-attention softmax(q kᵀ · scaling + causal) v through `F.scaled_dot_product_attention(is_causal=True)`.

    query (B, nh, T, hd), key/value (B, n_kv, T, hd) → ((B, T, nh, hd), None), the contract of transformers'
    AttentionInterface. Because this name has no entry in transformers' mask interface, the model builds no
    (B, 1, T, T) mask and the flash/cuDNN kernels skip the masked upper triangle (half the FLOPs of a dense mask).
    Only valid for full-length causal self-attention without padding — what training on packed blocks does; any
    other call (a mask, a KV cache) is handed to transformers' own SDPA function.
    """
    import torch.nn.functional as F

    T, S = query.shape[2], key.shape[2]
    if attention_mask is not None or T != S or T == 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: repeat each kv head for its query heads
        key = key.repeat_interleave(groups, dim=1)  # (B, nh, T, hd)
        value = value.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True)  # (B, nh, T, hd)
    return out.transpose(1, 2).contiguous(), None


def use_causal_sdpa(model, seq_len: int) -> str | None:
    """Switch `model` to `causal_sdpa_attention` when its attention is plain causal SDPA over `seq_len` tokens.

    Returns the previous `config._attn_implementation` (to restore before saving), or None when the model was
    left alone (another implementation, an unsupported architecture, or a sliding window shorter than seq_len).
    """
    from transformers import AttentionInterface

    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or cfg.model_type not in _CAUSAL_SDPA_TYPES:
        return None
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window is not None and window < seq_len:
        return None
    if CAUSAL_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(CAUSAL_SDPA, causal_sdpa_attention)
    cfg._attn_implementation = CAUSAL_SDPA
    return "sdpa"


def restore_attention(model, previous: str | None) -> None:
    """Undo `use_causal_sdpa` (so the saved config and later users see HF's own implementation)."""
    if previous is not None:
        model.config._attn_implementation = previous


def cache_rotary(model, seq_len: int):
    """Replace the decoder's rotary embedding by a lookup in its own cos/sin tables for positions 0..seq_len−1.

    HF recomputes cos(p·θ) and sin(p·θ) (p position, θ = inv_freq) in every forward; under torch.compile inductor
    fuses them into every layer's RoPE kernels, so each of the B·nh·T·hd elements of q and k evaluates a sine and
    a cosine, in the forward and again in the backward. The tables are what the module itself returns in fp32 for
    those positions, cast to the activations' dtype at lookup as HF does, so outputs are unchanged. Returns the
    original module (for `restore_rotary`), or None when the model is left alone (no `rotary_emb`, an architecture
    not in _CAUSAL_SDPA_TYPES, or a dynamic RoPE whose frequencies depend on the input's length).
    """
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    rotary = getattr(decoder, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if (model.config.model_type not in _CAUSAL_SDPA_TYPES or inv_freq is None
            or getattr(rotary, "rope_type", "default") in ("dynamic", "longrope")):
        return None

    class CachedRotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            positions = torch.arange(seq_len, device=inv_freq.device)[None]  # (1, T)
            with torch.no_grad():
                cos, sin = rotary(torch.zeros(1, device=inv_freq.device), positions)  # (1, T, hd) fp32
            self.register_buffer("cos", cos[0], persistent=False)  # (T, hd)
            self.register_buffer("sin", sin[0], persistent=False)

        def forward(self, x, position_ids):  # position_ids (B or 1, T) → cos, sin (B or 1, T, hd) in x's dtype
            cos, sin = self.cos.to(x.device), self.sin.to(x.device)
            return cos[position_ids].to(x.dtype), sin[position_ids].to(x.dtype)

    decoder.rotary_emb = CachedRotary()
    return rotary


def restore_rotary(model, previous) -> None:
    """Undo `cache_rotary`."""
    if previous is not None:
        model.get_decoder().rotary_emb = previous


# ---------------------------------------------------------------------------------------------- helpers
def sdpa_context(backend: str | None):
    """Context manager restricting scaled_dot_product_attention to one kernel (None: no restriction)."""
    if not backend:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([names[backend]])


def _dist_info() -> tuple[int, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    return 1, 0, 0


def _load_init(init, tokenizer):
    from experts.model import load_causal_lm
    from experts.tokenizer import load_tokenizer

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


class _RouterStats:
    """Per-layer expert load (fraction of top-k assignments) and mean routing entropy (nats)."""

    def __init__(self):
        self.counts = None  # (n_layers, n_experts)
        self.entropy_sum, self.n = 0.0, 0

    def update(self, router_logits, top_k: int) -> None:
        import torch

        with torch.no_grad():
            layers = [r.float() for r in router_logits if r is not None]
            if not layers:
                return
            counts = []
            for r in layers:  # r (B·T, E)
                p = torch.softmax(r, dim=-1)
                sel = p.topk(min(top_k, p.shape[-1]), dim=-1).indices  # (B·T, k)
                counts.append(torch.bincount(sel.reshape(-1), minlength=p.shape[-1]).double().cpu())
                self.entropy_sum += float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())
                self.n += 1
            c = torch.stack(counts)
            self.counts = c if self.counts is None else self.counts + c

    def summary(self) -> dict | None:
        if self.counts is None:
            return None
        load = self.counts / self.counts.sum(-1, keepdim=True)  # (n_layers, n_experts)
        return {
            "expert_load_per_layer": load.tolist(),
            "expert_load": load.mean(0).tolist(),
            "routing_entropy": self.entropy_sum / max(1, self.n),
        }


# ---------------------------------------------------------------------------------------------- training
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
    import torch

    from corpus.device import resolve_device
    from experts.model import check_compatible, count_params, flops_per_token
    from experts.data import PackedBlocks, Prefetcher
    from experts.microbatch import accumulation_weight, describe

    world, rank, local_rank = _dist_info()
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
        from experts.microbatch import memory_fraction

        total_memory = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(memory_fraction(config.experts_per_gpu, total_memory), device)
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
    if tokenizer is not None:
        check_compatible(model, tokenizer)
    shard_paths = [str(p) for p in shard_paths]
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
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if config.trainable == "ffn" and ".mlp." not in name:
            p.requires_grad_(False)  # FlexOlmo: the seed's attention, norms and embeddings stay as they are
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay + no_decay:
        raise InputError(f"--expert-trainable {config.trainable}: {type(model).__name__} has no such parameters to train")
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas, eps=config.eps, fused=device.type == "cuda",
    )
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
        state = _load_checkpoint(ckpt, model, optimizer, device, fsdp=fsdp)
        if config.keep_best and (ckpt / "best.safetensors").is_file():
            from safetensors.torch import load_file

            best_weights = load_file(str(ckpt / "best.safetensors"))
        if state.get("plan") and not plan.same_schedule(state["plan"]):
            raise InputError(f"checkpoint {ckpt} was written for a different batch plan {state['plan']}; delete it to restart")
        state["resumed_at"].append(state["step"])
        log.info("resuming %s from step %d (%s)", out_dir, state["step"], ckpt)
    state["plan"] = asdict(plan)
    compile_update = config.compile_update if config.compile_update is not None else use_compile
    masters = (MasterWeights(model, torch.bfloat16, accumulate=plan.grad_accum > 1, compile=compile_update)
               if use_bf16 else None)  # after the fp32 checkpoint is loaded

    def hand_back():  # undo what only training needs: attention name, rotary tables, bf16 weights
        restore_attention(model, prev_attn)
        restore_rotary(model, prev_rotary)
        if masters is not None:
            masters.restore()  # the fp32 master weights are what is saved and handed back

    ddp_module = loss_module
    if world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_module = DDP(loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    top_k = int(getattr(model.config, "num_experts_per_tok", 2) or 2)
    router_stats = _RouterStats()
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

    from tqdm.auto import tqdm

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
                    log.info("step %d/%d loss %.4f (step %d) lr %.2e %.0f tok/s%s", done, plan.steps, last_loss,
                             last_step, lr, tps, f" MFU {mfu:.1%}" if mfu else "")
            if valid is not None and config.eval_every and done % config.eval_every == 0 and done < plan.steps:
                vl = evaluate()
                state["valid_curve"].append([done, vl])
                log.info("step %d valid loss %.4f", done, vl)
                if config.keep_best and (state.get("best") is None or vl < state["best"]["loss"]):
                    state["best"], best_weights = {"step": done, "loss": vl}, snapshot()
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < plan.steps:
                flush_losses()
                state["wall_time_s"] = wall_before + time.perf_counter() - t_start
                if rank == 0 or fsdp:  # under FSDP every rank takes part in gathering the full state
                    with masters.fp32_model() if masters is not None else nullcontext():
                        _save_checkpoint(ckpt, model, optimizer, {**state, "data_position": done * plan.blocks_per_step,
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
        from experts.compat import make_portable

        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, state_dict=full_state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            make_portable(tmp)  # use_cache back on, files that older transformers read (experts.compat)
            write_json(tmp / "training.json", result)
        shutil.rmtree(ckpt, ignore_errors=True)
        log.info("trained %s: %d steps, %d tokens, %.1f s, final loss %.4f, valid %s", out_dir, result["steps"],
                 result["tokens_seen"], wall, result["final_loss"] or float("nan"), valid_loss)
    if world > 1:
        torch.distributed.barrier()
    return result


def _eval_loss(loss_module, x):
    """Validation forward without the fused loss's gradient work: full logits, mean CE."""
    import torch.nn.functional as F

    model = loss_module.model
    logits = model(input_ids=x, use_cache=False).logits[:, :-1]  # (B, T−1, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
    return loss, loss, None


def _auto_micro_batch(model, config: TrainConfig, plan: TrainPlan, device, setup, bf16_params: bool, world: int,
                      fsdp: bool, info: dict) -> int:
    """`--micro-batch-size auto` on CUDA: the largest micro-batch (blocks) whose forward + backward fits this
    process's memory next to the optimizer state (`experts.microbatch`), the same on every rank. Fills `info`
    (probes, memory limit) for training.json; InputError when not even one block fits."""
    import torch

    from experts.microbatch import (
        CPU_MICRO_BATCH, cuda_fits, largest_fitting, memory_fraction, no_fit_message, optimizer_reserve_bytes,
    )
    from experts.model import count_params

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
