"""Issue 23, defects 2-12 and its "also" items, each tried as a user would (`run_cli`: luigi's command line in a
forked child; `_popen`: a fresh `python -m luigi` where a real signal must arrive): symlink loops in a corpus
glob, `~` in --run-dir, the corpus path's spelling, a run folder inside the corpus, a file size limit, Ctrl-C,
CBTM_DEBUG=0, file modes, damaged finished outputs, a seed's auto_map, a replaced centroids file, an output
folder that vanishes or turns read-only while its stage runs."""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import CHECKPOINT_EVERY, run_args
from tests.faults.harness import ROOT, copy_run, flags, leftovers, normalized_report, run_cli
from tests.faults.test_bad_input import FAILED, PARAM, one_error_line
from tests.pipeline.conftest import tiny_params, write_tiny_corpus


def _stage_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stage_log.jsonl").read_text().splitlines()]


def _docs_file(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"document {i} " + f"word{i} " * 20}) + "\n" for i in range(n)))
    return path


def _prepare(params: dict) -> list[str]:
    return ["PrepareCorpus", "--local-scheduler", *flags(params)]


# ---- 2: globs and symlinked folders ------------------------------------------------------------------------------
@pytest.mark.parametrize("loops", [1, 2])
def test_symlink_loops_in_a_corpus_glob_read_each_file_once(tmp_path, loops):
    """`ln -s . d/loop/self` made `d/loop/**/*.jsonl` read one file 41 times (test documents in train too); a
    second loop (`sub/up -> ..`) made the run hang. Each file is read once, and the fingerprint returns."""
    from pipeline.stamps import files_fingerprint

    loop = tmp_path / "d" / "loop"
    _docs_file(loop / "docs.jsonl", 40)
    (loop / "self").symlink_to(".")
    if loops == 2:
        (loop / "sub").mkdir()
        (loop / "sub" / "up").symlink_to("..")
    assert [Path(f).name for f, _, _ in files_fingerprint(str(loop / "**" / "*.jsonl"))] == ["docs.jsonl"]
    res = run_cli(_prepare({"corpus": "d/loop/**/*.jsonl", "run_dir": "run"}), tmp_path, timeout=120)
    assert res.code == 0, res.out[-3000:]
    [corpus] = (tmp_path / "run").glob("corpus-*")
    stats = json.loads((corpus / "stats.json").read_text())
    assert stats["files"] == ["d/loop/docs.jsonl"] and sum(stats["n_docs"].values()) == 40
    import pyarrow.parquet as pq

    texts = {s: set(pq.read_table(corpus / f"{s}.parquet")["text"].to_pylist()) for s in ("train", "test")}
    assert not texts["train"] & texts["test"]


# ---- 3: ~ in path flags ------------------------------------------------------------------------------------------
def test_tilde_in_run_dir_is_the_home_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    corpus = write_tiny_corpus(tmp_path / "corpus", n_train=4, n_eval=2)
    res = run_cli(_prepare({"corpus": str(corpus), "run_dir": "~/x"}), tmp_path,
                  setup=lambda: os.environ.update(HOME=str(home)))
    assert res.code == 0, res.out[-3000:]
    assert list((home / "x").glob("corpus-*/train.parquet"))
    assert not (tmp_path / "~").exists() and sorted(p.name for p in home.iterdir()) == ["x"]


# ---- 4: the corpus path's spelling -------------------------------------------------------------------------------
def test_relative_and_absolute_corpus_paths_share_the_stage_folders(reference, tmp_path):
    """The reference ran with an absolute --corpus; the same files spelled relative to the working folder find
    every stage done (before: every stage, seed and experts included, ran again)."""
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    n_log = len(_stage_log(run_dir))
    relative = os.path.relpath(reference["corpus"], tmp_path)
    res = run_cli(run_args(reference, run_dir, corpus=relative), tmp_path)
    assert res.code == 0, res.out[-3000:]
    assert [r["stage"] for r in _stage_log(run_dir)[n_log:]] == []


# ---- 5: a run folder inside the corpus folder --------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["in", "in/**/*.jsonl.gz", "in/*/*/*.parquet"])
def test_run_dir_inside_the_corpus_is_refused(tmp_path, spec):
    write_tiny_corpus(tmp_path / "in", n_train=4, n_eval=2)
    res = run_cli(_prepare({"corpus": spec, "run_dir": "in/run"}), tmp_path)
    assert res.code == PARAM, res.out[-3000:]
    one_error_line(res.out, r"--run-dir in/run is inside the --corpus .*: the run's own files would be read as "
                            r"corpus; choose a --run-dir outside it")
    assert not (tmp_path / "in" / "run").exists()


