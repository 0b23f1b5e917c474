"""The Study: a grid of RunAll points in one run folder that shares every stage it can, and a pretrained seed
(a model an earlier run of the pipeline trained) used for RunAll and the Study."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import luigi
import pytest

from corpus.io import InputError
from pipeline import Study, TrainDense, TrainTokenizer
from pipeline.stamps import read_stage_log
from tests.pipeline.conftest import tiny_params, write_tiny_corpus
from tests.pipeline.test_stages import ENV


def _study_params(corpus: Path, run_dir: Path, **kw) -> dict:
    """Two points (the dense model, k = 2), c-BTM top-1 and top-all, the posterior ensemble, no few-shot."""
    p = tiny_params(corpus, run_dir, tasks="none", merge_methods="ensemble,posterior")
    p.update(num_clusters="1,2", top_k="1,all", clusterer="balanced", train_tokens=str(p["train_tokens"]))
    p.update(kw)
    return p


def _build(task) -> list[str]:
    started: list[str] = []

    @luigi.Task.event_handler(luigi.Event.START)
    def _count(t):
        started.append(t.task_id)

    try:
        ok = luigi.build([task], local_scheduler=True, workers=1, log_level="WARNING")
    finally:
        luigi.Task._event_callbacks[luigi.Task][luigi.Event.START].discard(_count)
    assert ok, "luigi build failed"
    return started


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != "stage_log.jsonl"}


def test_two_point_study_shares_stages_and_reruns_nothing(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    study = Study(**_study_params(tiny_corpus, run_dir))
    assert [p["num_clusters"] for p in study.points()] == [1, 2]
    _build(study)

    runs = read_stage_log(run_dir)
    outputs = [r["output"] for r in runs]
    assert len(outputs) == len(set(outputs))  # no output was built twice, whichever point asked for it
    n = Counter(r["stage"] for r in runs)
    assert n["PrepareCorpus"] == n["EmbedCorpus"] == n["TrainTokenizer"] == n["Study"] == 1
    assert n["FitClusters"] == 2  # k = 1 and k = 2
    # the seed and the dense model read the whole corpus's tokens, independent of k: one of each per budget
    assert n["TrainSeed"] == 1 and n["TrainDense"] == 1
    # k = 1 is the dense model: no expert of a 1-cluster run; the k = 2 point trains its two experts once
    experts = [json.loads((Path(r["output"]) / "stage.json").read_text())["params"] for r in runs
               if r["stage"] == "TrainExpert"]
    assert sorted((e["num_clusters"], e["cluster_id"]) for e in experts) == [(2, 0), (2, 1)]
    assert n["Report"] == 1 and not (run_dir / "report.md").exists()  # the points' reports stay in their folders

    out = json.loads((run_dir / "study.json").read_text())
    assert [(p["axes"]["num_clusters"], p["dense_only"]) for p in out["points"]] == [(1, True), (2, False)]
    assert set(out["points"][0]["test"]) == {"seed", "dense"}
    k2 = out["points"][1]
    assert k2["variants"] == {"1": "ensemble_top1", "all": "ensemble_topall"}
    assert {"seed", "dense", "expert_000", "expert_001", "ensemble_top1", "ensemble_topall", "posterior"} == set(k2["test"])
    assert out["methods"] == ["top-1", "top-all", "posterior"]
    assert k2["ratio_to_dense"]["posterior"] == pytest.approx(k2["test"]["posterior"] / k2["test"]["dense"])
    assert k2["compute"]["totals"]["cbtm_tokens"] == k2["compute"]["totals"]["dense_tokens"]
    assert {r["method"] for r in out["table"] if r["num_clusters"] == 2} == {"top-1", "top-all", "posterior"}
    assert len(out["headlines"]) == 1 and "k=2 top-1 vs dense" in out["headlines"][0]
    md = (run_dir / "study.md").read_text()
    links = [line.split("](", 1)[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert links and all((run_dir / link).is_file() for link in links)  # the run folder's copy links its figures
    assert "| 2 |" in md and "Compute accounting" in md

    # a second build runs nothing and touches nothing
    before = _mtimes(run_dir)
    assert _build(Study(**_study_params(tiny_corpus, run_dir))) == []
    assert _mtimes(run_dir) == before


@pytest.mark.parametrize("flag,value", [("clusterer", "balanced,kmeans"), ("top_k", "1,0"), ("num_clusters", "2,x"),
                                        ("train_tokens", "6144,1e6"), ("top_k", "2,9"), ("posterior_top_k", "two")])
def test_unknown_grid_value_fails_at_construction(flag, value, tiny_corpus, tmp_path):
    with pytest.raises(InputError) as err:
        Study(**{**_study_params(tiny_corpus, tmp_path / "run"), flag: value})
    assert f"--{flag.replace('_', '-')}" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # before any work


def test_cli_unknown_grid_value_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", "Study", "--local-scheduler",
                          "--run-dir", str(tmp_path / "run"), "--clusterer", "balanced,kmeans"],
                         env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "InputError: --clusterer 'kmeans': choose one of balanced, unbalanced, random" in text
    assert "Traceback" not in text and not (tmp_path / "run").exists()


def test_study_axes_are_run_all_parameters_given_as_lists(tmp_path):
    study = Study(run_dir=str(tmp_path), num_clusters="1,2,4", train_tokens="1000,2000", clusterer="balanced,random",
                  top_k="1,2,all", merge_methods="ensemble")
    points = study.points()
    # k = 1 (dense) once per budget, whatever the clusterer; k > 1 once per (budget, clusterer)
    assert len(points) == 2 * (1 + 2 * 2)
    assert [p for p in points if p["num_clusters"] == 1] == [
        {"num_clusters": 1, "train_tokens": t, "clusterer": "balanced", **_other_axes(study)} for t in (1000, 2000)]
    assert study.variants(2) == {"1": "ensemble_top1", "2": "ensemble_topall", "all": "ensemble_topall"}
    assert study.variants(4) == {"1": "ensemble_top1", "2": "ensemble_top2", "all": "ensemble_topall"}
    assert study.point_models({"num_clusters": 1, "train_tokens": 1000, "clusterer": "balanced",
                               **_other_axes(study)}) == ["seed", "dense"]


def _other_axes(study) -> dict:
    """Axes beyond the ones the test names (e.g. compute_match once RunAll has it), at their first value."""
    return {a: v[0] for a, v in study.grid().items() if a not in ("num_clusters", "train_tokens", "clusterer", "top_k")}


def test_a_model_trained_by_the_pipeline_seeds_another_run(tmp_path):
    """`--seed-model <run>/dense-<h>` of a run on another corpus: its tokenizer and context length are used, and
    with --seed-fraction 0 the seed is that model itself."""
    import torch
    from safetensors.torch import load_file

    other = write_tiny_corpus(tmp_path / "other", n_train=30, n_eval=4)
    first = TrainDense(**tiny_params(other, tmp_path / "first", num_clusters=2, seq_len=48))
    assert luigi.build([first], local_scheduler=True, workers=1, log_level="WARNING")
    pretrained = first.out_path()

    corpus = write_tiny_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    params = _study_params(corpus, run_dir, seed_model=str(pretrained), seq_len=0, seed_fraction=0.0,
                           num_clusters="2", top_k="1")
    _build(Study(**params))
    one = lambda prefix: next(run_dir.glob(f"{prefix}-*"))  # noqa: E731
    assert json.loads((one("tokenizer") / "tokenizer.json").read_text()) == json.loads(
        (pretrained / "tokenizer.json").read_text())
    assert json.loads((one("shards") / "meta.json").read_text())["seq_len"] == 48  # the model's context length
    seed, theirs = load_file(one("seed") / "model.safetensors"), load_file(pretrained / "model.safetensors")
    assert seed.keys() == theirs.keys() and all(torch.equal(seed[k], theirs[k]) for k in seed)
    expert = json.loads((one("experts") / "cluster_000" / "config.json").read_text())
    assert expert["vocab_size"] == json.loads((pretrained / "config.json").read_text())["vocab_size"]
    out = json.loads((run_dir / "study.json").read_text())
    assert out["settings"]["seed_model"] == str(pretrained) and out["points"][0]["test"]["ensemble_top1"] > 0
    # retraining the seed model in place (here: rewriting one of its files) gives new stages downstream of it
    tokenizer = TrainTokenizer(**{**tiny_params(corpus, run_dir), "seed_model": str(pretrained)}).out_path()
    (pretrained / "training.json").write_text((pretrained / "training.json").read_text() + "\n")
    luigi.task_register.Register.clear_instance_cache()
    assert TrainTokenizer(**{**tiny_params(corpus, run_dir), "seed_model": str(pretrained)}).out_path() != tokenizer
