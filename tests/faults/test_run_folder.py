"""The run folder: one writer at a time, a report that is always the last RunAll's, folders that can move, and
temporaries of killed runs cleaned up."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.lock import LOCK_NAME, RunFolderBusy, acquire, is_held, release, run_dir_lock
from tests.faults.conftest import run_args
from tests.faults.harness import copy_run, leftovers, normalized_report, popen, run_cli


def _stage_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stage_log.jsonl").read_text().splitlines()]


def _wait_for(predicate, timeout: float = 240.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def _holder(run_dir: Path, shared: bool = False, seconds: float = 600):
    """Another process that takes the run folder's lock (shared: as a luigid worker does) and holds it."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from pipeline.lock import acquire; "
            f"acquire(sys.argv[2], shared={shared}); print('held', flush=True); time.sleep({seconds})")
    p = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).resolve().parents[2]), str(run_dir)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_two_concurrent_runs_on_one_folder(reference, tmp_path):
    """A second RunAll on a folder in use stops at once (exit 40, one line naming the first one's pid), also when
    its command differs (--workers 1); with --run-lock-wait it waits, then finds everything done. Every stage ran
    once and the report is the reference's."""
    run_dir = tmp_path / "run"
    args = run_args(reference, run_dir)
    first = popen(args, tmp_path, tmp_path / "first.log")
    lock = run_dir / LOCK_NAME
    _wait_for(lambda: lock.is_file() and lock.read_text().strip() or first.poll() is not None, what="first run's lock")
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    waiter = popen([*args, "--run-lock-wait", "600"], tmp_path, tmp_path / "waiter.log")
    for extra in ([], ["--workers", "1"]):
        second = popen([*args, *extra], tmp_path, tmp_path / "second.log")
        assert second.wait(timeout=120) == 40
        out = (tmp_path / "second.log").read_text()
        busy = [line for line in out.splitlines() if "InputError:" in line]
        assert len(busy) == 1 and f"is in use by pid {first.pid} on " in busy[0] and "--run-lock-wait" in busy[0], out
        assert "Traceback" not in out
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert waiter.wait(timeout=600) == 0, (tmp_path / "waiter.log").read_text()[-3000:]
    assert "waiting for it" in (tmp_path / "waiter.log").read_text()
    runs = [r["task_id"] for r in _stage_log(run_dir)]
    assert len(runs) == len(set(runs)) == len(_stage_log(reference["run_dir"]))  # each stage once
    assert normalized_report(run_dir) == reference["report"]
    assert leftovers(run_dir) == []  # the lock file goes with the last holder


def test_workers_of_a_central_scheduler_keep_a_local_run_out(reference, tmp_path):
    """luigid workers hold the folder shared (any number at once); a --local-scheduler run meets them."""
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    workers = [_holder(run_dir, shared=True) for _ in range(2)]  # two "workers" hold it at once
    try:
        res = run_cli(run_args(reference, run_dir), tmp_path)
    finally:
        for w in workers:
            w.kill()
            w.wait()
    assert res.code == 40
    assert [line for line in res.out.splitlines() if "InputError" in line] == [
        f"ERROR: InputError: run folder {run_dir} is in use by workers of a central scheduler (luigid); one run "
        "writes a run folder at a time: wait for it to finish, pass --run-lock-wait SECONDS (inf = until it is "
        "free), or use another --run-dir"]


def test_lock_is_reentrant_and_waits(tmp_path):
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir):
        with run_dir_lock(run_dir):  # the same process: re-entrant
            assert is_held(run_dir)
        assert (run_dir / LOCK_NAME).is_file() and is_held(run_dir)
    assert not is_held(run_dir) and not (run_dir / LOCK_NAME).exists()
    holder = _holder(run_dir, seconds=2)
    with pytest.raises(RunFolderBusy, match=f"in use by pid {holder.pid}"):
        acquire(run_dir)
    t0 = time.monotonic()
    acquire(run_dir, wait=60)  # the holder exits after 2 s; the kernel drops its lock
    assert time.monotonic() - t0 < 30
    release(run_dir)
    holder.wait()


