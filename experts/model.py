"""Seed models: Llama presets built from scratch, or any HF causal LM from a local directory or the hub.

Scratch seeds use `transformers.LlamaForCausalLM` (RMSNorm, RoPE, SwiGLU; Touvron et al. 2023) with SDPA
attention. `flops_per_token` gives the training FLOPs used for MFU (Chowdhery et al. 2022, PaLM appendix B).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from corpus.io import InputError, write_json
from corpus.layout import TRAINING_INFO
from experts.compat import make_portable
from experts.tokenizer import load_tokenizer


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a scratch Llama; parameter counts below assume the stated vocabulary."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    seq_len: int  # default context length (max_position_embeddings) and shard block length
    tie_word_embeddings: bool = True
    num_key_value_heads: int | None = None
    lr: float = 3e-4  # peak learning rate this size trains with (min lr = lr / 10)
    doc: str = ""


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(96, 2, 4, 256, 256, True, lr=3e-3, doc="~1.0M params at vocab 8192; trains in about a minute on 2 CPU cores (demo, tests)"),
    "mini": ModelPreset(256, 4, 4, 688, 512, True, lr=3e-3, doc="~7.4M params at vocab 16384 (3.2M non-embedding), tied embeddings; GPU studies and benchmarks"),
    "small": ModelPreset(512, 6, 8, 1408, 1024, True, doc="~36M params at vocab 32000 (19.3M non-embedding), tied embeddings"),
    "base": ModelPreset(768, 12, 12, 2048, 1024, False, doc="~134M params at vocab 32000 (85M non-embedding), GPT-2-small sized Llama"),
    "large": ModelPreset(1024, 24, 16, 2816, 1024, True, doc="~341M params at vocab 32000 (308M non-embedding)"),
}


def get_preset(preset: str | ModelPreset) -> ModelPreset:
    if isinstance(preset, ModelPreset):
        return preset
    if preset not in PRESETS:
        raise InputError(f"unknown --model-size {preset!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def build_scratch_model(
    preset: str | ModelPreset,
    vocab_size: int,
    seq_len: int | None = None,
    seed: int = 0,
    bos_token_id: int | None = 0,
    eos_token_id: int | None = 1,
    pad_token_id: int | None = 2,
):
    """A freshly initialised `LlamaForCausalLM` of the given preset (seeded, SDPA attention, fp32 weights).

    Special ids default to those of `experts.tokenizer.train_tokenizer` (bos 0, eos 1, pad 2).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    p = get_preset(preset)
    if vocab_size <= 0:
        raise InputError(f"vocab_size must be positive, got {vocab_size}")
    config = LlamaConfig(
        vocab_size=int(vocab_size),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads or p.num_attention_heads,
        max_position_embeddings=int(seq_len or p.seq_len),
        tie_word_embeddings=p.tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_initial_seed(init, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> dict:
    """The seed without a seed phase: `init` (a model, or a Hugging Face folder / hub name) saved to `out_dir` as it
    is, with the tokenizer of `tokenizer_dir` and a `training.json` of zero steps, which it also returns."""
    model = load_causal_lm(init, load_tokenizer=False)[0] if isinstance(init, (str, os.PathLike)) else init
    model.save_pretrained(out_dir)
    load_tokenizer(tokenizer_dir).save_pretrained(out_dir)
    make_portable(out_dir)
    info = {"tokens_seen": 0, "steps": 0, "wall_time_s": 0.0, "gpu_hours": 0.0, "note": "no seed phase"}
    write_json(Path(out_dir) / TRAINING_INFO, info)
    return info


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def load_causal_lm(path_or_name: str | os.PathLike, dtype=None, load_tokenizer: bool = True):
    """Load `(model, tokenizer)` from a local `save_pretrained` directory or a hub model name.

    Raises InputError (one line naming the path) when the directory is missing, is not a causal LM, or holds
    a corrupt checkpoint. `tokenizer` is None when the directory has none and `load_tokenizer` is False.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = str(path_or_name)
    local = Path(name)
    looks_local = local.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        if not local.is_dir():
            raise InputError(f"seed model path does not exist or is not a directory: {local}")
        if not (local / "config.json").is_file():
            raise InputError(f"not a Hugging Face model directory (no config.json): {local}")
        try:
            json.loads((local / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"corrupt config.json in {local}: {_first_line(e)}") from None
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot load model config from {name}: {_first_line(e)}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"{name} is not a causal language model (model_type {config.model_type!r})")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype) if dtype else AutoModelForCausalLM.from_pretrained(name)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"corrupt or unreadable checkpoint in {name}: {_first_line(e)}") from None
    check_finite_weights(model, name)
    tokenizer = None
    if load_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot load the tokenizer of {name}: {_first_line(e)}") from None
    return model, tokenizer


def check_finite_weights(model, where: str) -> None:
    """InputError naming `where` when a parameter holds NaN or ±inf: a file overwritten with garbage, or a model
    saved after its training diverged. One reduction per tensor (a sum is non-finite iff an element is)."""
    import torch

    bad = {}
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p.sum())):
                bad[pname] = int((~torch.isfinite(p)).sum())
    if bad:
        first = next(iter(bad))
        raise InputError(f"corrupt weights in {where}: {sum(bad.values())} non-finite values in {len(bad)} tensor(s) "
                         f"(first: {first})")


def check_compatible(model, tokenizer) -> None:
    """InputError when the tokenizer can produce ids the model's embedding table does not have."""
    n_embed = model.get_input_embeddings().weight.shape[0]
    n_tok = len(tokenizer)
    if n_tok > n_embed:
        raise InputError(
            f"tokenizer/vocab mismatch: tokenizer has {n_tok} tokens but the model embeds only {n_embed}; "
            "shard with the seed model's own tokenizer"
        )


def count_params(model, non_embedding: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once); optionally without the input embedding."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    if non_embedding:
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        tied = out is not None and out.weight is emb
        if not tied:
            total -= emb.numel()
    return total


def flops_per_token(config, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·T (PaLM, Chowdhery et al. 2022, appendix B).

    N counts every matrix that multiplies activations: attention and MLP projections of all layers plus the
    output projection (lm_head, V·H), but not the input embedding lookup. L layers, H hidden size, T context.
    For MoE configs (num_local_experts or num_experts, num_experts_per_tok) only the active experts' MLPs count.
    """
    L, n_heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    N = L * layer_matrix_params(config) + config.vocab_size * config.hidden_size
    T = int(seq_len or getattr(config, "max_position_embeddings", 1024))
    return float(6 * N + 12 * L * n_heads * head_dim * T)


def layer_matrix_params(config) -> int:
    """Weights of the matrices one token meets in a decoder layer of `config` (a transformers config or a
    `ModelPreset`): attention q, k, v, o and the MLP's gate, up and down; for an MoE config the MLPs of its
    `num_experts_per_tok` active experts and the router."""
    H = config.hidden_size
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or H // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    inter = getattr(config, "intermediate_size", None) or 4 * H
    attn = H * n_heads * head_dim * 2 + H * n_kv * head_dim * 2  # q, o, k, v
    mlp = 3 * H * inter
    active = getattr(config, "num_experts_per_tok", None)
    n_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if active and n_experts:
        inter = getattr(config, "moe_intermediate_size", None) or inter
        mlp = 3 * H * inter * active + H * n_experts  # active experts + router
    return attn + mlp


def param_count(config, vocab_size: int | None = None) -> int:
    """Parameters of a dense Llama-style model of `config` (a transformers config, or a `ModelPreset` with
    `vocab_size`) without building it: the embeddings (once when tied), every layer's matrices
    (`layer_matrix_params`) and RMSNorm weights (two per layer and the final one). `count_params` counts a built
    model's."""
    H, L = config.hidden_size, config.num_hidden_layers
    V = vocab_size or config.vocab_size
    embeddings = V * H * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return embeddings + L * (layer_matrix_params(config) + 2 * H) + H
