"""Merges that survive specialization: every parameter merge and BTX MoE variant of one finished run, side by side.

Reads a run folder of `luigi --module pipeline RunAll` (its seed, experts, dense model, shards, clusters, corpus and
assignments) and scores, on the same seeded sample of test (and valid) documents as `EvaluatePerplexity`:

- seed, dense, the c-BTM top-2 ensemble of the experts;
- each parameter merge of `experts.merge` (average; task_arithmetic, ties, dare_linear, dare_ties with λ chosen on
  the valid shards, or the fixed --lambdas);
- the BTX MoE with attention / norms / embeddings from the experts' average, the seed, or the TIES merge, before
  finetuning and after `finetune_moe` with each budget of --moe-fractions (× the run's --train-tokens).

--expert-tokens N first trains new experts from the run's seed, N tokens each on their cluster's shard (e.g. the
dense model's budget: experts as specialised as the issue's GPU run), --expert-trainable ffn the FlexOlmo way;
everything above then uses those experts. Prints a markdown table; --json writes every number.

    PYTHONPATH=. python bench/bench_merges.py --run-dir runs/demo                         # the demo's experts
    PYTHONPATH=. python bench/bench_merges.py --run-dir runs/demo --expert-tokens 600000   # specialised experts
    PYTHONPATH=. python bench/bench_merges.py --run-dir runs/corpus_dev --device cuda --eval-max-docs 300 \\
        --expert-tokens 30000000 --moe-fractions 0 0.1 0.25 --json $OUT/merges.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def one(run: Path, prefix: str, given: str | None = None) -> Path:
    """The run's single `<prefix>-<hash>` folder (or `given`)."""
    if given:
        return Path(given)
    found = sorted(p for p in run.glob(f"{prefix}-*") if p.is_dir())
    if len(found) != 1:
        raise SystemExit(f"{run}: expected one {prefix}-* folder, found {[p.name for p in found]}; name it with a flag")
    return found[0]


def eval_docs(corpus: Path, assignments: Path, split: str, max_docs: int, seed: int) -> list[dict]:
    """The documents `EvaluatePerplexity.docs` scores: a seeded sample of `max_docs`, with their cluster_id."""
    import pyarrow.parquet as pq

    from corpus.read import parquet_file, read_columns, take_rows

    path = corpus / f"{split}.parquet"
    n = parquet_file(path).metadata.num_rows
    if max_docs and n > max_docs:
        rows = take_rows(path, sorted(np.random.default_rng(seed).choice(n, max_docs, replace=False).tolist()))
    else:
        rows = pq.read_table(path).to_pylist()
    cluster = dict(zip(*read_columns(assignments / f"{split}.parquet", ["id", "cluster_id"]).to_pydict().values()))
    for row in rows:
        row["cluster_id"] = int(cluster[row["id"]])
    return rows


