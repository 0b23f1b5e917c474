"""The expert phase against the dense phase on one GPU, at equal total tokens under the paper's compute matching,
through the pipeline's own training path; plus the micro-batch table (auto vs hand-picked sizes).

Compute matching (Gururangan et al. 2023, as the pipeline's budgets do by default): the dense model trains S
optimizer steps of D blocks; expert i trains the same S steps with a global batch of round(D · shareᵢ) blocks,
shareᵢ = its cluster's fraction of the training tokens; so the k experts together see the dense model's tokens.
k = 8 shares, measured on this repository's CPU machine from the pipeline's own stages on
/work/shared/data/corpus_dev (TF-IDF embedder, balanced k-means, k = 8, nearest assignment, BPE vocabulary 16384,
blocks of 512 tokens: `luigi --module pipeline ShardCorpus --corpus .../corpus_dev --num-clusters 8
--vocab-size 16384 --seq-len 512 --device cpu`, then shards-*/meta.json n_tokens per cluster / total):
SHARES below. The documents are balanced (3281–4263 per cluster), their tokens are not (6.0%–21.3%).

Rows (each process is what one Luigi worker runs: `experts.launch.gpu_slots` claims the GPU, then
`experts.launch.launch_training` trains in that process; random tokens; eager (`--compile off`, as in the issue's
figures); `--micro-batch-size auto`; bf16 weights with fp32 masters; no checkpoints):
  dense         one process on GPU 0 (a whole-GPU claim), S steps of D blocks
  experts       the 8 experts at once, 8 processes, `--experts-per-gpu 8` (one slot each, on the GPU whose
                slots carry the fewest tokens; each process may use 1/8 of the GPU's memory), over --gpus GPUs
  experts_mps   the same while a private CUDA MPS daemon serves the processes (kernels of different processes
                run concurrently instead of time-sliced); skipped when nvidia-cuda-mps-control is absent
  experts_1gpu  as `experts`, restricted to GPU 0 (the 2-GPU run's reference)
  experts_seq   the 8 experts one after another, one process each (`--experts-per-gpu 1`: today's default)
Timing: phase wall = first process started → last process exited (imports, CUDA start-up, training, saving);
training span = earliest first optimizer step → latest end of `launch_training` (the steps and the saves).
Ratios are to the dense row of the same size and run. Micro-batch table: one process trains S_micro steps per
setting (the dense batch, whole GPU) at hand-picked micro-batch sizes and `auto`; tokens/s from training.json
(steps after the first 3).

    python bench/bench_expert_phase.py --deadline 250                   # 1 GPU: 7m, small, base + micro table
    python bench/bench_expert_phase.py --gpus 2 --sizes 7m,small --rows experts_1gpu,experts --micro-table "" \\
        --deadline 150                                                  # 2 GPUs of one host
    python bench/bench_expert_phase.py --cpu                            # dry run of the logic on CPU (tiny)
Prints one table per size and the micro-batch table; details to $OUT/bench_expert_phase.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARES = [0.2080, 0.2134, 0.0809, 0.2034, 0.0604, 0.0676, 0.0738, 0.0924]
"""Token share of each of the k = 8 clusters of corpus_dev (see the module docstring)."""

SIZES = {  # name: (preset or (hidden, layers, heads, intermediate), seq_len, dense blocks per step, steps)
    "7m": ((256, 4, 4, 688), 512, 128, 200),
    "small": ("small", 1024, 64, 150),
    "base": ("base", 1024, 64, 70),
    "tiny": ((32, 2, 4, 64), 64, 16, 12),  # --cpu dry runs
}
MICRO = {"7m": [8, 32, 64, 128], "base": [8, 16, 32, 64], "small": [8, 16, 32, 64], "tiny": [4, 8, 16]}


def expert_blocks(dense_blocks: int) -> list[int]:
    """Blocks per step of each expert: round(D · shareᵢ), at least 1."""
    return [max(1, round(dense_blocks * s)) for s in SHARES]


def preset(spec):
    from experts.model import ModelPreset

    if isinstance(spec, str):
        return spec
    h, layers, heads, inter = spec
    return ModelPreset(h, layers, heads, inter, 1024, True)


# ------------------------------------------------------------------------------------------------ child processes
def train_worker(spec_path: str) -> None:
    """One training process: claim the GPU (whole or one slot) as a pipeline stage does, train, write timings."""
    t_proc = float(os.environ.get("BENCH_T_SPAWN", time.time()))
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from experts.launch import gpu_slots, launch_training
    from experts.training import TrainConfig

    t_imported = time.time()
    stamps = {}

    def on_step(step, state):
        if step == 1:
            stamps["first_step"] = time.time()

    config = TrainConfig(**spec["config"])
    with gpu_slots(1 if spec["gpus"] else 0, spec["lock_dir"], slots_per_gpu=spec["slots_per_gpu"],
                   shared=spec["shared"], weight=spec["weight"], gpus=spec["gpus"]) as gpus:
        t_claimed = time.time()
        info = launch_training(spec["init"], [spec["shard"]], spec["out"], config, gpus=gpus or None, on_step=on_step)
        t_done = time.time()
        peak = torch.cuda.max_memory_allocated() / 2**30 if gpus else 0.0
    Path(spec["result"]).write_text(json.dumps({
        "name": spec["name"], "gpu": gpus[0] if gpus else None, "t_spawn": t_proc, "t_imported": t_imported,
        "t_claimed": t_claimed, "t_first_step": stamps.get("first_step", t_claimed), "t_done": t_done,
        "steps": info["steps"], "tokens": info["tokens_seen"], "loop_wall_s": info["wall_time_s"],
        "tokens_per_s": info["tokens_per_s"], "micro_batches": info["plan"]["micro_batches"],
        "micro_batch": info.get("micro_batch"), "peak_gib": peak, "device": info["device"]}))


def micro_worker(spec_path: str) -> None:
    """The micro-batch table: one process, one short run per setting on the whole GPU 0."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from experts.launch import launch_training
    from experts.training import TrainConfig

    rows = []
    for job in spec["jobs"]:
        if spec["deadline_unix"] and time.time() > spec["deadline_unix"]:
            rows.append({**job["meta"], "error": "not run (deadline)"})
            continue
        try:
            info = launch_training(job["init"], [job["shard"]], job["out"], TrainConfig(**job["config"]),
                                   gpus=spec["gpus"] or None)
            rows.append({**job["meta"], "tokens_per_s": info["tokens_per_s"], "micro_batches": info["plan"]["micro_batches"],
                         "micro_batch": info.get("micro_batch"), "steps": info["steps"],
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if spec["gpus"] else 0.0})
        except Exception as e:  # noqa: BLE001 - one failed setting is reported, the others still run
            rows.append({**job["meta"], "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"})
        shutil.rmtree(job["out"], ignore_errors=True)
        if spec["gpus"]:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(json.dumps(rows[-1]), flush=True)
    Path(spec["result"]).write_text(json.dumps(rows))


