"""The optimizer update of bf16-weight training on one GPU: what `MasterWeights.step` replaced, and its variants.

Parameters of a Llama preset (default `base`, 134M, vocab 32000) as fp32 masters with bf16 copies, random bf16
gradients; every row runs the same number of steps from the same state, so the last column shows that all rows
compute the same update (relative to the largest master entry). Rows:
- `previous`: what train_model did before: a bf16→fp32 cast per parameter (the gradient hook),
  `clip_grad_norm_`, fused AdamW, `_foreach_copy_` into the bf16 weights;
- `fused`: `experts.training.optim._master_update(impl='fused')`, the eager CUDA path (same kernels, one call);
- `tensor, compiled`: `_master_update(impl='tensor')` under torch.compile (one fused kernel per parameter);
- `tensor, compiled, combo`: the same with inductor's combo_kernels (what MasterWeights uses when compiling).
Wall ms is host-bound for the compiled rows (dynamo guards over ~110 tensors); in training the host runs ahead
of the GPU, so GPU kernel ms is what a step pays.

    python bench/bench_optimizer.py --preset base --steps 50
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="base")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()

    from experts.model import build_scratch_model
    from experts.training.optim import _master_update

    dev = torch.device("cuda")
    params = [p.detach().to(dev) for p in build_scratch_model(args.preset, args.vocab, seq_len=1024).parameters()]
    params = [p for p in params if p.dim() >= 2] + [p for p in params if p.dim() < 2]  # decay group, then the rest
    n_decay = sum(p.dim() >= 2 for p in params)
    gen = torch.Generator(device=dev).manual_seed(0)
    grads = [torch.randn(p.shape, device=dev, generator=gen, dtype=torch.bfloat16) * 1e-2 for p in params]
    groups = ((0, n_decay, 0.1, 0.9, 0.95, 1e-8), (n_decay, len(params), 0.0, 0.9, 0.95, 1e-8))
    print(f"{args.preset}: {len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f}M parameters", flush=True)

    def previous():
        masters = [p.clone() for p in params]
        lows = [p.to(torch.bfloat16) for p in params]
        opt = torch.optim.AdamW([{"params": masters[:n_decay], "weight_decay": 0.1},
                                 {"params": masters[n_decay:], "weight_decay": 0.0}],
                                lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)

        def step():
            for m, g in zip(masters, grads):
                m.grad = g.float()
            torch.nn.utils.clip_grad_norm_(masters, 1.0)
            opt.step()
            torch._foreach_copy_(lows, masters)
            opt.zero_grad(set_to_none=True)
        return step, masters

    def ours(impl, compile, options=None):
        torch._dynamo.reset()
        masters = [p.clone() for p in params]
        lows = [p.to(torch.bfloat16) for p in params]
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), device=dev) for _ in params]
        lrs = [torch.zeros((), device=dev) for _ in groups]
        fn = torch.compile(_master_update, dynamic=False, options=options) if compile else _master_update

        def step():
            for t in lrs:
                t.fill_(3e-4)
            with torch.no_grad():
                fn(grads, masters, lows, exp_avgs, exp_avg_sqs, steps, lrs, groups, 1.0, impl)
        return step, masters

    rows = [("previous: cast per parameter, clip, fused AdamW, copy", previous),
            ("fused (eager CUDA path)", lambda: ours("fused", False)),
            ("tensor, compiled", lambda: ours("tensor", True)),
            ("tensor, compiled, combo_kernels (MasterWeights)", lambda: ours("tensor", True, {"combo_kernels": True}))]
    from torch.profiler import ProfilerActivity, profile

    results, reference = [], None
    for name, make in rows:
        step, masters = make()
        t0 = time.perf_counter()
        step()
        step()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
        if reference is None:
            reference = masters
        scale = max(float(r.abs().max()) for r in reference)
        diff = max(float((a - b).abs().max()) for a, b in zip(reference, masters)) / scale
        results.append((name, wall, gpu_ms, len(kernels), first, diff))
        print(f"{name}: {gpu_ms:.3f} ms GPU, {len(kernels)} kernels, {wall:.3f} ms wall", flush=True)

    print(f"\ndevice: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.steps + 3} steps per row\n")
    print("| update | GPU kernel ms/step | kernels/step | wall ms/step | first 2 steps s | max diff vs previous |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, gpu_ms, n, first, diff in results:
        print(f"| {name} | {gpu_ms:.3f} | {n} | {wall:.3f} | {first:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
