"""The `cbtm` lm-evaluation-harness model: simple_evaluate on tiny local YAML tasks (no download) for an expert and
an ensemble; a one-expert ensemble scores as its expert; numbers agree with lm-eval's own `hf` model."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from corpus.io import InputError  # noqa: E402
from tasks.lm_eval_model import CBTMLM  # noqa: E402  (registers "cbtm")
from tests.experts.hf_helpers import build_tiny_run  # noqa: E402
from tests.experts.merge_helpers import random_text  # noqa: E402

MC, GEN, PPL = "cbtm_tiny_mc", "cbtm_tiny_gen", "cbtm_tiny_ppl"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from experts.ensemble_folder import save_ensemble_config
    from experts.hf_ensemble import write_hf_ensemble

    root = build_tiny_run(tmp_path_factory.mktemp("run"))
    one = root / "merged-x" / "one"
    centroids = np.load(root / "clusters-x" / "centroids.npy")[:1]
    np.save(root / "clusters-x" / "centroid_0.npy", centroids)
    save_ensemble_config(one, [root / "experts-x" / "cluster_000"], kind="sparse",
                         centroids_path=root / "clusters-x" / "centroid_0.npy",
                         embedder_dir=root / "embeddings-x" / "embedder", top_k=1, route_every=4)
    write_hf_ensemble(one)
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three tasks over one local jsonl: multiple choice (loglikelihood), generation, rolling perplexity."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = [{"context": random_text(6 + i % 5, 300 + i), "choices": ["w5", "w17 w3", "w40"], "label": i % 3,
             "answer": "w8"} for i in range(6)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'data.jsonl'}\ntest_split: test\n"
    (d / "mc.yaml").write_text(f"task: {MC}\n{data}output_type: multiple_choice\ndoc_to_text: '{{{{context}}}}'\n"
                               "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
                               "metric_list:\n  - metric: acc\n")
    (d / "gen.yaml").write_text(f"task: {GEN}\n{data}output_type: generate_until\ndoc_to_text: '{{{{context}}}}'\n"
                                "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['w9']\n"
                                "  max_gen_toks: 4\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    (d / "ppl.yaml").write_text(f"task: {PPL}\n{data}output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                                "doc_to_target: '{{context}}'\nmetric_list:\n  - metric: word_perplexity\n")
    return d


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _evaluate(folder, task_dir, tasks=(MC, GEN, PPL)):
    return lm_eval.simple_evaluate(model="cbtm", model_args=f"pretrained={folder},device=cpu", tasks=list(tasks),
                                   task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                   batch_size=4, log_samples=True, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0)


def _ll_requests(lm, docs):
    reqs = [Instance("loglikelihood", {}, (d["context"], " " + c), i) for i, d in enumerate(docs) for c in d["choices"]]
    reqs.append(Instance("loglikelihood", {}, ("", "w3 w4 w5"), len(reqs)))  # empty context: BOS
    return lm.loglikelihood(reqs)


@pytest.mark.parametrize("which", ["expert", "ensemble"])
def test_simple_evaluate_on_local_tasks(run, task_dir, which):
    folder = run / ("experts-x/cluster_000" if which == "expert" else "merged-x/ensemble")
    out = _evaluate(folder, task_dir)
    res = out["results"]
    assert 0.0 <= res[MC]["acc,none"] <= 1.0 and 0.0 <= res[GEN]["exact_match,none"] <= 1.0
    assert res[PPL]["word_perplexity,none"] > 1.0
    lm = CBTMLM(pretrained=str(folder), device="cpu")
    gens = [s["filtered_resps"][0] for s in out["samples"][GEN]]
    want = lm.model.generate([s["doc"]["context"] for s in out["samples"][GEN]], max_new_tokens=4, stop=["w9"])
    assert gens == want  # greedy generate_until is the model's own greedy decoding
    for s in out["samples"][MC]:  # is_greedy of a choice ⇒ it is the argmax continuation: only the best can be
        scores = [r[0][0] for r in s["resps"]]
        greedy = [r[0][1] for r in s["resps"]]
        assert all(scores[i] == max(scores) for i, g in enumerate(greedy) if g)


def test_one_expert_ensemble_equals_its_expert(run, task_dir):
    docs = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    expert = CBTMLM(pretrained=str(run / "experts-x" / "cluster_000"), device="cpu")
    one = CBTMLM(pretrained=str(run / "merged-x" / "one"), device="cpu", batch_size=3)
    assert expert.kind == "hf" and one.kind == "ensemble"
    got, want = _ll_requests(one, docs), _ll_requests(expert, docs)
    assert [g for _, g in got] == [g for _, g in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-4)
    texts = [Instance("loglikelihood_rolling", {}, (random_text(90, 7),), 0)]  # longer than the 64-token context
    assert one.loglikelihood_rolling(texts) == pytest.approx(expert.loglikelihood_rolling(texts), abs=1e-3)
    a = _evaluate(run / "merged-x" / "one", task_dir, tasks=(MC,))["results"][MC]["acc,none"]
    b = _evaluate(run / "experts-x" / "cluster_000", task_dir, tasks=(MC,))["results"][MC]["acc,none"]
    assert a == b


def test_expert_numbers_match_lm_eval_hf_model(run, task_dir):
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    docs = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    folder = str(run / "experts-x" / "cluster_001")
    ours = _ll_requests(CBTMLM(pretrained=folder, device="cpu"), docs)
    ref = _ll_requests(HFLM(pretrained=folder, device="cpu", batch_size=4, dtype="float32"), docs)
    assert [s for s, _ in ours] == pytest.approx([s for s, _ in ref], abs=1e-4)
    assert [g for _, g in ours] == [g for _, g in ref]


def test_sampling_generate_until(run):
    lm = CBTMLM(pretrained=str(run / "merged-x" / "ensemble"), device="cpu")
    req = Instance("generate_until", {}, ("w1 w2 w3", {"until": ["w9"], "max_gen_toks": 5, "do_sample": True,
                                                        "temperature": 0.8, "top_p": 0.9}), 0)
    import torch

    torch.manual_seed(0)
    a = lm.generate_until([req])
    torch.manual_seed(0)
    assert lm.generate_until([req]) == a and "w9" not in a[0] and len(a[0].split()) <= 5


def test_bad_input_is_one_line(run, tmp_path):
    for kw, pattern in (({"pretrained": str(run / "experts-x" / "cluster_000"), "kind": "moe-ish"}, "not a model kind"),
                        ({"pretrained": str(tmp_path)}, "not a model folder"),
                        ({"pretrained": str(run / "merged-x" / "ensemble"), "kind": "hf"}, "holds a ensemble model")):
        with pytest.raises(InputError, match=pattern) as e:
            CBTMLM(**kw)
        assert "\n" not in str(e.value)


def test_cli_knows_cbtm_and_reports_bad_input_in_one_line(task_dir):
    """`python -m tasks.lm_eval_model` (= the cbtm-lm-eval script) is lm-eval's command line with `cbtm` registered:
    the model name resolves (the error comes from our model) and bad input ends in one line, exit status 2."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tasks.lm_eval_model", "run", "--model", "cbtm", "--model_args",
           "pretrained=/nonexistent", "--device", "cpu", "--tasks", MC, "--include_path", str(task_dir)]
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2, bad.stderr[-3000:]
    last = bad.stderr.strip().splitlines()[-1]
    assert last == "cbtm-lm-eval: error: model_args pretrained=/nonexistent: no such folder"


