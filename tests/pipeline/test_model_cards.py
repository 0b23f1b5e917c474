"""A tiny RunAll, then what a user does with its folders: every model folder has a card, any folder would upload
(file list checked offline), the ensembles load in HF (stop strings with the run's byte-level tokenizer), every
model kind scores through the lm-eval model, and saved files carry what older transformers need."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import luigi
import pytest

from corpus.io import InputError
from pipeline import RunAll
from tests.pipeline.conftest import tiny_params, write_tiny_corpus


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    corpus = write_tiny_corpus(root / "corpus")
    params = tiny_params(corpus, root / "run")
    assert luigi.build([RunAll(**params)], local_scheduler=True, workers=1, log_level="WARNING")
    return root / "run"


def _model_folders(run_dir: Path) -> dict[str, Path]:
    cards = json.loads(next(run_dir.glob("cards-*/cards.json")).read_text())
    return {name: Path(p).parent for name, p in cards.items()}


def test_every_model_folder_has_a_card(run_dir):
    folders = _model_folders(run_dir)
    expected = {"seed", "dense", "expert_000", "expert_001", "average", "moe", "moe_merged", "posterior"}
    assert expected <= set(folders) and any(n.startswith("ensemble_top") for n in folders)
    on_disk = {p.parent for pattern in ("*/model.safetensors", "*/*/model.safetensors", "*/*/ensemble.json")
               for p in run_dir.glob(pattern)}
    assert on_disk == set(folders.values())  # every saved model folder, nothing else
    for name, folder in folders.items():
        card = (folder / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers") and "## How to load" in card, name
    clusters = json.loads(next(run_dir.glob("cluster-info-*/clusters.json")).read_text())["clusters"]
    expert = (folders["expert_001"] / "README.md").read_text()
    assert "cluster 1 of 2" in expert and ", ".join(clusters[1]["top_terms"][:3]) in expert
    ppl = json.loads(next(p for p in run_dir.glob("eval-*/perplexity/expert_001.json")).read_text())
    assert f"{ppl['test']['overall']['perplexity']:,.3f}" in expert
    assert "compute-matched dense baseline" in expert and "Few-shot `domains`" in expert
    ens = (folders["posterior"] / "README.md").read_text()
    assert "import experts" in ens and "## Experts" in ens
    assert "extra tokens beyond the compute-matched budget" in (folders["moe"] / "README.md").read_text()


def test_push_to_hub_file_lists_offline(run_dir, monkeypatch, tmp_path):
    from experts.hf_ensemble import push_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any request would fail
    for name, folder in _model_folders(run_dir).items():
        files = push_folder(folder, f"someone/{name}", dry_run=True)
        assert "README.md" in files and "config.json" in files and "tokenizer.json" in files, name
        assert not any(f.endswith("stage.json") for f in files), name
        if (folder / "ensemble.json").is_file():  # self-contained: the experts go along, with their cards
            assert {"ensemble.json", "experts/expert_000/model.safetensors", "experts/expert_001/README.md",
                    "modeling_cbtm_ensemble.py"} <= set(files), name
            assert ("centroids.npy" in files) == name.startswith("ensemble_top"), name  # c-BTM's router
        else:
            assert "model.safetensors" in files, name
    empty = tmp_path / "tokenizer-only"
    shutil.copytree(next(run_dir.glob("tokenizer-*")), empty)
    with pytest.raises(InputError, match="holds no weights") as e:
        push_folder(empty, "someone/x", dry_run=True)
    assert "\n" not in str(e.value)


def test_run_ensembles_load_in_hf_with_stop_strings(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import experts  # noqa: F401

    folder = _model_folders(run_dir)["ensemble_topall"]
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompt = "Whisk the butter and"
    want = model.ensemble.generate([prompt], max_new_tokens=12)[0]
    enc = tok(prompt, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    got = tok.decode(model.generate(**enc, max_new_tokens=12, do_sample=False)[0, n:], skip_special_tokens=True)
    assert got == want
    words = want.split()
    if len(words) >= 2:  # the stop string ends generation at its first occurrence
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, stop_strings=[words[1]], tokenizer=tok)
        text = tok.decode(out[0, n:], skip_special_tokens=True)
        assert text.rstrip().endswith(words[1]) and len(text) <= len(want)


def test_every_model_kind_scores_through_lm_eval_model(run_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from tasks.lm_eval_model import CBTMLM

    reqs = [Instance("loglikelihood", {}, ("Whisk the butter and", " sugar"), 0),
            Instance("loglikelihood", {}, ("The striker scored a", " goal"), 1)]
    for name, folder in _model_folders(run_dir).items():
        lm = CBTMLM(pretrained=str(folder), device="cpu")
        out = lm.loglikelihood(reqs)
        assert all(s < 0 and isinstance(g, bool) for s, g in out), name


def test_saved_files_carry_what_older_transformers_need(run_dir):
    from experts.compat import MIN_TRANSFORMERS

    for name, folder in _model_folders(run_dir).items():
        config = json.loads((folder / "config.json").read_text())
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        assert config.get("use_cache", True) is True, name
        assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and tok["clean_up_tokenization_spaces"] is False
        assert tok["model_max_length"] == config["max_position_embeddings"], name
        if "rope_parameters" in config:
            assert config["rope_theta"] == config["rope_parameters"]["rope_theta"], name
    python = os.environ.get("CBTM_MIN_TRANSFORMERS_PYTHON", ".venv-min/bin/python")
    if not Path(python).is_file():
        pytest.skip(f"no venv with transformers=={MIN_TRANSFORMERS} at {python} (make venv-min)")
    folders = [str(f) for n, f in _model_folders(run_dir).items() if n in ("seed", "expert_000", "average", "moe")]
    check = Path(__file__).parent / "check_old_transformers.py"
    old = subprocess.run([python, str(check), *folders], capture_output=True, text=True, timeout=600)
    new = subprocess.run([sys.executable, str(check), *folders], capture_output=True, text=True, timeout=600)
    assert old.returncode == 0 and new.returncode == 0, old.stderr[-2000:] + new.stderr[-2000:]
    got, want = json.loads(old.stdout.splitlines()[-1]), json.loads(new.stdout.splitlines()[-1])
    assert got["version"] == MIN_TRANSFORMERS
    for f in folders:
        assert got[f]["ids"] == want[f]["ids"] and got[f]["text"] == want[f]["text"], f
        assert got[f]["logits"] == pytest.approx(want[f]["logits"], rel=1e-4, abs=1e-3), f
