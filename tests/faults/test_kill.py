"""kill -9 inside a stage, then the same command again: the run resumes and its report is the uninterrupted one's.

Every case copies the shared finished run, deletes the output of one stage (so that stage and everything
downstream of it run again, as after a crash), runs RunAll with a kill at one point of that stage (harness.Kill),
then reruns the same command. The rerun must exit 0, leave no temporary or working folder behind, and write a
report equal to the reference's (all numbers; times and run ids aside): training resumed from its checkpoints
gives the same weights, and nothing half-written is ever taken for finished.

Stage kinds: folder stages (an atomic folder), training stages (a `.partial` working folder and checkpoints
every 2 steps here), evaluation stages (one file plus its stamp) and RunAll's publication of the report. The
default cases cover every kill point of one stage of each kind (seeded pick among the stages whose downstream is
short); CBTM_FAULTS_FULL=N runs instead every stage at its start, after its publication and at N seeded renames
(.ci/run: its own step, N = 1).
CBTM_FAULT_TABLE=<file> appends one JSON line per case (stage, point, exit codes, identical) for reports.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.faults.conftest import CHECKPOINT_EVERY, run_args
from tests.faults.harness import Kill, copy_run, leftovers, normalized_report, run_cli

SEED = 15
KINDS = {
    "folder": ["PrepareCorpus", "TrainTokenizer", "EmbedCorpus", "FitClusters", "AssignClusters", "DescribeClusters",
               "ShardCorpus", "MergeExperts", "MakeDomainTask", "Report"],
    "training": ["TrainSeed", "TrainExpert", "TrainDense", "FinetuneMoE"],
    "evaluation": ["EvaluatePerplexity", "EvaluateFewShot"],
    "publication": ["RunAll"],
}
SHORT_DOWNSTREAM = {"folder": ["MergeExperts", "Report", "MakeDomainTask"], "training": ["TrainExpert", "FinetuneMoE"],
                    "evaluation": ["EvaluatePerplexity", "EvaluateFewShot"], "publication": ["RunAll"]}


def _default_cases() -> list[tuple[str, str, float]]:
    """(stage, point, u): every point of one stage per kind; `commit` kills before rename ceil(u · n), n = the
    number of renames that stage made in the reference run."""
    rng = random.Random(SEED)
    cases = []
    for kind, families in SHORT_DOWNSTREAM.items():
        family = rng.choice(families)
        cases += [(family, "start", 0.0), (family, "commit", round(rng.random(), 2)), (family, "publish", 0.0),
                  (family, "after-publish", 0.0)]
    return cases


def _full_cases(n_commits: int) -> list[tuple[str, str, float]]:
    """Every stage: start, `n_commits` seeded renames (one in each n-th of its renames), after publish."""
    rng = random.Random(SEED + 1)
    cases = []
    for family in [f for fams in KINDS.values() for f in fams]:
        cases += [(family, "start", 0.0)] + [(family, "commit", round((i + rng.random()) / n_commits, 2))
                                             for i in range(n_commits)] + [(family, "after-publish", 0.0)]
    return [c for c in cases if c not in _default_cases()]


FULL = int(os.environ.get("CBTM_FAULTS_FULL") or 0)  # N: the full matrix with N rename points per stage
CASES = _full_cases(FULL) if FULL else _default_cases()


def _outputs(reference: dict, family: str) -> list[str]:
    """The reference run's outputs (relative paths) of `family`, in the order they ran (its stage_log)."""
    recs = [json.loads(line) for line in (reference["run_dir"] / "stage_log.jsonl").read_text().splitlines()]
    return [str(Path(r["output"]).relative_to(reference["run_dir"])) for r in recs if r["stage"] == family]


@pytest.mark.parametrize("family,point,u", CASES, ids=[f"{f}:{p}" + (f"@{u}" if p == "commit" else "")
                                                       for f, p, u in CASES])
def test_kill_then_rerun_gives_the_same_report(reference, tmp_path, family, point, u):
    # which run of the stage is undone (seeded): the only one of its family to run again, so the kill's nth is 1
    instance = random.Random(f"{SEED}{family}").randrange(len(_outputs(reference, family))) if family != "RunAll" else 0
    n = reference["commits"][f"{family}#{instance + 1}"]
    kill = Kill(family, 1, point, max(1, math.ceil(u * n)))
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    if kill.family == "RunAll":
        (run_dir / "report.json").unlink()
    else:
        target = run_dir / _outputs(reference, family)[instance]
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        Path(str(target) + ".stage.json").unlink(missing_ok=True)
    args = run_args(reference, run_dir)
    killed = run_cli(args, tmp_path, kill=kill, checkpoint_every=CHECKPOINT_EVERY)
    rerun = run_cli(args, tmp_path, checkpoint_every=CHECKPOINT_EVERY)
    same = rerun.code == 0 and normalized_report(run_dir) == reference["report"]
    if os.environ.get("CBTM_FAULT_TABLE"):
        with open(os.environ["CBTM_FAULT_TABLE"], "a") as f:
            f.write(json.dumps({"stage": kill.family, "point": str(kill).split(":", 1)[1], "killed": killed.code,
                                "rerun": rerun.code, "identical": same, "left": leftovers(run_dir)}) + "\n")
    assert killed.code == -9, f"the kill at {kill} never happened (exit {killed.code}):\n{killed.out[-2000:]}"
    assert rerun.code == 0, rerun.out[-3000:]
    assert leftovers(run_dir) == []
    assert normalized_report(run_dir) == reference["report"]
    assert json.loads((run_dir / "report.json").read_text())["run"]["params"]["run_dir"] == str(run_dir)
