"""Training throughput: our loop (`experts.training.train_model`) vs a plain HF Llama loop, on one GPU.

Same model (HF LlamaForCausalLM, vocab 32000, seq 1024), same global batch (default 32 × 1024 tokens), random
tokens. Reference = the plain loop of issue 4: `loss = model(input_ids, labels=input_ids).loss`, bf16 autocast,
SDPA, fused AdamW, grad clipping; eager and `torch.compile(model)`. Ours = `train_model` (compiled backbone,
chunked fused linear + cross-entropy, fused AdamW, pinned non-blocking input copies).
MFU = tokens/s × flops_per_token / 989e12 (H100/H200 SXM dense bf16), flops_per_token = 6N + 12·L·H·T.

Every (size, loop) runs in its own fresh process (`--isolate N`: N processes compile at once), so no
compiled graph or SDPA-kernel choice leaks from one variant into another. GPU work is serialised by a
writer-preferring file lock: warm-up/compile steps of several variants may overlap each other, but each timed
window runs with the GPU (and the host's CPUs) to itself. A timer waits for warm-ups already under way, so one
very long warm-up (`autotune`: several minutes of max-autotune compilation) stalls every other timed window:
run such variants last or alone (`--isolate 1`).

Loops: `ref_eager`, `ref_compiled`, `ours` (train_model's defaults), and `ours_<opt>_<opt>…` with options
`fp32params` (fp32 weights under autocast instead of bf16 weights + fp32 master weights), `nocacherope` (RoPE
cos/sin recomputed inside the fused kernels), `backbone`/`whole` (backbone and each loss chunk compiled apart /
as one graph), `chunksN` (N loss chunks), `nocausal` (HF's own mask building), `flash`/`cudnn`/`efficient`
(force that SDPA kernel), `autotune` (`max-autotune-no-cudagraphs`), `cudagraphs` (`reduce-overhead`),
`nofused` (full logits + CE), `eager` (no torch.compile), `eagerupdate` (the optimizer update not compiled: cast,
clip, fused AdamW, copy), and inductor settings `coordesc` (coordinate_descent_tuning), `combo` (combo_kernels).

    python bench/bench_train.py --sizes small,base            # prints a markdown table
    python bench/bench_train.py --runs none --profile base:ours   # torch.profiler of train_model's steps 5–7
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch


class GpuLock:
    """Writer-preferring reader/writer lock over two files (flock): warm-up holds the room shared, timing holds it
    exclusive; a waiting timer holds the turnstile so no new warm-up starts until it has run. No-op without a dir."""

    def __init__(self, lock_dir: str | None):
        self.room = self.turn = None
        if lock_dir:
            self.room = open(Path(lock_dir) / "room.lock", "a+")
            self.turn = open(Path(lock_dir) / "turnstile.lock", "a+")

    def warmup(self):  # shared: may overlap other warm-ups, never a timed window
        if self.room:
            fcntl.flock(self.turn, fcntl.LOCK_EX)
            fcntl.flock(self.room, fcntl.LOCK_SH)
            fcntl.flock(self.turn, fcntl.LOCK_UN)

    def timing(self):  # exclusive: alone on the GPU
        if self.room:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # give cached activations back while waiting (others are warming up)
            fcntl.flock(self.room, fcntl.LOCK_UN)
            fcntl.flock(self.turn, fcntl.LOCK_EX)
            fcntl.flock(self.room, fcntl.LOCK_EX)

    def release(self):
        if self.room:
            torch.cuda.synchronize()
            fcntl.flock(self.room, fcntl.LOCK_UN)
            fcntl.flock(self.turn, fcntl.LOCK_UN)


def reference_loop(preset, vocab, seq, batch, steps, warmup, compile, lock):
    from experts.model import build_scratch_model

    lock.warmup()
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
    for i in range(warmup - 1):
        step(i)
    torch.cuda.synchronize()
    t_compile = time.perf_counter() - t0
    lock.timing()
    step(warmup - 1)  # one more untimed step after the wait (allocator re-fills its cache)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    lock.release()
    return {"tokens_per_s": steps * batch * seq / dt, "warmup_s": t_compile, "loss": float(loss.detach()),
            "config": model.config.to_dict(), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


OPTIONS = {
    "fp32params": {"bf16_params": False},
    "whole": {"compile_graph": "whole"},
    "backbone": {"compile_graph": "backbone"},
    "nocacherope": {"cache_rope": False},
    "cudagraphs": {"compile_mode": "reduce-overhead"},
    "nocausal": {"causal_sdpa": False},
    "flash": {"sdpa_backend": "flash"},
    "cudnn": {"sdpa_backend": "cudnn"},
    "efficient": {"sdpa_backend": "efficient"},
    "autotune": {"compile_mode": "max-autotune-no-cudagraphs"},
    "nofused": {"fused_loss": False},
    "eager": {"compile": False},
    "eagerupdate": {"compile_update": False},
}
INDUCTOR_OPTIONS = {  # loop options that set torch._inductor.config in the row's process
    "coordesc": {"coordinate_descent_tuning": True},
    "combo": {"combo_kernels": True},
}


def loop_options(loop: str) -> dict:
    """`ours_flash_autotune` → {'sdpa_backend': 'flash', 'compile_mode': ...} (TrainConfig keyword arguments);
    `chunksN` sets loss_chunks=N."""
    kw = {}
    for opt in loop.split("_")[1:]:
        if opt.startswith("chunks") and opt[6:].isdigit():
            kw["loss_chunks"] = int(opt[6:])
            continue
        if opt in INDUCTOR_OPTIONS:
            continue
        if opt not in OPTIONS:
            raise SystemExit(f"unknown option {opt!r} in loop {loop!r}; options: {', '.join(OPTIONS)}")
        kw.update(OPTIONS[opt])
    return kw


def _train_random(preset, vocab, seq, batch, n_steps, micro, on_step, **kw) -> tuple[dict, dict]:
    """`train_model` for n_steps on random tokens (a fresh scratch model); returns (training.json, model config)."""
    from experts.model import build_scratch_model
    from experts.training import TrainConfig, train_model

    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    np.save(tmp / "cluster_000.npy", rng.integers(0, vocab, size=(batch * 4, seq)).astype(np.uint16))
    model = build_scratch_model(preset, vocab, seq_len=seq)
    cfg = TrainConfig(train_tokens=n_steps * batch * seq, micro_batch_size=micro, global_batch_tokens=batch * seq,
                      warmup_steps=1, log_every=0, checkpoint_every=0, device="cuda", **kw)
    res = train_model(model, [str(tmp / "cluster_000.npy")], tmp / "out", cfg, on_step=on_step)
    return res, model.config.to_dict()


def our_loop(preset, vocab, seq, batch, steps, warmup, micro, lock, **kw):
    """`train_model` on random tokens; train_model times the steps after its first 3 (so warmup must be 3)."""
    assert warmup == 3, "train_model starts its throughput clock after 3 steps"
    lock.warmup()
    t0 = time.perf_counter()
    marks = {}

    def on_step(done, state):
        if done == warmup - 1:  # step `warmup` (untimed) and the timed steps run alone on the GPU
            marks["warm"] = time.perf_counter() - t0
            lock.timing()

    res, config = _train_random(preset, vocab, seq, batch, steps + warmup, micro, on_step, **kw)
    res["config"] = config
    lock.release()
    res["warmup_s"] = marks.get("warm", float("nan"))
    res["loss"] = res["final_loss"]
    res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def profile_ours(preset, vocab, seq, batch, micro, out_path, **kw):
    """Steps 5–7 of `train_model` itself (after 4 warm-up/compile steps) under torch.profiler: wall ms per step,
    GPU kernel ms per step, and the top CUDA kernels, to `out_path` (+ a gzipped Chrome trace beside it)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    marks = {}

    def on_step(done, state):
        if done in (4, 7):
            torch.cuda.synchronize()
            marks[done] = time.perf_counter()
            prof.start() if done == 4 else prof.stop()

    _train_random(preset, vocab, seq, batch, 8, micro, on_step, **kw)
    wall_ms = (marks[7] - marks[4]) / 3 * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    gpu_ms = sum(e.time_range.elapsed_us() for e in kernels) / 3 / 1e3
    head = f"{preset} {kw}: {wall_ms:.1f} ms/step wall, {gpu_ms:.1f} ms/step in GPU kernels, {len(kernels) // 3} kernels/step\n"
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    Path(out_path).write_text(head + table)
    prof.export_chrome_trace(str(Path(out_path).with_suffix(".json.gz")))
    print(head + table[:5000])


