"""`tasks.study.write_study` on points built in code: ratios against each point's own dense model, the main table,
the headline sentences, and the files (JSON, markdown, PNG figures) it writes."""
from __future__ import annotations

import json

import pytest

from tasks.study import write_study

LABELS = ("code", "news")


def _result(ppl: float, per_label: dict | None = None) -> dict:
    per = {lab: {"perplexity": v} for lab, v in (per_label or {lab: ppl for lab in LABELS}).items()}
    return {"valid": {"perplexity": ppl * 1.1, "per_label": per}, "test": {"perplexity": ppl, "per_label": per}}


def _point(k: int, budget: int, dense: float, cbtm: float, clusterer: str = "balanced", labels: bool = True) -> dict:
    """A point whose c-BTM variants have test perplexity `cbtm` (top-1: 10% worse; posterior 1% better)."""
    res = (lambda p: _result(p)) if labels else (lambda p: {"test": {"perplexity": p}, "valid": {"perplexity": p}})
    train = {"seed": {"tokens_seen": budget // 2, "steps": 10, "gpu_hours": 0.5, "plan": {"tokens_per_step": 64}},
             "dense": {"tokens_seen": budget // 2, "steps": 10, "gpu_hours": 0.5, "plan": {"tokens_per_step": 64}}}
    if k == 1:
        return {"axes": {"num_clusters": 1, "train_tokens": budget, "clusterer": clusterer}, "variants": {},
                "perplexity": {"seed": res(dense * 2), "dense": res(dense)}, "training": train, "report_dir": None}
    ppl = {"seed": res(dense * 2), "dense": res(dense), "ensemble_top1": res(cbtm * 1.1), "ensemble_topall": res(cbtm),
           "posterior": res(cbtm * 0.99), "average": res(dense * 3), **{f"expert_{c:03d}": res(dense * 1.5) for c in range(k)}}
    variants = {"1": "ensemble_top1", "all": "ensemble_topall"}
    if k > 2:
        ppl["ensemble_top2"] = res(cbtm)
        variants["2"] = "ensemble_top2"
    else:
        variants["2"] = "ensemble_topall"
    train.update({f"expert_{c:03d}": {"tokens_seen": budget // 2 // k, "steps": 10, "gpu_hours": 0.5 / k,
                                      "plan": {"tokens_per_step": 64 // k}} for c in range(k)})
    return {"axes": {"num_clusters": k, "train_tokens": budget, "clusterer": clusterer}, "variants": variants,
            "perplexity": ppl, "training": train, "report_dir": f"/runs/x/report-{k}{clusterer}{budget}"}


GRID = {"num_clusters": [1, 2, 4], "train_tokens": [1000, 4000], "clusterer": ["balanced", "random"],
        "top_k": ["1", "2", "all"]}


def _points(labels: bool = True) -> list[dict]:
    out = []
    for budget, dense in ((1000, 20.0), (4000, 10.0)):
        out.append(_point(1, budget, dense, dense, labels=labels))
        for clusterer, gain in (("balanced", 0.96), ("random", 1.02)):
            for k in (2, 4):
                out.append(_point(k, budget, dense * (1.01 if k == 4 else 1.0), dense * gain, clusterer, labels))
    return out


def test_write_study_table_ratios_and_headlines(tmp_path):
    study = write_study(tmp_path / "study", _points(), GRID, settings={"corpus": "x"}, run_dir="/runs/x")
    assert json.loads((tmp_path / "study" / "study.json").read_text()) == study
    assert len(study["points"]) == 10
    assert study["methods"] == ["top-1", "top-2", "top-all", "posterior", "average"]  # no seed, expert or dense
    k4 = next(p for p in study["points"] if p["axes"] == {"num_clusters": 4, "train_tokens": 4000, "clusterer": "balanced"})
    # ratios are against the point's own dense model (10.1 here), not the k = 1 one (10.0)
    assert k4["ratio_to_dense"]["ensemble_top2"] == pytest.approx(9.6 / 10.1)
    assert k4["compute"]["totals"]["cbtm_tokens"] == k4["compute"]["totals"]["dense_tokens"] == 4000
    assert k4["compute"]["models"]["expert_000"]["global_batch_tokens"] == 16
    rows = [r for r in study["table"] if r["train_tokens"] == 4000 and r["num_clusters"] == 2]
    assert {r["method"] for r in rows} == {"top-1", "top-2", "top-all", "posterior", "average"}
    top2 = {r["clusterer"]: r for r in rows if r["method"] == "top-2"}  # with k = 2, top-2 is every expert
    assert top2["balanced"]["test_ppl"] == pytest.approx(9.6) and top2["random"]["ratio_to_dense"] == pytest.approx(1.02)
    assert [r["method"] for r in study["table"] if r["num_clusters"] == 1] == ["dense", "dense"]
    # 9.6 / 10.1 = 0.950, 9.504 / 10.1 = 0.941, 10.2 / 9.6 = 1.0625
    assert study["headlines"][1] == ("**4k tokens**: k=4 top-2 vs dense: −5.0%; best: posterior (k=4, clusterer "
                                     "balanced) −5.9%; clusterer random vs balanced (k=4 top-2): +6.2%.")


def test_write_study_files_and_figures(tmp_path):
    study = write_study(tmp_path / "study", _points(), GRID, run_dir="/runs/x")
    out = tmp_path / "study"
    assert sorted(p.name for p in out.iterdir()) == ["figures", "study.json", "study.md"]
    assert study["figures"] == ["figures/ppl_vs_k.png", "figures/ppl_vs_top_k.png", "figures/compare_clusterer.png",
                                "figures/methods.png", "figures/domains.png"]
    for fig in study["figures"]:
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "study.md").read_text()
    for fig in study["figures"]:
        assert f"]({fig})" in md
    assert "| 1 | – | 20.00 | – | – | – | – | – |" in md  # the dense point: no merge method
    assert "[report-4balanced4000/report.md](../report-4balanced4000/report.md)" in md
    # without a label field there is no per-domain heat map; one top-k value draws no top-k curve
    again = write_study(tmp_path / "nolabels", _points(labels=False), {**GRID, "top_k": ["2"]})
    assert "figures/domains.png" not in again["figures"] and "figures/ppl_vs_top_k.png" not in again["figures"]
    assert again["methods"] == ["top-2", "posterior", "average"]


def test_headline_ratios_carry_their_bootstrap_interval(tmp_path):
    """With per-document figures, every headline ratio carries its paired-bootstrap interval, and a difference
    within the noise of the test documents reads as such, not as a win."""
    import numpy as np

    rng = np.random.default_rng(0)
    ntok = rng.integers(50, 300, 80)
    base = ntok * np.log(10.0) * rng.uniform(0.8, 1.2, 80)

    def with_docs(result, nll):
        docs = [{"id": f"d{i}", "nll": float(x), "n_tokens": int(n)} for i, (x, n) in enumerate(zip(nll, ntok))]
        result["test"] = dict(result["test"], docs=docs, perplexity=float(np.exp(nll.sum() / ntok.sum())))
        return result

    points = _points()
    for p in points:
        for m, r in p["perplexity"].items():
            noise = 0.0 if m == "dense" else ntok * rng.normal(0, 0.05, 80)
            shift = -0.2 * ntok if m == "posterior" else 0.0  # posterior clearly better; the rest within noise
            with_docs(r, base + noise + shift)
    study = write_study(tmp_path / "study", points, GRID)
    head = study["headlines"][1]
    assert "k=4 top-2 vs dense:" in head and "[95%:" in head and "no difference beyond noise" in head
    best = head.split("best: ")[1].split(";")[0]
    assert best.startswith("posterior") and "beyond noise" not in best
    k4 = next(p for p in study["points"] if p["axes"]["num_clusters"] == 4)
    low, high = k4["ratio_interval"]["posterior"]
    assert low <= k4["ratio_to_dense"]["posterior"] <= high < 1
