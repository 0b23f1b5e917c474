"""One tiny finished run shared by the fault suite (built once per session, copied by the tests that change it)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults.harness import flags, normalized_report, run_cli
from tests.pipeline.conftest import tiny_params, write_tiny_corpus

CHECKPOINT_EVERY = 2  # training stages checkpoint every 2 steps, so kills can land between checkpoints


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """{corpus, run_dir, params, args, report, commits}: a finished tiny RunAll (few-shot task, every merge method)
    and how many file renames each stage made (`harness.count_commits`)."""
    root = tmp_path_factory.mktemp("reference")
    corpus = write_tiny_corpus(root / "corpus")
    run_dir = root / "run"
    params = tiny_params(corpus, run_dir)
    args = ["RunAll", "--local-scheduler", *flags(params)]
    counts = root / "commits.json"
    res = run_cli(args, root, count_to=counts, checkpoint_every=CHECKPOINT_EVERY)
    assert res.code == 0, res.out[-3000:]
    return {"root": root, "corpus": corpus, "run_dir": run_dir, "params": params, "args": args,
            "report": normalized_report(run_dir), "commits": json.loads(counts.read_text())}


def run_args(reference: dict, run_dir: Path, **over) -> list[str]:
    """The reference command on another run folder (and other parameters)."""
    return ["RunAll", "--local-scheduler", *flags({**reference["params"], "run_dir": str(run_dir), **over})]
