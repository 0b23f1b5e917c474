"""Multi-GPU training throughput: two experts trained at once on a 2-GPU host vs one alone, and one expert on two
GPUs (DDP, FSDP) vs one GPU.

Every row trains through `experts.launch.launch_training`, the function the pipeline's training stages call:
  solo      one expert, `launch_training(gpus=[0])` in a fresh process (TrainExpert with --gpus-per-expert 1)
  parallel  two experts at once, two fresh processes, `gpus=[0]` and `gpus=[1]`, each its own shard (what two
            Luigi workers with `[resources] gpu = 2` do); target: aggregate ≥ 1.9 × solo
  ddp       one expert on GPUs 0+1, `launch_training(gpus=[0, 1])` → torchrun, DDP, the same micro-batch per GPU
            (so twice the global batch); ideal: 2 × solo
  fsdp      the same with `TrainConfig(sharding="fsdp")` (FSDP2, bf16 all-gathers, fp32 reduce-scatters)
Rows run one after another. Random tokens, vocab 32000, seq 1024, torch.compile on, fp32 parameters with bf16
autocast in every row (`bf16_params` off, so the one- and two-GPU rows compare like with like).

Timing. solo/parallel: each process synchronises the GPU and stamps the wall clock after every optimizer step
(`on_step`); an expert's steady state starts after `--skip` steps (compilation), and the processes stop together
once all of them have been in steady state for `--window` seconds. Tokens/s of an expert = tokens of its steps
that end inside the common window [latest steady start, earliest stop] / window length, so in `parallel` both
GPUs are busy for the whole window. ddp/fsdp (torchrun subprocesses, no callback): train_model's own figure
(steps after the first 3), with a step count sized from the solo speed to give about `--window` seconds.
While `parallel` runs, `nvidia-smi` lists the compute processes of each GPU: one per GPU means neither expert
touched the other's GPU.

    python bench/bench_parallel.py --size base --window 22     # prints a markdown table; JSON to $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Stop(Exception):
    """Raised from on_step once every process of the row has timed `window` seconds."""


def train_config(args, n_steps: int, n_gpus: int, sharding: str = "ddp"):
    from experts.training import TrainConfig

    tokens = args.micro * args.seq * n_gpus
    kw = dict(train_tokens=n_steps * tokens, micro_batch_size=args.micro, global_batch_tokens=tokens, warmup_steps=1,
              log_every=0, checkpoint_every=0, device="cpu" if args.cpu else "cuda", compile=not args.cpu,
              sharding=sharding, bf16_params=False)  # fp32 weights in every row: one- and two-GPU rows alike
    return TrainConfig(**kw)


def worker(spec_path: str) -> None:
    """One expert on one GPU through `launch_training`; writes step timestamps and training.json's tokens/s."""
    import torch

    from experts.launch import launch_training

    spec = json.loads(Path(spec_path).read_text())
    args = argparse.Namespace(**spec["args"])
    stamps: list[float] = []
    row_dir = Path(spec["row_dir"])

    def on_step(step, state):
        if not args.cpu:
            torch.cuda.synchronize()
        now = time.time()
        stamps.append(now)
        if step == args.skip:
            (row_dir / f"{spec['name']}.start").write_text(repr(now))
        starts = [float(p.read_text()) for p in row_dir.glob("*.start")]
        if len(starts) == spec["n_procs"] and now >= max(starts) + args.window:
            raise _Stop

    cfg = train_config(args, spec["max_steps"], 1)
    result = {"name": spec["name"], "gpu": spec["gpu"], "pid": os.getpid()}
    try:
        launch_training(spec["init"], [spec["shard"]], spec["out"], cfg, gpus=None if args.cpu else [spec["gpu"]],
                        on_step=on_step)
        result["stopped"] = "budget"
    except _Stop:
        result["stopped"] = "window"
    result.update(stamps=stamps, tokens_per_step=args.micro * args.seq,
                  device="cpu" if args.cpu else torch.cuda.get_device_name(),
                  peak_mem_gib=0.0 if args.cpu else torch.cuda.max_memory_allocated() / 2**30)
    Path(spec["result"]).write_text(json.dumps(result))


