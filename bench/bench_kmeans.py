"""Benchmark: balanced k-means (this project, each backend) vs the c-BTM auction vs unbalanced Lloyd / faiss.Kmeans.

Same data for every method in one run; reports wall time, ratio to the unbalanced torch Lloyd of the same run,
inertia (mean squared distance of the fitted points to their assigned centroid) and max/min cluster size (of the
balanced assignment during fit; "nearest" = sizes when the fitted centroids assign by nearest centroid).
Optional parts: encoder throughput (EncoderEmbedder vs plain SentenceTransformer.encode defaults) and NMI of
TF-IDF vs encoder clusters on corpus_dev (label = source). Prints markdown tables; --out writes JSON lines.
On CPU, `--repeat R` runs R rounds of faiss.Kmeans followed by each balanced backend and reports the min and median
over rounds of balanced / faiss.Kmeans (same round, same process), the figure for the "≤ 3× faiss.Kmeans" target
on a machine whose load varies.

  python bench/bench_kmeans.py --device cpu --sizes 200000 --ks 16 --data mixture --backends faiss,torch \
      --auction-max-n 0 --repeat 3
  python bench/bench_kmeans.py --device cuda --sizes 50000,1000000 --ks 8,16,64,128 --big 10000000 --encoder --nmi
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from clustering import BalancedKMeans, UnbalancedKMeans, size_bounds  # noqa: E402

ROWS: list[dict] = []
OUT = None


def emit(row: dict) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    if OUT:
        with open(OUT, "a") as f:
            f.write(json.dumps(row) + "\n")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def mixture(n: int, d: int, n_comp: int, seed: int, device) -> torch.Tensor:
    """Gaussian mixture, unequal component sizes (Zipf weights ∝ 1/rank), unit variance, means N(0, 1.5²)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = 1.0 / torch.arange(1, n_comp + 1, dtype=torch.float64)
    comp = torch.multinomial(w / w.sum(), n, replacement=True, generator=g).to(device)
    mu = (torch.randn(n_comp, d, generator=g) * 1.5).to(device)
    gd = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=gd, device=device)
    return x.add_(mu[comp])


def read_jsonl(path: Path, field: str, limit: int | None = None) -> list[str]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)[field])
            if limit and len(out) >= limit:
                break
    return out


def tfidf_vectors(corpus: Path, n: int, seed: int, device) -> torch.Tensor:
    """TF-IDF-SVD(100) vectors of corpus_dev train; resampled with jitter (σ=0.01) when n > #docs."""
    from clustering.embed import TfidfEmbedder

    texts = read_jsonl(corpus / "train.jsonl.gz", "text")
    key = ("tfidf", len(texts))
    if key not in _CACHE:
        emb = TfidfEmbedder(n_components=100, seed=seed).fit(texts)
        _CACHE[key] = torch.from_numpy(emb.transform(texts))
    base = _CACHE[key]
    if n <= len(base):
        return base[:n].to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(len(base), (n,), generator=g)
    x = base.to(device)[idx.to(device)]
    return x.add_(0.01 * torch.randn(x.shape, device=device))


_CACHE: dict = {}


def sizes_str(sizes) -> str:
    s = np.asarray(sizes)
    return f"{s.min()}–{s.max()} ({s.max() / max(s.min(), 1):.3f})"


