"""Every stage's output folder for the demo defaults and for flag changes, pinned: restructuring the parameters
(groups, significance, hashing) must resolve the folders runs already have."""
from __future__ import annotations

import json
from pathlib import Path

import luigi
import pytest

from pipeline import RunAll
from pipeline.failures import upstream

GOLDEN = Path(__file__).with_name("stage_paths.json")
VARIANTS = {
    "defaults": {},
    "branch_schedule_restart": {"branch_schedule": "restart"},  # the schedule of earlier versions: their folders
    "num_clusters": {"num_clusters": 8},
    "temperature": {"temperature": 0.5},
    "branch_from_average": {"branch_from": "average", "temperature": 0.5},
    "execution": {"device": "cpu", "eval_batch_size": 4, "experts_per_gpu": 2, "compile": "off",
                  "force_stage": "FitClusters"},
    "learning_rate_preset": {"learning_rate": "3e-3"},
    "learning_rate": {"learning_rate": "1e-3"},
    "batch": {"batch_tokens": 4096, "micro_batch_size": "4"},
    "micro_batch": {"micro_batch_size": "4"},
    "gpus_per_expert": {"gpus_per_expert": 2, "sharding": "fsdp"},
    "small_share": {"small_share": "one_block"},
    "merging": {"merge_lambda": "0.5", "moe_shared": "ties", "ties_density": 0.3, "dare_drop_rate": 0.2,
                "merge_methods": "ensemble,posterior,average,task_arithmetic,ties,dare_linear,dare_ties,moe",
                "merge_weights": "uniform", "router_init": "hidden", "moe_top_k": 1},
    "routing": {"top_k": "all", "route_every": 8, "route_early": "1,2", "route_weights": "distance"},
    "training": {"expert_trainable": "ffn", "compute_match": "tokens", "expert_budget": "uniform", "eval_every": 5,
                 "keep_best": False, "seed_fraction": 0.5, "train_tokens": 2_000_000, "moe_tokens": 1000},
    "clustering": {"clusterer": "balanced", "balance_by": "tokens", "assign": "balanced", "embed_sample": 50,
                   "cluster_sample": 60, "seed": 1},
    "corpus_and_eval": {"max_docs": 500, "label_field": "source", "model_size": "mini", "vocab_size": 512,
                        "seq_len": 64, "eval_max_docs": 20, "shots": 2, "fewshot_seeds": "1,2",
                        "fewshot_max_test": 10, "fewshot_models": "dense,moe"},
}


def stage_paths(run_dir: Path, **params) -> list[str]:
    """The output path (relative to the run folder) of every stage upstream of RunAll."""
    root = RunAll(run_dir=str(run_dir), **params)
    return sorted(t.out_path().relative_to(run_dir).as_posix() for t in upstream(luigi.task.flatten(root.requires())))


@pytest.mark.parametrize("variant", VARIANTS)
def test_stage_folders_are_unchanged(tmp_path, variant):
    expected = json.loads(GOLDEN.read_text())[variant]
    assert stage_paths(tmp_path / "run", **VARIANTS[variant]) == expected


if __name__ == "__main__":  # python -m tests.pipeline.test_stage_paths: rewrite the golden file (only on purpose)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        GOLDEN.write_text(json.dumps({v: stage_paths(Path(d) / "run", **kw) for v, kw in VARIANTS.items()},
                                     indent=1) + "\n")
