"""The report's budgets section: per model tokens, steps, batch, epochs, kept step; totals c-BTM vs dense."""
from experts.budget import plan_budgets
from tasks.report import _budgets, render_markdown


def _training(tokens, steps, batch, data, kept=None):
    return {"tokens_seen": tokens, "steps": steps, "wall_time_s": 1.0, "gpu_hours": 0.5, "valid_loss": 1.0,
            "kept_step": kept or steps, "plan": {"tokens_per_step": batch}, "data_tokens": data}


def test_budgets_table_accounts_every_model_and_the_definitions():
    plan = plan_budgets(100_000, 0.5, [3000, 1000], 10, batch_blocks=40, compute_match="steps")
    models = {"seed": _training(50_000, 125, 400, 4000), "dense": _training(50_000, 125, 400, 4000, kept=100)}
    for e in plan["experts"]:
        models[f"expert_{e['cluster_id']:03d}"] = _training(e["tokens"], e["steps"], e["batch_tokens"], e["data_tokens"])
    b = _budgets({"plan": plan, "models": models})
    assert b["compute_match"] == "steps" and b["expert_budget"] == "proportional"
    assert b["totals"]["cbtm_tokens"] == b["totals"]["dense_tokens"] == 100_000
    assert b["totals"]["cbtm_gpu_hours"] == 1.5 and b["totals"]["dense_gpu_hours"] == 1.0
    assert b["models"]["expert_000"]["share"] == 0.75 and b["models"]["dense"]["epochs"] == 12.5
    assert abs(b["models"]["expert_000"]["epochs"] - b["models"]["dense"]["epochs"]) < 0.1  # proportional budgets
    report = {"run": {}, "clusters": {}, "perplexity": {}, "fewshot": {}, "budgets": b, "timings": {}}
    md = render_markdown(report)
    assert "`--compute-match steps`" in md and "`--expert-budget proportional`" in md
    assert "| dense | – | 50000 | 125 | 400 | 12.50 | 1.0000 | 100 |" in md
    assert md.count("| expert_") == 2 and "| expert_000 | 0.750 → 0.750 |" in md


def test_budgets_section_names_the_experts_below_one_block_and_the_rule():
    plan = plan_budgets(100_000, 0.5, [3000, 3000, 100], 10, batch_blocks=8)  # cluster 2: 0.13 block per step
    models = {f"expert_{e['cluster_id']:03d}": _training(e["tokens"], e["steps"], e["batch_tokens"], e["data_tokens"])
              for e in plan["experts"]}
    report = {"run": {}, "clusters": {}, "perplexity": {}, "fewshot": {},
              "budgets": _budgets({"plan": plan, "models": models}), "timings": {}}
    assert report["budgets"]["plan"]["small_share"] == "fewer_steps"
    assert [e["small"] for e in report["budgets"]["plan"]["experts"]] == [False, False, True]
    md = render_markdown(report)
    assert "**Shares below one block:** 1 of 3 experts (clusters 2)" in md and "`--small-share fewer_steps`" in md
    big = {**report, "budgets": _budgets({"plan": plan_budgets(100_000, 0.5, [3000, 3000], 10, batch_blocks=8),
                                          "models": models})}
    assert "Shares below one block" not in render_markdown(big)