def run_config(data_name, x, k, args, device):
    n = x.shape[0]
    base = {"data": data_name, "n": n, "k": k, "device": str(device)}
    # unbalanced torch Lloyd: the GEMM floor
    sync(device)
    t = time.perf_counter()
    u = UnbalancedKMeans(k, n_iter=args.n_iter, backend="torch", device=str(device), seed=0, verbose=False,
                         fit_sample=n).fit(x)
    sync(device)
    t_ref = time.perf_counter() - t
    emit({**base, "method": "unbalanced Lloyd (torch)", "seconds": t_ref, "ratio": 1.0, "inertia": u.inertia_,
          "sizes": sizes_str(u.sizes_)})
    with_faiss = "faiss" in args.backends and n <= args.faiss_max_n
    backends = [b for b in args.backends if not (b == "faiss" and (device.type == "cuda" or n > args.faiss_max_n))]
    rounds: dict[str, list[float]] = {"faiss.Kmeans": [], **{b: [] for b in backends}}
    for rep in range(args.repeat if with_faiss else 1):  # faiss.Kmeans then each backend, in every round
        if with_faiss:
            t_f, inertia, sizes = fit_faiss(x, k, args)
            rounds["faiss.Kmeans"].append(t_f)
            if rep == 0:
                emit({**base, "method": "faiss.Kmeans (unbalanced, CPU)", "seconds": t_f, "ratio": t_f / t_ref,
                      "inertia": inertia, "sizes": sizes})
        for backend in backends:
            sync(device)
            t = time.perf_counter()
            b = BalancedKMeans(k, n_iter=args.n_iter, balance=args.balance, backend=backend, device=str(device),
                               seed=0, verbose=False, fit_sample=n).fit(x)
            sync(device)
            tb = time.perf_counter() - t
            rounds[backend].append(tb)
            if rep == 0:
                near = np.bincount(b.predict(x), minlength=k)
                emit({**base, "method": f"balanced ({backend}, this project)", "seconds": tb, "ratio": tb / t_ref,
                      "inertia": b.inertia_, "sizes": sizes_str(b.sizes_), "nearest_sizes": sizes_str(near),
                      "bounds": size_bounds(n, k, args.balance)})
    if with_faiss:
        for backend in backends:
            r = np.array(rounds[backend]) / np.array(rounds["faiss.Kmeans"])
            emit({**base, "part": "vs_faiss", "backend": backend, "rounds": len(r), "ratio_min": float(r.min()),
                  "ratio_median": float(np.median(r)), "balanced_s": rounds[backend],
                  "faiss_s": rounds["faiss.Kmeans"]})
    # the c-BTM auction (BASE layers assignment), n truncated to a multiple of k
    from reference_auction import auction_kmeans

    if n > args.auction_max_n:
        emit({**base, "method": "c-BTM auction (reimpl.)", "skipped": f"n > {args.auction_max_n}: the official "
              "code fits 50k batches one after another; see the 50k rows"})
        return
    m = (n // k) * k
    xa = x[:m].to(device)
    sync(device)
    t = time.perf_counter()
    try:
        _, assign, inertia = auction_kmeans(xa, k, n_iter=args.n_iter, time_budget_s=args.auction_budget_s)
        sync(device)
        ta = time.perf_counter() - t
        emit({**base, "n": m, "method": "c-BTM auction (reimpl.)", "seconds": ta, "ratio": ta / t_ref,
              "inertia": inertia, "sizes": sizes_str(torch.bincount(assign, minlength=k).cpu().numpy())})
    except TimeoutError as e:
        emit({**base, "n": m, "method": "c-BTM auction (reimpl.)", "skipped": f"over {args.auction_budget_s}s ({e})"})


def fit_faiss(x, k, args) -> tuple[float, float, str]:
    """faiss.Kmeans (CPU, every point used) on x: (wall seconds of train, inertia, sizes string)."""
    import faiss

    xn = x.cpu().numpy()
    t = time.perf_counter()
    km = faiss.Kmeans(x.shape[1], k, niter=args.n_iter, seed=1, max_points_per_centroid=1 << 30)
    km.train(xn)
    t_f = time.perf_counter() - t
    dist, lab = km.index.search(xn, 1)
    return t_f, float(dist.mean()), sizes_str(np.bincount(lab[:, 0], minlength=k))


def run_big(args, device):
    n = args.big
    x = mixture(n, 100, 32, seed=1, device=torch.device("cpu"))  # host RAM; streamed to the GPU in batches
    k = 64
    t = time.perf_counter()
    b = BalancedKMeans(k, n_iter=args.n_iter, balance=args.balance, backend="torch", device=str(device),
                       verbose=False, fit_sample=1_000_000).fit(x)
    t_fit = time.perf_counter() - t
    t = time.perf_counter()
    lab = b.predict(x)
    t_pred = time.perf_counter() - t
    t = time.perf_counter()
    labb = b.assign_balanced(x)
    t_bal = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    emit({"data": "mixture", "n": n, "k": k, "method": "balanced torch: fit 1M sample + predict + assign_balanced",
          "fit_s": t_fit, "predict_s": t_pred, "assign_balanced_s": t_bal, "peak_gpu_gib": peak,
          "nearest_sizes": sizes_str(np.bincount(lab, minlength=k)),
          "balanced_sizes": sizes_str(np.bincount(labb, minlength=k))})


def run_encoder(args, device):
    from sentence_transformers import SentenceTransformer

    from clustering.embed import EncoderEmbedder, default_encoder_path

    texts = read_jsonl(Path(args.texts or Path(args.corpus) / "train.jsonl.gz"), "text", limit=args.encoder_docs)
    path = args.encoder_model or str(default_encoder_path())
    enc = EncoderEmbedder(path, device=str(device), batch_size=args.encoder_batch)
    enc.transform(texts[:64])
    sync(device)
    t = time.perf_counter()
    a = enc.transform(texts)
    sync(device)
    t_ours = time.perf_counter() - t
    st = SentenceTransformer(path, device=str(device), model_kwargs={"dtype": torch.float32})  # the model's fp32
    st.encode(texts[:64])
    sync(device)
    t = time.perf_counter()
    b = st.encode(texts)  # defaults: batch_size 32, fp32, max_seq_length of the model (256)
    sync(device)
    t_st = time.perf_counter() - t
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    emit({"part": "encoder", "docs": len(texts), "device": str(device),
          "EncoderEmbedder_docs_per_s": len(texts) / t_ours, "SentenceTransformer_encode_docs_per_s": len(texts) / t_st,
          "speedup": t_st / t_ours, "min_cosine_vs_st": float((a * b).sum(1).min())})


def run_nmi(args, device):
    from sklearn.metrics import normalized_mutual_info_score

    from clustering.embed import EncoderEmbedder, TfidfEmbedder

    corpus = Path(args.texts or Path(args.corpus) / "train.jsonl.gz")
    texts = read_jsonl(corpus, "text")
    labels = read_jsonl(corpus, "source")
    if args.nmi_docs and args.nmi_docs < len(texts):
        idx = np.sort(np.random.default_rng(0).choice(len(texts), args.nmi_docs, replace=False))
        texts, labels = [texts[i] for i in idx], [labels[i] for i in idx]
    embs = {}
    for name in args.nmi_embedders.split(","):
        t = time.perf_counter()
        if name == "tfidf":
            embs[name] = (TfidfEmbedder(n_components=100).fit(texts).transform(texts), 0.0)
        else:
            embs[name] = (EncoderEmbedder(args.encoder_model, device=str(device),
                                          batch_size=args.encoder_batch).transform(texts), 0.0)
        embs[name] = (embs[name][0], time.perf_counter() - t)
    for k in args.nmi_ks:
        for name, (x, t_emb) in embs.items():
            for cls in ("balanced", "unbalanced"):
                model = (BalancedKMeans(k, device=str(device), verbose=False) if cls == "balanced"
                         else UnbalancedKMeans(k, device=str(device), verbose=False)).fit(x)
                emit({"part": "nmi", "docs": len(texts), "k": k, "embedder": name, "clusterer": cls,
                      "nmi": float(normalized_mutual_info_score(labels, model.labels_)),
                      "embed_s": t_emb})


def tables():
    vs = [r for r in ROWS if r.get("part") == "vs_faiss"]
    if vs:
        print("\n| data | n | k | backend | rounds | balanced / faiss.Kmeans, min | median | balanced s | faiss.Kmeans s |")
        print("|---|---:|---:|---|---:|---:|---:|---|---|")
        for r in vs:
            print(f"| {r['data']} | {r['n']:,} | {r['k']} | {r['backend']} | {r['rounds']} | {r['ratio_min']:.2f} | "
                  f"{r['ratio_median']:.2f} | {', '.join(f'{v:.2f}' for v in r['balanced_s'])} | "
                  f"{', '.join(f'{v:.2f}' for v in r['faiss_s'])} |")
    km = [r for r in ROWS if "method" in r and "seconds" in r or r.get("skipped")]
    if km:
        print("\n| data | n | k | method | wall s | × unbalanced torch | inertia | sizes min–max (max/min) | nearest-centroid sizes |")
        print("|---|---:|---:|---|---:|---:|---:|---|---|")
        for r in km:
            if r.get("skipped"):
                print(f"| {r['data']} | {r['n']:,} | {r['k']} | {r['method']} | skipped: {r['skipped']} | | | | |")
            else:
                print(f"| {r['data']} | {r['n']:,} | {r['k']} | {r['method']} | {r['seconds']:.3f} | "
                      f"{r['ratio']:.2f} | {r['inertia']:.4f} | {r['sizes']} | {r.get('nearest_sizes', '')} |")
    for r in ROWS:
        if "fit_s" in r:
            print(f"\n10M: {json.dumps(r)}")
        if r.get("part") == "encoder":
            print(f"\n| encoder ({r['device']}, {r['docs']} docs) | docs/s |\n|---|---:|\n"
                  f"| EncoderEmbedder | {r['EncoderEmbedder_docs_per_s']:.0f} |\n"
                  f"| SentenceTransformer.encode defaults | {r['SentenceTransformer_encode_docs_per_s']:.0f} |")
    nmi = [r for r in ROWS if r.get("part") == "nmi"]
    if nmi:
        print("\n| docs | k | embedder | clusterer | NMI vs source |\n|---:|---:|---|---|---:|")
        for r in nmi:
            print(f"| {r['docs']} | {r['k']} | {r['embedder']} | {r['clusterer']} | {r['nmi']:.3f} |")


def main():
    global OUT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--sizes", default="50000")
    p.add_argument("--ks", default="16")
    p.add_argument("--data", default="mixture,tfidf")
    p.add_argument("--backends", default="torch,faiss")
    p.add_argument("--n-iter", type=int, default=20)
    p.add_argument("--repeat", type=int, default=1, help="rounds of faiss.Kmeans + each balanced backend (CPU): "
                   "min and median of balanced / faiss.Kmeans over the rounds")
    p.add_argument("--balance", type=float, default=1.02)
    p.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus_dev"))
    p.add_argument("--auction-max-n", type=int, default=50_000)
    p.add_argument("--auction-budget-s", type=float, default=60.0)
    p.add_argument("--faiss-max-n", type=int, default=1_000_000)
    p.add_argument("--big", type=int, default=0, help="also fit 1M sample + predict this many points (GPU)")
    p.add_argument("--encoder", action="store_true")
    p.add_argument("--encoder-docs", type=int, default=20_000)
    p.add_argument("--encoder-batch", type=int, default=256)
    p.add_argument("--nmi", action="store_true")
    p.add_argument("--nmi-docs", type=int, default=0, help="0 = whole train split")
    p.add_argument("--nmi-ks", default="8")
    p.add_argument("--skip-kmeans", action="store_true")
    p.add_argument("--texts", default=None, help="jsonl.gz with text/source for --encoder/--nmi (default corpus train)")
    p.add_argument("--encoder-model", default=None, help="sentence-transformers dir (default: packaged MiniLM)")
    p.add_argument("--nmi-embedders", default="tfidf,encoder")
    p.add_argument("--price-steps-sweep", default="", help="e.g. 0,1,2,4: time 1M×100 k=64 mixture per setting")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    OUT = args.out
    from corpus.device import resolve_device

    device = resolve_device(args.device).device
    args.backends = [b for b in args.backends.split(",") if b]
    args.nmi_ks = [int(k) for k in args.nmi_ks.split(",")]
    print(f"# device {device} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}",
          flush=True)
    if not args.skip_kmeans:
        for data in args.data.split(","):
            for n in [int(s) for s in args.sizes.split(",")]:
                x = mixture(n, 100, 32, seed=0, device=device) if data == "mixture" else \
                    tfidf_vectors(Path(args.corpus), n, 0, device)
                for k in [int(s) for s in args.ks.split(",")]:
                    try:
                        run_config(data, x, k, args, device)
                    except Exception as e:  # keep going: one failure must not lose the rest of the run
                        emit({"data": data, "n": n, "k": k, "method": "error", "skipped": repr(e)[:200]})
                del x
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if args.price_steps_sweep:
        x = mixture(1_000_000, 100, 32, seed=0, device=device)
        for ps in [int(v) for v in args.price_steps_sweep.split(",")]:
            for rep in range(2):
                sync(device)
                t = time.perf_counter()
                b = BalancedKMeans(64, n_iter=args.n_iter, balance=args.balance, backend="torch", device=str(device),
                                   verbose=False, fit_sample=1_000_000, price_steps=ps).fit(x)
                sync(device)
                emit({"part": "price_steps", "price_steps": ps, "rep": rep, "seconds": time.perf_counter() - t,
                      "inertia": b.inertia_, "sizes": sizes_str(b.sizes_)})
        del x
    if args.encoder:
        run_encoder(args, device)
    if args.nmi:
        run_nmi(args, device)
    if args.big:
        try:
            run_big(args, device)
        except Exception as e:
            emit({"method": "big", "data": "mixture", "n": args.big, "k": 64, "skipped": repr(e)[:300]})
    tables()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
