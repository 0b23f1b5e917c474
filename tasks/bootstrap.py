"""How sure a perplexity ratio is: a paired bootstrap over the test documents (Efron & Tibshirani 1993, ch. 13;
paired over documents as in Koehn 2004 for MT metrics).

Two models scored on the same documents give, per document d, the summed NLL and the token count of each. The
ratio of their perplexities

    r = PPL_a / PPL_b = exp( Σ_d NLL_a,d / Σ_d n_a,d  −  Σ_d NLL_b,d / Σ_d n_b,d )

is recomputed on `n_boot` resamples of the documents (with replacement, the same documents for both models, so
what the two models share cancels); the `level` interval is the percentile interval of those ratios. An interval
that contains 1 means no difference beyond the noise of which documents were drawn for testing (it says nothing
about training noise, which only other seeds measure).

Input: `evaluate_perplexity(..., per_doc=True)` results (their `docs` list of {id, nll, n_tokens}).
"""
from __future__ import annotations

import math

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def paired_docs(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(nll, n_tokens) arrays of shape (2, n_docs) for the documents both evaluations scored, in a's order; None
    when either has no per-document figures or they share no document."""
    docs_a, docs_b = (a or {}).get("docs"), (b or {}).get("docs")
    if not docs_a or not docs_b:
        return None
    by_id = {d["id"]: d for d in docs_b}
    pairs = [(d, by_id[d["id"]]) for d in docs_a if d["id"] in by_id]
    if not pairs:
        return None
    nll = np.array([[x["nll"] for x, _ in pairs], [y["nll"] for _, y in pairs]], dtype=np.float64)  # (2, n_docs)
    ntok = np.array([[x["n_tokens"] for x, _ in pairs], [y["n_tokens"] for _, y in pairs]], dtype=np.float64)
    return nll, ntok


def ratio_interval(a: dict, b: dict, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> dict | None:
    """Paired bootstrap of PPL(a) / PPL(b) over the documents both evaluated (a, b: evaluate_perplexity results
    with `docs`). Returns {"ratio", "low", "high", "level", "n_docs", "n_boot", "beyond_noise": the interval
    excludes 1}, or None without per-document figures."""
    paired = paired_docs(a, b)
    if paired is None:
        return None
    nll, ntok = paired
    n = nll.shape[1]

    def log_ratio(s_nll, s_tok):  # s_*: (2, ...) sums over documents
        return s_nll[0] / s_tok[0] - s_nll[1] / s_tok[1]

    point = math.exp(float(log_ratio(nll.sum(1), ntok.sum(1))))
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # (n_boot, n_docs)
    counts = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)  # (n_boot, n_docs)
    boot = np.exp(log_ratio(nll @ counts.T, ntok @ counts.T))  # (n_boot,)
    low, high = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"ratio": point, "low": float(low), "high": float(high), "level": level, "n_docs": int(n),
            "n_boot": int(n_boot), "beyond_noise": bool(low > 1 or high < 1)}


def describe_change(ci: dict | None, ratio: float | None = None) -> str:
    """"−3.1% [95%: −4.0% … −2.2%]" or "+0.1% [95%: −0.6% … +0.7%], no difference beyond noise"; just the
    change when there is no interval."""
    def pct(r):
        return f"{100 * (r - 1):+.1f}%".replace("-", "−")

    r = ci["ratio"] if ci else ratio
    if r is None:
        return "–"
    if not ci:
        return pct(r)
    span = f"{pct(r)} [{int(round(100 * ci['level']))}%: {pct(ci['low'])} … {pct(ci['high'])}]"
    return span if ci["beyond_noise"] else f"{span}, no difference beyond noise"