# ------------------------------------------------------------------------------------------------ parent
class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.work = Path(tempfile.mkdtemp(prefix="bench_expert_phase"))
        os.environ["TQDM_DISABLE"] = "1"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
                    "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if args.cpu:
            self.env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.gpus = [] if args.cpu else list(range(args.gpus))
        self.device = "cpu" if args.cpu else "cuda"

    def left(self) -> float:
        return self.args.deadline - (time.time() - self.t0) if self.args.deadline else 1e9

    def prepare(self, size: str) -> dict:
        """Init folder and random-token shards (dense + one per expert) for a size."""
        import numpy as np

        from experts.model import build_scratch_model, count_params

        spec, seq, dense_blocks, steps = SIZES[size]
        steps = max(4, int(steps * self.args.scale))
        d = self.work / size
        d.mkdir(exist_ok=True)
        model = build_scratch_model(preset(spec), self.args.vocab, seq_len=seq)
        n_params = count_params(model)
        model.save_pretrained(d / "init")
        rng = np.random.default_rng(0)
        blocks = expert_blocks(dense_blocks)
        shards = {}
        for name, b in [("dense", dense_blocks)] + [(f"expert{i}", b) for i, b in enumerate(blocks)]:
            path = d / f"{name}.npy"
            np.save(path, rng.integers(0, self.args.vocab, size=(2 * b, seq)).astype(np.uint16))
            shards[name] = str(path)
        return {"size": size, "dir": d, "init": str(d / "init"), "seq": seq, "dense_blocks": dense_blocks,
                "expert_blocks": blocks, "steps": steps, "n_params": n_params, "shards": shards}

    def config(self, s: dict, blocks: int, experts_per_gpu: int = 1, micro="auto", steps: int | None = None) -> dict:
        steps = steps or s["steps"]
        return dict(train_tokens=steps * blocks * s["seq"], global_batch_tokens=blocks * s["seq"],
                    micro_batch_size=micro, warmup_steps=max(1, steps // 50), lr=3e-4, min_lr=3e-5,
                    checkpoint_every=0, device=self.device, compile=False, seed=0, experts_per_gpu=experts_per_gpu)

    def spawn(self, s: dict, row: str, name: str, shard: str, config: dict, gpus: list[int], slots: int,
              shared: bool, weight: float, env: dict):
        row_dir = s["dir"] / row
        row_dir.mkdir(exist_ok=True)
        spec = {"name": name, "init": s["init"], "shard": shard, "out": str(row_dir / name),
                "result": str(row_dir / f"{name}.json"), "config": config, "gpus": gpus,
                "lock_dir": str(row_dir / ".gpu-locks"), "slots_per_gpu": slots, "shared": shared, "weight": weight}
        path = row_dir / f"{name}.spec.json"
        path.write_text(json.dumps(spec))
        log = open(row_dir / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, __file__, "--train-worker", str(path)], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**env, "BENCH_T_SPAWN": repr(time.time())})
        return proc, log, row_dir / f"{name}.json", row_dir / f"{name}.log"

    def run_row(self, s: dict, row: str, limit: float | None = None) -> dict:
        """Start the row's processes (all at once, or one after another for experts_seq) and collect timings;
        kill them after `limit` seconds (default: until the deadline)."""
        env = dict(self.env)
        mps = None
        if row == "experts_mps":
            mps, why = start_mps(s["dir"] / "mps")
            if mps is None:
                return {"row": row, "error": why}
            env.update(mps)
        try:
            jobs = []
            if row == "dense":
                jobs.append(("dense", s["shards"]["dense"], self.config(s, s["dense_blocks"]), self.gpus[:1], 1,
                             False, 1.0))
            else:
                gpus = self.gpus[:1] if row in ("experts_1gpu", "experts_seq") else self.gpus
                n = 1 if row == "experts_seq" else len(SHARES)
                for i, b in enumerate(s["expert_blocks"]):
                    jobs.append((f"expert{i}", s["shards"][f"expert{i}"], self.config(s, b, experts_per_gpu=n),
                                 gpus, n, n > 1, float(b)))
            timeout = max(30.0, min(self.left() - 5, limit or 1e9))
            t_start = time.time()
            results, errors = [], []
            sequential = row == "experts_seq"
            batches = [[j] for j in jobs] if sequential else [jobs]
            for batch in batches:
                procs = [self.spawn(s, row, *job, env=env) for job in batch]
                for proc, log, res, logpath in procs:
                    try:
                        proc.wait(timeout=max(1.0, timeout - (time.time() - t_start)))
                    except subprocess.TimeoutExpired:
                        errors.append(f"killed after {timeout:.0f} s (row time limit)")
                        for p, *_ in procs:
                            if p.poll() is None:
                                p.kill()
                        proc.wait()
                    log.close()
                    if proc.returncode != 0 or not res.exists():
                        tail = [l for l in logpath.read_text(errors="replace").splitlines() if l.strip()][-12:]
                        errors.append(f"{res.stem}: exit {proc.returncode}: " + " | ".join(tail)[-1500:])
                    else:
                        results.append(json.loads(res.read_text()))
                if errors:
                    break
            t_end = time.time()
        finally:
            if mps is not None:
                stop_mps(mps)
        for out in (s["dir"] / row).glob("expert*"):  # saved models: free the disk for the next rows
            if out.is_dir():
                shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(s["dir"] / row / "dense", ignore_errors=True)
        if errors:
            return {"row": row, "error": "\n".join(errors)}
        span = max(r["t_done"] for r in results) - min(r["t_first_step"] for r in results)
        return {"row": row, "processes": len(results), "gpus_used": sorted({r["gpu"] for r in results if r["gpu"] is not None}),
                "wall_s": t_end - t_start, "span_s": span, "tokens": sum(r["tokens"] for r in results),
                "steps": sorted({r["steps"] for r in results}), "per_process": results,
                "startup_s": max(r["t_first_step"] - r["t_spawn"] for r in results)}

    def micro_table(self, sizes: list[str], prepared: dict) -> list[dict]:
        jobs = []
        for size in sizes:
            s = prepared.get(size) or self.prepare(size)
            prepared[size] = s
            steps = max(6, int(self.args.micro_steps * (1 if not self.args.cpu else 0.5)))
            for micro in MICRO[size] + ["auto"]:
                if micro != "auto" and micro > s["dense_blocks"]:
                    continue
                jobs.append({"init": s["init"], "shard": s["shards"]["dense"], "out": str(s["dir"] / f"micro-{micro}"),
                             "config": self.config(s, s["dense_blocks"], micro=micro, steps=steps),
                             "meta": {"size": size, "global_blocks": s["dense_blocks"], "micro": micro,
                                      "seq": s["seq"], "n_params": s["n_params"]}})
        spec_path = self.work / "micro.spec.json"
        result = self.work / "micro.json"
        deadline = time.time() + self.left() - 5 if self.args.deadline else 0
        spec_path.write_text(json.dumps({"jobs": jobs, "gpus": self.gpus[:1], "result": str(result),
                                         "deadline_unix": deadline}))
        log = self.work / "micro.log"
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, __file__, "--micro-worker", str(spec_path)], cwd=ROOT, stdout=f,
                                  stderr=subprocess.STDOUT, env=self.env, timeout=max(30, self.left()))
        if proc.returncode != 0 or not result.exists():
            return [{"error": "micro-batch worker failed: " + log.read_text(errors="replace")[-1500:]}]
        return json.loads(result.read_text())