def test_report_is_always_the_last_runs(reference, tmp_path):
    """Run, rerun with --temperature 0.5, rerun the first command: the last run builds nothing and exits 0, and
    the run folder's report is again the first one's (parameters, numbers, the report folder it came from)."""
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    assert run_cli(run_args(reference, run_dir, temperature=0.5), tmp_path).code == 0
    hot = json.loads((run_dir / "report.json").read_text())
    assert hot["run"]["params"]["temperature"] == 0.5
    n_log = len(_stage_log(run_dir))
    res = run_cli(run_args(reference, run_dir), tmp_path)
    assert res.code == 0, res.out[-3000:]
    assert len(_stage_log(run_dir)) == n_log  # no stage ran
    report = json.loads((run_dir / "report.json").read_text())
    assert report["run"]["params"]["temperature"] == 0.1
    assert normalized_report(run_dir) == reference["report"]
    ref_published = json.loads((reference["run_dir"] / "report.json").read_text())["run"]["published"]
    assert report["run"]["published"]["report"] == ref_published["report"] != hot["run"]["published"]["report"]
    md = (run_dir / "report.md").read_text()
    assert f"results of `{ref_published['report']}/`" in md and "`--temperature 0.1`" in md


@pytest.mark.parametrize("how", ["copy", "move"])
def test_a_moved_or_copied_run_folder_reruns_nothing(reference, tmp_path, how):
    src = copy_run(reference["run_dir"], tmp_path / "old")
    run_dir = tmp_path / "elsewhere" / "run"
    run_dir.parent.mkdir()
    if how == "move":
        src.rename(run_dir)
    else:
        copy_run(src, run_dir)
    n_log = len(_stage_log(run_dir))
    res = run_cli(run_args(reference, run_dir), tmp_path)
    assert res.code == 0, res.out[-3000:]
    assert len(_stage_log(run_dir)) == n_log, [r["stage"] for r in _stage_log(run_dir)[n_log:]]
    assert normalized_report(run_dir) == reference["report"]
    assert json.loads((run_dir / "report.json").read_text())["run"]["run_dir"] == str(run_dir)


def test_temporaries_of_killed_runs_are_cleaned(reference, tmp_path):
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    ppl = next(run_dir.glob("eval-*/perplexity"))
    fewshot = next(run_dir.glob("eval-*/fewshot/domains"))
    stale = [run_dir / ".embeddings-00000000.cbtm-tmp-1a2b3c4d", ppl / ".seed.json.cbtm-tmp-5e6f7a8b",
             fewshot / ".moe.json.cbtm-tmp-0a1b2c3d",
             run_dir / ".clusters-00000000.cbtm-old-9c0d1e2f"]
    for p in stale:
        p.mkdir()
        (p / "half-written.npy").write_bytes(b"\0" * 10)
    experts = next(run_dir.glob("experts-*"))
    partial = experts / ".cluster_007.partial"  # an interrupted training whose inputs were rebuilt since
    (partial.parent / (partial.name + ".ckpt")).mkdir(parents=True)
    (partial.parent / (partial.name + ".branch-init")).mkdir()  # --branch-from average's start, left by a kill
    partial.mkdir()
    seed = next(run_dir.glob("seed-*")).name
    (experts / ".cluster_007.partial-inputs.json").write_text(json.dumps({seed: "an-older-run-id"}))
    res = run_cli(run_args(reference, run_dir), tmp_path)
    assert res.code == 0, res.out[-3000:]
    assert leftovers(run_dir) == []
    assert normalized_report(run_dir) == reference["report"]


