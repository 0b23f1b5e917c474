"""The training loss: next-token cross-entropy of a causal LM (`CausalLMLoss`), by default through a chunked fused
linear + cross-entropy that never materialises the (B, T, V) logits in fp32 (the idea of Liger-Kernel's
FusedLinearCrossEntropy), plus the load-balancing aux loss of an MoE."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from experts.training.config import TrainConfig

# Model types whose logits are exactly lm_head(last_hidden_state): the fused loss may be used for them.
_FUSED_LOSS_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "mixtral", "qwen2_moe", "phi3"}


def _ce_chunk(h, w, targets):
    """Loss sum and gradients for one chunk of rows. h (n, H), w (V, H), targets (n,) → (scalar, (n,H), (V,H))."""
    logits = (h @ w.t()).float()  # (n, V)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    p = torch.exp(logits - lse[:, None])  # softmax (n, V)
    p = p - torch.nn.functional.one_hot(targets, p.shape[1]).to(p.dtype)  # dL/dlogits
    g = p.to(h.dtype)
    return loss, g @ w, g.t() @ h


def make_linear_cross_entropy(compile: bool = False, mode: str | None = None):
    """Return f(h (N, H), w (V, H), targets (N,), n_chunks) → mean CE of softmax(h wᵀ) at targets.

    Forward computes the gradients chunk by chunk (logits of one chunk at a time, never (N, V) at once) and
    stores only dL/dh (N, H) and dL/dw (V, H); backward scales them by the incoming gradient.
    """
    chunk_fn = torch.compile(_ce_chunk, dynamic=False, mode=mode) if compile else _ce_chunk

    class LinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, w, targets, n_chunks):
            dt = torch.get_autocast_dtype("cuda") if (h.is_cuda and torch.is_autocast_enabled("cuda")) else h.dtype
            hc, wc = h.to(dt), w.to(dt)
            N = h.shape[0]
            grad_h = torch.empty_like(hc)  # (N, H)
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)  # (V, H)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            bounds = [N * i // n_chunks for i in range(n_chunks + 1)]  # Python ints: traceable as one graph
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b <= a:
                    continue
                l, gh, gw = chunk_fn(hc[a:b], wc, targets[a:b])
                loss += l
                grad_h[a:b] = gh
                grad_w += gw.float()
            ctx.save_for_backward(grad_h, grad_w)
            ctx.meta = (N, h.dtype, w.dtype)
            return loss / N

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w = ctx.saved_tensors
            N, h_dtype, w_dtype = ctx.meta
            s = grad_out / N
            return (grad_h * s).to(h_dtype), (grad_w * s).to(w_dtype), None, None

    return LinearCrossEntropy.apply


def _fused_ok(model) -> bool:
    """Whether `model`'s logits are exactly lm_head(last hidden state), which the fused loss computes itself."""
    cfg = model.config
    out = model.get_output_embeddings()
    return (
        cfg.model_type in _FUSED_LOSS_TYPES
        and out is not None
        and getattr(out, "bias", None) is None
        and not getattr(cfg, "final_logit_softcapping", None)
        and getattr(cfg, "logit_scale", None) in (None, 1, 1.0)
        and hasattr(model, "get_decoder")
    )


class CausalLMLoss:
    """Wraps a causal LM into `module(input_ids (B, T)) → (total_loss, lm_loss, router_logits | None)`.

    lm_loss = mean over the B·(T−1) next-token predictions; total = lm_loss + coef · aux (MoE only). The module's
    `fused` says whether it computes the chunked fused loss (then a validation pass without gradients is cheaper
    through the model's own logits) or the model's full logits.
    """

    @staticmethod
    def build(model, config: TrainConfig, compile: bool):
        use_router = config.router_aux_loss_coef > 0 or hasattr(model.config, "num_local_experts") or \
            hasattr(model.config, "num_experts_per_tok")
        fused = config.fused_loss and _fused_ok(model) and not use_router
        mode = config.compile_mode

        class _Loss(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model
                self.fused = fused
                # dynamic=False: micro-batches of two sizes (an uneven split) get two static graphs, not a dynamic one
                if fused:
                    whole = compile and config.compile_graph == "whole"
                    parts = compile and not whole
                    object.__setattr__(self, "_backbone", torch.compile(model.get_decoder(), mode=mode, dynamic=False)
                                       if parts else model.get_decoder())
                    object.__setattr__(self, "_lce", make_linear_cross_entropy(parts, mode))
                    object.__setattr__(self, "_fused", torch.compile(self._fused_loss, mode=mode, dynamic=False)
                                       if whole else self._fused_loss)
                else:
                    object.__setattr__(self, "_full", torch.compile(model, mode=mode, dynamic=False) if compile else model)

            def _fused_loss(self, input_ids, targets):
                h = self._backbone(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]  # (B, T−1, H)
                w = self.model.get_output_embeddings().weight  # (V, H)
                return self._lce(h.reshape(-1, h.shape[-1]), w, targets, config.loss_chunks)

            def forward(self, input_ids):  # (B, T)
                targets = input_ids[:, 1:].reshape(-1)  # (B·(T−1),)
                if fused:
                    loss = self._fused(input_ids, targets)
                    return loss, loss, None
                kw = {"output_router_logits": True} if use_router else {}
                out = self._full(input_ids=input_ids, use_cache=False, **kw)
                logits = out.logits[:, :-1]  # (B, T−1, V)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)
                router_logits = getattr(out, "router_logits", None) if use_router else None
                total = loss
                aux = getattr(out, "aux_loss", None)
                if config.router_aux_loss_coef > 0 and aux is not None:
                    total = loss + config.router_aux_loss_coef * aux
                return total, loss, router_logits

        return _Loss()
