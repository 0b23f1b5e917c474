"""Warm-GPU timing of BalancedKMeans on 1M × 100, 20 iterations, from the input types the pipeline hands it, next
to a plain torch Lloyd loop in the same process; optionally against an earlier kmeans.py.

`bench_kmeans.py` times each method once in a fresh process, so its first rows include CUDA start-up and
allocator growth; this script warms up with one small fit first and repeats each setting. Data: a 100-d Gaussian
mixture of 32 components with Zipf weights (numpy seed 0), and with --tfidf a matrix of document vectors (e.g.
TF-IDF-SVD(100) of corpus_dev train saved as .npy) resampled to n rows with σ=0.01 jitter.

Inputs (--inputs), each fitted with the class's defaults as `fit_clusters` calls it:
  tensor   a float32 tensor already on the device (no transfer: the solver alone)
  numpy    a float32 numpy array in host memory
  memmap   the same matrix saved as .npy and opened with mmap_mode='r' — what `FitClusters` passes (page-cached)
The `lloyd` row is a plain torch Lloyd loop (distances by one GEMM, argmin, centroid means by a one-hot GEMM) from
the device tensor, same k and iterations: the floor any k-means on this data can reach. The table gives each
row's min and median wall time over --reps fits and its ratio to the Lloyd loop's min, and checks that the
numpy/memmap fits give the tensor fit's centroids. With --baseline, the BalancedKMeans of that file (an earlier
version of clustering/kmeans.py) is timed in turn with the current one, from the device tensor.

  python3 bench/bench_kmeans_warm.py                              # k=64: tensor, numpy, memmap, lloyd
  python3 bench/bench_kmeans_warm.py --ks 16,64,128 --exact-iters 0,2 --reps 3 --baseline old_kmeans.py \\
      --tfidf tfidf_train.npy
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clustering import BalancedKMeans  # noqa: E402


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


def lloyd(x: torch.Tensor, k: int, n_iter: int = 20, seed: int = 0) -> torch.Tensor:
    """Plain Lloyd k-means from k random points of x (n, d) on its device; returns the centroids (k, d)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone()  # (k, d)
    x2 = torch.einsum("ij,ij->i", x, x)  # (n,)
    for _ in range(n_iter):
        d = torch.addmm((c * c).sum(1)[None, :], x, c.T, alpha=-2.0).add_(x2[:, None])  # (n, k)
        a = d.argmin(1)  # (n,)
        onehot = torch.zeros((k, x.shape[0]), device=x.device)
        onehot.scatter_(0, a[None, :], 1.0)
        counts = onehot.sum(1)  # (k,)
        c = torch.where(counts[:, None] > 0, (onehot @ x) / counts.clamp_min(1)[:, None], c)
    return c


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--ks", default="64")
    p.add_argument("--exact-iters", default="2", help="BalancedKMeans exact_iters values (default 2 = the class's)")
    p.add_argument("--inputs", default="tensor,numpy,memmap,lloyd")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline", default=None, help="an earlier clustering/kmeans.py to time in turn")
    p.add_argument("--tfidf", default=None, help=".npy of document vectors, resampled to --n rows")
    p.add_argument("--device", default="cuda")
    p.add_argument("--deadline", type=float, default=0, help="start no fit after this many seconds (0 = none)")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kmeans_warm.json"))
    args = p.parse_args()
    t_start = time.time()
    impls = {"current": BalancedKMeans}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_kmeans", args.baseline)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        impls["baseline"] = mod.BalancedKMeans
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    inputs = [v for v in args.inputs.split(",") if v]
    datasets = {"mixture": mixture(args.n, args.dim)}
    if args.tfidf:
        datasets["tfidf"] = resampled(args.tfidf, args.n)
    tmp = Path(tempfile.mkdtemp(prefix="bench_kmeans_warm"))
    warm = datasets["mixture"][: min(args.n, 100_000)]
    for cls in impls.values():  # warm-up: CUDA context, kernels, allocator, pinned staging buffers
        for x in (torch.from_numpy(warm).to(dev), warm):
            cls(64, n_iter=5, backend="torch", device=args.device, verbose=False).fit(x)
    lloyd(torch.from_numpy(warm).to(dev), 64, 5)
    sync()
    results: dict[tuple, list] = {}
    centroids: dict[tuple, np.ndarray] = {}
    for name, xn in datasets.items():
        xt = torch.from_numpy(xn).to(dev)
        np.save(tmp / f"{name}.npy", xn)
        xm = np.load(tmp / f"{name}.npy", mmap_mode="r")
        float(np.asarray(xm).sum(dtype=np.float64))  # read the whole file once: page-cached, as in a pipeline run
        source = {"tensor": xt, "numpy": xn, "memmap": xm}
        for k in [int(v) for v in args.ks.split(",")]:
            for ex in [int(v) for v in args.exact_iters.split(",")]:
                for rep in range(args.reps):
                    for inp in inputs:
                        for impl, cls in impls.items():
                            if inp == "lloyd" and impl != "current" or impl != "current" and inp != "tensor":
                                continue
                            if args.deadline and time.time() - t_start > args.deadline:
                                break
                            sync()
                            t = time.perf_counter()
                            if inp == "lloyd":
                                c = lloyd(xt, k)
                                sync()
                                wall, inertia, sizes = time.perf_counter() - t, float("nan"), "-"
                            else:
                                km = cls(k, n_iter=20, backend="torch", device=args.device, seed=0, exact_iters=ex,
                                         verbose=False).fit(source[inp])
                                sync()
                                wall, inertia, sizes = time.perf_counter() - t, km.inertia_, f"{min(km.sizes_)}-{max(km.sizes_)}"
                                if impl == "current":
                                    centroids[(name, k, ex, inp)] = km.centroids
                            key = (name, k, ex if inp != "lloyd" else "-", inp, impl)
                            results.setdefault(key, []).append((wall, inertia))
                            print(f"{name} k={k} exact_iters={key[2]} input={inp} {impl} wall={wall:.3f}s "
                                  f"inertia={inertia:.4f} sizes={sizes}", flush=True)
        del xt, source, xm
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"\n{device_name}, torch {torch.__version__}, n={args.n:,} × {args.dim}, 20 iterations, "
          f"min/median of {args.reps} warm fits")
    print("| data | k | exact_iters | input | version | wall s min | median | × Lloyd (min) | inertia | centroids = tensor fit's |")
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---|")
    rows = []
    for (name, k, ex, inp, impl), r in results.items():
        w = np.array([v[0] for v in r])
        ref = results.get((name, k, "-", "lloyd", "current"))
        ratio = f"{w.min() / min(v[0] for v in ref):.2f}×" if ref and inp != "lloyd" else "-"
        same = "-"
        if inp in ("numpy", "memmap") and (name, k, ex, "tensor") in centroids:
            diff = float(np.abs(centroids[(name, k, ex, inp)] - centroids[(name, k, ex, "tensor")]).max())
            same = "yes" if diff == 0 else f"max |Δ| {diff:.1e}"
        print(f"| {name} | {k} | {ex} | {inp} | {impl} | {w.min():.3f} | {np.median(w):.3f} | {ratio} | "
              f"{r[0][1]:.4f} | {same} |")
        rows.append({"data": name, "k": k, "exact_iters": ex, "input": inp, "version": impl,
                     "walls": w.tolist(), "ratio_to_lloyd": ratio, "centroids_equal": same})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": device_name, "n": args.n, "dim": args.dim, "rows": rows,
                                           "wall_s": time.time() - t_start}, indent=2))


if __name__ == "__main__":
    main()