def test_readme_offline_recipe_runs_the_shipped_yaml(run, tmp_path, monkeypatch):
    """README's offline lm-eval recipe: examples/lm_eval/*.yaml, as shipped, over a demo corpus's test split found
    by the glob runs/demo/demo-corpus-*/test.jsonl.gz under the working directory (no Hub)."""
    import gzip
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples" / "lm_eval"
    split = tmp_path / "runs" / "demo" / "demo-corpus-0123abcd"
    split.mkdir(parents=True)
    domains = ("code", "docstrings", "reference", "licences")
    rows = [{"id": f"t{i}", "text": random_text(20 + i, 500 + i), "source": domains[i % 4]} for i in range(8)]
    with gzip.open(split / "test.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    out = lm_eval.simple_evaluate(model="cbtm", model_args=f"pretrained={run / 'merged-x' / 'ensemble'},device=cpu",
                                  tasks=["cbtm_demo_ppl", "cbtm_demo_domain"], batch_size=4,
                                  task_manager=TaskManager(include_path=str(examples), include_defaults=False))
    res = out["results"]
    assert res["cbtm_demo_ppl"]["word_perplexity,none"] > 1.0 and res["cbtm_demo_ppl"]["bits_per_byte,none"] > 0
    assert 0.0 <= res["cbtm_demo_domain"]["acc,none"] <= 1.0
    assert out["n-samples"]["cbtm_demo_domain"]["effective"] == len(rows)