def start_mps(folder: Path) -> tuple[dict | None, str]:
    """Start a private CUDA MPS control daemon (its own pipe and log folders, so no other process of the host
    uses it); returns the environment its clients need, or None and why not."""
    ctl = shutil.which("nvidia-cuda-mps-control")
    if ctl is None:
        return None, "nvidia-cuda-mps-control not found: no MPS on this host"
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run([ctl, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"nvidia-cuda-mps-control -d failed: {e}"
    if r.returncode != 0:
        return None, f"nvidia-cuda-mps-control -d exited {r.returncode}: {(r.stderr or r.stdout).strip()[:300]}"
    time.sleep(1.0)
    return env, ""


def stop_mps(env: dict) -> None:
    ctl = shutil.which("nvidia-cuda-mps-control")
    if ctl:
        try:
            subprocess.run([ctl], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=60)
        except (OSError, subprocess.SubprocessError):
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="7m,small,base")
    ap.add_argument("--rows", default="dense,experts,experts_mps", help="dense, experts, experts_mps, experts_1gpu, "
                    "experts_seq (comma separated; ratios need dense, or experts_1gpu for the 2-GPU figure)")
    ap.add_argument("--micro-table", default="7m,base", help="sizes of the micro-batch table ('' = none)")
    ap.add_argument("--micro-steps", type=int, default=12, help="steps per micro-batch setting")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs the experts row spreads over (0..N-1)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every size's step count")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--deadline", type=float, default=0, help="start nothing after this many seconds (0 = none)")
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU: size 'tiny', few steps")
    ap.add_argument("--train-worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--micro-worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_expert_phase.json"))
    args = ap.parse_args()
    if args.train_worker:
        return train_worker(args.train_worker)
    if args.micro_worker:
        return micro_worker(args.micro_worker)
    if args.cpu:
        args.sizes = "tiny" if args.sizes == ap.get_default("sizes") else args.sizes
        args.micro_table = "tiny" if args.micro_table == ap.get_default("micro_table") else args.micro_table
        args.rows = args.rows.replace("experts_mps", "").strip(",")

    bench = Bench(args)
    report = {"args": vars(args), "shares": SHARES, "sizes": {}, "micro": []}
    prepared: dict = {}
    rows = [r for r in args.rows.split(",") if r]
    for size in [s for s in args.sizes.split(",") if s]:
        report["sizes"][size] = {"rows": {}}
        if bench.left() < 30:
            report["sizes"][size]["skipped"] = "deadline"
            continue
        s = prepared[size] = bench.prepare(size)
        report["sizes"][size].update(n_params=s["n_params"], seq=s["seq"], dense_blocks=s["dense_blocks"],
                                     expert_blocks=s["expert_blocks"], steps=s["steps"])
        for row in rows:
            dense = report["sizes"][size]["rows"].get("dense", {})
            need = 2.5 * dense["wall_s"] if "wall_s" in dense else 30
            if bench.left() < need:
                report["sizes"][size]["rows"][row] = {"row": row, "error": f"not started (--deadline, {bench.left():.0f} s left)"}
                continue
            # a row that hangs (e.g. MPS clients that cannot reach their server) must not eat the other sizes' time
            r = bench.run_row(s, row, limit=max(60.0, 5 * dense["wall_s"]) if "wall_s" in dense else None)
            report["sizes"][size]["rows"][row] = r
            print(f"{size} {row}: " + json.dumps({k: v for k, v in r.items() if k != "per_process"})[:700], flush=True)
    micro_sizes = [m for m in args.micro_table.split(",") if m]
    if micro_sizes and bench.left() > 20:
        report["micro"] = bench.micro_table(micro_sizes, prepared)
    report["wall_s"] = time.time() - bench.t0
    print_tables(report)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    shutil.rmtree(bench.work, ignore_errors=True)


