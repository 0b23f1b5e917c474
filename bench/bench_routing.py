"""Routing quality of the c-BTM ensemble against oracle routing, on the experts of a finished pipeline run.

For one split of the run's corpus (documents and cluster ids from `corpus-*/<split>.parquet` and
`assignments-*/<split>.parquet`, a seeded sample of --max-docs as the evaluation stage draws it), scores:
each expert alone (its own cluster's row is the oracle: every document scored by the expert of the cluster its
full text is assigned to), the BTM posterior ensemble over all experts (dense), and the c-BTM `SparseEnsemble`
under each routing variant × top-k, with `tasks.perplexity.evaluate_perplexity`. Prints a markdown table: test
perplexity overall and per cluster, each ÷ the oracle's, and the expert tokens run per scored token (the
sparse cost: top-k plus what the no-signal first chunk and re-routing add).

    PYTHONPATH=. python bench/bench_routing.py --run /work/runs/demo-base                    # CPU, ~1 min
    PYTHONPATH=. python bench/bench_routing.py --run runs/corpus_dev --device cuda --max-docs 300 --json out.json

Variants: distance (softmax(-d²/T) over the top-k, the c-BTM paper's weights), distance+early (routing also
refreshed after 1, 2, 4, 8 tokens), posterior (the routing weights × the routed experts' likelihood of the row so
far; the default), posterior+early, posterior+sizes (a prior from the training cluster sizes for prefixes without
routing signal, instead of uniform).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "distance": {"route_weights": "distance"},
    "distance+early": {"route_weights": "distance", "route_early": (1, 2, 4, 8)},
    "posterior": {"route_weights": "posterior"},
    "posterior+early": {"route_weights": "posterior", "route_early": (1, 2, 4, 8)},
    "posterior+sizes": {"route_weights": "posterior", "prior": "sizes"},
}


def one(pattern: str) -> Path:
    found = sorted(glob.glob(pattern))
    if not found:
        raise SystemExit(f"nothing matches {pattern}")
    return Path(found[0])


def load_docs(run: Path, split: str, max_docs: int, seed: int) -> list[dict]:
    """The split's documents with cluster_id: the sample `EvaluatePerplexity.docs` draws for --eval-max-docs."""
    import pyarrow.parquet as pq

    rows = pq.read_table(one(f"{run}/corpus-*/{split}.parquet")).to_pylist()
    if max_docs and len(rows) > max_docs:
        keep = np.random.default_rng(seed).choice(len(rows), max_docs, replace=False)
        rows = [rows[i] for i in sorted(keep.tolist())]
    table = pq.read_table(one(f"{run}/assignments-*/{split}.parquet"), columns=["id", "cluster_id"]).to_pydict()
    cluster = dict(zip(table["id"], table["cluster_id"]))
    for row in rows:
        row["cluster_id"] = int(cluster[row["id"]])
    return rows


def sparse_config(run: Path) -> Path:
    for cfg in sorted(glob.glob(f"{run}/merged-*/ensemble/ensemble.json")):
        if json.loads(Path(cfg).read_text()).get("kind") == "sparse":
            return Path(cfg)
    raise SystemExit(f"{run} has no merged-*/ensemble/ensemble.json (run the ensemble merge first)")


def main():
    import torch

    from clustering.embed import load_embedder
    from experts.ensemble import PosteriorEnsemble, SparseEnsemble
    from experts.scoring import HFCausalLM
    from tasks.perplexity import evaluate_perplexity, oracle_perplexity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished pipeline run folder")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-docs", type=int, default=0, help="seeded sample (as --eval-max-docs); 0 = all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-k", nargs="+", default=["1", "2", "all"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--route-every", type=int, default=0, help="0 = the run's")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    run = Path(args.run)
    docs = load_docs(run, args.split, args.max_docs, args.seed)
    cfg_path = sparse_config(run)
    cfg = json.loads(cfg_path.read_text())
    expert_dirs = [(cfg_path.parent / e).resolve() for e in cfg["experts"]]
    k = len(expert_dirs)
    experts = [HFCausalLM.from_pretrained(str(d), device=args.device, name=f"expert_{j:03d}")
               for j, d in enumerate(expert_dirs)]
    summary = json.loads(one(f"{run}/assignments-*/summary.json").read_text())
    sizes = summary["splits"]["train"]["sizes"]
    centroids = np.load((cfg_path.parent / cfg["centroids"]).resolve())
    embedder = load_embedder((cfg_path.parent / cfg["embedder"]).resolve())
    route_every = args.route_every or cfg["route_every"]
    rows, results = [], {}

    def record(name, top_k, res, expert_tokens=None):
        results[f"{name} top-{top_k}" if top_k else name] = res
        rows.append({"model": name, "top_k": top_k, "ppl": res["perplexity"],
                     "per_cluster": {c: g["perplexity"] for c, g in res["per_cluster"].items()},
                     "expert_tokens_per_token": expert_tokens, "wall_s": res.get("wall_time_s")})

    t0 = time.perf_counter()
    singles = [evaluate_perplexity(e, docs, batch_size=args.batch_size) for e in experts]
    n_target_tokens = singles[0]["n_tokens"]
    oracle = oracle_perplexity(singles)
    record("oracle", None, oracle)
    btm = PosteriorEnsemble(experts, prior="updating", device=args.device, name="posterior")
    res = evaluate_perplexity(btm, docs, batch_size=args.batch_size)
    record("BTM posterior, all experts (dense)", None, res, float(k))
    for top in args.top_k:
        top_k = k if top == "all" else int(top)
        if top_k > k:
            continue
        for variant in args.variants:
            kw = dict(VARIANTS[variant])
            if kw.get("prior") == "sizes":
                kw["prior"] = sizes
            ens = SparseEnsemble(experts, centroids, embedder, top_k=top_k, temperature=cfg["temperature"],
                                 route_every=route_every, device=args.device, expert_batch_size=args.batch_size,
                                 name=f"{variant} top-{top}", **kw)
            res = evaluate_perplexity(ens, docs, batch_size=args.batch_size)
            ens.check_finite()
            run_tokens = sum(ens.stats["tokens"].values())  # input tokens given to experts
            per_token = run_tokens / max(1, res["n_tokens"] + res["n_windows"])  # windows' input tokens
            record(variant, "all" if top_k == k else top_k, res, per_token)
    wall = time.perf_counter() - t0

    clusters = sorted(oracle["per_cluster"], key=int)
    print(f"\nrun {run}, split {args.split}: {len(docs)} docs, {n_target_tokens} tokens, {k} experts, "
          f"route_every {route_every}, temperature {cfg['temperature']}, device {args.device}; {wall:.0f} s\n")
    print("| routing | top-k | ppl | ÷ oracle | " + " | ".join(f"c{c} (÷ oracle)" for c in clusters)
          + " | expert tokens / token |")
    print("|---|---:|---:|---:|" + "---:|" * len(clusters) + "---:|")
    for r in rows:
        ppl = {c: r["per_cluster"].get(c, math.nan) for c in clusters}
        pcs = " | ".join(f"{ppl[c]:.3f} ({ppl[c] / oracle['per_cluster'][c]['perplexity']:.3f})" for c in clusters)
        cost = "–" if r["expert_tokens_per_token"] is None else f"{r['expert_tokens_per_token']:.2f}"
        print(f"| {r['model']} | {r['top_k'] or '–'} | {r['ppl']:.3f} | {r['ppl'] / oracle['perplexity']:.3f} | {pcs} "
              f"| {cost} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "split": args.split, "n_docs": len(docs),
                                               "route_every": route_every, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
