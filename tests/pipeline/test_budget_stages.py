"""Budget flags in the pipeline: what each flag reruns (hashes), a --num-clusters grid that reuses the tokenizer,
seed and dense model (stage log), shares below one block trained with their tokens, empty clusters refused."""
from __future__ import annotations

import json

import luigi
import pytest

from corpus.io import InputError
from pipeline import (FitClusters, RunAll, ShardCorpus, TokenizeCorpus, TrainDense, TrainExpert, TrainExperts,
                      TrainSeed)
from pipeline.stamps import read_stage_log
from tests.pipeline.conftest import tiny_params


def test_each_flag_reruns_exactly_what_it_affects(tmp_path):
    base = dict(corpus="demo", run_dir=str(tmp_path))

    def paths(**kw):
        luigi.task_register.Register.clear_instance_cache()
        return {s.__name__: s(**base, **kw, **({"cluster_id": 0} if s is TrainExpert else {})).out_path()
                for s in (TokenizeCorpus, FitClusters, ShardCorpus, TrainSeed, TrainDense, TrainExpert)}

    ref = paths()
    changed = lambda **kw: {k for k, v in paths(**kw).items() if v != ref[k]}  # noqa: E731
    assert changed(compute_match="tokens") == {"TrainExpert"}
    assert changed(expert_budget="uniform") == {"TrainExpert"}
    assert changed(balance_by="tokens") == {"FitClusters", "ShardCorpus", "TrainExpert"}
    assert changed(balance_by="tokens", clusterer="random") == changed(clusterer="random")  # no balance to weigh
    assert changed(eval_every=7) == changed(keep_best=False) == {"TrainSeed", "TrainDense", "TrainExpert"}
    assert changed(num_clusters=3) == {"FitClusters", "ShardCorpus", "TrainExpert"}  # seed and dense stay
    assert changed(gpus_per_expert=2) == {"TrainExpert"}
    assert changed(branch_schedule="restart") == {"TrainSeed", "TrainDense", "TrainExpert"}  # via the seed


@pytest.mark.parametrize("flag,value", [("compute_match", "flops"), ("expert_budget", "equal"),
                                        ("balance_by", "chars"), ("eval_every", -1),
                                        ("branch_schedule", "cosine")])
def test_bad_budget_flags_fail_with_the_flag_named(flag, value, tmp_path):
    with pytest.raises(InputError) as err:
        RunAll(run_dir=str(tmp_path), **{flag: value})
    assert f"--{flag.replace('_', '-')}" in str(err.value) and "\n" not in str(err.value)


