"""RunAll at the default merge methods with seeds of other families (saved as downloads are: family tokenizer, no pad
token for Llama and GPT-2, GPT-2's context in n_positions), and a merge method that fails: the report and the model
cards are still written, with the failure named."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import luigi
import pytest

from corpus.io import InputError
from pipeline import RunAll
from tests.experts.family_helpers import save_family
from tests.pipeline.conftest import tiny_params


def _run(corpus: Path, run_dir: Path, seed: Path, **kw) -> dict:
    params = tiny_params(corpus, run_dir, seed_model=str(seed), seq_len=0, seed_fraction=0.5, vocab_size=4096,
                         train_tokens=4096, batch_tokens=1024, moe_tokens=1024, tasks="none", **kw)
    params.pop("learning_rate")
    assert luigi.build([RunAll(**params)], local_scheduler=True, workers=1, log_level="WARNING")
    return json.loads((run_dir / "report.json").read_text())


def _models(report: dict) -> set[str]:
    return {m for m, r in report["perplexity"].items() if (r.get("test") or {}).get("perplexity")}


def test_llama_without_pad_token_and_a_failing_merge(tiny_corpus, tmp_path, monkeypatch):
    """A Llama seed whose tokenizer has no pad token builds the MoE (router from padded batches of hidden states); TIES
    failing for a reason of its own leaves every other model, the report (naming it) and the cards."""
    from experts import merging

    def broken(method, out, inputs):
        raise RuntimeError("simulated failure inside ties")

    monkeypatch.setitem(merging.MERGE_METHODS, "ties", replace(merging.MERGE_METHODS["ties"], build=broken))
    seed = save_family(tmp_path / "llama", "llama", context=64)
    report = _run(tiny_corpus, tmp_path / "run", seed)
    assert {"dense", "ensemble_top1", "posterior", "average", "task_arithmetic", "moe"} <= _models(report)
    assert "ties" not in report["perplexity"]
    assert "simulated failure inside ties" in report["merges"]["failed"]["ties"]["error"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "**ties failed**" in md and "--force-stage MergeExperts" in md
    moe = json.loads(next((tmp_path / "run").glob("merged-*/moe/moe.json")).read_text())
    assert moe["architecture"] == "MixtralForCausalLM" and moe["router_init"] == "hidden"  # the default
    assert report["merges"]["moe"]["router"] == moe["router"]["method"]
    cards = json.loads(next((tmp_path / "run").glob("cards-*/cards.json")).read_text())
    assert "failed" in cards["ties"] and Path(cards["moe"]).is_file()
    assert moe["router"]["method"].split(" (")[0] in Path(cards["moe"]).read_text()


def test_qwen2_seed_builds_a_qwen2_moe(tiny_corpus, tmp_path):
    """With --router-init centroids the TF-IDF centroids (another dimension than the hidden size) route through the
    least-squares map, and report, moe.json and card say so."""
    seed = save_family(tmp_path / "qwen2", "qwen2", tie=True, context=64)
    report = _run(tiny_corpus, tmp_path / "run", seed, router_init="centroids")
    assert {"dense", "average", "ties", "moe"} <= _models(report)
    moe = json.loads(next((tmp_path / "run").glob("merged-*/moe/moe.json")).read_text())
    assert moe["architecture"] == "Qwen2MoeForCausalLM" and moe["router_init"] == "centroids"
    assert "least-squares" in moe["router"]["method"] and report["merges"]["moe"]["router"] == moe["router"]["method"]
    assert "least-squares" in (tmp_path / "run" / "report.md").read_text()


def test_gpt2_seed_skips_the_moe_and_reads_n_positions(tiny_corpus, tmp_path):
    """GPT-2 (context 48 in n_positions, no pad token): the default merges skip moe, the report says why, and
    the ensembles evaluate within the model's 48 positions; asking for moe is refused before any work."""
    seed = save_family(tmp_path / "gpt2", "gpt2", context=48)
    report = _run(tiny_corpus, tmp_path / "run", seed)
    assert {"dense", "ensemble_top1", "posterior", "average", "task_arithmetic", "ties"} <= _models(report)
    assert "moe" not in report["run"]["models"] and "GPT-2" in report["run"]["skipped"]["moe"]
    assert "Merge `moe` skipped" in (tmp_path / "run" / "report.md").read_text()
    with pytest.raises(InputError, match="--merge-methods moe: .*supports Llama, Mistral, Qwen2, Qwen3"):
        RunAll(**tiny_params(tiny_corpus, tmp_path / "run2", seed_model=str(seed), merge_methods="average,moe"))
    assert not (tmp_path / "run2").exists()