def test_run_dir_beside_a_glob_that_cannot_reach_it_is_accepted(tmp_path):
    write_tiny_corpus(tmp_path / "in", n_train=4, n_eval=2)
    res = run_cli(_prepare({"corpus": "in/*.jsonl.gz", "run_dir": "in/run"}), tmp_path)
    assert res.code == 0, res.out[-3000:]


# ---- 6: a write failure is not the input's fault -----------------------------------------------------------------
def test_file_size_limit_names_the_run_folder_not_the_corpus(tmp_path):
    """`ulimit -f 60`: the arrow cache the corpus reader writes in the run folder cannot grow; the line says which
    path could not be written and why (before: "cannot read corpus files …/small.jsonl")."""
    corpus = _docs_file(tmp_path / "small.jsonl", 2000)  # ~360 KB, far above the limit once converted

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60 * 1024, 60 * 1024))

    res = run_cli(_prepare({"corpus": str(corpus), "run_dir": str(tmp_path / "run")}), tmp_path, setup=limit)
    assert res.code == FAILED, res.out[-3000:]
    line = one_error_line(res.out, r"--run-dir .*/run: PrepareCorpus could not write .*/run/.*: file too large for "
                                   r"the file size limit \(ulimit -f\); raise the limit and run again")
    assert "cannot read corpus" not in line


