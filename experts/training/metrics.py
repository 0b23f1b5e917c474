"""Routing statistics of an MoE during training (BTX finetuning), for training.json."""
from __future__ import annotations

import torch


class RouterStats:
    """Per-layer expert load (fraction of top-k assignments) and mean routing entropy (nats)."""

    def __init__(self):
        self.counts = None  # (n_layers, n_experts)
        self.entropy_sum, self.n = 0.0, 0

    def update(self, router_logits, top_k: int) -> None:
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
