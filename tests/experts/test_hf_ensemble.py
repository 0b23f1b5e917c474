"""Ensemble folders as Hugging Face models: AutoModelForCausalLM loads them, their log-probs are the pipeline
ensemble's, HF generate decodes as the project does, folders survive copies, bad folders fail in one line."""
import json
import shutil

import pytest
import torch

import experts  # noqa: F401  (registers cbtm_ensemble)
from corpus.io import InputError
from experts.ensemble_folder import load_ensemble
from experts.hf_ensemble import CBTMEnsembleForCausalLM
from tests.experts.hf_helpers import build_tiny_run
from tests.experts.merge_helpers import random_text

PROMPTS = [random_text(n, 100 + n) for n in (5, 11, 3)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_tiny_run(tmp_path_factory.mktemp("run"))


def _auto(folder, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **kw)


def _tok(folder, side="right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = side
    return tok


def _batch(tok, texts, side="right"):
    tok.padding_side = side
    rows = [[tok.bos_token_id] + tok(t)["input_ids"] for t in texts]
    enc = tok.pad({"input_ids": rows}, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _target_logprobs(logits, ids, mask):  # (B, T-1), 0 where the target is padding
    lp = logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return lp * (mask[:, :-1] * mask[:, 1:])


@pytest.mark.parametrize("kind", ["ensemble", "posterior"])
def test_copied_run_folder_loads_and_equals_pipeline_ensemble(run, tmp_path, kind):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    model = _auto(copy / "merged-x" / kind)
    assert isinstance(model, CBTMEnsembleForCausalLM) and model.config.model_type == "cbtm_ensemble"
    ref = load_ensemble(run / "merged-x" / kind)  # what the pipeline's evaluation loads
    tok = _tok(copy / "merged-x" / kind)
    texts = [random_text(n, s) for s, n in enumerate([14, 6, 9])]
    ids, mask = _batch(tok, texts)
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    want = ref.token_logprobs(ids, mask)
    out = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(_target_logprobs(out.logits, ids, mask)[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert torch.allclose(out.logits[mask.bool()].exp().sum(-1), torch.ones(int(mask.sum())), atol=1e-4)
    # left padding, as HF batched generation uses, gives the same numbers at the same tokens
    lids, lmask = _batch(tok, texts, side="left")
    left = _target_logprobs(model(input_ids=lids, attention_mask=lmask).logits, lids, lmask)
    for b in range(len(texts)):
        n = int(mask[b].sum()) - 1
        torch.testing.assert_close(left[b, -n:], want[b, :n], atol=1e-5, rtol=1e-5)
    # labels give the mean NLL
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert float(loss) == pytest.approx(float(-want[valid].mean()), rel=1e-5)


@pytest.mark.parametrize("kind", ["ensemble", "posterior"])
def test_hf_greedy_generate_equals_project_generate(run, kind):
    model = _auto(run / "merged-x" / kind)
    tok = _tok(run / "merged-x" / kind, side="left")
    want = model.ensemble.generate(PROMPTS, max_new_tokens=10)  # route_every 4: routing refreshes while decoding
    eos = tok.eos_token_id
    for prompt, text in zip(PROMPTS, want):
        enc = tok(prompt, return_tensors="pt")
        new = model.generate(**enc, max_new_tokens=10, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        assert tok.decode(new[: new.index(eos)] if eos in new else new) == text
    batched = model.generate(**tok(PROMPTS, return_tensors="pt", padding=True), max_new_tokens=10, do_sample=False)
    width = tok(PROMPTS, return_tensors="pt", padding=True)["input_ids"].shape[1]
    for row, text in zip(batched[:, width:].tolist(), want):
        assert tok.decode(row[: row.index(eos)] if eos in row else row) == text


def test_sampling_top_p_and_beams(run):
    """(Stop strings need a byte-level tokenizer: tested on a pipeline run in tests/pipeline/test_model_cards.py.)"""
    folder = run / "merged-x" / "ensemble"
    model, tok = _auto(folder), _tok(folder, side="left")
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    a = model.generate(**enc, max_new_tokens=8, do_sample=True, top_p=0.8, temperature=0.7)
    torch.manual_seed(0)
    b = model.generate(**enc, max_new_tokens=8, do_sample=True, top_p=0.8, temperature=0.7)
    assert torch.equal(a, b) and a.shape[0] == 2 and (a < model.config.vocab_size).all()
    beams = model.generate(**tok(PROMPTS[0], return_tensors="pt"), max_new_tokens=4, num_beams=2, do_sample=False)
    assert beams.shape[1] <= len(tok(PROMPTS[0])["input_ids"]) + 4


def test_lone_folder_needs_its_experts_and_save_pretrained_copies_them(run, tmp_path):
    folder = run / "merged-x" / "ensemble"
    lone = tmp_path / "lone"
    shutil.copytree(folder, lone)
    with pytest.raises(InputError, match=r"expert folder .*cluster_000.* is missing") as e:
        _auto(lone)
    assert "\n" not in str(e.value)
    model = _auto(folder)
    model.save_pretrained(tmp_path / "self-contained", copy_experts=True)
    shutil.copytree(tmp_path / "self-contained", tmp_path / "moved")
    shutil.rmtree(tmp_path / "self-contained")
    moved = _auto(tmp_path / "moved")
    assert json.loads((tmp_path / "moved" / "ensemble.json").read_text())["experts"][0] == "experts/expert_000"
    ids, mask = _batch(_tok(folder), PROMPTS)
    torch.testing.assert_close(moved(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits)
    model.save_pretrained(tmp_path / "referencing")  # experts referenced from the new place
    assert _auto(tmp_path / "referencing").ensemble.top_k == model.ensemble.top_k


def test_different_vocabularies_fail_in_one_line(run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    cfg_file = copy / "experts-x" / "cluster_001" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["vocab_size"] += 5
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"different vocabularies.*cluster_001") as e:
        _auto(copy / "merged-x" / "ensemble")
    assert "\n" not in str(e.value)


def test_trust_remote_code_loads_through_the_folder_shims(run, tmp_path):
    """A fresh process that never imported `experts`: transformers runs the folder's auto_map shims."""
    import os
    import subprocess
    import sys

    code = ("from transformers import AutoModelForCausalLM as A; import sys; "
            "m = A.from_pretrained(sys.argv[1], trust_remote_code=True); print(type(m).__name__)")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code, str(run / "merged-x" / "ensemble")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "CBTMEnsembleForCausalLM"
    assert list((tmp_path / "modules").rglob("configuration_cbtm_ensemble.py"))  # the config came through its shim


def test_config_json_says_which_ensemble_it_is(run):
    """The three c-BTM ensembles of a run differ only in top_k: config.json names it (routing_top_k: transformers
    would drop a config's top_k as a sampling setting) and the model name, so the folders can be told apart."""
    import json

    cfg = json.loads((run / "merged-x" / "ensemble" / "config.json").read_text())
    assert cfg["routing_top_k"] == 2 and cfg["ensemble_name"] == "ensemble" and cfg["num_experts"] == 3
    posterior = json.loads((run / "merged-x" / "posterior" / "config.json").read_text())
    assert posterior["ensemble_kind"] == "posterior" and posterior["routing_top_k"] in (1, 2, 3)


def test_generation_and_long_documents_raise_no_user_facing_warnings(run):
    """Ensemble generation passes the KV cache under the name the experts' forward takes (no `past_key_values`
    FutureWarning); scoring a document longer than the context, which is cut into windows on purpose, does not
    trigger the tokenizer's "longer than the specified maximum sequence length" warning."""
    import warnings

    from experts.ensemble_folder import load_ensemble
    from tasks.perplexity import evaluate_perplexity
    from tests.experts.merge_helpers import random_text

    model = _auto(run / "merged-x" / "ensemble")
    tok = _tok(run / "merged-x" / "ensemble", side="left")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.generate(**tok(PROMPTS, return_tensors="pt", padding=True), max_new_tokens=6, do_sample=False)
    ensemble = load_ensemble(run / "merged-x" / "ensemble", device="cpu")
    ensemble.tokenizer.model_max_length = ensemble.max_length  # as saved folders have it (experts.compat)
    long_doc = random_text(5 * ensemble.max_length, 11)
    evaluate_perplexity(ensemble, [{"id": "long", "text": long_doc}], batch_size=2)
    assert not ensemble.tokenizer.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")
