from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus.io import InputError
from tasks.builtin import SENTIMENT, Template
from tasks.fewshot import (
    Task, build_prompts, evaluate_fewshot, label_token_ids, load_task, make_task_from_corpus,
    sample_demonstrations, score_labels,
)
from tests.tasks.conftest import FixedModel, ToyModel, make_tokenizer

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
POS = ["a great film", "great acting here", "truly great fun", "a great story", "great music and cast",
       "what a great ride", "great great great", "simply great"]
NEG = ["an awful film", "awful acting here", "truly awful mess", "an awful story", "awful music and cast",
       "what an awful ride", "awful awful awful", "simply awful"]


def sentiment_task(n_test=12):
    train = [{"text": t, "label": 1} for t in POS] + [{"text": t, "label": 0} for t in NEG]
    # test contains copies of train texts, so demonstrations must avoid them
    test = [{"text": t, "label": 1} for t in POS[:n_test // 2]] + [{"text": t, "label": 0} for t in NEG[:n_test // 2]]
    return Task("toy_sentiment", train, test, ["negative", "positive"], SENTIMENT, ["negative", "positive"], "sentiment")


def all_words(task, extra=()):
    texts = [e["text"] for e in task.train + task.test] + list(extra)
    texts += [task.template.format_demo("x", w) for w in task.verbalizer]
    return make_tokenizer(texts)


def test_prompts_deterministic_and_never_contain_the_test_example():
    task = sentiment_task()
    model = FixedModel(all_words(task), torch.zeros(1))
    test_texts = {e["text"] for e in task.test}
    collided = 0
    for seed in (13, 21):
        collided += sum(task.train[i]["text"] in test_texts for i in sample_demonstrations(task, 4, seed))
        a = build_prompts(model, task, task.test, 4, seed, True, budget=10_000)
        b = build_prompts(model, task, task.test, 4, seed, True, budget=10_000)
        assert a.ids == b.ids and a.texts == b.texts
        for ex, text in zip(task.test, a.texts):
            demo_block = text.rsplit(task.template.sep, 1)[0]
            assert task.template.format_demo(ex["text"], "") not in demo_block + " "
            assert ex["text"] not in [line.split("Review: ", 1)[-1] for line in demo_block.split("\n")]
            assert text.endswith(task.template.format_input(ex["text"]))
            assert text.count("Review:") == 5
    assert collided > 0  # the seeds' demo sets do contain test texts, which had to be replaced
    assert build_prompts(model, task, task.test, 4, 13, True, 10_000).texts != \
        build_prompts(model, task, task.test, 4, 21, True, 10_000).texts


def test_balanced_demonstrations():
    task = sentiment_task()
    for seed in (13, 21, 42, 87, 100):
        d = sample_demonstrations(task, 6, seed, balanced=True)
        labels = [task.train[i]["label"] for i in d]
        assert sorted(labels) == [0, 0, 0, 1, 1, 1] and len(set(d)) == 6
        assert sample_demonstrations(task, 6, seed) == d
        r = sample_demonstrations(task, 6, seed, balanced=False)
        assert len(set(r)) == 6


@pytest.mark.parametrize("words, preferred", [(["negative", "positive"], "positive"),
                                              (["so bad", "so good"], "good")])
def test_model_preferring_one_label_scores_its_share(words, preferred):
    task = sentiment_task()
    task.verbalizer = words
    task.test = task.test[:5] + task.test[-3:]  # 5 positive, 3 negative
    tok = all_words(task)
    logits = torch.zeros(len(tok))
    logits[tok.convert_tokens_to_ids(preferred)] = 3.0
    model = FixedModel(tok, logits)
    res = evaluate_fewshot(model, task, shots=2, seeds=(13, 21), batch_size=3)
    share = np.mean([e["label"] == 1 for e in task.test])
    assert res["accuracy"]["mean"] == pytest.approx(share)
    assert res["accuracy"]["std"] == 0.0
    assert all(e["prediction_counts"] == [0, 8] for e in res["per_seed"])
    assert res["single_pass"] == (len(words[0].split()) == 1)


def test_single_pass_equals_separate_scoring(hf_model_factory):
    task = sentiment_task()
    texts = [e["text"] for e in task.train] + ["Review: Sentiment: negative positive very"]
    model = hf_model_factory(texts)
    prompts = build_prompts(model, task, task.test, 4, 42, True, budget=model.max_length - 1)
    labels = label_token_ids(model, task)
    assert all(len(x) == 1 for x in labels)
    one = score_labels(model, prompts.ids, labels, batch_size=5, single_pass=True)
    sep = score_labels(model, prompts.ids, labels, batch_size=3, single_pass=False)
    np.testing.assert_allclose(one, sep, rtol=1e-5, atol=1e-5)
    # the full distribution read out of score_tokens is the plain next-token distribution after the prompt
    for i in (0, 5):
        x = torch.tensor([prompts.ids[i]])
        nxt = model.next_token_logprobs(x, torch.ones_like(x))[0]
        np.testing.assert_allclose(one[i], nxt[[y[0] for y in labels]].numpy(), rtol=1e-5, atol=1e-5)
    # and the same as the interface's own loglikelihood() (which adds no BOS before a non-empty context)
    prompts = build_prompts(model, task, task.test, 4, 42, True, budget=model.max_length - 1, add_bos=False)
    ours = score_labels(model, prompts.ids, labels, batch_size=4)
    reqs = [(p, " " + w) for p in prompts.texts for w in task.verbalizer]
    ref = np.array([s for s, _ in model.loglikelihood(reqs)]).reshape(len(prompts.texts), -1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    # multi-token label words: the per-label path still agrees with loglikelihood()
    task.verbalizer = ["very negative", "very positive"]
    labels = label_token_ids(model, task)
    ours = score_labels(model, prompts.ids, labels, batch_size=4)
    reqs = [(p, " " + w) for p in prompts.texts for w in task.verbalizer]
    ref = np.array([s for s, _ in model.loglikelihood(reqs)]).reshape(len(prompts.texts), -1)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


class SentimentToy(ToyModel):
    """Reads the words after the last 'Review': 'great' → positive, 'awful' → negative; +bias to positive.

    With bias=0 the model is perfectly calibrated: given the content-free premise it is uniform over labels."""

    def __init__(self, tok, bias=0.0, strength=1.0):
        super().__init__(tok)
        self.bias, self.strength = bias, strength
        self.ids = {w: tok.convert_tokens_to_ids(w) for w in ("Review", "great", "awful", "negative", "positive")}

    def dist(self, prefix):
        last = max([i for i, t in enumerate(prefix) if t == self.ids["Review"]], default=-1)
        query = prefix[last + 1:] if last >= 0 else []
        logits = torch.zeros(self.V)
        s = self.strength * (query.count(self.ids["great"]) - query.count(self.ids["awful"]))
        logits[self.ids["positive"]] = s + self.bias
        logits[self.ids["negative"]] = -s
        return torch.log_softmax(logits, -1)


def test_dcpmi_leaves_calibrated_model_unchanged_and_removes_bias():
    task = sentiment_task()
    tok = all_words(task)
    calibrated = evaluate_fewshot(SentimentToy(tok), task, shots=2, seeds=(13, 42))
    by = calibrated["by_scoring"]
    assert by["raw"]["accuracy"]["mean"] == by["dcpmi"]["accuracy"]["mean"] == 1.0
    for e in calibrated["per_seed"]:
        assert e["by_scoring"]["raw"] == e["by_scoring"]["dcpmi"]
    biased = evaluate_fewshot(SentimentToy(tok, bias=5.0), task, shots=2, seeds=(13,), scoring="dcpmi")
    assert biased["by_scoring"]["raw"]["accuracy"]["mean"] == 0.5  # always "positive"
    assert biased["accuracy"]["mean"] == 1.0  # calibration removes the prior
    assert biased["baselines"]["random"]["accuracy"] == 0.5


def test_long_prompts_drop_demonstrations_from_the_front():
    task = sentiment_task()
    model = SentimentToy(all_words(task))
    model.max_length = 24
    res = evaluate_fewshot(model, task, shots=6, seeds=(13,), out_path=None, fit_shots=False)
    seed = res["per_seed"][0]
    assert seed["n_truncated_prompts"] == len(task.test) and seed["n_demos_dropped"] > 0
    assert seed["mean_prompt_tokens"] <= 23
    prompts = build_prompts(model, task, task.test, 6, 13, True, budget=23)
    full = build_prompts(model, task, task.test, 6, 13, True, budget=10_000)
    for short, long_ in zip(prompts.texts, full.texts):
        assert long_.endswith(short) and len(short) < len(long_)
    assert max(len(x) for x in prompts.ids) <= 23


class RoutingToy(SentimentToy):
    def __init__(self, tok):
        super().__init__(tok)
        self.fixed = None
        self.log = []

    def set_fixed_routing(self, texts):
        self.log.append(("set", len(texts)))
        self.fixed = texts

    def clear_fixed_routing(self):
        self.log.append(("clear",))
        self.fixed = None

    def routing_weights(self, texts):
        w = np.array([[1.0, 0.0] if "great" in t.rsplit("Review", 1)[-1] else [0.25, 0.75] for t in texts])
        return w


def test_routing_hooks(tmp_path):
    task = sentiment_task()
    model = RoutingToy(all_words(task))
    res = evaluate_fewshot(model, task, shots=2, seeds=(13,), out_path=tmp_path / "r.json")
    assert res["routing"]["mode"] == "prompt"
    assert res["routing"]["prompt"]["top_expert_share"] == [0.5, 0.5]
    assert json.loads((tmp_path / "r.json").read_text())["routing"]["prompt"]["n_texts"] == len(task.test)
    res = evaluate_fewshot(model, task, shots=2, seeds=(13,), task_routing=True)
    assert model.log == [("set", len(task.train)), ("clear",)] and model.fixed is None
    assert res["routing"]["mode"] == "task" and "task" in res["routing"]
    # a model without the hooks still evaluates
    res = evaluate_fewshot(SentimentToy(all_words(task)), task, shots=2, seeds=(13,), task_routing=True)
    assert res["routing"]["mode"].startswith("prompt")


def write_task(folder: Path, train, test, labels):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def test_load_task_folder_and_label_names(tmp_path):
    f = write_task(tmp_path / "sst2", [{"text": "good", "label": "positive"}, {"text": "bad", "label": 0}],
                   [{"text": "fine", "label": 1}], ["negative", "positive"])
    task = load_task(f)
    assert task.name == "sst2" and task.kind == "sentiment" and task.verbalizer == ["negative", "positive"]
    assert [e["label"] for e in task.train] == [1, 0]
    g = write_task(tmp_path / "mytask", [{"text": "a", "label": 0}], [{"text": "b", "label": 1}], ["Foo_Bar", "Baz"])
    task = load_task(g)
    assert task.kind == "generic" and task.verbalizer == ["foo bar", "baz"]
    (g / "task.json").write_text(json.dumps({"template": {"input_format": "Q: {text}\nA:"}, "verbalizer": ["x", "y"]}))
    task = load_task(g)
    assert task.template.domain_premise() == "A:" and task.verbalizer == ["x", "y"]
    assert load_task("mytask", search_dirs=[tmp_path]).name == "mytask"


def test_bad_inputs(tmp_path):
    bad = write_task(tmp_path / "bad", [{"text": "a", "label": 3}], [{"text": "b", "label": 0}], ["x", "y"])
    with pytest.raises(InputError, match=r"train.jsonl:1: label 3 outside labels.json"):
        load_task(bad)
    bad = write_task(tmp_path / "bad2", [{"text": "a", "label": "neutral"}], [{"text": "b", "label": 0}], ["x", "y"])
    with pytest.raises(InputError, match="'neutral' is not in labels.json"):
        load_task(bad)
    (bad / "test.jsonl").unlink()
    with pytest.raises(InputError, match="missing file: .*test.jsonl"):
        load_task(bad)
    with pytest.raises(InputError, match="not found"):
        load_task("no_such_task_anywhere")
    task = sentiment_task()
    model = SentimentToy(all_words(task))
    with pytest.raises(InputError, match="fewer than shots=20"):
        evaluate_fewshot(model, task, shots=20, seeds=(13,))
    empty = Task("e", [], task.test, task.labels, SENTIMENT, task.verbalizer)
    with pytest.raises(InputError, match="train pool is empty"):
        evaluate_fewshot(model, empty, shots=2, seeds=(13,))
    task.verbalizer = ["  ", "positive"]
    with pytest.raises(InputError, match="tokenizes to nothing"):
        evaluate_fewshot(model, task, shots=2, seeds=(13,))
    with pytest.raises(InputError, match="unknown scoring"):
        evaluate_fewshot(model, sentiment_task(), shots=2, scoring="nope")
    with pytest.raises(ValueError):
        Template("no placeholder")


def test_make_task_from_corpus(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = {"code_python": "def return import class", "news": "minister said today report",
             "math": "sum equals twice total"}
    for split, n in (("train", 30), ("valid", 6)):
        texts, labels = [], []
        for lab, w in words.items():
            for i in range(n):
                texts.append(f"{w} {i} " * 40)
                labels.append(lab)
        pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts, "label": labels}),
                       corpus / f"{split}.parquet")
    out = make_task_from_corpus(corpus, tmp_path / "task", n_train=12, n_test=9, seed=0, max_chars=60)
    task = load_task(out)
    assert task.labels == sorted(words) and task.kind == "domain"
    assert task.verbalizer == ["code python", "math", "news"]
    assert np.bincount([e["label"] for e in task.train]).tolist() == [4, 4, 4]
    assert np.bincount([e["label"] for e in task.test]).tolist() == [3, 3, 3]
    assert all(len(e["text"]) <= 64 for e in task.train + task.test)
    assert task.template.domain_premise() == "Domain:"
    with pytest.raises(InputError, match="missing file"):
        make_task_from_corpus(tmp_path / "nowhere", tmp_path / "t2")


@pytest.mark.skipif(not (SHARED / "tasks" / "sst2").is_dir(), reason="../shared/data/tasks absent")
def test_load_shared_sst2():
    task = load_task(SHARED / "tasks" / "sst2", max_test=100)
    assert task.name == "sst2" and task.labels == ["negative", "positive"] and task.kind == "sentiment"
    assert len(task.train) == 5000 and len(task.test) == 100
    assert {e["label"] for e in task.test} == {0, 1}
    assert load_task(SHARED / "tasks" / "sst2", max_test=100).test == task.test


def test_hub_task_column_mapping(monkeypatch):
    """hf:<name>:<config>?text=..&label=..&test=.. through datasets.load_dataset (replaced by an in-memory one)."""
    import datasets

    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["negative", "positive"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}, features=feats),
        "validation": datasets.Dataset.from_dict({"sentence": ["great"], "label": [1]}, features=feats),
    })
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: calls.append((name, config)) or dd)
    task = load_task("hf:glue:sst2?text=sentence&test=validation")
    assert calls == [("glue", "sst2")]
    assert task.name == "sst2" and task.kind == "sentiment" and task.labels == ["negative", "positive"]
    assert task.train[0] == {"text": "good", "label": 1} and task.test == [{"text": "great", "label": 1}]
    with pytest.raises(InputError, match="no split 'test'"):
        load_task("hf:glue:sst2?text=sentence")
    with pytest.raises(InputError, match="no column 'text'"):
        load_task("hf:glue:sst2?test=validation")


