"""The report read in a minute: the headline, the figures it draws, the shots the few-shot prompts really held."""
import json

import matplotlib.colors as mc
import pytest
from PIL import Image

from tasks.figures import model_colours
from tasks.report import write_report

CLUSTERS = ("0", "1")


def _ppl(overall, per_cluster):
    split = {"perplexity": overall, "n_tokens": 100, "per_cluster": {c: {"perplexity": p} for c, p in
                                                                     zip(CLUSTERS, per_cluster)}}
    return {"valid": split, "test": split}


def _fewshot(acc):
    return {"accuracy": {"mean": acc, "std": 0.01}, "macro_f1": {"mean": acc, "std": 0.01}, "shots": 8,
            "seeds": [1, 2], "n_test": 10, "per_seed": [{"mean_demos": 3.0}, {"mean_demos": 3.5}],
            "n_truncated_prompts": 20, "baselines": {"majority": {"accuracy": 0.3}, "random": {"accuracy": 0.5}}}


def _training(tokens, steps):
    return {"tokens_seen": tokens, "steps": steps, "plan": {"tokens_per_step": tokens // steps},
            "loss_curve": [[s, 5.0 / s] for s in range(1, steps + 1)], "valid_curve": [[steps, 5.0 / steps]]}


@pytest.fixture
def report(tmp_path):
    perplexity = {"dense": _ppl(10.0, [10.0, 10.0]), "expert_000": _ppl(40.0, [9.0, 200.0]),
                  "expert_001": _ppl(50.0, [300.0, 9.5]), "ensemble_top2": _ppl(9.59, [9.2, 9.9]),
                  "moe": _ppl(9.4, [9.3, 9.5])}
    plan = {"train_tokens": 1000}
    budgets = {"plan": plan, "models": {"seed": _training(500, 10), "dense": _training(500, 10),
                                        "expert_000": _training(250, 10), "expert_001": _training(250, 10),
                                        "moe": _training(250, 5)}}
    merges = {"moe": {"build": {"top_k": 2, "num_local_experts": 2}, "training": {"tokens_seen": 250},
                      "routing": {"tokens": 64, "max_entropy": 0.693, "per_token_entropy": [0.5, 0.6],
                                  "mean_router_entropy": [0.69, 0.68], "per_expert_load": [[0.6, 0.4], [0.5, 0.5]]}}}
    cluster_info = {"n_clusters": 2, "clusters": [{"cluster_id": 0, "label_distribution": {"a": 9, "b": 1}},
                                                  {"cluster_id": 1, "label_distribution": {"b": 10}}]}
    run_info = {"run_dir": str(tmp_path / "run"), "corpus": {"label_field": "domain"}}
    fewshot = {"topic": {m: _fewshot(0.6) for m in perplexity}}
    out = tmp_path / "report"
    return write_report(out, run_info, cluster_info, perplexity, fewshot, budgets, {}, merges), out


def test_headline_compares_cbtm_with_dense_and_flags_the_moe_extra_tokens(report):
    r, out = report
    assert r["headline"]["sentences"][0] == ("c-BTM top-2 vs dense at equal compute: test perplexity 9.59 vs 10.00, "
                                             "−4.1%.")  # no per-document figures here: no interval
    best = r["headline"]["sentences"][1]
    assert r["headline"]["best"] == "moe" and best.startswith("Best model: moe, test perplexity 9.40 (−6.0% vs dense)")
    assert "250 extra finetuning tokens (+25% of the compute-matched budget)" in best
    md = (out / "report.md").read_text()
    assert md.splitlines()[2] == "- " + r["headline"]["sentences"][0]  # the first thing report.md says


def test_every_figure_is_drawn_and_embedded(report):
    r, out = report
    names = {"perplexity", "perplexity_clusters", "routing_labels", "fewshot", "moe_routing", "training_curves"}
    assert set(r["figures"]) == {f"figures/{n}.png" for n in names}
    md = (out / "report.md").read_text()
    for f in r["figures"]:
        assert f"]({f})" in md
        with Image.open(out / f) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    for key in ("schema_version", "run", "clusters", "perplexity", "oracle_ratio", "fewshot", "budgets", "timings",
                "merges", "figures"):  # the keys report.json always had
        assert key in json.loads((out / "report.json").read_text())


def test_fewshot_says_how_many_demonstrations_the_prompts_held(report):
    r, out = report
    row = r["fewshot"]["topic"]["dense"]
    assert row["shots"] == 8 and row["mean_demos"] == 3.25 and row["n_prompts"] == 20
    md = (out / "report.md").read_text()
    assert "| topic | dense | 8 | 3.2 |" in md and "**Prompts cut to fit the context:**" in md
    assert "*random guess (chance) baseline*" in md


def test_model_colours_are_distinct_and_experts_keep_their_cluster_colour():
    models = ["seed", "dense", *(f"expert_{j:03d}" for j in range(32)), "ensemble_top2", "average", "moe", "oracle"]
    colours = model_colours(models)
    assert len({mc.to_hex(c) for c in colours.values()}) == len(models)
    assert colours["expert_003"] == model_colours(["expert_003", "expert_000"])["expert_003"]
