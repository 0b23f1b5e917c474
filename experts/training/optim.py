"""The optimizer update of bf16 training: fp32 master weights (`MasterWeights`) and one AdamW update that clips,
steps and writes the bf16 copy (`_master_update`)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch.optim.adamw import adamw


class MasterWeights:
    """bf16 parameters in the model, fp32 master weights in the optimizer (mixed-precision training as in
    Micikevicius et al. 2018, "Mixed Precision Training", without loss scaling: bf16 has fp32's exponent range).

    Every fp32 parameter p of `model` stays what the optimizer and the checkpoint hold (the master); the model
    gets a new parameter p̂ = bf16(p) in its place (tied weights stay tied), so activations and the residual
    stream are bf16 too. `step()` clips the gradients, takes one AdamW step on the masters and sets p̂ = bf16(p).
    With `accumulate` (gradient accumulation over micro-batches) a post-accumulate-grad hook adds each p̂.grad to
    p.grad in fp32 and frees p̂.grad, so the sum is fp32; without it `step()` reads the bf16 p̂.grad directly.
    `fp32_model()` puts the masters into the model for a while (writing a checkpoint); `restore()` puts them back
    for good.
    """

    def __init__(self, model, dtype, accumulate: bool = True, compile: bool = False):
        self._slots = []  # (module, name, master, low)
        low_of: dict[int, Any] = {}
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or p.dtype != torch.float32:
                    continue
                if id(p) not in low_of:
                    low = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
                    if p.requires_grad and accumulate:
                        low.register_post_accumulate_grad_hook(_grad_to_master(p))
                    low_of[id(p)] = low
                self._slots.append((module, name, p, low_of[id(p)]))
        pairs = {id(m): (m, low) for _, _, m, low in self._slots}.values()
        self.masters = [m for m, _ in pairs]  # fp32, what the optimizer updates
        self.lows = [low for _, low in pairs]  # bf16, what the model computes with
        self._low_of = {id(m): low for m, low in pairs}
        self.accumulate = accumulate
        self.compiled = compile
        # combo_kernels: inductor packs the per-parameter update kernels into a few launches (bench/RESULTS.md)
        self._update = (torch.compile(_master_update, dynamic=False, options={"combo_kernels": True}) if compile
                        else _master_update)
        self._lrs: list | None = None
        self._use(low=True)

    def _use(self, low: bool) -> None:
        for module, name, master, p_low in self._slots:
            module._parameters[name] = p_low if low else master

    def step(self, optimizer, max_norm: float) -> None:
        """What `clip_grad_norm_(masters, max_norm)` (0 = no clipping), `optimizer.step()` and p̂ = bf16(p) for
        every parameter do in turn, as one update: on CUDA one compiled graph of a few fused kernels that read each
        bf16 gradient once, instead of a cast per parameter, a clipping pass and the fused AdamW pass
        (bench/bench_optimizer.py, bench/RESULTS.md).

        `optimizer` is the `torch.optim.AdamW` over the masters; its param groups give lr, betas, eps and weight
        decay, and its state holds the moments and step counts (created as AdamW creates them), so checkpoints
        are the same either way. Parameters without a gradient are skipped, as AdamW skips them (when compiled, a
        new set of such parameters compiles a new graph).
        """
        groups, group_ids, flat = [], [], {k: [] for k in ("grads", "masters", "lows", "exp_avgs", "exp_avg_sqs", "steps")}
        for gi, group in enumerate(optimizer.param_groups):
            start = len(flat["masters"])
            for m in group["params"]:
                low = self._low_of[id(m)]
                g = m.grad if self.accumulate else low.grad
                if g is None:
                    continue
                st = optimizer.state[m]
                if not st:  # as torch.optim.AdamW initialises its state (fused/capturable: step on the device)
                    on_device = m.device.type != "cpu"
                    st["step"] = (torch.zeros((), dtype=torch.float32, device=m.device) if on_device
                                  else torch.tensor(0.0, dtype=torch.float32))
                    st["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
                for k, v in (("grads", g), ("masters", m), ("lows", low), ("exp_avgs", st["exp_avg"]),
                             ("exp_avg_sqs", st["exp_avg_sq"]), ("steps", st["step"])):
                    flat[k].append(v)
            if len(flat["masters"]) > start:
                groups.append((start, len(flat["masters"]), float(group["weight_decay"]), *map(float, group["betas"]),
                               float(group["eps"])))
                group_ids.append(gi)
        if not groups:
            return
        device = flat["masters"][0].device
        impl = "tensor" if self.compiled or device.type == "cpu" else "fused"
        lrs = [float(optimizer.param_groups[gi]["lr"]) for gi in group_ids]
        if device.type != "cpu":  # lr as a device tensor per param group: a new lr must not recompile the graph
            if self._lrs is None:
                self._lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in optimizer.param_groups]
            for gi, lr in zip(group_ids, lrs):
                self._lrs[gi].fill_(lr)
            lrs = [self._lrs[gi] for gi in group_ids]
        with torch.no_grad():
            self._update(flat["grads"], flat["masters"], flat["lows"], flat["exp_avgs"], flat["exp_avg_sqs"],
                         flat["steps"], lrs, tuple(groups), float(max_norm), impl)
        for low in self.lows:
            low.grad = None

    @contextmanager
    def fp32_model(self):
        """The model holds its fp32 masters inside the block (so its state_dict() is fp32)."""
        self._use(low=False)
        try:
            yield
        finally:
            self._use(low=True)

    def restore(self) -> None:
        """Put the fp32 masters back into the model for good (idempotent)."""
        self._use(low=False)


def _grad_to_master(master):
    def hook(low):  # low.grad (bf16) → master.grad (fp32), summed over micro-batches
        if master.grad is None:
            master.grad = low.grad.float()
        else:
            master.grad.add_(low.grad)
        low.grad = None

    return hook


def _master_update(grads, masters, lows, exp_avgs, exp_avg_sqs, steps, lrs, groups, max_norm: float, impl: str):
    """Clip `grads` (bf16 or fp32) to a global norm of `max_norm` (as clip_grad_norm_), take one AdamW step on the
    fp32 `masters` per group (start, end, weight_decay, beta1, beta2, eps) with learning rates `lrs`, and copy
    the masters into the bf16 `lows`.

    impl 'tensor': AdamW written out per tensor (torch's single-tensor AdamW, step for step), so that torch.compile
    fuses each parameter's whole update — read the gradient once, update moments and master, write the bf16 copy —
    into one kernel; eager on CPU. impl 'fused': torch's fused AdamW kernel (CUDA without compilation)."""
    coef = None
    if max_norm > 0:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # reads the bf16 gradients as they are
        coef = torch.clamp(max_norm / (torch.linalg.vector_norm(torch.stack(norms)) + 1e-6), max=1.0)
    if impl == "fused":
        grads = [g.float() for g in grads]
        if coef is not None:
            grads = torch._foreach_mul(grads, coef)
        for (start, end, weight_decay, beta1, beta2, eps), lr in zip(groups, lrs):
            sl = slice(start, end)
            adamw(masters[sl], grads[sl], exp_avgs[sl], exp_avg_sqs[sl], [], steps[sl], fused=True, amsgrad=False,
                  beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
        torch._foreach_copy_(lows, masters)
        return
    for (start, end, weight_decay, beta1, beta2, eps), lr in zip(groups, lrs):
        for i in range(start, end):
            grad = grads[i].float() if coef is None else grads[i].float() * coef
            param, exp_avg, exp_avg_sq, step = masters[i], exp_avgs[i], exp_avg_sqs[i], steps[i]
            step.add_(1)
            param.mul_(1 - lr * weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step).sqrt()
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.sub_(exp_avg / denom * (lr / bias_correction1))
            lows[i].copy_(param)