def test_sparse_ensemble_routes_on_the_whole_prompt():
    """The c-BTM ensemble through the same code: single-pass equals per-label scoring, routing sees the prompt."""
    ensemble = pytest.importorskip("experts.ensemble")
    from experts.scoring import HFCausalLM
    from tests.tasks.conftest import tiny_llama

    class Embedder:
        seen: list = []

        def transform(self, texts):
            self.seen.extend(texts)
            x = np.array([[t.count("great") + 0.1, t.count("awful") + 0.1] for t in texts], dtype=np.float32)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

    task = sentiment_task()
    tok = all_words(task)
    experts = [HFCausalLM(tiny_llama(len(tok), seed=s), tok, name=f"e{s}") for s in (0, 1)]
    emb = Embedder()
    ens = ensemble.SparseEnsemble(experts, centroids=np.eye(2, dtype=np.float32), embedder=emb, top_k=1,
                                  temperature=0.5, route_every=4)
    prompts = build_prompts(ens, task, task.test[:4], 4, 42, True, budget=ens.max_length - 1)
    labels = label_token_ids(ens, task)
    one = score_labels(ens, prompts.ids, labels, batch_size=4, single_pass=True)
    assert all(tok.decode(p[1:]) in emb.seen for p in prompts.ids)  # routed on the whole prompt (no BOS)
    sep = score_labels(ens, prompts.ids, labels, batch_size=3, single_pass=False)
    np.testing.assert_allclose(one, sep, rtol=1e-5, atol=1e-5)