def _user_files(root: Path) -> dict[str, bytes]:
    """A user's folder with dot-files whose names look like temporaries (issue 23, defect 1)."""
    files = {".bashrc.old-backup": b"x", "docs/.thesis.tex.old-v1": b"x", ".cache.tmp-keep/file": b"x",
             ".notes.tmp-1a2b3c4d": b"x", "docs/.draft.old-9c0d1e2f/a.txt": b"x", ".x.partial-inputs.json": b"{}",
             ".x.partial/keep": b"x"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_a_folder_that_is_not_a_run_folder_is_refused_and_left_alone(reference, tmp_path):
    """A --run-dir that exists, is not empty and is not a run folder is refused in one line before any work, and
    nothing in it changes; the refusal names the flag that overrides it."""
    user = tmp_path / "P"
    files = _user_files(user)
    before = sorted(p.relative_to(user) for p in user.rglob("*"))
    res = run_cli(run_args(reference, user), tmp_path)
    assert res.code == 40, res.out[-3000:]
    assert len(res.error_lines) == 1 and "is not a run folder" in res.error_lines[0], res.out[-3000:]
    assert "--adopt-run-dir" in res.error_lines[0]
    assert sorted(p.relative_to(user) for p in user.rglob("*")) == before
    assert all((user / n).read_bytes() == d for n, d in files.items())


def test_the_cleanup_removes_only_what_the_pipeline_wrote(tmp_path):
    """Inside a run folder the user chose (--adopt-run-dir), the start-up cleanup removes only names the
    pipeline makes (`corpus.io.temporary_path`), however much a user's dot-file looks like a temporary."""
    from corpus.io import temporary_path
    from pipeline.preflight import check_run_dir, clean_stale, mark_run_dir

    user = tmp_path / "P"
    files = _user_files(user)
    assert clean_stale(user) == []  # no run-folder marker: never touched
    with pytest.raises(Exception, match="is not a run folder"):
        check_run_dir(user)
    check_run_dir(user, adopt=True)
    mark_run_dir(user)
    ours = [temporary_path(user / "clusters-00000000"), temporary_path(user / "docs" / "x.json", "old")]
    for p in ours:
        p.mkdir(parents=True)
    assert sorted(clean_stale(user)) == sorted(ours)
    assert all((user / n).read_bytes() == d for n, d in files.items())
    assert not any(p.exists() for p in ours)


def test_interrupted_training_with_current_inputs_is_kept_for_resuming(reference, tmp_path):
    """The sweep leaves a `.partial` alone while its inputs are unchanged: the same stage resumes from it."""
    from pipeline.preflight import clean_stale

    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    experts = next(run_dir.glob("experts-*"))
    shutil.move(experts / "cluster_001", experts / ".cluster_001.partial")
    stamp = json.loads((experts / ".cluster_001.partial" / "stage.json").read_text())
    (experts / ".cluster_001.partial-inputs.json").write_text(json.dumps(stamp["inputs_run_ids"]))
    assert clean_stale(run_dir) == []


def test_disk_estimate_counts_only_what_is_left_to_do(reference, tmp_path):
    """A finished folder needs no space; a fresh one needs its models (fp32 tiny Llama: 260,064 parameters each)
    and checkpoints; without the experts, those and what is downstream of them."""
    import luigi

    from pipeline import RunAll
    from pipeline.preflight import estimate_disk

    params = reference["params"]
    assert estimate_disk(RunAll(**params))[0] == 0
    luigi.task_register.Register.clear_instance_cache()
    need, parts = estimate_disk(RunAll(**{**params, "run_dir": str(tmp_path / "fresh")}))
    model = 4 * 260_064
    assert parts["models"] == 7 * model and parts["checkpoints"] == 3 * model  # seed, dense, 2 experts, average, moe, moe-finetuned
    assert parts["corpus"] == parts["shards"] > 0
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    shutil.rmtree(next(run_dir.glob("experts-*")))
    luigi.task_register.Register.clear_instance_cache()
    assert estimate_disk(RunAll(**{**params, "run_dir": str(run_dir)}))[1] == {
        "corpus": 0, "shards": 0, "models": 5 * model, "checkpoints": 3 * model}  # experts, merges, moe-finetuned
