"""Resume after a real kill on the GPU: does a killed `train_model` run end with the loss curve of an
uninterrupted one, within floating-point noise?

Four fresh processes train the same scratch Llama (same seed, same shard, train_model's GPU defaults: compiled
model and optimizer update, bf16 weights with fp32 masters) with a checkpoint every `--checkpoint-every` steps:
`full` and `full2` run uninterrupted (their difference is the GPU's own run-to-run noise); `killed` SIGKILLs
itself right after step `--kill-at`; `resumed` is the same command run again, which continues from the last
checkpoint. The shard is a learnable synthetic stream (a sparse random Markov chain over the vocabulary), so the
loss falls from ln V towards the chain's entropy.

    python bench/bench_resume.py --preset small --steps 60 --checkpoint-every 20 --kill-at 30
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def markov_shard(path: Path, n_blocks: int, seq: int, vocab: int, seed: int = 0) -> None:
    """n_blocks × seq tokens of a first-order chain in which every token has 4 possible successors."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 4))
    choice = rng.integers(0, 4, size=n_blocks * seq)
    tokens = np.empty(n_blocks * seq, dtype=np.int64)
    tokens[0] = 0
    for i in range(1, len(tokens)):
        tokens[i] = successors[tokens[i - 1], choice[i]]
    np.save(path, tokens.astype(np.uint16).reshape(n_blocks, seq))


def child(args) -> None:
    import torch

    from experts.model import build_scratch_model
    from experts.training import TrainConfig, train_model

    cfg = TrainConfig(train_tokens=args.steps * args.batch * args.seq, micro_batch_size=args.micro,
                      global_batch_tokens=args.batch * args.seq, lr=1e-3, min_lr=1e-4, warmup_steps=5, log_every=0,
                      checkpoint_every=args.checkpoint_every, device=args.device, seed=0)

    def on_step(done, state):
        if args.child == "killed" and done == args.kill_at:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a node failure would

    model = build_scratch_model(args.preset, args.vocab, seq_len=args.seq, seed=0)
    train_model(model, [args.shard], args.out, cfg, on_step=on_step)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--kill-at", type=int, default=30)
    ap.add_argument("--device", default="cuda", help="cpu: a quick check of the script itself (exact there)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--shard", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="bench_resume"))
    shard = work / "cluster_000.npy"
    markov_shard(shard, args.steps * args.batch, args.seq, args.vocab)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, __file__, "--preset", args.preset, "--vocab", str(args.vocab), "--seq", str(args.seq),
            "--batch", str(args.batch), "--micro", str(args.micro), "--steps", str(args.steps),
            "--checkpoint-every", str(args.checkpoint_every), "--kill-at", str(args.kill_at), "--shard", str(shard),
            "--device", args.device]
    for name, out in (("full", "full"), ("full2", "full2"), ("killed", "resumed"), ("resumed", "resumed")):
        proc = subprocess.run(base + ["--child", name, "--out", str(work / out)], env=env, capture_output=True, text=True)
        killed = proc.returncode == -signal.SIGKILL
        print(f"{name}: exit {proc.returncode}{' (SIGKILL)' if killed else ''}", flush=True)
        if proc.returncode != 0 and not (name == "killed" and killed):
            sys.exit(proc.stderr[-3000:])
        if name == "killed":
            ckpt = work / "resumed.ckpt" / "trainer_state.json"
            print(f"  checkpoint left at step {json.loads(ckpt.read_text())['step']}, no output folder: "
                  f"{not (work / 'resumed').exists()}", flush=True)

    runs = {n: json.loads((work / n / "training.json").read_text()) for n in ("full", "full2", "resumed")}
    weights = {n: load_file(str(work / n / "model.safetensors")) for n in runs}
    print(f"\npreset {args.preset}, {args.steps} steps of {args.batch}x{args.seq} tokens, checkpoint every "
          f"{args.checkpoint_every}, killed after step {args.kill_at}; resumed_at {runs['resumed']['resumed_at']}\n")
    print("| comparison | steps | max abs Δ loss | mean abs Δ loss | final loss | max abs Δ weight / max abs weight |")
    print("|---|---:|---:|---:|---|---:|")
    for label, a, b in (("full vs full2 (run-to-run noise)", "full", "full2"),
                        ("full vs killed + resumed", "full", "resumed")):
        la = np.array([l for _, l in runs[a]["loss_curve"]])
        lb = np.array([l for _, l in runs[b]["loss_curve"]])
        assert [s for s, _ in runs[a]["loss_curve"]] == [s for s, _ in runs[b]["loss_curve"]]
        d = np.abs(la - lb)
        scale = max(float(w.abs().max()) for w in weights[a].values())
        dw = max(float((weights[a][k].float() - weights[b][k].float()).abs().max()) for k in weights[a]) / scale
        print(f"| {label} | {len(la)} | {d.max():.2e} | {d.mean():.2e} | {la[-1]:.4f} / {lb[-1]:.4f} | {dw:.1e} |")
    first, last = runs["full"]["loss_curve"][0][1], runs["full"]["loss_curve"][-1][1]
    print(f"\nloss of the uninterrupted run: step 1 {first:.3f} → step {args.steps} {last:.3f}")


if __name__ == "__main__":
    main()
