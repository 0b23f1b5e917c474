"""tasks.bootstrap: the paired bootstrap of perplexity ratios, and the report's wording of a change within noise."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tasks import bootstrap
from tasks.report import _headline, _ppl_summary


def evaluation(nll, ntok):
    docs = [{"id": f"d{i}", "nll": float(x), "n_tokens": int(n)} for i, (x, n) in enumerate(zip(nll, ntok))]
    total = float(np.sum(nll)) / float(np.sum(ntok))
    return {"perplexity": math.exp(total), "docs": docs, "n_tokens": int(np.sum(ntok))}


@pytest.fixture
def dense():
    rng = np.random.default_rng(0)
    ntok = rng.integers(50, 300, 120)
    return evaluation(ntok * rng.uniform(0.8, 1.2, 120), ntok), ntok


def test_same_model_is_no_difference(dense):
    d, _ = dense
    ci = bootstrap.ratio_interval(d, d)
    assert ci["ratio"] == pytest.approx(1.0) and ci["low"] == pytest.approx(1.0) and ci["high"] == pytest.approx(1.0)
    assert not ci["beyond_noise"]


def test_better_on_every_document_is_beyond_noise(dense):
    d, ntok = dense
    nll = np.array([x["nll"] for x in d["docs"]])
    better = evaluation(nll - 0.05 * ntok, ntok)  # 0.05 nats per token less on every document
    ci = bootstrap.ratio_interval(better, d)
    assert ci["ratio"] == pytest.approx(better["perplexity"] / d["perplexity"])
    assert ci["low"] <= ci["ratio"] <= ci["high"] < 1 and ci["beyond_noise"]
    assert "beyond noise" not in bootstrap.describe_change(ci)


def test_a_tiny_change_with_noise_reads_as_no_difference(dense):
    d, ntok = dense
    nll = np.array([x["nll"] for x in d["docs"]])
    rng = np.random.default_rng(1)
    noisy = evaluation(nll + ntok * rng.normal(0, 0.05, len(ntok)) - 0.0005 * ntok, ntok)
    ci = bootstrap.ratio_interval(noisy, d)
    assert ci["low"] < 1 < ci["high"] and not ci["beyond_noise"]
    assert "no difference beyond noise" in bootstrap.describe_change(ci)


def test_pairs_by_document_id(dense):
    d, _ = dense
    shuffled = dict(d, docs=list(reversed(d["docs"])))
    assert bootstrap.ratio_interval(shuffled, d)["high"] == pytest.approx(1.0)
    assert bootstrap.ratio_interval({"perplexity": 2.0}, d) is None  # no per-document figures: no interval


def test_headline_says_no_difference_for_a_change_within_noise(dense):
    d, ntok = dense
    nll = np.array([x["nll"] for x in d["docs"]])
    rng = np.random.default_rng(2)
    top2 = evaluation(nll + ntok * rng.normal(0, 0.05, len(ntok)) - 0.0005 * ntok, ntok)
    report = {"perplexity": {"dense": {"test": _ppl_summary(d)}, "ensemble_top2": {"test": _ppl_summary(top2, d)}},
              "budgets": {"totals": {}}, "merges": {}}
    head = _headline(report)
    first = head["sentences"][0]
    assert first.startswith("c-BTM top-2 vs dense") and first.endswith(": no difference beyond noise.")
    low, high = head["vs_dense_interval"]["ensemble_top2"]
    assert low < 0 < high
