"""`--help` of a stage: every flag once, in its group, documented, with its default."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import RunAll
from pipeline.params import PARAMETER_GROUPS

ROOT = Path(__file__).resolve().parents[2]


def stage_help(stage: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    out = subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", stage, "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_every_run_parameter_is_in_one_group():
    names = [n for g in PARAMETER_GROUPS for n in vars(g) if not n.startswith("_")]
    assert sorted(names) == sorted(n for n, _ in RunAll.get_params())


@pytest.mark.parametrize("stage", ["RunAll", "TrainExpert"])
def test_help_lists_every_flag_once_with_its_default(stage):
    text = stage_help(stage)
    # one entry per flag: `  --flag METAVAR  description`, wrapped
    entries = re.split(r"\n  (?=--[\w-]+(?: \[?[A-Z_]+\]?)?(?: {2,}|\n))", text)
    flags = [re.match(r"--[\w-]+", e).group(0) for e in entries[1:]]
    assert len(flags) == len(set(flags)), "a flag is listed twice"
    assert not any(f.startswith(f"--{stage}-") for f in flags)
    for name, _ in RunAll.get_params():
        flag = "--" + name.replace("_", "-")
        entry = next(e for e in entries if e.startswith(flag + " "))
        described = re.sub(r"\s+", " ", entry[len(flag):]).strip()
        assert "(default: " in described and not described.split(" ", 1)[1].startswith("(default"), entry
    groups = [line.rstrip(":") for line in text.splitlines() if re.fullmatch(r"[a-z]+:", line)]
    assert groups == ["options", "run", "corpus", "clustering", "training", "merging", "evaluation", "execution",
                      "slurm"]
