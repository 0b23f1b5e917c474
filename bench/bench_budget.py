"""What `--compute-match steps` costs in throughput: `train_model` at the dense batch and at experts' shares of it.

Under steps matching every expert runs the dense model's steps with a global batch of b_j = share_j × B blocks,
usually not a multiple of the micro-batch (its last micro-batch is smaller: one more compiled shape). This trains
the same scratch preset on random tokens for `--steps` optimizer steps at B and at each b_j of `--shares`
(default: 8 proportional shares like those of a real corpus) and prints tokens/s, seconds per step and the plan
(micro-batch, accumulation, last micro-batch); the first `--warmup` steps (compilation) are not timed.

    python bench/bench_budget.py --device cuda --preset mini --batch-blocks 128 --micro 32   # one H200: ~3 min
    python bench/bench_budget.py --device cpu --preset tiny --batch-blocks 8 --micro 4 --seq 64 --steps 4 --warmup 1
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=0, help="block length; 0 = the preset's")
    ap.add_argument("--batch-blocks", type=int, default=128, help="the dense batch B in blocks")
    ap.add_argument("--micro", type=int, default=32, help="--micro-batch-size")
    ap.add_argument("--shares", default="0.061,0.083,0.097,0.118,0.124,0.139,0.176,0.202")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    args = ap.parse_args()

    from experts.budget import apportion
    from experts.model import build_scratch_model, get_preset
    from experts.training import TrainConfig, plan_training, train_model

    seq = args.seq or get_preset(args.preset).seq_len
    shares = [float(s) for s in args.shares.split(",")]
    shares = [s / sum(shares) for s in shares]
    batches = [("dense", args.batch_blocks)] + [(f"expert {j} (share {s:.3f})", b)
                                                for j, (s, b) in enumerate(zip(shares, apportion(args.batch_blocks, shares)))]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "cluster_000.npy"
        n_blocks = max(b for _, b in batches) * (args.steps + 1)
        np.save(shard, np.random.default_rng(0).integers(0, args.vocab, (n_blocks, seq)).astype(np.uint16))
        for name, b in batches:
            times = []
            cfg = TrainConfig(train_tokens=args.steps * b * seq, global_batch_tokens=b * seq,
                              micro_batch_size=args.micro, device=args.device, warmup_steps=0, log_every=0,
                              checkpoint_every=0, lr=1e-3, min_lr=1e-4)
            plan = plan_training(cfg, seq)
            model = build_scratch_model(args.preset, args.vocab, seq_len=seq)
            train_model(model, [str(shard)], Path(tmp) / name.split()[0] / str(b), cfg,
                        on_step=lambda step, state: times.append(time.perf_counter()))
            per_step = (times[-1] - times[args.warmup - 1]) / (len(times) - args.warmup)
            rows.append((name, b, plan.micro_batch_size, plan.grad_accum, plan.micro_batches[-1], b * seq / per_step, per_step))
    print(f"\n{args.preset} on {args.device}, seq {seq}, dense batch {args.batch_blocks} blocks, "
          f"--micro-batch-size {args.micro}, {args.steps} steps ({args.warmup} untimed)\n")
    print("| model | batch (blocks) | micro | accum | last micro | tokens/s | s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b, micro, accum, last, tps, sps in rows:
        print(f"| {name} | {b} | {micro} | {accum} | {last} | {tps:,.0f} | {sps:.4f} |")
    dense_sps = rows[0][-1]
    total = sum(r[-1] for r in rows[1:])
    print(f"\nk experts one after another on one device: {total / dense_sps:.2f}× the dense model's time per step "
          "(steps matching assumes each expert on 1/k of the devices, i.e. 1.00×)")


if __name__ == "__main__":
    main()
