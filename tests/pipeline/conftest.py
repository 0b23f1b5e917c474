"""A tiny four-domain corpus written in code (no download), and a guard that cleans luigi's instance cache."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

WORDS = {
    "cooking": "whisk butter sugar flour oven bake simmer garlic onion saucepan skillet dough knead roast "
               "pepper salt cream stir chop recipe minutes golden crisp tender sauce".split(),
    "sports": "striker goal match league team coach referee penalty season score defender midfielder "
              "tournament final win loss stadium fans keeper pitch minute half".split(),
    "code": "def return import class self list dict value index loop function module error raise "
            "string integer args kwargs print none true false lambda yield".split(),
    "medicine": "patient dose fever symptoms clinical blood pressure diagnosis treatment hospital infection "
                "antibiotic nurse therapy chronic acute tablet mg scan heart pain".split(),
}


def tiny_docs(n_per_domain: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n_per_domain):
        for domain, words in WORDS.items():
            text = " ".join(rng.choice(words) for _ in range(rng.randint(25, 45)))
            rows.append({"id": f"{domain}-{seed}-{i}", "text": text.capitalize() + ".", "source": domain})
    return rows


def write_tiny_corpus(folder: Path, n_train: int = 40, n_eval: int = 6) -> Path:
    """`folder/{train,valid,test}.jsonl.gz` with 4 domains × (n_train | n_eval | n_eval) documents."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("valid", n_eval, 1), ("test", n_eval, 2)):
        data = "".join(json.dumps(r) + "\n" for r in tiny_docs(n, seed)).encode()
        (folder / f"{split}.jsonl.gz").write_bytes(gzip.compress(data, mtime=0))
    return folder


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    return write_tiny_corpus(tmp_path / "corpus")


def tiny_params(corpus: Path, run_dir: Path, **kw) -> dict:
    """RunAll parameters for a run that finishes in seconds on a CPU."""
    p = dict(corpus=str(corpus), label_field="source", run_dir=str(run_dir), num_clusters=2, model_size="tiny",
             vocab_size=400, seq_len=64, train_tokens=6144, seed_fraction=0.5, batch_tokens=512,
             learning_rate=3e-3, moe_tokens=512, eval_max_docs=6, tasks="domains", shots=2,
             fewshot_seeds="13,21", fewshot_max_test=6, device="cpu", top_k="2", embed_sample=1000)
    p.update(kw)
    return p