def gpu_processes() -> dict[int, int] | None:
    """Number of compute processes on each GPU index, from nvidia-smi (None when it cannot tell)."""
    try:
        uuids = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20).stdout
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=gpu_uuid,pid", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    index = {u.strip(): int(i) for i, u in (l.split(",") for l in uuids.strip().splitlines())}
    counts = {i: 0 for i in index.values()}
    for line in apps.strip().splitlines():
        counts[index[line.split(",")[0].strip()]] += 1
    return counts


def window_rates(results: list[dict], skip: int) -> tuple[float, list[float]]:
    """Common window [latest steady start, earliest last step] and each process's tokens/s inside it."""
    t0 = max(r["stamps"][skip - 1] for r in results)
    t1 = min(r["stamps"][-1] for r in results)
    span = t1 - t0
    rates = [sum(t0 < t <= t1 for t in r["stamps"]) * r["tokens_per_step"] / span for r in results]
    return span, rates


def run_single_gpu_row(name: str, gpus: list[int], args, work: Path, init: str, shards: list[str], env) -> dict:
    row_dir = work / name
    row_dir.mkdir()
    procs = []
    for k, g in enumerate(gpus):
        spec = {"name": f"expert{k}", "gpu": g, "init": init, "shard": shards[k], "out": str(row_dir / f"expert{k}"),
                "result": str(row_dir / f"expert{k}.json"), "row_dir": str(row_dir), "n_procs": len(gpus),
                "max_steps": args.max_steps, "args": vars(args)}
        path = row_dir / f"expert{k}.spec.json"
        path.write_text(json.dumps(spec))
        log = open(row_dir / f"expert{k}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(path)], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, cwd=ROOT), row_dir / f"expert{k}.log"))
    seen = None
    while any(p.poll() is None for p, _ in procs):
        time.sleep(2)
        if any(p.poll() not in (None, 0) for p, _ in procs):  # one failed: the others would wait for it forever
            for p, _ in procs:
                if p.poll() is None:
                    p.kill()
        if len(gpus) > 1 and len(list(row_dir.glob("*.start"))) == len(gpus) and seen is None:
            seen = gpu_processes()
    results = []
    for k, (p, log) in enumerate(procs):
        path = row_dir / f"expert{k}.json"
        if p.returncode != 0 or not path.exists():
            tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()][-15:]
            return {"row": name, "error": "\n".join(tail)[-3000:]}
        results.append(json.loads(path.read_text()))
    span, rates = window_rates(results, args.skip)
    return {"row": name, "gpus": len(gpus), "window_s": span, "per_expert": rates, "tokens_per_s": sum(rates),
            "steps": [len(r["stamps"]) for r in results], "peak_mem_gib": max(r["peak_mem_gib"] for r in results),
            "gpu_processes": seen,
            "device": results[0]["device"]}


