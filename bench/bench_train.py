"""Training throughput: our loop (`experts.train.train_model`) vs a plain HF Llama loop, on one GPU.

Same model (HF LlamaForCausalLM, vocab 32000, seq 1024), same global batch (default 32 × 1024 tokens), random
tokens. Reference = the plain loop of issue 4: `loss = model(input_ids, labels=input_ids).loss`, bf16 autocast,
SDPA, fused AdamW, grad clipping; eager and `torch.compile(model)`. Ours = `train_model` (compiled backbone,
chunked fused linear + cross-entropy, fused AdamW, pinned non-blocking input copies).
MFU = tokens/s × flops_per_token / 989e12 (H100/H200 SXM dense bf16), flops_per_token = 6N + 12·L·H·T.

    python bench/bench_train.py --sizes small,base            # prints a markdown table
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch


def reference_loop(preset, vocab, seq, batch, steps, warmup, compile):
    from experts.model import build_scratch_model

    model = build_scratch_model(preset, vocab, seq_len=seq).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    fwd = torch.compile(model) if compile else model
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, vocab, (batch, seq), generator=g).cuda() for _ in range(4)]
    def step(i):
        x = xs[i % len(xs)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {"tokens_per_s": steps * batch * seq / dt, "warmup_s": t_compile, "loss": float(loss.detach()), "config": model.config}
    del model, opt, fwd
    torch.cuda.empty_cache()
    return out


def our_loop(preset, vocab, seq, batch, steps, warmup, micro, **kw):
    from experts.model import build_scratch_model
    from experts.train import TrainConfig, train_model

    tmp = Path(tempfile.mkdtemp())
    n_steps = steps + warmup
    rng = np.random.default_rng(0)
    np.save(tmp / "cluster_000.npy", rng.integers(0, vocab, size=(batch * 4, seq)).astype(np.uint16))
    model = build_scratch_model(preset, vocab, seq_len=seq)
    cfg = TrainConfig(train_tokens=n_steps * batch * seq, micro_batch_size=micro, global_batch_tokens=batch * seq,
                      warmup_steps=1, log_every=0, checkpoint_every=0, device="cuda", **kw)
    t0 = time.perf_counter()
    res = train_model(model, [str(tmp / "cluster_000.npy")], tmp / "out", cfg)
    res["warmup_s"] = time.perf_counter() - t0 - res["steps"] * batch * seq / res["tokens_per_s"]
    res["loss"] = res["final_loss"]
    res["config"] = model.config
    del model
    torch.cuda.empty_cache()
    return res


def profile_ours(preset, vocab, seq, batch, out_path):
    """One compiled step of our loss + backward under torch.profiler; top CUDA kernels to a text file."""
    from experts.model import build_scratch_model
    from experts.train import CausalLMLoss, TrainConfig

    model = build_scratch_model(preset, vocab, seq_len=seq).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    mod = CausalLMLoss.build(model, TrainConfig(train_tokens=1), compile=True)
    x = torch.randint(0, vocab, (batch, seq), device="cuda")
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = mod(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    Path(out_path).write_text(table)
    print(table[:6000])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,base")
    ap.add_argument("--loops", default="ref_eager,ref_compiled,ours")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32, help="global batch in sequences")
    ap.add_argument("--micro", type=int, default=32, help="our micro-batch (grad accumulation fills the batch)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", default="", help="size to profile our step for (writes $OUT/profile_<size>.txt)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_train.json"))
    args = ap.parse_args()

    from experts.model import count_params, build_scratch_model, flops_per_token
    from experts.train import peak_flops

    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    peak = peak_flops(dev) or float("nan")
    rows = []
    for size in args.sizes.split(","):
        with torch.device("meta"):
            n_params = count_params(build_scratch_model(size, args.vocab, seq_len=args.seq))
        res = {}
        for loop in args.loops.split(","):
            t0 = time.perf_counter()
            if loop == "ref_eager":
                r = reference_loop(size, args.vocab, args.seq, args.batch, args.steps, args.warmup, compile=False)
            elif loop == "ref_compiled":
                r = reference_loop(size, args.vocab, args.seq, args.batch, args.steps, args.warmup, compile=True)
            elif loop == "ours":
                r = our_loop(size, args.vocab, args.seq, args.batch, args.steps, args.warmup, args.micro)
            elif loop == "ours_nofused":
                r = our_loop(size, args.vocab, args.seq, args.batch, args.steps, args.warmup, args.micro, fused_loss=False)
            elif loop.startswith("ours_sdpa_"):
                r = our_loop(size, args.vocab, args.seq, args.batch, args.steps, args.warmup, args.micro,
                             sdpa_backend=loop.split("_")[-1])
            elif loop == "ours_eager":
                r = our_loop(size, args.vocab, args.seq, args.batch, args.steps, args.warmup, args.micro, compile=False)
            else:
                raise SystemExit(f"unknown loop {loop}")
            fpt = flops_per_token(r["config"], args.seq)
            r["mfu"] = r["tokens_per_s"] * fpt / peak
            res[loop] = r
            print(f"{size} {loop}: {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%}, loss {r['loss']:.3f}, "
                  f"warm-up {r['warmup_s']:.0f} s, total {time.perf_counter() - t0:.0f} s", flush=True)
        base = res.get("ref_compiled", {}).get("tokens_per_s")
        for loop, r in res.items():
            rows.append({"model": size, "params_M": n_params / 1e6, "loop": loop, "tokens_per_s": r["tokens_per_s"],
                         "mfu": r["mfu"], "vs_ref_compiled": r["tokens_per_s"] / base if base else None})
        if args.profile == size:
            profile_ours(size, args.vocab, args.seq, args.micro, Path(os.environ.get("OUT", ".")) / f"profile_{size}.txt")
    name = torch.cuda.get_device_name(dev)
    print(f"\ndevice: {name}, torch {torch.__version__}, batch {args.batch}x{args.seq} tokens, vocab {args.vocab}, "
          f"our micro-batch {args.micro}, {args.steps} timed steps after {args.warmup} warm-up steps\n")
    print("| model | params | loop | tokens/s | MFU | × compiled ref |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_ref_compiled']:.2f}×" if r["vs_ref_compiled"] else "-"
        print(f"| {r['model']} | {r['params_M']:.0f}M | {r['loop']} | {r['tokens_per_s'] / 1e6:.3f}M | {r['mfu']:.1%} | {ratio} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": name, "rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
