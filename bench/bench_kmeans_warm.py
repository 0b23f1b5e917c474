"""Warm-GPU timing of BalancedKMeans on 1M × 100, 20 iterations, optionally against an earlier kmeans.py.

`bench_kmeans.py` times each method once in a fresh process, so its first rows include CUDA start-up and
allocator growth; this script warms up with one small fit first and repeats each setting. Data: a 100-d Gaussian
mixture of 32 components with Zipf weights (numpy seed 0), and with --tfidf a matrix of document vectors (e.g.
TF-IDF-SVD(100) of corpus_dev train saved as .npy) resampled to n rows with σ=0.01 jitter. With --baseline, the
BalancedKMeans of that file (an earlier version of clustering/kmeans.py) is timed in turn with the current one, on
the same data in the same process. Prints one line per fit, then the min and median per setting.

  python3 bench/bench_kmeans_warm.py                                  # k=64, exact_iters 0, 1, 2 (version 3)
  python3 bench/bench_kmeans_warm.py --ks 16,64,128 --exact-iters 2 --reps 3 --baseline old_kmeans.py \\
      --tfidf tfidf_train.npy
"""
import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering.kmeans import BalancedKMeans  # noqa: E402


def mixture(n: int, d: int = 100, comps: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = 1 / np.arange(1, comps + 1)
    w /= w.sum()
    means = rng.normal(0, 1.5, (comps, d))
    return (means[rng.choice(comps, n, p=w)] + rng.normal(0, 1, (n, d))).astype(np.float32)


def resampled(path: str, n: int) -> np.ndarray:
    base = np.load(path).astype(np.float32)  # (n_docs, d)
    rng = np.random.default_rng(0)
    x = base[rng.integers(len(base), size=n)]
    return x + rng.normal(0, 0.01, x.shape).astype(np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--ks", default="64")
    p.add_argument("--exact-iters", default="0,1,2")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--baseline", default=None, help="an earlier clustering/kmeans.py to time in turn")
    p.add_argument("--tfidf", default=None, help=".npy of document vectors, resampled to --n rows")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    impls = {"current": BalancedKMeans}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_kmeans", args.baseline)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        impls["baseline"] = mod.BalancedKMeans
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    datasets = {"mixture": mixture(args.n)}
    if args.tfidf:
        datasets["tfidf"] = resampled(args.tfidf, args.n)
    for cls in impls.values():  # warm-up: CUDA context, kernels, allocator
        cls(64, n_iter=5, backend="torch", device=args.device, verbose=False).fit(
            torch.from_numpy(datasets["mixture"][:100_000]).to(dev))
    results: dict[tuple, list] = {}
    for name, xn in datasets.items():
        x = torch.from_numpy(xn).to(dev)
        for k in [int(v) for v in args.ks.split(",")]:
            for ex in [int(v) for v in args.exact_iters.split(",")]:
                for rep in range(args.reps):
                    for impl, cls in impls.items():
                        sync()
                        t = time.perf_counter()
                        km = cls(k, n_iter=20, backend="torch", device=args.device, seed=0, exact_iters=ex,
                                 verbose=False).fit(x)
                        sync()
                        wall = time.perf_counter() - t
                        results.setdefault((name, k, ex, impl), []).append((wall, km.inertia_))
                        print(f"{name} k={k} exact_iters={ex} {impl} wall={wall:.3f}s inertia={km.inertia_:.4f} "
                              f"sizes={min(km.sizes_)}-{max(km.sizes_)}", flush=True)
        del x
    print(f"\n| data | k | exact_iters | version | wall s min | median | inertia |  ({args.device}, n={args.n:,})")
    print("|---|---:|---:|---|---:|---:|---:|")
    for (name, k, ex, impl), r in results.items():
        w = np.array([v[0] for v in r])
        print(f"| {name} | {k} | {ex} | {impl} | {w.min():.3f} | {np.median(w):.3f} | {r[0][1]:.4f} |")


if __name__ == "__main__":
    main()
