"""Each stage carries the parameter groups it uses and, through `pipeline.params.carries`, those of the stages it
requires; a run's whole set of flags still builds any one stage, with the run's folders."""
from __future__ import annotations

import luigi
import luigi.cmdline_parser
import pytest

import pipeline
from pipeline import PrepareCorpus, RunAll, TrainDense, TrainExpert, TrainSeed
from pipeline.failures import upstream
from pipeline.params import RUN_PARAMETERS

ALL_METHODS = {"merge_methods": "ensemble,posterior,average,task_arithmetic,ties,dare_linear,dare_ties,moe",
               "moe_shared": "ties", "tasks": "domains", "label_field": "source"}


def names(task) -> set[str]:
    return {n for n, _ in task.get_params()}


def graph(run_dir, **params) -> list:
    root = RunAll(run_dir=str(run_dir), **params)
    return list(upstream(luigi.task.flatten(root.requires())))


@pytest.mark.parametrize("params", [{}, ALL_METHODS, {"branch_from": "average", "num_clusters": 3}])
def test_every_stage_carries_the_run_parameters_of_its_inputs(tmp_path, params):
    """`clone` hands down only what the cloning stage has: an input with a run parameter its stage lacks would
    silently take the default (another folder)."""
    for stage in graph(tmp_path / "run", **params):
        for t in stage._inputs():
            missing = (names(t) & RUN_PARAMETERS) - names(stage)
            assert not missing, f"{stage.task_family} requires {t.task_family} but lacks {sorted(missing)}"


@pytest.mark.parametrize("params", [{}, ALL_METHODS, {"branch_from": "average", "router_init": "centroids"}])
def test_a_stage_hashes_only_parameters_it_carries(tmp_path, params):
    derived = {"label", "router_fit"}  # PrepareCorpus: the label field resolved; MergeExperts moe: the router fit
    for stage in graph(tmp_path / "run", **params):
        assert set(stage.hashed) - derived <= names(stage), stage.task_family


def test_a_stage_carries_only_its_own_and_its_inputs_groups():
    run = names(RunAll)
    assert run == set(RUN_PARAMETERS)
    assert {"num_clusters", "temperature", "train_tokens", "merge_methods"}.isdisjoint(names(PrepareCorpus))
    assert {"num_clusters", "compute_match", "top_k"}.isdisjoint(names(TrainSeed) | names(TrainDense))
    assert {"eval_max_docs", "tasks", "merge_methods", "moe_tokens"}.isdisjoint(names(TrainExpert))
    assert {"num_clusters", "temperature", "train_tokens"} <= names(TrainExpert)
    for name in pipeline.__all__:
        cls = getattr(pipeline, name)
        assert names(cls) & RUN_PARAMETERS <= run


def test_a_runs_whole_set_of_flags_builds_one_stage(tmp_path):
    params = {"run_dir": str(tmp_path / "run"), "num_clusters": 8, "max_docs": 30, "temperature": 0.5,
              "merge_methods": "ensemble", "eval_max_docs": 5}
    alone = PrepareCorpus(**params)
    assert alone.max_docs == 30 and not hasattr(alone, "num_clusters")
    stages = list(upstream(luigi.task.flatten(RunAll(**params).requires())))
    assert alone.out_path() == next(t for t in stages if t.task_family == "PrepareCorpus").out_path()
    expert = TrainExpert(**params, cluster_id=3)
    assert expert.out_path() == next(t for t in stages if t.task_family == "TrainExpert" and t.cluster_id == 3).out_path()
    with pytest.raises(luigi.parameter.UnknownParameterException, match="num_cluster"):
        PrepareCorpus(**params, num_cluster=8)  # not a run parameter: still refused


def test_a_stage_command_line_accepts_the_run_flags_it_does_not_carry(capsys):
    parser = luigi.cmdline_parser.CmdlineParser._build_parser(root_task="PrepareCorpus")
    args = parser.parse_args(["PrepareCorpus", "--num-clusters", "8", "--max-docs", "30", "--keep-best", "false"])
    assert args.max_docs == "30"
    with pytest.raises(SystemExit):  # a misspelled flag is still one line
        parser.parse_args(["PrepareCorpus", "--num-cluster", "8"])
    assert "did you mean --num-clusters" in capsys.readouterr().err


def test_a_training_config_error_names_the_flag(tmp_path):
    """A `TrainConfig` field it refuses (ConfigError) comes back naming the flag that set it, or the pipeline."""
    from corpus.io import ConfigError
    from pipeline.training import config_error

    seed = TrainSeed(run_dir=str(tmp_path / "run"), learning_rate="1e-3")
    err = config_error(ConfigError("TrainConfig.min_lr", "must be in [0, lr], got -1"), seed)
    assert str(err) == "--learning-rate 1e-3: TrainConfig.min_lr must be in [0, lr], got -1"
    err = config_error(ConfigError("TrainConfig.schedule_steps", "must be ≥ 1, got 0"), seed)
    assert str(err) == "TrainConfig.schedule_steps (set by the pipeline) must be ≥ 1, got 0"
    err = config_error(ConfigError("TrainConfig.trainable", "must be all or ffn, got 'x'"), seed)
    assert "(set by the pipeline)" in str(err)  # TrainSeed has no --expert-trainable


def test_a_stage_cannot_clone_a_stage_that_carries_more(tmp_path):
    """A clone would give the parameters the stage lacks their defaults (another folder): refused instead."""
    from pipeline import ShardCorpus

    dense = TrainDense(run_dir=str(tmp_path / "run"), num_clusters=8)
    with pytest.raises(TypeError, match="TrainDense cannot clone ShardCorpus: it does not carry .*num_clusters"):
        dense.clone(ShardCorpus)
    assert dense.clone(TrainSeed).out_path() == TrainSeed(run_dir=str(tmp_path / "run")).out_path()
