"""Host-side cost of one eager training step: how many tensor operations (≈ GPU kernel launches) a step issues and
how long the host takes to issue them, for the ~7M Llama of bench_expert_phase.py.

Counts every aten operation of one step (forward, backward, clipping + AdamW as train_model runs them: the fused
linear cross-entropy, `MasterWeights` on CUDA / plain AdamW on CPU) with a TorchDispatchMode, then times steps on a
tiny input (1 block of `--tokens` tokens) so that the arithmetic is negligible and what remains is the host's
per-operation cost (Python, dispatcher, and on CUDA the launch). A step whose GPU work is shorter than that is
launch-bound: its time is ops × host µs/op, whatever the batch.

    python bench/bench_step_overhead.py --device cpu      # prints one table
    python bench/bench_step_overhead.py --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=16384)
    args = ap.parse_args()

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from corpus.device import resolve_device
    from experts.model import ModelPreset, build_scratch_model, count_params
    from experts.training import TrainConfig
    from experts.training.loss import CausalLMLoss
    from experts.training.optim import MasterWeights
    from experts.training.patches import cache_rotary, use_causal_sdpa

    setup = resolve_device(args.device)
    dev = setup.device
    model = build_scratch_model(ModelPreset(256, 4, 4, 688, 1024, True), args.vocab, seq_len=512).to(dev)
    config = TrainConfig(train_tokens=1, device=args.device, compile=False)
    use_causal_sdpa(model, args.tokens)
    cache_rotary(model, args.tokens)
    loss_module = CausalLMLoss.build(model, config, compile=False)
    bf16 = dev.type == "cuda" and setup.dtype == torch.bfloat16
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, fused=dev.type == "cuda")
    masters = MasterWeights(model, torch.bfloat16, accumulate=False) if bf16 else None
    x = torch.randint(0, args.vocab, (1, args.tokens), device=dev)

    def step(counter=None):
        with counter if counter is not None else contextlib.nullcontext():
            with setup.autocast():
                total, _, _ = loss_module(x)
            total.backward()
        if counter is not None:
            counter.fwd_bwd = sum(counter.ops.values())
        with counter if counter is not None else contextlib.nullcontext():
            update()

    def update():
        if masters is not None:
            masters.step(opt, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    for _ in range(3):
        step()
    counter = Count()
    step(counter)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    ms = (time.perf_counter() - t) / args.steps * 1e3
    n_ops = sum(counter.ops.values())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {count_params(model) / 1e6:.1f}M params, 1 × {args.tokens} tokens, "
          f"{'bf16 weights + MasterWeights' if bf16 else 'fp32 weights + AdamW'}")
    print("| ops per step | of which forward + backward | optimizer | host ms per step | µs per op | most frequent ops |")
    print("|---:|---:|---:|---:|---:|---|")
    top = ", ".join(f"{k} {v}" for k, v in counter.ops.most_common(6))
    print(f"| {n_ops} | {counter.fwd_bwd} | {n_ops - counter.fwd_bwd} | {ms:.2f} | {ms * 1e3 / n_ops:.1f} | {top} |")


if __name__ == "__main__":
    main()