def print_tables(report: dict) -> None:
    import torch

    args = report["args"]
    device = "cpu"
    for sz in report["sizes"].values():
        for r in sz.get("rows", {}).values():
            if r.get("per_process"):
                device = r["per_process"][0]["device"]
    print(f"\n{device}; torch {torch.__version__}; eager; --micro-batch-size auto; vocab {args['vocab']}; "
          f"shares {SHARES}; bench wall {report['wall_s']:.0f} s\n")
    print("| model | params | row | processes | GPUs | steps | tokens | phase wall s | training span s | "
          "× dense (span) | × dense (wall) | micro-batches |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for size, sz in report["sizes"].items():
        if "skipped" in sz:
            print(f"| {size} | | skipped ({sz['skipped']}) | | | | | | | | | |")
            continue
        rows = sz["rows"]
        ref = rows.get("dense") if "error" not in rows.get("dense", {"error": 1}) else None
        if ref is None and "experts_1gpu" in rows and "error" not in rows["experts_1gpu"]:
            ref = rows["experts_1gpu"]
        for name, r in rows.items():
            if "error" in r:
                print(f"| {size} | {sz['n_params'] / 1e6:.1f}M | {name} | failed: {r['error'].splitlines()[0][:160]} "
                      "| | | | | | | | |")
                continue
            ratio = lambda k: f"{r[k] / ref[k]:.2f}×" if ref else "-"  # noqa: E731
            micro = ", ".join(sorted({"+".join(map(str, p["micro_batches"])) for p in r["per_process"]},
                                     key=lambda v: -sum(map(int, v.split("+")))))
            print(f"| {size} | {sz['n_params'] / 1e6:.1f}M | {name} | {r['processes']} | {len(r['gpus_used']) or '-'} | "
                  f"{'/'.join(map(str, r['steps']))} | {r['tokens'] / 1e6:.2f}M | {r['wall_s']:.1f} | "
                  f"{r['span_s']:.1f} | {ratio('span_s')} | {ratio('wall_s')} | {micro} |")
    if report["micro"]:
        print("\n| model | params | global batch (blocks × seq) | micro-batch | micro-batches per step | tokens/s | "
              "× best hand-picked | peak GiB |")
        print("|---|---:|---|---|---|---:|---:|---:|")
        by_size: dict = {}
        for r in report["micro"]:
            by_size.setdefault(r.get("size"), []).append(r)
        for size, rs in by_size.items():
            best = max((r["tokens_per_s"] for r in rs if r.get("micro") != "auto" and "tokens_per_s" in r), default=None)
            for r in rs:
                if "error" in r:
                    print(f"| {size} | | | {r.get('micro')} | failed: {r['error'][:160]} | | | |")
                    continue
                sizes = r["micro_batches"]
                split = f"{len(sizes)} × {sizes[0]}" if len(set(sizes)) == 1 else "+".join(map(str, sizes))
                label = f"auto → {max(sizes)}" if r["micro"] == "auto" else str(r["micro"])
                rel = f"{r['tokens_per_s'] / best:.3f}" if best else "-"
                print(f"| {size} | {r['n_params'] / 1e6:.1f}M | {r['global_blocks']} × {r['seq']} | {label} | {split} | "
                      f"{r['tokens_per_s'] / 1e6:.3f}M | {rel} | {r['peak_gib']:.1f} |")


if __name__ == "__main__":
    main()