def run_one(size, loop, args, lock) -> dict:
    if loop == "ref_eager":
        return reference_loop(size, args.vocab, args.seq, args.batch, args.steps, args.warmup, False, lock)
    if loop == "ref_compiled":
        return reference_loop(size, args.vocab, args.seq, args.batch, args.steps, args.warmup, True, lock)
    if loop == "ours" or loop.startswith("ours_"):
        return our_loop(size, args.vocab, args.seq, args.batch, args.steps, args.warmup, args.micro, lock,
                        **loop_options(loop))
    raise SystemExit(f"unknown loop {loop}")


def child(args) -> None:
    """One (size, loop) in this fresh process; prints one JSON line prefixed with RESULT."""
    from experts.model import flops_per_token
    from experts.training.schedule import peak_flops
    from transformers import LlamaConfig

    torch.backends.cuda.matmul.allow_tf32 = True
    size, loop = args.child.split(":")
    import torch._inductor.config as inductor_config

    for opt in loop.split("_")[1:]:
        for k, v in INDUCTOR_OPTIONS.get(opt, {}).items():
            setattr(inductor_config, k, v)
    if args.profile_out:
        return profile_ours(size, args.vocab, args.seq, args.batch, args.micro, args.profile_out, **loop_options(loop))
    t0 = time.perf_counter()
    r = run_one(size, loop, args, GpuLock(args.lock_dir))
    fpt = flops_per_token(LlamaConfig(**r["config"]), args.seq)
    out = {"size": size, "loop": loop, "tokens_per_s": r["tokens_per_s"], "mfu": r["tokens_per_s"] * fpt / (peak_flops(torch.device("cuda")) or float("nan")),
           "loss": r["loss"], "warmup_s": r["warmup_s"], "total_s": time.perf_counter() - t0, "peak_mem_gib": r["peak_mem_gib"]}
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,base")
    ap.add_argument("--loops", default="ref_compiled,ours_nocausal,ours")
    ap.add_argument("--runs", default="", help="explicit size:loop list (overrides --sizes/--loops), run in this order")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32, help="global batch in sequences")
    ap.add_argument("--micro", type=int, default=32, help="our micro-batch (grad accumulation fills the batch)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--isolate", type=int, default=3, help="fresh process per variant, this many compiling at once")
    ap.add_argument("--deadline", type=float, default=0, help="stop starting/kill variants after this many seconds (0 = none)")
    ap.add_argument("--profile", default="", help="size:loop list to profile after the timings, each in a fresh "
                    "process (writes $OUT/profile_<size>_<loop>.txt and .json.gz)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--lock-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_train.json"))
    args = ap.parse_args()
    if args.child:
        return child(args)

    from experts.model import count_params, build_scratch_model

    runs = [r.split(":") for r in args.runs.split(",")] if args.runs else \
        [(s, l) for s in args.sizes.split(",") for l in args.loops.split(",")]
    if args.runs == "none":  # profiles only
        runs = []
    lock_dir = tempfile.mkdtemp(prefix="bench_train_lock")
    t_start = time.perf_counter()
    results: dict[tuple[str, str], dict] = {}
    pending = list(runs)
    running: list[tuple[tuple[str, str], subprocess.Popen, Path]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(4, (os.cpu_count() or 8) // max(1, args.isolate))))
    base_cmd = [sys.executable, __file__, "--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch),
                "--micro", str(args.micro), "--steps", str(args.steps), "--warmup", str(args.warmup), "--lock-dir", lock_dir]
    log_dir = Path(tempfile.mkdtemp(prefix="bench_train_logs"))  # per-variant logs (only failures are echoed)
    out_dir = Path(os.environ.get("OUT", "."))

    def collect(key, proc, log_path):
        text = log_path.read_text(errors="replace")
        line = next((l for l in text.splitlines() if l.startswith("RESULT ")), None)
        if line:
            results[key] = json.loads(line[7:])
            r = results[key]
            print(f"{key[0]} {key[1]}: {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%}, loss {r['loss']:.3f}, warm-up "
                  f"{r['warmup_s']:.0f} s, total {r['total_s']:.0f} s, peak {r['peak_mem_gib']:.1f} GiB", flush=True)
        else:
            err = [l for l in text.splitlines() if l.strip()][-3:]
            results[key] = {"error": " | ".join(err)[-400:] or f"exit {proc.returncode}"}
            print(f"{key[0]} {key[1]}: FAILED ({results[key]['error']})", flush=True)

    while pending or running:
        late = args.deadline and time.perf_counter() - t_start > args.deadline
        while pending and len(running) < max(1, args.isolate) and not late:
            key = tuple(pending.pop(0))
            log_path = log_dir / f"log_{key[0]}_{key[1]}.txt"
            proc = subprocess.Popen(base_cmd + ["--child", f"{key[0]}:{key[1]}"], stdout=open(log_path, "w"),
                                    stderr=subprocess.STDOUT, env=env)
            running.append((key, proc, log_path))
        if late:
            for key, proc, log_path in running:
                proc.kill()
                results[key] = {"error": f"not finished within --deadline {args.deadline:.0f} s"}
            for key in pending:
                results[tuple(key)] = {"error": "not started (deadline)"}
            running, pending = [], []
            break
        time.sleep(1)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                collect(*item)

    for spec in filter(None, args.profile.split(",")):
        size, loop = spec.split(":")
        left = args.deadline - (time.perf_counter() - t_start) if args.deadline else None
        if left is not None and left < 30:
            print(f"profile {spec}: skipped (deadline)", flush=True)
            continue
        try:
            subprocess.run(base_cmd + ["--child", spec, "--profile-out", str(out_dir / f"profile_{size}_{loop}.txt")],
                           env=env, timeout=left)
        except subprocess.TimeoutExpired:
            print(f"profile {spec}: not finished within --deadline", flush=True)

    rows = []
    for size, loop in runs:
        with torch.device("meta"):
            n_params = count_params(build_scratch_model(size, args.vocab, seq_len=args.seq))
        r = results.get((size, loop), {"error": "missing"})
        base = results.get((size, "ref_compiled"), {}).get("tokens_per_s")
        rows.append({"model": size, "params_M": n_params / 1e6, "loop": loop, **r,
                     "vs_ref_compiled": r["tokens_per_s"] / base if base and "tokens_per_s" in r else None})
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"\ndevice: {name}, torch {torch.__version__}, batch {args.batch}x{args.seq} tokens, vocab {args.vocab}, "
          f"our micro-batch {args.micro}, {args.steps} timed steps after {args.warmup} warm-up steps, one fresh "
          f"process per row, timed windows exclusive; wall {time.perf_counter() - t_start:.0f} s\n")
    print("| model | params | loop | tokens/s | MFU | × compiled ref | warm-up s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['model']} | {r['params_M']:.0f}M | {r['loop']} | failed: {r['error'][:120]} | | | | |")
            continue
        ratio = f"{r['vs_ref_compiled']:.2f}×" if r["vs_ref_compiled"] else "-"
        print(f"| {r['model']} | {r['params_M']:.0f}M | {r['loop']} | {r['tokens_per_s'] / 1e6:.3f}M | {r['mfu']:.1%} | "
              f"{ratio} | {r['warmup_s']:.0f} | {r['peak_mem_gib']:.1f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": name, "rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
