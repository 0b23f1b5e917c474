"""What the loop changes in a transformers causal LM for training, and undoes before the model is saved: attention
as SDPA with is_causal=True and no materialised mask (`use_causal_sdpa` / `restore_attention`), RoPE's cos/sin
read from tables (`cache_rotary` / `restore_rotary`); and `sdpa_context`, which pins one SDPA kernel. Outputs are
unchanged."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    T, S = query.shape[2], key.shape[2]
    if attention_mask is not None or T != S or T == 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # heavy: on use

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
    from transformers import AttentionInterface  # heavy: imported when a model is patched

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


def sdpa_context(backend: str | None):
    """Context manager restricting scaled_dot_product_attention to one kernel (None: no restriction)."""
    if not backend:
        return nullcontext()
    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([names[backend]])
