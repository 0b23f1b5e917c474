"""MoE router initialisation: centroids through the least-squares map vs mean hidden states (vs random), on a finished
run folder where RunAll ran once per --router-init (the same experts, seed and corpus).

    python bench/bench_router_init.py RUN_DIR [--max-docs N] [--bootstrap 2000]

For each MoE (merged, before finetuning, and finetuned) and for dense: the test perplexity over the same test
documents, and each model's ratio to dense with a 95% paired bootstrap interval over documents (resampling
documents, ratio of exp(Σ NLL / Σ tokens)). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np


def per_doc_nll(folder: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(Σ NLL per document (nats), tokens per document) of the model in `folder`."""
    from experts.scoring import HFCausalLM

    model = HFCausalLM.from_pretrained(folder, device="cpu", name=os.path.basename(folder))
    ll = np.array(model.loglikelihood_rolling(texts, batch_size=8))  # (n,) Σ log p
    n_tok = np.array([len(model._encode(t)) for t in texts], dtype=np.float64)  # predicted tokens after the BOS
    return -ll, n_tok


def ratio_ci(nll: np.ndarray, tok: np.ndarray, ref: np.ndarray, ref_tok: np.ndarray, b: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = len(nll)
    idx = rng.integers(0, n, size=(b, n))
    r = np.exp(nll[idx].sum(1) / tok[idx].sum(1) - ref[idx].sum(1) / ref_tok[idx].sum(1))
    return np.percentile(r, [2.5, 97.5])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--max-docs", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=2000)
    args = ap.parse_args()
    from corpus.read import read_columns

    run = args.run_dir
    corpus = glob.glob(f"{run}/corpus-*/test.parquet")[0]
    texts = [t for t in read_columns(corpus, ["text"]).column(0).to_pylist() if t.strip()]
    if args.max_docs:
        texts = texts[: args.max_docs]
    models = {"dense": glob.glob(f"{run}/dense-*")[0]}
    for moe in sorted(glob.glob(f"{run}/merged-*/moe/moe.json")):
        init = json.load(open(moe))["router_init"]
        models[f"moe {init} (merged)"] = os.path.dirname(moe)
    for ft in sorted(glob.glob(f"{run}/moe-finetuned-*/stage.json")):  # the MoE each finetune started from
        merged = next(v for v in json.load(open(ft))["inputs"].values() if v.endswith("/moe"))
        init = json.load(open(os.path.join(run, merged, "moe.json")))["router_init"]
        models[f"moe {init} (finetuned)"] = os.path.dirname(ft)
    scores = {name: per_doc_nll(folder, texts) for name, folder in models.items()}
    ref, ref_tok = scores["dense"]
    print(f"{len(texts)} test documents, {int(ref_tok.sum())} tokens\n")
    print("| model | test ppl | × dense | 95% CI (paired bootstrap over documents) |\n|---|---:|---:|---|")
    for name, (nll, tok) in scores.items():
        ppl = float(np.exp(nll.sum() / tok.sum()))
        r = float(np.exp(nll.sum() / tok.sum() - ref.sum() / ref_tok.sum()))
        lo, hi = ratio_ci(nll, tok, ref, ref_tok, args.bootstrap)
        print(f"| {name} | {ppl:.4f} | {r:.4f} | {lo:.4f}–{hi:.4f} |")


if __name__ == "__main__":
    main()
