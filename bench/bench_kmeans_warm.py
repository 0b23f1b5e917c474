"""Warm-GPU timing of BalancedKMeans on 1M × 100, k = 64, 20 iterations, for exact_iters = 0, 1, 2.

`bench_kmeans.py` times each method once in a fresh process, so its first rows include CUDA start-up and
allocator growth; this script warms up with one small fit first and repeats each setting twice. Data: a
100-d Gaussian mixture of 32 components with Zipf weights. Prints one line per fit.

  python3 bench/bench_kmeans_warm.py
"""
import time

import numpy as np
import torch

from clustering.kmeans import BalancedKMeans

rng = np.random.default_rng(0)
n, d, comps = 1_000_000, 100, 32
w = 1 / np.arange(1, comps + 1)
w /= w.sum()
means = rng.normal(0, 1.5, (comps, d))
x = torch.from_numpy((means[rng.choice(comps, n, p=w)] + rng.normal(0, 1, (n, d))).astype(np.float32)).cuda()
BalancedKMeans(64, n_iter=5, backend="torch", device="cuda", verbose=False).fit(x[:100000])  # warm-up
for ex in (0, 1, 2, 0, 1, 2):
    torch.cuda.synchronize()
    t = time.perf_counter()
    km = BalancedKMeans(64, n_iter=20, backend="torch", device="cuda", seed=0, exact_iters=ex, verbose=False).fit(x)
    torch.cuda.synchronize()
    print(f"exact_iters={ex} wall={time.perf_counter() - t:.3f}s inertia={km.inertia_:.3f} "
          f"sizes={min(km.sizes_)}-{max(km.sizes_)}")