def run_two_gpu_row(name: str, sharding: str, steps: int, args, work: Path, init: str, shard: str) -> dict:
    from experts.launch import launch_training

    t = time.time()
    try:
        info = launch_training(init, [shard], work / name, train_config(args, steps, 2, sharding),
                               gpus=None if args.cpu else [0, 1], cpu_procs=2, timeout=args.row_timeout)
    except Exception as e:  # noqa: BLE001 - a failed row is reported, the others still run
        return {"row": name, "error": str(e).strip()[-3000:]}
    timed = (info["steps"] - 3) * info["plan"]["tokens_per_step"] / info["tokens_per_s"]
    return {"row": name, "gpus": 2, "window_s": timed, "tokens_per_s": info["tokens_per_s"], "per_expert": [info["tokens_per_s"]],
            "steps": [info["steps"]], "wall_s": time.time() - t, "device": info["device"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="base", help="experts.model preset: small (36M) or base (134M)")
    ap.add_argument("--rows", default="solo,parallel,fsdp,ddp")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro", type=int, default=32, help="sequences per GPU per step (no gradient accumulation)")
    ap.add_argument("--window", type=float, default=22.0, help="timed seconds per row")
    ap.add_argument("--skip", type=int, default=5, help="steps before the timed window (compilation)")
    ap.add_argument("--max-steps", type=int, default=5000, help="budget of solo/parallel processes (they stop on time)")
    ap.add_argument("--deadline", type=float, default=0, help="start no row after this many seconds (0 = none)")
    ap.add_argument("--row-timeout", type=float, default=240, help="seconds per ddp/fsdp row")
    ap.add_argument("--cpu", action="store_true", help="dry run of the script's logic on CPU (no compile; use with --size tiny --micro 2 --seq 64 --vocab 512)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_parallel.json"))
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)

    import numpy as np

    from experts.launch import _SAFE_ENV
    from experts.model import build_scratch_model, count_params

    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_parallel"))
    model = build_scratch_model(args.size, args.vocab, seq_len=args.seq)
    n_params = count_params(model)
    init = str(work / "init")
    model.save_pretrained(init)
    shards = []
    for k in range(2):  # one shard per expert, 4 global batches of random tokens each (the data order cycles)
        rng = np.random.default_rng(k)
        path = work / f"cluster_{k:03d}.npy"
        np.save(path, rng.integers(0, args.vocab, size=(8 * args.micro, args.seq)).astype(np.uint16))
        shards.append(str(path))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", **_SAFE_ENV}
    os.environ.update({"TQDM_DISABLE": "1", **_SAFE_ENV})
    rows = {}
    for name in args.rows.split(","):
        if args.deadline and time.time() - t_start > args.deadline:
            rows[name] = {"row": name, "error": f"not started (--deadline {args.deadline:.0f} s)"}
            continue
        t = time.time()
        if name == "solo":
            rows[name] = run_single_gpu_row(name, [0], args, work, init, shards, env)
        elif name == "parallel":
            rows[name] = run_single_gpu_row(name, [0, 1], args, work, init, shards, env)
        elif name in ("ddp", "fsdp"):
            solo = rows.get("solo", {}).get("tokens_per_s") or 3e5
            steps = int(args.window * solo / (args.micro * args.seq)) + 3  # ≈ window s at 2× tokens per step and ~2× speed
            rows[name] = run_two_gpu_row(name, name, steps, args, work, init, shards[0])
        else:
            raise SystemExit(f"unknown row {name!r}; rows: solo, parallel, ddp, fsdp")
        rows[name]["row_wall_s"] = time.time() - t
        print(f"{name}: {json.dumps(rows[name])[:600]}", flush=True)
        if "error" in rows[name]:
            print(rows[name]["error"], flush=True)

    base = rows.get("solo", {}).get("tokens_per_s")
    device = next((r["device"] for r in rows.values() if "device" in r), "no GPU")
    import torch

    print(f"\ndevice: 2 × {device}, torch {torch.__version__}, model {args.size} ({n_params / 1e6:.0f}M params), "
          f"{args.micro} × {args.seq} tokens per GPU per step, vocab {args.vocab}, compile {'off' if args.cpu else 'on'}, fp32 params + bf16 "
          f"autocast; wall {time.time() - t_start:.0f} s\n")
    print("| row | GPUs | tokens/s per expert | aggregate tokens/s | × solo | timed s | steps | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | | failed: {r['error'].splitlines()[-1][:150]} | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else "-"
        per = ", ".join(f"{x / 1e6:.3f}M" for x in r["per_expert"])
        mem = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        print(f"| {name} | {r['gpus']} | {per} | {r['tokens_per_s'] / 1e6:.3f}M | {ratio} | {r['window_s']:.1f} | "
              f"{'/'.join(map(str, r['steps']))} | {mem} |")
    par = rows.get("parallel", {})
    if "gpu_processes" in par:
        print(f"\nparallel: compute processes per GPU while both experts ran (nvidia-smi): {par['gpu_processes']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": device, "rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