# ---- 7: Ctrl-C and SIGTERM ---------------------------------------------------------------------------------------
def _popen(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """A fresh `python -m luigi` whose SIGINT is the default one (a shell's background jobs ignore it)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("LUIGI_CONFIG_PATH", None)
    env.pop("CBTM_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "luigi", "--module", "pipeline", *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupted_training_says_so_and_the_same_command_resumes(reference, tmp_path, sig):
    """Ctrl-C while the seed trains: exit 130, one line naming the stage and saying that the same command
    resumes, no traceback (before: 47 frames, exit 1). SIGTERM ends quietly (143 in a shell). Either way the
    same command then finishes the stage."""
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    args = ["TrainSeed", "--local-scheduler", *flags({**reference["params"], "run_dir": str(run_dir),
                                                      "train_tokens": 60_000})]
    log = tmp_path / "first.log"
    proc = _popen(args, tmp_path, log)
    deadline = time.monotonic() + 300
    while not list(run_dir.glob(".seed-*.partial")):  # the stage's working folder: it is building
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    code = proc.wait(timeout=120)
    out = log.read_text(errors="replace")
    assert "Traceback" not in out, out[-3000:]
    if sig == "SIGINT":
        assert code == 130, out[-3000:]
        lines = [line for line in out.splitlines() if "interrupted (Ctrl-C)" in line]
        assert len(lines) == 1 and lines[0].startswith(f"TrainSeed was interrupted (Ctrl-C) while writing {run_dir}/"
                                                       "seed-") and "run the same command again to resume" in lines[0]
    else:
        assert code == -signal.SIGTERM, out[-3000:]
    assert len(list(run_dir.glob("seed-*/stage.json"))) == 1  # the reference's: nothing half-done looks finished
    again = run_cli(args, tmp_path)
    assert again.code == 0, again.out[-3000:]
    assert len(list(run_dir.glob("seed-*/stage.json"))) == 2  # the reference's seed and this one
    assert not (run_dir / ".cbtm-lock").exists()


# ---- 8: CBTM_DEBUG=0 ---------------------------------------------------------------------------------------------
def _crash_prepare_corpus():
    from pipeline.corpus import PrepareCorpus

    def build(self, out):
        raise RuntimeError("disk controller on fire")

    PrepareCorpus.build = build


@pytest.mark.parametrize("value,on", [("0", False), ("no", False), ("1", True)])
def test_cbtm_debug_is_a_switch(tmp_path, monkeypatch, value, on):
    monkeypatch.setenv("CBTM_DEBUG", value)
    corpus = write_tiny_corpus(tmp_path / "corpus", n_train=4, n_eval=2)
    res = run_cli(_prepare({"corpus": str(corpus), "run_dir": str(tmp_path / "run")}), tmp_path,
                  setup=_crash_prepare_corpus)
    assert res.code == FAILED
    assert ("Traceback" in res.out) == on, res.out[-3000:]


# ---- 9: file modes -----------------------------------------------------------------------------------------------
def test_published_files_have_the_umasks_modes(reference):
    """Weights were 0600 (safetensors writes a private temporary file) while config.json was 0644."""
    mask = os.umask(0o022)
    os.umask(mask)
    wrong = {str(p.relative_to(reference["run_dir"])): oct(p.stat().st_mode & 0o777)
             for p in reference["run_dir"].rglob("*") if not p.is_symlink()
             and p.stat().st_mode & 0o777 != ((0o777 if p.is_dir() else 0o666) & ~mask)}
    assert wrong == {}


# ---- 10: damaged finished outputs --------------------------------------------------------------------------------
def test_a_damaged_output_is_named_and_rebuilt(reference, tmp_path):
    """`rm <run>/experts-*/cluster_000/model.safetensors`: the rerun names the missing file and rebuilds that expert
    and what depends on it, to the same report (before: exit 0 in a second, the damage unnoticed)."""
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    weights = next(run_dir.glob("experts-*")) / "cluster_000" / "model.safetensors"
    weights.unlink()
    n_log = len(_stage_log(run_dir))
    res = run_cli(run_args(reference, run_dir), tmp_path, checkpoint_every=CHECKPOINT_EVERY)
    assert res.code == 0, res.out[-3000:]
    said = [line for line in res.out.splitlines() if "is damaged" in line]
    assert len(said) == 1 and f"TrainExpert output {weights.parent} is damaged (model.safetensors is missing): " \
        "rebuilding it" in said[0] and "--force-stage TrainExpert" in said[0], said
    assert weights.is_file()
    rebuilt = {r["stage"] for r in _stage_log(run_dir)[n_log:]}
    assert "TrainExpert" in rebuilt and not rebuilt & {"PrepareCorpus", "FitClusters", "TrainSeed", "TrainDense"}
    assert normalized_report(run_dir) == reference["report"]
    assert leftovers(run_dir) == []


def test_stamps_of_earlier_versions_stay_complete(reference, tmp_path):
    """Stamps written before they listed their files are complete as they were: nothing reruns."""
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    for path in run_dir.rglob("*stage.json"):
        stamp = json.loads(path.read_text())
        assert stamp.pop("files") is not None
        path.write_text(json.dumps(stamp))
    (next(run_dir.glob("cluster-info-*")) / "projection.png").unlink()
    n_log = len(_stage_log(run_dir))
    res = run_cli(run_args(reference, run_dir), tmp_path)
    assert res.code == 0, res.out[-3000:]
    assert _stage_log(run_dir)[n_log:] == []


# ---- 11: a seed's auto_map ---------------------------------------------------------------------------------------
def test_a_seeds_auto_map_is_not_copied(reference, tmp_path):
    seed = tmp_path / "seed"
    shutil.copytree(next(reference["run_dir"].glob("seed-*")), seed)
    for name in ("stage.json", "README.md"):
        (seed / name).unlink(missing_ok=True)
    config = json.loads((seed / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (seed / "config.json").write_text(json.dumps(config))
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    params = {**reference["params"], "run_dir": str(run_dir), "seed_model": str(seed)}
    res = run_cli(["TrainSeed", "--local-scheduler", *flags(params)], tmp_path)
    assert res.code == 0, res.out[-3000:]
    [trained] = [p for p in run_dir.glob("seed-*") if not (reference["run_dir"] / p.name).exists()]
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((trained / name).read_text()), name


# ---- 12: a replaced array file -----------------------------------------------------------------------------------
def test_a_replaced_centroids_file_is_named(reference, tmp_path):
    """centroids.npy replaced by a file of the same size that is no array (so the stamp's sizes still match):
    one line naming the file (before: a bare "ValueError: Cannot load file containing pickled data")."""
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    centroids = next(run_dir.glob("clusters-*")) / "centroids.npy"
    centroids.write_bytes(b"x" * centroids.stat().st_size)
    res = run_cli(run_args(reference, run_dir, force_stage="DescribeClusters"), tmp_path)
    assert res.code == FAILED, res.out[-3000:]
    one_error_line(res.out, rf"InputError: {centroids} is not a readable NumPy array file \(.*\); it was replaced "
                            "or damaged")


# ---- also: an output folder that vanishes or turns read-only while its stage runs --------------------------------
def _then(action):
    def setup():
        from pipeline.corpus import PrepareCorpus

        build = PrepareCorpus.build

        def build_then(self, out):
            info = build(self, out)
            action(out)
            return info

        PrepareCorpus.build = build_then
    return setup


def test_an_output_folder_that_vanishes_is_named(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus", n_train=4, n_eval=2)
    res = run_cli(_prepare({"corpus": str(corpus), "run_dir": str(tmp_path / "run")}), tmp_path,
                  setup=_then(shutil.rmtree))
    assert res.code == FAILED, res.out[-3000:]
    one_error_line(res.out, rf"--run-dir {tmp_path}/run: PrepareCorpus lost {tmp_path}/run/\.corpus-\w+\.cbtm-tmp-"
                            r"\w+: it vanished while the stage ran \(removed by something else\?\)")


def _read_only(folder: Path) -> None:
    """Bind `folder` onto itself read-only (root only): the stage's own output folder, not the run folder (whose
    lock file is open, so it cannot be remounted)."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)


def test_an_output_folder_that_turns_read_only_is_named(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        _read_only(probe)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot bind-mount a folder read-only here (needs root)")
    mounts = [probe]
    try:
        corpus = write_tiny_corpus(tmp_path / "corpus", n_train=4, n_eval=2)
        res = run_cli(_prepare({"corpus": str(corpus), "run_dir": str(tmp_path / "run")}), tmp_path,
                      setup=_then(_read_only))
        mounts += list((tmp_path / "run").glob(".corpus-*"))
        assert res.code == FAILED, res.out[-3000:]
        one_error_line(res.out, rf"--run-dir {tmp_path}/run: PrepareCorpus could not write {tmp_path}/run/\.corpus-"
                                r"\w+\.cbtm-tmp-\w+/.*: read-only file system; make it writable and run again")
    finally:
        for m in mounts:
            subprocess.run(["umount", str(m)], capture_output=True)


# ---- also: gc of stage folders no completed run uses -------------------------------------------------------------
def test_gc_lists_then_removes_only_unused_stage_folders(reference, tmp_path, capsys):
    """After a second RunAll with another --temperature, the first run's merges, evaluations, report and cards
    are unused: a dry run lists them with the size it would free and removes nothing; --delete removes exactly
    them; the second run then finds everything it needs. Folders that only look like stage folders stay."""
    from pipeline.gc import main

    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    assert run_cli(run_args(reference, run_dir, temperature=0.5), tmp_path).code == 0
    user = run_dir / "notes-0badc0de"  # a stage-like name, no stamp
    user.mkdir()
    (user / "mine.txt").write_text("keep me")
    foreign = run_dir / "clusters-12345678"  # a stamp whose hash is not the folder's
    shutil.copytree(next(run_dir.glob("clusters-*")), foreign)
    before = sorted(p.name for p in run_dir.iterdir())

    assert main([str(run_dir), "--keep-runs", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("0 stage folder(s) not used by the last 2")
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = [line.split()[3] for line in out[:-1]]  # unused  <size> <unit>  <folder>  <stage>
    assert listed and all(line.startswith("unused") for line in out[:-1]), out
    assert {name.rsplit("-", 1)[0] for name in listed} <= {"merged", "eval", "report", "cards", "moe-finetuned"}
    assert f"would free" in out[-1] and f"python -m pipeline.gc {run_dir} --delete" in out[-1]
    assert sorted(p.name for p in run_dir.iterdir()) == before  # a dry run removes nothing

    n_log = len(_stage_log(run_dir))
    assert main([str(run_dir), "--delete"]) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(set(before) - set(listed))
    assert (user / "mine.txt").read_text() == "keep me" and foreign.is_dir()
    res = run_cli(run_args(reference, run_dir, temperature=0.5), tmp_path)
    assert res.code == 0 and _stage_log(run_dir)[n_log:] == [], res.out[-3000:]


def test_gc_refuses_a_folder_that_is_not_a_run_folder(tmp_path, capsys):
    from pipeline.gc import main

    (tmp_path / "corpus-0badc0de").mkdir()
    assert main([str(tmp_path), "--delete"]) == 1
    assert "is not a run folder" in capsys.readouterr().err and (tmp_path / "corpus-0badc0de").is_dir()


def test_gc_removes_nothing_when_a_used_stamp_is_unreadable(reference, tmp_path, capsys):
    """A stage the last run uses whose stamp cannot be read: gc cannot tell what it was built from, so it says so in
    one line and removes nothing (before, its inputs counted as unused and --delete removed them)."""
    from pipeline.gc import main

    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    assert run_cli(run_args(reference, run_dir, temperature=0.5), tmp_path).code == 0
    last = json.loads((run_dir / "runs.jsonl").read_text().splitlines()[-1])
    for root in last["roots"]:  # the last run's report: before, its inputs all counted as unused
        (run_dir / root / "stage.json").write_text("{not json")
    before = sorted(p.name for p in run_dir.iterdir())
    assert main([str(run_dir), "--delete"]) == 1
    err = capsys.readouterr().err
    assert "removes nothing" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run_dir.iterdir()) == before