def test_shots_are_fitted_to_the_context():
    """By default the prompts hold the demonstrations that fit: fewer than asked, the request kept, few prompts cut."""
    task = sentiment_task()
    model = SentimentToy(all_words(task))
    model.max_length = 24
    res = evaluate_fewshot(model, task, shots=6, seeds=(13, 21), out_path=None)
    assert res["shots_asked"] == 6 and 0 < res["shots"] < 6
    assert res["n_truncated_prompts"] < len(task.test)
    assert all(e["mean_demos"] > res["shots"] - 1 for e in res["per_seed"])
    model.max_length = 10_000
    roomy = evaluate_fewshot(model, task, shots=6, seeds=(13,), out_path=None)
    assert roomy["shots"] == roomy["shots_asked"] == 6


def test_majority_baseline_is_the_evaluated_examples_majority():
    """The majority baseline predicts the most frequent label of the evaluated examples, so it is never below
    chance; the train pool's majority label (here absent from the test set) plays no part."""
    from tasks.fewshot.metrics import baselines

    task = sentiment_task()
    task.train = [dict(ex, label=0) for ex in task.train]  # train majority: negative
    y_true = np.array([1, 1, 1, 0])
    b = baselines(task, y_true, seeds=(1,))
    assert b["majority"]["label"] == task.labels[1] and b["majority"]["accuracy"] == 0.75
    assert b["majority"]["accuracy"] >= b["random"]["accuracy"]
