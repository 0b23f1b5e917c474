"""Stage wiring without training: light imports, hashed folders, completion stamps, bad input in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import luigi
import pytest

from corpus.io import InputError
from pipeline import AssignClusters, EvaluateFewShot, FitClusters, PrepareCorpus, RunAll, TrainExpert
from tests.pipeline.conftest import tiny_params, write_tiny_corpus

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "LUIGI_CONFIG_PATH": str(ROOT / "luigi.cfg")}


def test_import_and_scheduling_stay_light():
    """Building the whole graph, hashing it and checking completeness imports no heavy library, touches no CUDA."""
    code = ("import sys, pipeline\n"
            "r = pipeline.RunAll(run_dir='/nonexistent/run')\n"
            "todo, seen = [r], set()\n"
            "while todo:\n"
            "    t = todo.pop()\n"
            "    if t.task_id in seen: continue\n"
            "    seen.add(t.task_id); t.complete(); todo.extend(luigi.task.flatten(t.requires()))\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'sklearn', 'datasets', 'faiss', 'tokenizers', 'pyarrow', 'matplotlib'))\n"
            "print(len(seen), heavy)\n")
    out = subprocess.run([sys.executable, "-c", "import luigi\n" + code], env=ENV, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    n, heavy = out.stdout.strip().split(" ", 1)
    assert int(n) > 30 and heavy == "[]"


def test_hash_follows_parameters_and_inputs(tmp_path):
    base = dict(corpus="demo", run_dir=str(tmp_path))
    a, b = FitClusters(**base), FitClusters(**base, num_clusters=8)
    assert a.out_path() != b.out_path()
    # a downstream stage changes with an upstream parameter, an upstream stage does not change downstream's
    assert TrainExpert(**base, cluster_id=0).out_path() != TrainExpert(**base, num_clusters=8, cluster_id=0).out_path()
    assert PrepareCorpus(**base).out_path() == PrepareCorpus(**base, num_clusters=8).out_path()
    # one experts-<h>/ folder for all clusters
    assert TrainExpert(**base, cluster_id=0).out_path().parent == TrainExpert(**base, cluster_id=1).out_path().parent
    assert a.out_path().name.startswith("clusters-")


def test_prepare_corpus_stage_stamp_and_edit_in_place(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus", n_train=5, n_eval=2)
    stage = PrepareCorpus(corpus=str(corpus), label_field="source", run_dir=str(tmp_path / "run"))
    assert not stage.complete()
    assert luigi.build([stage], local_scheduler=True, log_level="WARNING")
    assert stage.complete()
    stamp = json.loads(stage.stamp_path().read_text())
    assert stamp["params"]["corpus"] == str(corpus) and stamp["run_id"] and stamp["wall_time_s"] >= 0
    # editing the corpus in place gives a new corpus folder: nothing stale is reused
    write_tiny_corpus(corpus, n_train=6, n_eval=2)
    luigi.task_register.Register.clear_instance_cache()
    fresh = PrepareCorpus(corpus=str(corpus), label_field="source", run_dir=str(tmp_path / "run"))
    assert fresh.out_path() != stage.out_path() and not fresh.complete()


def test_train_expert_checks_cluster_id_and_hashes_branch_temperature(tmp_path):
    base = dict(corpus="demo", run_dir=str(tmp_path), num_clusters=4)
    with pytest.raises(InputError, match="--cluster-id 4"):
        TrainExpert(**base, cluster_id=4)  # refused before anything upstream runs
    path = lambda **kw: TrainExpert(**base, cluster_id=3, **kw).out_path()  # noqa: E731
    assert path(temperature=0.5) == path(temperature=0.1)  # branched from the seed: no temperature involved
    assert path(branch_from="average", temperature=0.5) != path(branch_from="average", temperature=0.1)


def test_micro_batch_size_reaches_training_and_hashes_only_as_the_global_batch(tmp_path):
    from pipeline import TrainDense, TrainSeed

    base = dict(corpus="demo", run_dir=str(tmp_path))
    assert TrainDense(**base, micro_batch_size=4).train_config(1000).micro_batch_size == 4
    path = lambda **kw: TrainSeed(**base, **kw).out_path()  # noqa: E731
    assert path(micro_batch_size=4) != path()  # --batch-tokens 0: the micro-batch is the global batch
    assert path(batch_tokens=8192, micro_batch_size=4) == path(batch_tokens=8192)  # accumulation only
    with pytest.raises(InputError, match="--micro-batch-size 0"):
        RunAll(**base, micro_batch_size=0)


def test_experts_per_gpu_shares_gpus_through_slots_not_luigi_units(tmp_path):
    from pipeline import TrainDense, TrainSeed

    base = dict(corpus="demo", run_dir=str(tmp_path), device="cuda")
    assert TrainExpert(**base, cluster_id=0).resources == {"gpu": 1}
    assert TrainExpert(**base, cluster_id=0, experts_per_gpu=4).resources == {}  # 4 slots per GPU: file locks
    assert TrainSeed(**base, experts_per_gpu=4).resources == TrainDense(**base, experts_per_gpu=4).resources == {"gpu": 1}
    assert TrainExpert(**base, cluster_id=0, experts_per_gpu=4).train_config(1000).micro_batch_size == "auto"
    path = lambda **kw: TrainExpert(**base, cluster_id=0, **kw).out_path()  # noqa: E731
    assert path(experts_per_gpu=4) == path() == path(micro_batch_size="8")  # execution only: same folders
    with pytest.raises(InputError, match="--experts-per-gpu 0"):
        RunAll(**base, experts_per_gpu=0)
    with pytest.raises(InputError, match="--experts-per-gpu 2 .* --gpus-per-expert 2"):
        RunAll(**base, experts_per_gpu=2, gpus_per_expert=2)
    with pytest.raises(InputError, match="--micro-batch-size 'big'"):
        RunAll(**base, micro_batch_size="big")


def test_fewshot_hash_follows_task_files(tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    (task / "labels.json").write_text('["a", "b"]')
    (task / "test.jsonl").write_text('{"text": "x", "label": "a"}\n')
    stage = lambda: EvaluateFewShot(corpus="demo", run_dir=str(tmp_path / "run"), task=str(task), model="dense")  # noqa: E731
    before = stage().out_path()
    (task / "test.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n')
    luigi.task_register.Register.clear_instance_cache()
    assert stage().out_path() != before


@pytest.mark.parametrize("flag,value", [("clusterer", "spectral"), ("embedder", "bert"), ("assign", "greedy"),
                                        ("branch_from", "nowhere"), ("top_k", "three"), ("merge_methods", "soup"),
                                        ("temperature", 0.0), ("seed_fraction", 1.0), ("device", "tpu")])
def test_bad_parameters_fail_with_the_flag_named(flag, value, tmp_path):
    with pytest.raises(InputError) as err:
        RunAll(run_dir=str(tmp_path), **{flag: value})
    assert f"--{flag.replace('_', '-')}" in str(err.value)


def test_cli_bad_corpus_is_one_line_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", "PrepareCorpus", "--local-scheduler",
                          "--run-dir", str(tmp_path / "run"), "--corpus", str(tmp_path / "missing.jsonl")],
                         env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert f"InputError: corpus path does not exist: {tmp_path / 'missing.jsonl'}" in text
    assert "Traceback" not in text
    assert out.returncode != 0


def test_more_clusters_than_documents_is_refused(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus", n_train=3, n_eval=2)
    params = tiny_params(corpus, tmp_path / "run")
    assert luigi.build([AssignClusters(**{k: v for k, v in params.items()})], local_scheduler=True,
                       log_level="WARNING")
    too_many = FitClusters(**{**params, "num_clusters": 13})  # 12 training documents
    with pytest.raises(InputError, match="larger than the number of training documents"):
        too_many.run()
    assert not too_many.out_path().exists()


def test_interrupted_stage_never_looks_finished(tmp_path, monkeypatch):
    corpus = write_tiny_corpus(tmp_path / "corpus", n_train=3, n_eval=2)
    stage = PrepareCorpus(corpus=str(corpus), run_dir=str(tmp_path / "run"))

    def crash(self, out):
        (out / "train.parquet").write_text("half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(PrepareCorpus, "build", crash)
    with pytest.raises(KeyboardInterrupt):
        stage.run()
    assert not stage.out_path().exists() and not stage.complete()
    monkeypatch.undo()
    stage.run()  # the rerun resumes from scratch and completes
    assert stage.complete()


def test_task_list_none_and_fewshot_models_filter(tmp_path):
    run = RunAll(run_dir=str(tmp_path), tasks="none")
    assert run.task_list == []
    run = RunAll(run_dir=str(tmp_path), tasks="domains,none", fewshot_models="dense,moe")
    assert run.task_list == ["domains"]  # the demo corpus has a label field
    assert run.fewshot_model_names(["seed", "dense", "expert_000", "moe"]) == ["dense", "moe"]
    with pytest.raises(InputError, match="--fewshot-models"):
        run.fewshot_model_names(["dense"])


@pytest.mark.parametrize("flag,value", [("route_early", "1,0,4"), ("route_early", "-2"), ("route_early", "1,x"),
                                        ("route_every", 0), ("route_weights", "likelihood")])
def test_bad_routing_flags_fail_with_the_flag_named(flag, value, tmp_path):
    with pytest.raises(InputError) as err:
        RunAll(run_dir=str(tmp_path), **{flag: value})
    assert f"--{flag.replace('_', '-')}" in str(err.value) and "\n" not in str(err.value)


def test_routing_flags_enter_the_ensemble_hash_only(tmp_path):
    from pipeline.merging import MergeExperts

    base = dict(corpus="demo", run_dir=str(tmp_path))
    paths = {MergeExperts(**base, method="ensemble", **kw).out_path()
             for kw in ({}, {"route_weights": "distance"}, {"route_early": "1,2,4,8"})}
    assert len(paths) == 3
    assert (MergeExperts(**base, method="average").out_path()
            == MergeExperts(**base, method="average", route_weights="distance", route_early="1,2").out_path())