def cluster_texts(corpus: Path, assignments: Path, k: int, per_cluster: int = 32) -> list[list[str]]:
    """Up to `per_cluster` training documents of each cluster (as `MergeExperts.cluster_texts`)."""
    from corpus.read import read_columns, take_rows

    ids = read_columns(assignments / "train.parquet", ["cluster_id"]).column(0).to_pylist()
    rows: list[list[int]] = [[] for _ in range(k)]
    for i, c in enumerate(ids):
        if len(rows[c]) < per_cluster:
            rows[c].append(i)
    texts = iter(r["text"] for r in take_rows(corpus / "train.parquet", [i for g in rows for i in g], ["text"]))
    return [[next(texts) for _ in g] for g in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--work-dir", default=None, help="where merged models go (default <run-dir>/bench-merges)")
    for f in ("seed", "dense", "experts", "shards", "clusters", "embeddings", "corpus", "assignments"):
        ap.add_argument(f"--{f}-dir", default=None, help=f"the run's {f}-<hash> folder when it has several")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-max-docs", type=int, default=80)
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=["average", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
    ap.add_argument("--lambdas", nargs="*", default=["auto"], help="'auto' (chosen on valid shards) and/or numbers")
    ap.add_argument("--density", type=float, default=0.2, help="TIES trim density")
    ap.add_argument("--drop-rate", type=float, default=0.5, help="DARE drop rate")
    ap.add_argument("--weights", choices=("uniform", "sizes"), default="sizes")
    ap.add_argument("--moe-shared", nargs="*", default=["average", "seed", "ties"])
    ap.add_argument("--moe-fractions", type=float, nargs="*", default=[0.0, 0.1, 0.25],
                    help="MoE finetune tokens as fractions of the run's --train-tokens (0 = not finetuned)")
    ap.add_argument("--moe-lr", type=float, default=0.0, help="peak LR of the MoE finetune (0 = the run's)")
    ap.add_argument("--expert-tokens", type=int, default=0, help="train new experts from the seed, N tokens each")
    ap.add_argument("--expert-trainable", choices=("all", "ffn"), default="all")
    ap.add_argument("--no-ensemble", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from experts.ensemble_folder import load_ensemble, save_ensemble_config
    from experts.merge import LAMBDAS, merge_experts, sample_blocks
    from experts.merging import MergeRecipe
    from experts.moe import build_moe, finetune_moe
    from experts.scoring import HFCausalLM
    from experts.training import TrainConfig, train_model
    from tasks.perplexity import evaluate_perplexity

    run = Path(args.run_dir)
    work = Path(args.work_dir or run / "bench-merges")
    work.mkdir(parents=True, exist_ok=True)
    seed_dir, dense_dir = one(run, "seed", args.seed_dir), one(run, "dense", args.dense_dir)
    shards = one(run, "shards", args.shards_dir)
    stage = json.loads((seed_dir / "stage.json").read_text())["params"]
    meta = json.loads((shards / "meta.json").read_text())
    clusters = sorted(int(c) for c in meta["clusters"])
    train_shards = [str(shards / f"cluster_{c:03d}.npy") for c in clusters]
    valid_shards = [str(shards / f"valid_cluster_{c:03d}.npy") for c in clusters
                    if meta["clusters"][str(c)].get("valid", {}).get("n_blocks", 0) > 0]
    lr = stage.get("learning_rate") or 3e-4

    def train_config(tokens: int, **kw) -> TrainConfig:
        opts = dict(lr=lr, min_lr=lr / 10, seed=args.seed, device=args.device,
                    micro_batch_size=stage.get("micro_batch_size", 8), global_batch_tokens=stage.get("batch_tokens") or None)
        return TrainConfig(train_tokens=tokens, **{**opts, **kw})

    if args.expert_tokens:
        expert_root = work / f"experts-{args.expert_tokens}-{args.expert_trainable}"
        for c, shard in zip(clusters, train_shards):
            out = expert_root / f"cluster_{c:03d}"
            if not (out / "training.json").is_file():
                t0 = time.time()
                train_model(str(seed_dir), [shard], out, train_config(args.expert_tokens, trainable=args.expert_trainable))
                print(f"trained expert {c} ({args.expert_tokens} tokens) in {time.time() - t0:.0f} s", flush=True)
        expert_dirs = [expert_root / f"cluster_{c:03d}" for c in clusters]
    else:
        expert_root = one(run, "experts", args.experts_dir)
        expert_dirs = sorted(expert_root.glob("cluster_*"))
    tag = expert_root.name

    corpus, assignments = one(run, "corpus", args.corpus_dir), one(run, "assignments", args.assignments_dir)
    docs = {s: eval_docs(corpus, assignments, s, args.eval_max_docs, args.seed) for s in ("valid", "test")}
    sizes = np.bincount(pq.read_table(assignments / "train.parquet", columns=["cluster_id"]).column(0).to_numpy(),
                        minlength=len(clusters))
    weights = None if args.weights == "uniform" else (sizes / sizes.sum()).tolist()
    blocks = sample_blocks(valid_shards)
    results: dict[str, dict] = {}

    def score(name: str, model, extra: dict | None = None) -> None:
        r = {s: evaluate_perplexity(model, docs[s], batch_size=args.eval_batch_size) for s in ("valid", "test")}
        results[name] = {"valid": r["valid"]["perplexity"], "test": r["test"]["perplexity"],
                         "test_per_cluster": {k: v["perplexity"] for k, v in r["test"]["per_cluster"].items()},
                         **(extra or {})}
        print(f"{name:44s} valid {r['valid']['perplexity']:8.3f}  test {r['test']['perplexity']:8.3f}", flush=True)

    def hf(path) -> HFCausalLM:
        return HFCausalLM.from_pretrained(str(path), device=args.device, name=Path(path).name)

    score("seed", hf(seed_dir))
    score("dense", hf(dense_dir))
    for c, d in zip(clusters, expert_dirs):
        score(f"expert_{c:03d}", hf(d))
    if not args.no_ensemble:
        ens = work / f"{tag}-ensemble_top2"
        save_ensemble_config(ens, [str(d) for d in expert_dirs], kind="sparse",
                             centroids_path=one(run, "clusters", args.clusters_dir) / "centroids.npy",
                             embedder_dir=one(run, "embeddings", args.embeddings_dir) / "embedder",
                             top_k=min(2, len(expert_dirs)), temperature=stage.get("temperature", 0.1),
                             route_every=stage.get("route_every", 16), name="ensemble_top2")
        score("ensemble_top2", load_ensemble(ens, device=args.device, expert_batch_size=args.eval_batch_size))

    merged_dirs: dict[str, Path] = {}
    for method in args.methods:
        for lam in (["-"] if method == "average" else args.lambdas):
            name = method if method == "average" else f"{method} λ={lam}"
            out = work / f"{tag}-{method}-{lam}-{args.weights}"
            recipe = MergeRecipe(lam=1.0 if lam in ("-", "auto") else float(lam), density=args.density,
                                 drop_rate=args.drop_rate, seed=args.seed)
            if not (out / "merge.json").is_file():
                merge_experts(expert_dirs, out, method, seed_dir=None if method == "average" else seed_dir,
                              weights=weights, recipe=recipe, lambdas=LAMBDAS if lam == "auto" else None,
                              valid_blocks=blocks, device=args.device)
            m = json.loads((out / "merge.json").read_text())
            score(name, hf(out), {"recipe": m["recipe"], "lambda_search": m.get("lambda_search")})
            merged_dirs.setdefault(method, out)

    train_tokens = int(stage["train_tokens"])
    for shared in args.moe_shared:
        shared_dir = {"average": None, "seed": seed_dir}.get(shared, merged_dirs.get(shared))
        if shared not in ("average", "seed") and shared_dir is None:
            print(f"skipping MoE with shared={shared}: no such merge among --methods")
            continue
        moe = work / f"{tag}-moe-{shared}"
        if not (moe / "moe.json").is_file():
            centroids = np.load(one(run, "clusters", args.clusters_dir) / "centroids.npy")
            build_moe(expert_dirs, moe, seed_dir=seed_dir, router_init=stage.get("router_init", "centroids"),
                      top_k=min(2, len(expert_dirs)), centroids=centroids, seed=args.seed, shared_dir=shared_dir,
                      cluster_texts=cluster_texts(corpus, assignments, len(expert_dirs)))
        for frac in args.moe_fractions:
            if frac == 0:
                score(f"moe {shared} (no finetune)", hf(moe))
                continue
            tokens = int(frac * train_tokens)
            ft = work / (f"{tag}-moe-{shared}-ft{tokens}" + (f"-lr{args.moe_lr:g}" if args.moe_lr else ""))
            lr_kw = {"lr": args.moe_lr, "min_lr": args.moe_lr / 10} if args.moe_lr else {}
            if not (ft / "training.json").is_file():
                finetune_moe(moe, train_shards, ft, train_config(tokens, **lr_kw), valid_paths=valid_shards)
            routing = json.loads((ft / "routing.json").read_text())
            score(f"moe {shared} + finetune {frac:g}×budget" + (f" lr {args.moe_lr:g}" if args.moe_lr else ""), hf(ft),
                  {"finetune_tokens": tokens, "per_token_entropy": routing["per_token_entropy"],
                   "per_expert_load": routing["per_expert_load"]})

    dense = results["dense"]["test"]
    avg = results.get("average", {}).get("test")
    ens = results.get("ensemble_top2", {}).get("test")
    print(f"\n{tag}: test perplexity on {len(docs['test'])} docs ({args.device}); λ grid {LAMBDAS}\n")
    print("| model | valid ppl | test ppl | × dense | × average | × ensemble top-2 | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        note = ""
        if r.get("recipe"):
            note = ", ".join(f"{k} {v}" for k, v in r["recipe"].items())
        if r.get("per_token_entropy"):
            note = "routing entropy/layer " + " ".join(f"{e:.2f}" for e in r["per_token_entropy"])
        ratio = lambda b: f"{r['test'] / b:.2f}" if b else "–"  # noqa: E731
        print(f"| {name} | {r['valid']:.3f} | {r['test']:.3f} | {ratio(dense)} | {ratio(avg)} | {ratio(ens)} | {note} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "experts": tag, "device": args.device,
                                               "eval_docs": len(docs["test"]), "results": results}, indent=1))


if __name__ == "__main__":
    main()