def test_num_clusters_grid_reuses_tokenizer_seed_and_dense(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    params = tiny_params(tiny_corpus, run_dir, merge_methods="ensemble")
    wanted = lambda p: [TrainExperts(**p), TrainDense(**p)]  # noqa: E731
    assert luigi.build(wanted(params), local_scheduler=True, workers=1, log_level="WARNING")
    first = {r["stage"] for r in read_stage_log(run_dir)}
    assert {"TrainTokenizer", "TokenizeCorpus", "TrainSeed", "TrainDense", "TrainExpert"} <= first
    n = len(read_stage_log(run_dir))
    assert luigi.build(wanted({**params, "num_clusters": 3}), local_scheduler=True, workers=1, log_level="WARNING")
    rerun = [r["stage"] for r in read_stage_log(run_dir)[n:]]
    assert sorted(set(rerun)) == ["AssignClusters", "FitClusters", "ShardCorpus", "TrainExpert"]
    assert rerun.count("TrainExpert") == 3
    # every expert ran the dense model's steps with its share of the dense batch (--compute-match steps)
    dense = json.loads(next(run_dir.glob("dense-*/training.json")).read_text())
    for k in (2, 3):
        plan = TrainExpert(**{**params, "num_clusters": k}, cluster_id=0).budget_plan()
        experts = [json.loads((TrainExpert(**{**params, "num_clusters": k}, cluster_id=c).out_path()
                               / "training.json").read_text()) for c in range(k)]
        assert all(e["steps"] == dense["steps"] for e in experts)
        assert sum(e["tokens_seen"] for e in experts) + plan["rounding"] == dense["tokens_seen"]
        assert [e["plan"]["tokens_per_step"] for e in experts] == [e["batch_tokens"] for e in plan["experts"]]
        assert all(e["keep_best"] and 1 <= e["kept_step"] <= e["steps"] and len(e["valid_curve"]) >= 5
                   for e in experts + [dense])
        # --branch-schedule continue (default): seed, then dense or each expert, are one schedule of seed + S steps
        seed = json.loads(next(run_dir.glob("seed-*/training.json")).read_text())
        assert seed["config"]["schedule_steps"] == seed["steps"] + dense["steps"] and seed["config"]["schedule_start"] == 0
        assert all((e["config"]["schedule_start"], e["config"]["schedule_steps"]) == (seed["steps"],
                   seed["steps"] + e["steps"]) for e in experts + [dense])


def test_shares_below_one_block_train_with_the_dense_models_tokens(tiny_corpus, tmp_path, caplog):
    # a dense batch of 2 blocks cannot give each of 3 clusters a whole block per step: each trains one block per
    # step for its share of the dense model's steps (--small-share fewer_steps), said once in the log
    params = tiny_params(tiny_corpus, tmp_path / "run", num_clusters=3, batch_tokens=128, merge_methods="ensemble")
    with caplog.at_level("INFO", logger="luigi-interface"):
        assert luigi.build([TrainExperts(**params), TrainDense(**params)], local_scheduler=True, workers=1,
                           log_level="WARNING")
    plan = TrainExpert(**params, cluster_id=0).budget_plan()
    dense = json.loads((TrainDense(**params).out_path() / "training.json").read_text())
    experts = [json.loads((TrainExpert(**params, cluster_id=c).out_path() / "training.json").read_text())
               for c in range(3)]
    small = [e for e in plan["experts"] if e["small"]]
    assert small and all(e["batch_blocks"] == 1 and e["steps"] < dense["steps"] for e in small)
    assert [e["steps"] for e in experts] == [e["steps"] for e in plan["experts"]]
    assert sum(e["tokens_seen"] for e in experts) + plan["rounding"] == dense["tokens_seen"]
    assert 0 <= plan["rounding"] < dense["steps"] * plan["seq_len"]
    said = [r.getMessage() for r in caplog.records if "--small-share fewer_steps" in r.getMessage()]
    assert len(said) == 1 and "less than one block of the dense batch" in said[0]
    # the other rule is its own expert folder; the default keeps the folders earlier runs have
    assert TrainExpert(**params, cluster_id=0, small_share="one_block").out_path() != \
        TrainExpert(**params, cluster_id=0).out_path()


def test_empty_cluster_is_still_refused_in_one_line(tiny_corpus, tmp_path, monkeypatch):
    from corpus.io import read_json

    params = tiny_params(tiny_corpus, tmp_path / "run", num_clusters=3)
    assert luigi.build([ShardCorpus(**params)], local_scheduler=True, workers=1, log_level="WARNING")
    meta = read_json(ShardCorpus(**params).out_path() / "meta.json")
    meta["clusters"].pop("2", None)  # cluster 2 without training tokens
    monkeypatch.setattr("pipeline.training.read_json", lambda path: meta if str(path).endswith("meta.json")
                        else read_json(path))
    stage = TrainExpert(**params, cluster_id=1)
    with pytest.raises(InputError) as err:
        stage.run()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cluster(s) 2 have no training tokens") and not stage.out_path().exists()


def test_balance_by_tokens_balances_document_lengths(tmp_path):
    """Clusters balanced by length: the fitted and the assigned (--assign balanced) clusters hold about the same
    number of bytes, within the weighted bounds, on a corpus whose domains differ in document length."""
    import gzip

    import numpy as np

    from clustering import document_weights, weighted_size_bounds
    from pipeline import AssignClusters, PrepareCorpus
    from tests.pipeline.conftest import tiny_docs

    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, n, seed in (("train", 60, 0), ("valid", 6, 1), ("test", 6, 2)):
        rows = tiny_docs(n, seed)
        for r in rows:  # code documents 4× longer than the others
            r["text"] = " ".join([r["text"]] * (4 if r["source"] == "code" else 1))
        (folder / f"{split}.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0))
    params = tiny_params(folder, tmp_path / "run", num_clusters=4, balance_by="tokens", assign="balanced")
    assert luigi.build([AssignClusters(**params)], local_scheduler=True, workers=1, log_level="WARNING")
    clusters = json.loads((FitClusters(**params).out_path() / "config.json").read_text())
    summary = json.loads((AssignClusters(**params).out_path() / "summary.json").read_text())
    w = document_weights(PrepareCorpus(**params).out_path())
    lo, hi = weighted_size_bounds(w.sum(), w.max(), 4, 1.02)
    assert clusters["weighted"] and lo <= min(clusters["weighted_sizes"]) and max(clusters["weighted_sizes"]) <= hi
    sizes = np.asarray(summary["splits"]["train"]["weighted_sizes"])
    assert sizes.min() >= lo and sizes.max() <= hi
    assert max(summary["splits"]["train"]["sizes"]) > 1.5 * min(summary["splits"]["train"]["sizes"])  # not by docs
