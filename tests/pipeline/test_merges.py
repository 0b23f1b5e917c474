"""Merge stages end to end: task-arithmetic merges (λ chosen on the valid shards), the MoE with shared weights from
the TIES merge, FFN-only (FlexOlmo) experts, the report's merge section; hashes and bad flags."""
from __future__ import annotations

import json

import luigi
import numpy as np
import pytest
import torch

from corpus.io import InputError
from pipeline import MergeExperts, RunAll, TrainExpert
from experts.merging import RECIPE_FLAGS
from pipeline.merging import FLAGS
from tests.pipeline.conftest import tiny_params


def test_merge_methods_end_to_end(tiny_corpus, tmp_path):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    params = tiny_params(tiny_corpus, run_dir, tasks="none", merge_methods="ensemble,average,task_arithmetic,ties,moe",
                         moe_shared="ties", expert_trainable="ffn")
    assert luigi.build([RunAll(**params)], local_scheduler=True, workers=1, log_level="WARNING")
    merged = {p.name: p for d in run_dir.glob("merged-*") for p in d.iterdir()}
    assert set(merged) == {"ensemble", "average", "task_arithmetic", "ties", "moe"}
    for m in ("task_arithmetic", "ties"):
        meta = json.loads((merged[m] / "merge.json").read_text())
        assert meta["method"] == m and len(meta["lambda_search"]) > 1
        best = min(meta["lambda_search"], key=meta["lambda_search"].get)
        assert float(best) == meta["recipe"]["lam"]
        assert meta["weights"] == pytest.approx([0.5, 0.5], abs=0.2) and sum(meta["weights"]) == pytest.approx(1)
    assert json.loads((merged["moe"] / "moe.json").read_text())["shared"] == str(merged["ties"])

    # FlexOlmo experts: every non-FFN tensor is the seed's
    seed = load_file(str(next(run_dir.glob("seed-*")) / "model.safetensors"))
    for e in next(run_dir.glob("experts-*")).iterdir():
        trained = load_file(str(e / "model.safetensors"))
        assert all(torch.equal(trained[k], v) != (".mlp." in k) for k, v in seed.items())

    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["merges"]["parameter"]) == {"average", "task_arithmetic", "ties"}
    moe = report["merges"]["moe"]
    assert moe["shared"] == str(merged["ties"]) and moe["finetune_tokens"] > 0 and moe["extra_tokens_fraction"] > 0
    layers = moe["routing"]["per_layer"]
    assert [r["layer"] for r in layers] == [0, 1]  # the tiny preset's two layers
    for r in layers:
        assert len(r["load"]) == 2 and np.isclose(sum(r["load"]), 1) and 0 <= r["per_token_entropy"] <= np.log(2) + 1e-6
    md = (run_dir / "report.md").read_text()
    assert "## Merges" in md and "| ties |" in md and "**Extra compute:**" in md and "| layer | per-token entropy" in md


def test_merge_hashes(tmp_path):
    base = dict(corpus="demo", run_dir=str(tmp_path))
    path = lambda method, **kw: MergeExperts(**base, method=method, **kw).out_path()  # noqa: E731
    assert path("ties", ties_density=0.5) != path("ties")
    assert path("average", ties_density=0.5) == path("average")
    assert path("task_arithmetic", dare_drop_rate=0.3) == path("task_arithmetic")
    assert path("dare_ties", dare_drop_rate=0.3) != path("dare_ties")
    assert path("task_arithmetic", merge_lambda="0.5") != path("task_arithmetic")
    assert path("moe", moe_shared="seed") != path("moe")
    assert path("moe", moe_shared="ties", ties_density=0.5) != path("moe", moe_shared="ties")  # via its input
    # the default expert training keeps the folders runs already have; FFN-only experts get their own
    expert = lambda **kw: TrainExpert(**base, cluster_id=0, **kw)  # noqa: E731
    assert "expert_trainable" not in expert().hashed
    assert expert(expert_trainable="ffn").out_path() != expert().out_path()
    assert expert(expert_trainable="ffn").train_config(1000).trainable == "ffn"
    # every parameter merge of the library is a --merge-methods value hashing the flags behind its recipe fields
    from experts.merging import PARAMETER_MERGES as LIBRARY

    for name, method in LIBRARY.items():
        assert set(FLAGS[name]) == {"merge_weights"} | {RECIPE_FLAGS[p] for p in method.params}


@pytest.mark.parametrize("flag,value,message", [
    ("dare_drop_rate", 1.0, "--dare-drop-rate 1.0: must be in [0, 1)"),
    ("dare_drop_rate", -0.1, "--dare-drop-rate -0.1: must be in [0, 1)"),
    ("ties_density", 0.0, "--ties-density 0.0: must be in (0, 1]"),
    ("merge_lambda", "big", "--merge-lambda 'big': a finite number or 'auto'"),
    ("merge_lambda", "nan", "--merge-lambda 'nan'"),
    ("moe_shared", "dense", "--moe-shared 'dense': choose one of"),
    ("merge_weights", "random", "--merge-weights 'random'"),
    ("expert_trainable", "attention", "--expert-trainable 'attention'"),
])
def test_bad_merge_flags_are_one_line_naming_the_flag(flag, value, message, tmp_path):
    with pytest.raises(InputError) as err:
        RunAll(run_dir=str(tmp_path), **{flag: value})
    assert message in str(err.value) and "\n" not in str(err.value)
