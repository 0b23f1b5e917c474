"""The clusterers: balanced k-means for c-BTM clusters (on GPU or CPU, at corpus scale) and the ablation baselines.

c-BTM (Gururangan et al. 2023, §2.2) clusters TF-IDF document embeddings with *balanced* k-means, so every expert
sees about the same amount of data.

- `BalancedKMeans`: Lloyd iterations whose assignment step solves the capacitated assignment problem
  (sizes within a tolerance) with dual prices + exact greedy repair (`clustering.balanced`); with per-point
  weights (document lengths) the sizes are weighted.
- `UnbalancedKMeans`: plain Lloyd (one GEMM + argmin per iteration), the speed floor and an ablation.
- `RandomClusters`: uniform random assignment, the paper's random-cluster control.

A search backend (`clustering.search`: torch or faiss) computes squared distances to the centroids; the
balancing, centroid update and bookkeeping are shared torch code that runs on the same device, so both backends
give the same result up to floating-point ties. `save` / `load` write and read `centroids.npy` + `config.json`.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch

from clustering.balanced import (DAMP, Scratch, balanced_assign, capped_assign, cluster_sizes, relaxed_prices,
                                 size_bounds, weighted_size_bounds)
from clustering.inputs import BATCH_BYTES, check_matrix, check_weights, rows_to_device, take_rows
from clustering.search import FaissSearch, TorchSearch, cluster_of, faiss_has_gpu, sqnorms, to_dense
from corpus.device import resolve_device
from corpus.io import InputError, read_json, write_json
from corpus.layout import CENTROIDS

log = logging.getLogger(__name__)

_RELAX_STEPS = 4  # at most this many dual steps per intermediate Lloyd iteration
_PRICE_SAMPLE = 1024  # intermediate dual steps use a fixed sample of max(16384, 1024·k) fitted points


class Clusterer:
    """Shared parts: backend/device choice, k-means++ init, streaming predict, save/load."""

    algorithm = "base"

    def __init__(
        self,
        n_clusters: int,
        n_iter: int = 20,
        backend: str = "auto",
        device: str = "auto",
        seed: int = 0,
        fit_sample: int = 1_000_000,
        n_candidates: int = 32,
        batch_size: int | None = None,
        verbose: bool = True,
    ):
        if int(n_clusters) < 1:
            raise InputError(f"n_clusters must be ≥ 1, got {n_clusters}")
        if backend not in ("auto", "faiss", "torch"):
            raise InputError(f"backend must be auto, faiss or torch, got {backend!r}")
        if int(n_iter) < 0:
            raise InputError(f"n_iter must be ≥ 0, got {n_iter}")
        if int(fit_sample) < 1:
            raise InputError(f"fit_sample must be ≥ 1, got {fit_sample}")
        self.n_clusters, self.n_iter, self.seed = int(n_clusters), int(n_iter), int(seed)
        self.fit_sample, self.n_candidates, self.batch_size = int(fit_sample), int(n_candidates), batch_size
        self.backend_request, self.device_request, self.verbose = backend, str(device), verbose
        self.centroids: np.ndarray | None = None  # (k, d) float32
        self.labels_: np.ndarray | None = None  # (n_fit,) cluster of each fitted (sampled) point
        self.sizes_: list[int] | None = None
        self.inertia_: float | None = None
        self.fit_seconds_: float | None = None
        self._resolve()

    # -- device / backend ------------------------------------------------------------------------------------
    def _resolve(self) -> None:
        self.device = resolve_device(self.device_request).device
        backend = self.backend_request
        if backend == "auto":
            if self.device.type == "cuda":
                backend = "torch"
            else:
                try:
                    import faiss  # noqa: F401

                    backend = "faiss"
                except ImportError:
                    backend = "torch"
        if backend == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise InputError("backend='faiss' needs faiss: pip install faiss-cpu (or cbtm[gpu]), "
                                 "or use backend='torch'") from None
            if self.device.type == "cuda" and not faiss_has_gpu():
                raise InputError(f"backend='faiss' with device={self.device_request!r} needs a faiss GPU build: "
                                 "pip install 'cbtm[gpu]' (faiss-gpu), or use backend='torch' on the GPU")
        self.backend = backend

    def _searcher(self, centroids: torch.Tensor):
        if self.backend == "faiss":
            return FaissSearch(centroids, self.n_candidates, gpu=self.device.type == "cuda")
        return TorchSearch(centroids)

    def _batch_rows(self, dim: int) -> int:
        if self.batch_size:
            return int(self.batch_size)
        return max(1024, BATCH_BYTES // (4 * (dim + self.n_clusters)))

    def _centroids_t(self) -> torch.Tensor:
        if self.centroids is None:
            raise InputError(f"{type(self).__name__} is not fitted yet: call fit(x) or load(dir) first")
        return torch.from_numpy(self.centroids).to(self.device)

    def _check_dim(self, x: Any) -> None:
        if x.shape[1] != self.centroids.shape[1]:
            raise InputError(f"x has dimension {x.shape[1]} but the centroids have {self.centroids.shape[1]} "
                             "(embeddings from a different embedder?)")

    # -- fitting helpers ---------------------------------------------------------------------------------------
    def _fit_sample(self, x: Any) -> tuple[torch.Tensor, np.ndarray]:
        x = check_matrix(x)
        n = x.shape[0]
        if n == 0:
            raise InputError("cannot cluster an empty matrix (0 documents)")
        if self.n_clusters > n:
            raise InputError(f"n_clusters={self.n_clusters} is larger than the number of documents ({n})")
        rng = np.random.default_rng(self.seed)
        idx = np.arange(n) if n <= self.fit_sample else np.sort(rng.choice(n, self.fit_sample, replace=False))
        if n > self.fit_sample:
            log.info("fitting on a sample of %d of %d documents", self.fit_sample, n)
        return take_rows(x, idx, self.device), idx

    def _init_centroids(self, xs: torch.Tensor) -> torch.Tensor:
        """Greedy k-means++ (Arthur & Vassilvitskii 2007; 2+log k local trials as in scikit-learn) on a seeded
        subsample of ≤ max(10k, 40k) points, in numpy on the CPU so every backend starts from the same centroids."""
        k = self.n_clusters
        rng = np.random.default_rng(self.seed + 1)
        n = xs.shape[0]
        s = min(n, max(10_000, 40 * k))
        sub = np.sort(rng.choice(n, s, replace=False)) if s < n else np.arange(n)
        pts = xs[torch.as_tensor(sub, device=xs.device)].cpu().numpy().astype(np.float64)  # (s, d)
        p2 = (pts * pts).sum(1)
        trials = 2 + int(math.log(k)) if k > 1 else 1
        chosen = [int(rng.integers(s))]
        closest = np.maximum(p2 - 2 * pts @ pts[chosen[0]] + p2[chosen[0]], 0)  # (s,)
        for _ in range(1, k):
            total = closest.sum()
            if total <= 0:  # fewer distinct points than clusters: duplicates are fine
                cand = rng.integers(s, size=trials)
            else:
                cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * total).clip(max=s - 1)
            dc = np.maximum(p2[None, :] - 2 * pts[cand] @ pts.T + p2[cand, None], 0)  # (trials, s)
            pot = np.minimum(closest[None, :], dc).sum(1)
            best = int(np.argmin(pot))
            chosen.append(int(cand[best]))
            closest = np.minimum(closest, dc[best])
        return torch.from_numpy(pts[chosen].astype(np.float32)).to(xs.device)  # (k, d)

    @staticmethod
    def _update(xs: torch.Tensor, assign: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroid step c_j = mean{x_i : a(i) = j}; empty clusters keep their old centroid. Returns (c, counts).

        The sums are the sparse one-hot product S = A·X, A (k, n) with A[a(i), i] = 1: on CPU scipy's CSC product
        (one pass adding each row to its cluster's sum, as faiss does; a dense one-hot GEMM costs k× the adds), on
        CUDA a dense one-hot GEMM in chunks (deterministic, unlike index_add_'s atomics)."""
        k, d = old.shape
        n = xs.shape[0]
        counts = torch.bincount(assign, minlength=k)  # (k,)
        if xs.device.type == "cpu":
            idx = np.int32 if n < 1 << 31 else np.int64
            onehot = scipy.sparse.csc_array((np.ones(n, np.float32), assign.numpy().astype(idx),
                                             np.arange(n + 1, dtype=idx)), shape=(k, n))  # (k, n)
            sums = torch.from_numpy(np.asarray(onehot @ xs.numpy(), dtype=np.float32))  # (k, d)
        else:
            sums = torch.zeros((k, d), dtype=torch.float32, device=xs.device)
            step = max(1, (1 << 26) // k)
            for s in range(0, n, step):
                a = assign[s : s + step]
                onehot = torch.zeros((k, a.numel()), dtype=torch.float32, device=xs.device)
                onehot.scatter_(0, a[None, :], 1.0)
                sums += onehot @ xs[s : s + step]  # (k, d)
        new = sums / counts.clamp_min(1)[:, None].to(torch.float32)
        return torch.where((counts > 0)[:, None], new, old), counts

    def _finish_fit(self, c: torch.Tensor, assign: torch.Tensor, dist: torch.Tensor, t0: float) -> None:
        k = self.n_clusters
        self.centroids = c.detach().cpu().numpy().astype(np.float32)
        self.labels_ = assign.cpu().numpy()
        self.sizes_ = torch.bincount(assign, minlength=k).cpu().tolist()
        self.inertia_ = float(dist.double().mean())
        self.fit_seconds_ = time.perf_counter() - t0
        if self.verbose:
            log.info("%s: k=%d sizes %d..%d, inertia %.5f, %.2fs (%s on %s)", self.algorithm, k, min(self.sizes_),
                     max(self.sizes_), self.inertia_, self.fit_seconds_, self.backend, self.device)

    def _log_iter(self, it: int, counts: torch.Tensor, t0: float) -> None:
        if self.verbose and ((it + 1) % 5 == 0 or it + 1 == self.n_iter):
            el = time.perf_counter() - t0
            log.debug("iter %d/%d sizes %d..%d (%.1f it/s)", it + 1, self.n_iter, int(counts.min()),
                      int(counts.max()), (it + 1) / max(el, 1e-9))

    # -- prediction ----------------------------------------------------------------------------------------------
    def _stream(self, x: Any, fn, desc: str) -> None:
        """Call fn(start, stop, xb) for consecutive row batches of x (numpy, memmap or torch)."""
        n = x.shape[0]
        step = self._batch_rows(x.shape[1])
        bar = None
        if self.verbose and n > step:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=desc, unit="doc", mininterval=2.0)
        for s in range(0, n, step):
            e = min(n, s + step)
            fn(s, e, rows_to_device(x, s, e, self.device))
            if bar is not None:
                bar.update(e - s)
        if bar is not None:
            bar.close()

    def predict(self, x: Any, return_distance: bool = False, out_distances: np.ndarray | None = None):
        """Nearest centroid for every row of x (n, dim), streamed in batches (x may be a memory-mapped .npy).

        Returns labels (n,) int64, or (labels, distance (n,) float32 squared distance to that centroid) with
        return_distance; `out_distances` (n, n_clusters) float32, if given (e.g. an open_memmap), receives all
        squared distances."""
        x = check_matrix(x)
        c = self._centroids_t()
        self._check_dim(x)
        search = self._searcher(c)
        n = x.shape[0]
        labels = np.empty(n, dtype=np.int64)
        dist = np.empty(n, dtype=np.float32)

        def step(s, e, xb):
            if out_distances is not None:
                d = search.full(xb)  # (b, k)
                out_distances[s:e] = d.cpu().numpy()
                v, a = d.min(1)
            else:
                cd, ci = search.candidates(xb)
                v, p = cd.min(1)
                a = cluster_of(ci, p)
            labels[s:e] = a.cpu().numpy()
            dist[s:e] = v.cpu().numpy()

        self._stream(x, step, "predict")
        return (labels, dist) if return_distance else labels

    def squared_distances(self, x: Any, out: np.ndarray | None = None) -> np.ndarray:
        """All squared distances (n, n_clusters) float32, streamed; written into `out` when given."""
        x = check_matrix(x)
        if out is None:
            out = np.empty((x.shape[0], self.n_clusters), dtype=np.float32)
        self.predict(x, out_distances=out)
        return out

    # -- persistence ---------------------------------------------------------------------------------------------
    def _config(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "n_clusters": self.n_clusters,
            "dim": None if self.centroids is None else int(self.centroids.shape[1]),
            "n_iter": self.n_iter,
            "seed": self.seed,
            "fit_sample": self.fit_sample,
            "backend": self.backend,
            "n_candidates": self.n_candidates,
            "sizes": self.sizes_,
            "inertia": self.inertia_,
            "fit_seconds": self.fit_seconds_,
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write `centroids.npy` (k, dim) float32 and `config.json` into out_dir (created; no pickle)."""
        if self.centroids is None:
            raise InputError(f"{type(self).__name__} is not fitted yet: nothing to save")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        np.save(out_dir / CENTROIDS, self.centroids.astype(np.float32))
        extra = self._extra_arrays()
        for name, arr in extra.items():
            np.save(out_dir / f"{name}.npy", arr)
        write_json(out_dir / "config.json", self._config())
        return out_dir

    def _extra_arrays(self) -> dict[str, np.ndarray]:
        return {}

    @classmethod
    def load(cls, in_dir: str | Path, device: str = "auto", backend: str = "auto") -> "Clusterer":
        """Load what `save` wrote; returns the class named in config.json (BalancedKMeans, ...)."""
        in_dir = Path(in_dir)
        cfg = read_json(in_dir / "config.json")
        kind = _CLASSES.get(cfg.get("algorithm"))
        if kind is None:
            raise InputError(f"{in_dir / 'config.json'}: unknown clustering algorithm {cfg.get('algorithm')!r}")
        if cls is not Clusterer and not issubclass(kind, cls):
            raise InputError(f"{in_dir} holds a {kind.__name__}, not a {cls.__name__}")
        try:
            centroids = np.load(in_dir / CENTROIDS, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {in_dir / 'centroids.npy'}: {e}") from None
        if centroids.ndim != 2 or centroids.shape[0] != cfg["n_clusters"]:
            raise InputError(f"{in_dir / 'centroids.npy'} has shape {centroids.shape}, expected "
                             f"({cfg['n_clusters']}, dim)")
        obj = kind._from_config(cfg, device=device, backend=backend)
        obj.centroids = centroids
        obj.sizes_, obj.inertia_, obj.fit_seconds_ = cfg.get("sizes"), cfg.get("inertia"), cfg.get("fit_seconds")
        obj._load_extra(in_dir)
        return obj

    @classmethod
    def _from_config(cls, cfg: dict, device: str, backend: str):
        return cls(cfg["n_clusters"], n_iter=cfg.get("n_iter", 20), backend=backend, device=device,
                   seed=cfg.get("seed", 0), fit_sample=cfg.get("fit_sample", 1_000_000),
                   n_candidates=cfg.get("n_candidates", 32))

    def _load_extra(self, in_dir: Path) -> None:
        pass


class BalancedKMeans(Clusterer):
    """Balanced k-means: Lloyd iterations whose assignment step keeps cluster sizes within `balance`.

    Objective: min Σ_i ‖x_i − c_a(i)‖²  s.t.  lo ≤ |{i : a(i)=j}| ≤ hi for every cluster j, with (lo, hi) from
    `size_bounds` (max/min ≤ balance; balance=1 → exactly ⌊n/k⌋/⌈n/k⌉). Each of the n_iter Lloyd iterations:
    squared distances to the centroids (torch GEMM, or faiss) into one reused (n, k) buffer, an assignment, then
    the mean update. The assignment of the first n_iter − exact_iters iterations is approximate: ≤ 4 damped dual
    (price) steps (`relaxed_prices`, warm-started, on a fixed sample of max(16384, 1024·k) points), then one
    vectorised capped assignment (`capped_assign`: argmin of distance + price, overfull clusters shed their
    lowest-regret points); sizes are near, not within, the bounds. The last
    `exact_iters` iterations (default 2: fewer strand centroids on skewed data) and the final assignment w.r.t.
    the final centroids run the exact `balanced_assign` (dual steps + greedy repair), so the fitted sizes meet
    the bounds exactly. On CPU the per-cluster order statistics are numpy partitions and the big temporaries
    live in reused buffers (`Scratch`); they select the same points as the sorting (CUDA) path.

    c-BTM (Gururangan et al. 2023) uses the auction assignment of BASE layers (Lewis et al. 2021), which solves the
    same problem by letting clusters bid for their n/k best points; here the dual is solved per cluster in closed
    form (e-th smallest regret), which costs a few passes over the (n, k) cost matrix instead of hundreds of
    auction rounds — see bench/RESULTS.md for the measured comparison.

    With per-point weights (fit(x, weights)), the capacities are weighted: lo ≤ Σ_{a(i)=j} w_i ≤ hi
    (`weighted_size_bounds`) and every step above takes the weights (prices per unit of weight); without weights
    each point weighs 1 and the sizes are counts.

    fit(x) fits on a seeded sample of ≤ fit_sample rows; predict(x) streams nearest-centroid assignment;
    assign_balanced(x) streams the capacity-aware assignment of a whole corpus (sizes within `balance` at
    corpus scale, not only on the sample).
    """

    algorithm = "balanced"

    def __init__(self, n_clusters: int, n_iter: int = 20, balance: float = 1.02, backend: str = "auto",
                 device: str = "auto", seed: int = 0, fit_sample: int = 1_000_000, n_candidates: int = 32,
                 price_steps: int = 2, batch_size: int | None = None, verbose: bool = True, exact_iters: int = 2):
        if not (balance >= 1.0):
            raise InputError(f"balance is the allowed max/min cluster-size ratio and must be ≥ 1, got {balance}")
        self.balance, self.price_steps = float(balance), int(price_steps)
        self.exact_iters = max(0, int(exact_iters))  # final Lloyd iterations that use the exact balanced_assign
        self.prices_: np.ndarray | None = None  # (k,) final dual prices, a warm start for assign_balanced
        self.weighted = False  # fitted with per-point weights: prices_ are per unit of weight
        self.weighted_sizes_: list[float] | None = None  # weighted sizes of the fitted sample
        self.max_weight_: float | None = None  # largest weight seen in fit (widens the weighted bounds)
        super().__init__(n_clusters, n_iter=n_iter, backend=backend, device=device, seed=seed,
                         fit_sample=fit_sample, n_candidates=n_candidates, batch_size=batch_size, verbose=verbose)

    def fit(self, x: Any, weights: Any = None) -> "BalancedKMeans":
        """Fit on x (n, dim) numpy/memmap/torch, float16/32. Sets centroids, labels_ (of the sample), sizes_,
        inertia_ (mean squared distance of the sample to its assigned centroid), prices_.

        weights (n,) > 0, optional: per-point weights (e.g. document lengths); the balance then holds for the
        weighted sizes Σ_{a(i)=j} w_i (`weighted_size_bounds`, weighted_sizes_) instead of point counts, with
        prices per unit of weight. The centroids stay plain means of their points."""
        t0 = time.perf_counter()
        if weights is not None:
            weights = check_weights(weights, check_matrix(x).shape[0])
        xs, idx = self._fit_sample(x)  # (n, d) float32 on device
        n, k = xs.shape[0], self.n_clusters
        x2 = sqnorms(xs)  # (n,)
        c = self._init_centroids(xs)  # (k, d)
        w = None if weights is None else torch.from_numpy(weights[idx].astype(np.float32)).to(self.device)  # (n,)
        self.weighted = w is not None
        prices = torch.zeros(k, dtype=torch.float32, device=self.device)
        # intermediate dual steps on a fixed seeded sample of the fitted points (bounds for that many points)
        ns = min(n, max(16_384, _PRICE_SAMPLE * k))
        sub = None if ns == n else torch.from_numpy(
            np.sort(np.random.default_rng(self.seed + 2).choice(n, ns, replace=False))).to(self.device)
        ws = w if w is None or sub is None else w[sub]
        lo, hi = self._bounds(n, w)
        lo_s, hi_s = self._bounds(ns, ws)
        eps, damp = None, torch.full((k,), DAMP, device=self.device)
        buf = None  # all k distances (n, k) when the searcher computes them: one buffer for every iteration
        scratch = Scratch()
        buf_s = None if sub is None else torch.empty((ns, k), dtype=torch.float32, device=self.device)
        for it in range(self.n_iter):
            cd, ci = self._searcher(c).candidates(xs, x2, out=buf)
            buf = cd if ci is None else None
            d = to_dense(cd, ci, k)  # (n, k)
            if eps is None:
                eps = 1e-6 * float(d.amin(1).mean()) + 1e-12  # tie-breaking price increment
                if w is not None:
                    eps /= float(w.mean())  # prices are per unit of weight
            if it >= self.n_iter - self.exact_iters:  # last iterations: exact bounds, so no centroid is stranded
                assign, _, prices = balanced_assign(xs, c, cd, ci, lo, hi, prices, self.price_steps, x2, scratch, w)
            else:
                ds = d if sub is None else torch.index_select(d, 0, sub, out=buf_s)
                prices, damp = relaxed_prices(ds, prices, damp, lo_s, hi_s, _RELAX_STEPS, eps, scratch=scratch, w=ws)
                assign = capped_assign(d, prices, hi, overwrite=True, scratch=scratch, w=w)  # nearly balanced; d spent
            del d, cd, ci
            c, counts = self._update(xs, assign, c)
            self._log_iter(it, counts, t0)
        # the final assignment w.r.t. the final centroids is the only one that must meet the bounds exactly
        cd, ci = self._searcher(c).candidates(xs, x2, out=buf)
        assign, dist, prices = balanced_assign(xs, c, cd, ci, lo, hi, prices, self.price_steps, x2, scratch, w)
        self.prices_ = prices.cpu().numpy().astype(np.float32)
        self.weighted_sizes_ = None if w is None else cluster_sizes(assign, w, k).cpu().tolist()
        self.max_weight_ = None if weights is None else float(weights.max())
        self._finish_fit(c, assign, dist, t0)
        return self

    def _bounds(self, n: int, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Size bounds (lo, hi) (k,) for n points: counts (`size_bounds`, int64), or weighted sizes
        (`weighted_size_bounds`, float64) when weights w (n,) are given."""
        k = self.n_clusters
        if w is None:
            lo, hi = size_bounds(n, k, self.balance)
            dtype = torch.long
        else:
            lo, hi = weighted_size_bounds(float(w.double().sum()), float(w.max()), k, self.balance)
            dtype = torch.float64
        return (torch.full((k,), lo, dtype=dtype, device=self.device),
                torch.full((k,), hi, dtype=dtype, device=self.device))

    def assign_balanced(self, x: Any, return_distance: bool = False, out_distances: np.ndarray | None = None,
                        weights: Any = None):
        """Capacity-aware assignment of a whole corpus x (n, dim), streamed in batches.

        After N documents have been assigned, cluster j holds between LO(N) and HI(N) of them (`size_bounds` for
        N): each batch of b rows gets per-cluster bounds lo_j = max(0, LO(N+b) − count_j), hi_j = HI(N+b) −
        count_j and is solved with `balanced_assign`, warm-started from the fitted prices. So the final sizes obey
        the tolerance over the whole corpus. With weights (n,) the same holds for weighted sizes: the bounds are
        `weighted_size_bounds` of the weight assigned so far (widened by the largest weight of x) and each batch
        is solved with its weights. Returns labels (n,) int64 [, distance (n,) float32]; fills
        out_distances (n, n_clusters) when given."""
        x = check_matrix(x)
        if weights is not None:
            weights = check_weights(weights, x.shape[0])
        c = self._centroids_t()
        self._check_dim(x)
        k, n = self.n_clusters, x.shape[0]
        if k > n:
            raise InputError(f"n_clusters={k} is larger than the number of documents to assign ({n})")
        search = self._searcher(c)
        labels = np.empty(n, dtype=np.int64)
        dist = np.empty(n, dtype=np.float32)
        if weights is None:
            sizes = torch.zeros(k, dtype=torch.long, device=self.device)  # points assigned to each cluster so far
        else:
            sizes = torch.zeros(k, dtype=torch.float64, device=self.device)  # their weight
            cum = np.concatenate([[0.0], np.cumsum(weights)])  # (n + 1,) weight of the first N points
            w_max = float(weights.max())
        warm = self.prices_ is not None and (weights is None or self.weighted)  # weighted: prices per unit of weight
        prices = torch.from_numpy(self.prices_ if warm else np.zeros(k, np.float32)).to(self.device)

        def step(s, e, xb):
            nonlocal prices
            if weights is None:
                lo_n, hi_n = size_bounds(e, k, self.balance)
                wb = None
            else:
                lo_n, hi_n = weighted_size_bounds(float(cum[e]), w_max, k, self.balance)
                wb = torch.from_numpy(weights[s:e].astype(np.float32)).to(self.device)
            lo, hi = (lo_n - sizes).clamp_min(0), hi_n - sizes
            if out_distances is not None:
                cd, ci = search.full(xb), None
                out_distances[s:e] = cd.cpu().numpy()
            else:
                cd, ci = search.candidates(xb)
            a, d, prices = balanced_assign(xb, c, cd, ci, lo, hi, prices, self.price_steps, w=wb)
            sizes.add_(cluster_sizes(a, wb, k))
            labels[s:e] = a.cpu().numpy()
            dist[s:e] = d.cpu().numpy()

        self._stream(x, step, "assign_balanced")
        return (labels, dist) if return_distance else labels

    def _config(self) -> dict:
        cfg = {**super()._config(), "balance": self.balance, "price_steps": self.price_steps,
               "size_bounds_fit": None if self.sizes_ is None else
               list(size_bounds(sum(self.sizes_), self.n_clusters, self.balance))}
        if self.weighted:
            cfg.update(weighted=True, weighted_sizes=self.weighted_sizes_, max_weight=self.max_weight_,
                       size_bounds_fit=list(weighted_size_bounds(sum(self.weighted_sizes_), self.max_weight_,
                                                                 self.n_clusters, self.balance)))
        return cfg

    def _extra_arrays(self) -> dict[str, np.ndarray]:
        return {} if self.prices_ is None else {"prices": self.prices_.astype(np.float32)}

    @classmethod
    def _from_config(cls, cfg: dict, device: str, backend: str):
        return cls(cfg["n_clusters"], n_iter=cfg.get("n_iter", 20), balance=cfg.get("balance", 1.02),
                   backend=backend, device=device, seed=cfg.get("seed", 0),
                   fit_sample=cfg.get("fit_sample", 1_000_000), n_candidates=cfg.get("n_candidates", 32),
                   price_steps=cfg.get("price_steps", 2))

    def _load_extra(self, in_dir: Path) -> None:
        p = in_dir / "prices.npy"
        self.prices_ = np.load(p, allow_pickle=False).astype(np.float32) if p.exists() else None
        cfg = read_json(in_dir / "config.json")
        self.weighted = bool(cfg.get("weighted", False))
        self.weighted_sizes_, self.max_weight_ = cfg.get("weighted_sizes"), cfg.get("max_weight")


class UnbalancedKMeans(Clusterer):
    """Plain Lloyd k-means (Lloyd 1982): a(i) = argmin_j ‖x_i − c_j‖², c_j = mean of its points. Same interface
    and init as BalancedKMeans; an empty cluster is re-seeded with the point farthest from its centroid."""

    algorithm = "unbalanced"

    def fit(self, x: Any) -> "UnbalancedKMeans":
        t0 = time.perf_counter()
        xs, _ = self._fit_sample(x)
        x2 = sqnorms(xs)
        c = self._init_centroids(xs)
        for it in range(self.n_iter + 1):
            cd, ci = self._searcher(c).candidates(xs, x2)
            dist, p = cd.min(1)
            assign = cluster_of(ci, p)
            if it == self.n_iter:
                break
            c, counts = self._update(xs, assign, c)
            empty = (counts == 0).nonzero().squeeze(1)
            if empty.numel():
                far = dist.topk(empty.numel()).indices
                c[empty] = xs[far]
            self._log_iter(it, counts, t0)
        self._finish_fit(c, assign, dist, t0)
        return self

    def assign_balanced(self, x: Any, **kw):
        raise InputError("assign='balanced' needs a balanced clusterer; refit with clusterer='balanced'")


class RandomClusters(Clusterer):
    """The paper's random-cluster control: each document gets a uniformly random cluster_id (seeded); centroids
    are the means of the randomly assigned points so that routing code still has centroids to use."""

    algorithm = "random"

    def fit(self, x: Any) -> "RandomClusters":
        t0 = time.perf_counter()
        xs, _ = self._fit_sample(x)
        n, k = xs.shape[0], self.n_clusters
        assign = torch.from_numpy(self.random_labels(n)).to(self.device)
        c, _ = self._update(xs, assign, torch.zeros((k, xs.shape[1]), device=self.device))
        dist = ((xs - c[assign]) ** 2).sum(1)
        self._finish_fit(c, assign, dist, t0)
        return self

    def random_labels(self, n: int, salt: int = 0) -> np.ndarray:
        """n uniform random cluster ids in [0, k), seeded by (seed, salt)."""
        return np.random.default_rng([self.seed, salt]).integers(0, self.n_clusters, size=n)

    def assign_balanced(self, x: Any, **kw):
        raise InputError("assign='balanced' needs a balanced clusterer; refit with clusterer='balanced'")


_CLASSES = {"balanced": BalancedKMeans, "unbalanced": UnbalancedKMeans, "random": RandomClusters}


def load_clusterer(clusters_dir: str | Path, device: str = "auto", backend: str = "auto") -> Clusterer:
    """Load a clusterer saved by `fit_clusters` / `.save` (class chosen from config.json)."""
    return Clusterer.load(clusters_dir, device=device, backend=backend)
