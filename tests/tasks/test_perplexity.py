from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from corpus.io import InputError
from experts.scoring import HFCausalLM
from tasks.perplexity import evaluate_perplexity
from tests.tasks.conftest import FixedModel, ToyModel, make_tokenizer

DOCS = [
    {"id": "a", "text": "the cat sat on the mat and the dog sat on the log", "label": "pets", "cluster_id": 0},
    {"id": "b", "text": "stocks fell as the market closed", "label": "news", "cluster_id": 1},
    {"id": "c", "text": "the dog ran", "label": "pets", "cluster_id": 1},
    {"id": "d", "text": "market report : shares rose , the index closed higher on the day", "label": "news",
     "cluster_id": 0},
]


def by_hand(model, docs):
    """Σ NLL and token counts per doc from one full forward pass of BOS + tokens."""
    out = {}
    for d in docs:
        ids = torch.tensor([[model.tokenizer.bos_token_id] + model.tokenizer(d["text"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model.model(ids).logits[0, :-1]  # (T-1, V)
        nll = F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
        out[d["id"]] = (nll, ids.shape[1] - 1)
    return out


def test_perplexity_equals_exp_mean_nll_by_hand(hf_model_factory, tmp_path):
    model = hf_model_factory([d["text"] for d in DOCS])
    res = evaluate_perplexity(model, DOCS, out_path=tmp_path / "ppl.json", batch_size=3, per_doc=True)
    ref = by_hand(model, DOCS)
    nll, n = sum(v[0] for v in ref.values()), sum(v[1] for v in ref.values())
    assert res["n_tokens"] == n and res["n_docs"] == 4 and res["n_windows"] == 4
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    n_bytes = sum(len(d["text"].encode()) for d in DOCS)
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    for key, group in (("label", "per_label"), ("cluster_id", "per_cluster")):
        for value in {str(d[key]) for d in DOCS}:
            ids = [d["id"] for d in DOCS if str(d[key]) == value]
            g_nll, g_n = sum(ref[i][0] for i in ids), sum(ref[i][1] for i in ids)
            assert res[group][value]["perplexity"] == pytest.approx(math.exp(g_nll / g_n), rel=1e-5)
            assert res[group][value]["n_docs"] == len(ids)
    for row in res["docs"]:
        assert row["nll"] == pytest.approx(ref[row["id"]][0], rel=1e-5)
    assert json.loads((tmp_path / "ppl.json").read_text())["n_tokens"] == n


def test_windows_match_the_scoring_interface(hf_model_factory):
    model = hf_model_factory([d["text"] for d in DOCS], max_length=6)
    res = evaluate_perplexity(model, DOCS, batch_size=4, per_doc=True)
    rolling = model.loglikelihood_rolling([d["text"] for d in DOCS])
    for row, ll in zip(res["docs"], rolling):
        assert row["nll"] == pytest.approx(-ll, rel=1e-5)
    assert res["n_windows"] > len(DOCS)


class Recorder(ToyModel):
    def dist(self, prefix):
        return torch.full((self.V,), -math.log(self.V))


def test_windows_and_prefix_texts():
    tok = make_tokenizer([d["text"] for d in DOCS])
    model = Recorder(tok, max_length=5)
    res = evaluate_perplexity(model, DOCS, batch_size=2)
    assert res["perplexity"] == pytest.approx(model.V, rel=1e-6)  # uniform model: PPL = vocabulary size
    seen = []  # (window ids, prefix text)
    for kind, ids, mask, prefixes in model.calls:
        assert kind == "token" and ids.shape[1] <= 5 and len(prefixes) == ids.shape[0]
        for r in range(ids.shape[0]):
            seen.append((ids[r, : int(mask[r].sum())].tolist(), prefixes[r]))
    total = 0
    for d in DOCS:
        full = [tok.bos_token_id] + tok(d["text"], add_special_tokens=False)["input_ids"]
        total += len(full) - 1
        # reconstruct: windows of this doc start at 0, 4, 8, ... and overlap by exactly one token
        for start in range(0, len(full) - 1, 4):
            win = full[start : start + 5]
            prefix = tok.decode(full[1:start]) if start > 1 else ""
            assert (win, prefix) in seen
            if start:
                assert prefix and d["text"].startswith(prefix)  # routing sees the document so far
    assert len(seen) == res["n_windows"] and sum(len(w) - 1 for w, _ in seen) == total == res["n_tokens"]


def test_max_docs_empty_docs_and_bad_input():
    tok = make_tokenizer([d["text"] for d in DOCS])
    model = FixedModel(tok, torch.zeros(len(tok)))
    res = evaluate_perplexity(model, iter(DOCS + [{"id": "e", "text": ""}]), max_docs=2)
    assert res["n_docs"] == 2 and res["per_label"].keys() == {"pets", "news"}
    res = evaluate_perplexity(model, DOCS + [{"id": "e", "text": ""}])
    assert res["n_docs"] == 4 and res["n_empty_docs"] == 1
    with pytest.raises(InputError, match="'x' has no string 'text'"):
        evaluate_perplexity(model, [{"id": "x", "body": "hi"}])
    with pytest.raises(InputError, match="no documents"):
        evaluate_perplexity(model, [])


def test_oracle_equals_each_documents_own_expert(hf_model_factory):
    """Oracle routing = every document scored by the expert of its cluster, assembled from the experts' results."""
    from tasks.perplexity import oracle_perplexity
    from tests.tasks.conftest import tiny_llama

    base = hf_model_factory([d["text"] for d in DOCS])
    experts = [base, HFCausalLM(tiny_llama(len(base.tokenizer), 256, seed=7), base.tokenizer, name="other")]
    results = [evaluate_perplexity(e, DOCS, batch_size=2, per_doc=True) for e in experts]
    oracle = oracle_perplexity(results)
    assert oracle["model"] == "oracle" and oracle["n_docs"] == len(DOCS) and oracle["per_label"] == {}
    for c in ("0", "1"):
        for key in ("perplexity", "n_tokens", "n_docs", "n_bytes"):
            assert oracle["per_cluster"][c][key] == pytest.approx(results[int(c)]["per_cluster"][c][key], rel=1e-9)
    own = {d["id"]: int(d["cluster_id"]) for d in DOCS}  # by hand: each document under its own expert
    nll = sum(row["nll"] for c, r in enumerate(results) for row in r["docs"] if own[row["id"]] == c)
    n = sum(row["n_tokens"] for row in results[0]["docs"])
    assert oracle["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-6) and oracle["n_tokens"] == n
    assert oracle["perplexity"] != pytest.approx(results[0]["perplexity"], rel=1e-3)
    other = evaluate_perplexity(experts[1], DOCS[:3], batch_size=2)
    with pytest.raises(InputError, match="same documents"):
        oracle_perplexity([results[0], other])


def test_token_caps_cut_long_documents_and_say_so(hf_model_factory):
    """--eval-max-doc-tokens scores a document's first tokens only (a huge one costs what a short one does);
    --eval-max-tokens stops the split there; the result counts what was cut and left out."""
    model = hf_model_factory([d["text"] for d in DOCS])
    long_doc = {"id": "long", "text": " ".join([DOCS[0]["text"]] * 20000), "label": "pets", "cluster_id": 0}  # ~1 MB
    docs = [long_doc] + DOCS
    cap = max(len(model.tokenizer(d["text"], add_special_tokens=False)["input_ids"]) for d in DOCS)
    res = evaluate_perplexity(model, docs, batch_size=4, per_doc=True, max_doc_tokens=cap)
    assert res["n_docs_cut"] == 1 and res["n_docs_left_out"] == 0 and res["max_doc_tokens"] == cap
    assert {d["id"]: d["n_tokens"] for d in res["docs"]}["long"] == cap
    head = {"id": "long", "text": model.tokenizer.decode(model.tokenizer(long_doc["text"][:2000],
                                                                          add_special_tokens=False)["input_ids"][:cap])}
    alone = evaluate_perplexity(model, [head], per_doc=True)  # the cut document is scored as its prefix
    assert math.isclose(res["docs"][0]["nll"], alone["docs"][0]["nll"], rel_tol=1e-5)
    assert res["docs"][1:] == evaluate_perplexity(model, DOCS, batch_size=4, per_doc=True)["docs"]
    total = evaluate_perplexity(model, DOCS, max_tokens=15, per_doc=True)
    assert total["n_tokens"] == 15 and total["n_docs_left_out"] >= 1
    assert total["n_docs"] + total["n_docs_left_out"] == len(DOCS)
