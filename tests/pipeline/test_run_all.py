"""End to end: `luigi.build([RunAll(...tiny...)])` produces every stage's files; a second build runs nothing;
changing one parameter reruns only what depends on it; --force-stage reruns a stage and its downstream."""
from __future__ import annotations

import json
from pathlib import Path

import luigi
import pytest

from experts.training import TrainConfig
from experts.training.schedule import lr_at, plan_training
from pipeline import RunAll
from pipeline.stamps import read_stage_log
from tests.pipeline.conftest import tiny_params


def _build(params: dict) -> list[str]:
    started: list[str] = []

    @luigi.Task.event_handler(luigi.Event.START)  # fires for every task that runs (handlers match by isinstance)
    def _count(task):
        started.append(task.task_id)

    try:
        ok = luigi.build([RunAll(**params)], local_scheduler=True, workers=1, log_level="WARNING")
    finally:
        luigi.Task._event_callbacks[luigi.Task][luigi.Event.START].discard(_count)
    assert ok, "luigi build failed"
    return started


def _instantiate_all(task) -> None:
    for dep in luigi.task.flatten(task.requires()):
        _instantiate_all(dep)


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "stage_log.jsonl"}


def test_run_all_end_to_end(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    # the methods of before task-arithmetic merges joined the default (tests/pipeline/test_merges.py runs those)
    params = tiny_params(tiny_corpus, run_dir, merge_methods="ensemble,posterior,average,moe")
    first = _build(params)
    assert any(t.startswith("TrainExpert") for t in first) and any(t.startswith("Report") for t in first)

    folders = {p.name.rsplit("-", 1)[0] for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert {"corpus", "embeddings", "clusters", "assignments", "cluster-info", "tokenizer", "shards", "seed",
            "experts", "dense", "merged", "moe-finetuned", "moe-compute-dense", "eval", "task-domains",
            "report"} <= folders
    one = lambda prefix: next(run_dir.glob(f"{prefix}-*"))  # noqa: E731
    assert {p.name for p in one("corpus").iterdir()} >= {"train.parquet", "valid.parquet", "test.parquet",
                                                         "stats.json", "stage.json"}
    assert (one("clusters") / "centroids.npy").is_file()
    assert (one("assignments") / "train.parquet").is_file()
    experts = sorted(p.name for p in one("experts").iterdir())
    assert experts == ["cluster_000", "cluster_001"]
    for e in experts:
        assert (one("experts") / e / "training.json").is_file() and (one("experts") / e / "stage.json").is_file()
    merged = {p.name for d in run_dir.glob("merged-*") for p in d.iterdir()}
    assert merged == {"ensemble", "posterior", "average", "moe"}
    # --branch-schedule continue: the MoE finetune peaks at the LR the branches started at, below the seed's peak
    dense, moe = (json.loads((one(p) / "training.json").read_text()) for p in ("dense", "moe-finetuned"))
    cfg = TrainConfig.from_dict(dense["config"])
    start = lr_at(0, cfg, plan_training(cfg, dense["plan"]["seq_len"]))
    assert moe["config"]["lr"] == pytest.approx(start) and start < cfg.lr
    # the MoE's equal-compute dense model: dense continued for the MoE finetune's tokens, with its recipe
    more = json.loads((one("moe-compute-dense") / "training.json").read_text())
    assert more["tokens_seen"] == moe["tokens_seen"] > 0 and more["config"]["lr"] == moe["config"]["lr"]
    inputs = json.loads((one("moe-compute-dense") / "stage.json").read_text())["inputs"].values()
    assert any(str(i).startswith("dense-") for i in inputs)
    ppl = {p.stem for p in run_dir.glob("eval-*/perplexity/*.json") if not p.name.endswith(".stage.json")}
    assert ppl == {"seed", "dense", "expert_000", "expert_001", "ensemble_top1", "ensemble_topall", "posterior",
                   "average", "moe", "dense_moe_compute", "oracle"}
    fewshot = {p.stem for p in run_dir.glob("eval-*/fewshot/domains/*.json") if not p.name.endswith(".stage.json")}
    assert fewshot == ppl - {"oracle"}  # the oracle is a perplexity reference, not a model
    evals = {p.stem: json.loads(p.read_text()) for p in run_dir.glob("eval-*/perplexity/*.json")
             if not p.name.endswith(".stage.json")}
    assert evals["oracle"]["test"]["per_cluster"]
    for c, group in evals["oracle"]["test"]["per_cluster"].items():  # the oracle scores cluster c with expert c
        assert group == pytest.approx(evals[f"expert_{int(c):03d}"]["test"]["per_cluster"][c])
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) >= {"schema_version", "run", "clusters", "perplexity", "fewshot", "budgets", "timings",
                           "oracle_ratio"}
    assert set(report["perplexity"]) == ppl
    assert set(report["oracle_ratio"]) == {"ensemble_top1", "ensemble_topall", "posterior"}
    assert "Ensembles against oracle routing" in (run_dir / "report.md").read_text()
    assert set(report["perplexity"]["dense"]["test"]["per_label"]) == {"cooking", "sports", "code", "medicine"}
    assert report["budgets"]["totals"]["cbtm_tokens"] == report["budgets"]["totals"]["dense_tokens"]
    assert (run_dir / "report.md").read_text().count("| dense |") >= 1
    assert any("BTX MoE vs dense at equal compute (dense_moe_compute" in h for h in report["headline"]["sentences"])
    # every stage wrote its resolved config beside its output
    stage = json.loads((one("clusters") / "stage.json").read_text())
    assert stage["params"]["num_clusters"] == 2 and stage["stage"] == "FitClusters"

    # a second build runs nothing and touches nothing
    before = _mtimes(run_dir)
    assert _build(params) == []
    assert _mtimes(run_dir) == before

    # changing an evaluation parameter reruns only evaluations, the report and the model cards (which quote them)
    n_log = len(read_stage_log(run_dir))
    _build({**params, "fewshot_seeds": "13"})
    rerun = {r["stage"] for r in read_stage_log(run_dir)[n_log:]}
    assert rerun == {"EvaluateFewShot", "Report", "WriteModelCards"}

    # --force-stage reruns that stage and everything downstream of it, in the same folders
    n_log = len(read_stage_log(run_dir))
    merged_before = sorted(p for d in run_dir.glob("merged-*") for p in d.iterdir())
    _instantiate_all(RunAll(**params, force_stage="MergeExperts"))  # constructing forced stages deletes nothing
    assert sorted(p for d in run_dir.glob("merged-*") for p in d.iterdir()) == merged_before
    _build({**params, "force_stage": "MergeExperts"})
    rerun = [r["stage"] for r in read_stage_log(run_dir)[n_log:]]
    assert rerun.count("MergeExperts") == 5 and "FinetuneMoE" in rerun and "Report" in rerun
    assert "TrainExpert" not in rerun and "TrainDense" not in rerun
