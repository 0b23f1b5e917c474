"""experts.run_models: a run's model names parse back to what made them, `load_model` loads any model folder of a
run, bad folders fail naming the field, and reading names stays light (no torch)."""
import os
import subprocess
import sys

import pytest

from corpus.io import ConfigError
from experts.run_models import (
    DENSE_MOE_COMPUTE, TRAINED, ensemble_name, ensemble_top_k, expert_cluster, expert_name, has_training, is_ensemble,
    is_expert, load_model, model_kind,
)
from experts.scoring import HFCausalLM
from tests.experts.hf_helpers import build_tiny_run


def test_names_parse_back():
    for c in (0, 7, 123, 1000):
        assert expert_cluster(expert_name(c)) == c and is_expert(expert_name(c)) and has_training(expert_name(c))
    for top in (1, 2, "all"):
        name = ensemble_name(top)
        assert ensemble_top_k(name) == str(top) and is_ensemble(name) and not has_training(name)
    assert expert_name(3) == "expert_003" and ensemble_name("all") == "ensemble_topall"
    for other in ("seed", "dense", "posterior", "moe", "average", DENSE_MOE_COMPUTE, "oracle"):
        assert expert_cluster(other) is None and ensemble_top_k(other) is None
    assert expert_cluster("expert_x") is None  # the prefix without a cluster id is no expert's name
    assert all(has_training(m) for m in TRAINED) and not has_training("average")


def test_reading_names_imports_no_torch():
    code = "import sys, experts.run_models; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_tiny_run(tmp_path_factory.mktemp("run"))


def test_load_model_of_each_kind(run):
    expert = run / "experts-x" / "cluster_000"
    hf = load_model(expert, device="cpu", name="expert_000")
    assert isinstance(hf, HFCausalLM) and hf.name == "expert_000" and model_kind(expert) == "hf"
    assert load_model(expert, "hf", device="cpu").name == str(expert)  # default name: the folder
    ens = load_model(run / "merged-x" / "ensemble", device="cpu", batch_size=3, name="ensemble_top2")
    assert ens.name == "ensemble_top2" and ens.expert_batch_size == 3 and ens.top_k == 2
    assert load_model(run / "merged-x" / "posterior", device="cpu").name == "posterior"  # ensemble.json's name


def test_bad_folders_name_the_field(run, tmp_path):
    for folder, kind, field in ((tmp_path / "nope", "auto", "folder"), (tmp_path, "auto", "folder"),
                                (run / "merged-x" / "ensemble", "hf", "kind"), (tmp_path, "moe-ish", "kind")):
        with pytest.raises(ConfigError) as e:
            load_model(folder, kind, device="cpu")
        assert e.value.field == field and "\n" not in str(e.value)
