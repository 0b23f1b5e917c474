"""Before any work: claim the run folder, clean what killed runs left in it, and check its free disk space.

`claim_for_command_line(task)` runs when the root task of a `luigi --module pipeline <Task> ...` command is
built (RunAll, a stage run alone, TrainExperts): it takes the run folder's lock for the rest of the process
(`pipeline.lock`: exclusive with `--local-scheduler`, shared under a central luigid), removes stale temporary
folders (exclusive holders only: nobody else writes the folder then), and estimates the disk space the stages
still to run need.

The run folder is ours only when it carries the marker `corpus.layout.RUN_MARKER` (`.cbtm-run.json`), written
when the pipeline first claims it. A `--run-dir` that exists, is not empty and has no marker is refused, unless
`--adopt-run-dir` says to use it anyway (a run folder of an earlier version, one with `stage_log.jsonl`,
is adopted). Nothing is ever removed from a folder without the marker.

Stale temporaries, removed inside a marked run folder only, each logged: names of exactly the form
`corpus.io.temporary_path` makes (`.<name>.cbtm-tmp-<8 hex>`, `.<name>.cbtm-old-<8 hex>`: atomic writes cut
short), and a training stage's `.<name>.partial` working folder with its `.ckpt`, `.tensorboard` and
`.launch.json` siblings, next to the `.<name>.partial-inputs.json` the pipeline wrote for it, when the recorded
inputs are no longer the inputs' current outputs, or its working folder is gone (the same stage with unchanged
inputs resumes from it instead).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from corpus.io import InputError, temporary_of, write_json
from corpus.layout import RUN_MARKER, STAGE_STAMP
from pipeline.stamps import STAGE_LOG, files_fingerprint, remove_path
from pipeline.lock import hold_until_exit, is_held, run_lock

log = logging.getLogger("luigi-interface")

# what a resumable training stage keeps beside its `.<name>.partial` working folder (pipeline.stage.Stage._workdir,
# experts.training.checkpoint_dir, experts.training.events.events_dir, experts.launch, and TrainExpert's averaged
# start under --branch-from average)
_PARTIAL_SIBLINGS = ("", ".ckpt", ".tensorboard", ".launch.json", "-inputs.json", ".branch-init")


def claim_for_command_line(task) -> None:
    """When `task` is the root task of this process's luigi command line: lock, clean, check (see module doc)."""
    from luigi.cmdline_parser import CmdlineParser

    cp = CmdlineParser.get_instance()
    if cp is None or getattr(cp.known_args, "root_task", None) != task.task_family or is_held(task.run_dir):
        return
    import luigi.interface

    local = bool(luigi.interface.core().local_scheduler)
    check_tasks(task)
    check_run_dir(task.run_dir, adopt=task.adopt_run_dir)
    hold_until_exit(task.run_dir, wait=run_lock().wait, shared=not local)
    mark_run_dir(task.run_dir)
    if local:
        clean_stale(task.run_dir)
    check_disk(task)


def check_tasks(task) -> None:
    """Every few-shot task given by folder or name loads now (its files, its labels), not after the training."""
    specs = [t for t in getattr(task, "task_list", []) if t != "domains" and not t.startswith("hf:")]
    if not specs or not any(t.task_family == "EvaluateFewShot" for t in _graph(task)):
        return
    from tasks.fewshot.load import load_task

    for spec in specs:
        try:
            load_task(spec)
        except InputError as e:
            raise InputError(f"--tasks {spec}: {e}") from None


# ---- the run folder ------------------------------------------------------------------------------------------
def check_run_dir(run_dir: str | os.PathLike, adopt: bool = False) -> None:
    """InputError when `run_dir` exists, is not empty and is not a run folder (module doc), unless `adopt`
    or it is an earlier version's run folder (it has `stage_log.jsonl`). Writes nothing."""
    from pipeline.lock import LOCK_NAME

    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / RUN_MARKER).is_file():
        return
    entries = sorted(e.name for e in os.scandir(run_dir) if e.name != LOCK_NAME)
    if entries and STAGE_LOG not in entries and not adopt:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise InputError(f"--run-dir {run_dir} is not empty ({shown}) and is not a run folder (it has no "
                         f"{RUN_MARKER}); choose a new or empty folder, or pass --adopt-run-dir to use it "
                         "(the pipeline then removes only what it wrote itself)")


def mark_run_dir(run_dir: str | os.PathLike) -> None:
    """Write the run-folder marker into `run_dir` (which exists: its lock is held) unless it is there."""
    marker = Path(run_dir) / RUN_MARKER
    if not marker.is_file():
        write_json(marker, {"created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "note": "a cbtm run folder: the pipeline removes only its own temporaries under it"})


# ---- stale temporaries ----------------------------------------------------------------------------------------
def clean_stale(run_dir: str | os.PathLike, depth: int = 4) -> list[Path]:
    """Remove the temporaries killed runs left under `run_dir` (module doc), logging each; returns what was removed.
    A folder without the run-folder marker is left alone.

    Call only while holding the run folder exclusively."""
    run_dir = Path(run_dir)
    removed: list[Path] = []
    if not (run_dir / RUN_MARKER).is_file():
        return removed
    todo = [(run_dir, 0)]
    while todo:
        folder, level = todo.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        names = {e.name for e in entries}
        for e in entries:
            p = Path(e.path)
            if temporary_of(e.name) is not None:
                removed.append(p)
            elif e.name.startswith(".") and e.name.endswith(".partial-inputs.json") and (
                    not (folder / e.name[: -len("-inputs.json")]).is_dir() or _partial_is_stale(p, run_dir)):
                stem = e.name[: -len("-inputs.json")]  # .<name>.partial
                removed += [folder / (stem + s) for s in _PARTIAL_SIBLINGS if stem + s in names]
            elif e.is_dir(follow_symlinks=False) and not e.name.startswith(".") and level + 1 < depth:
                todo.append((p, level + 1))
    for p in removed:
        log.info("removing %s, left by an interrupted run", p)
        remove_path(p)
    return removed


def _partial_is_stale(marker: Path, run_dir: Path) -> bool:
    """A `.partial` is stale when an input it recorded was rebuilt or removed since (its run_id changed)."""
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return True
    for key, run_id in recorded.items():
        path = Path(key) if Path(key).is_absolute() else run_dir / key
        stamp = path.with_name(path.name + ".stage.json") if path.suffix == ".json" else path / STAGE_STAMP
        try:
            if json.loads(stamp.read_text()).get("run_id") != run_id:
                return True
        except (OSError, ValueError):
            return True
    return False


# ---- disk space ----------------------------------------------------------------------------------------------
def check_disk(task) -> None:
    """InputError when the run folder's filesystem has less free space than the stages still to run need."""
    need, parts = estimate_disk(task)
    try:
        free = shutil.disk_usage(task.run_dir).free
    except OSError:
        return
    if need > free:
        detail = ", ".join(f"{k} ~{size_text(v)}" for k, v in parts.items() if v)
        raise InputError(f"--run-dir {task.run_dir}: about {size_text(need)} of disk needed by the stages still to run "
                         f"({detail}) but only {size_text(free)} free there; free space or use another --run-dir")


_DISK_STAGES = ("PrepareCorpus", "ShardCorpus", "TrainSeed", "TrainDense", "TrainExpert", "FinetuneMoE", "MergeExperts")
"""The stages whose outputs `estimate_disk` counts (every other stage writes little)."""


def estimate_disk(task) -> tuple[int, dict]:
    """(bytes, {what: bytes}) a run writes for the stages of `task`'s graph that are not complete yet: the
    corpus copy and token shards (about one byte per byte of text), every trained or merged model (fp32 weights)
    and one training checkpoint at a time (weights and AdamW moments: 3× a model)."""
    stages: dict[str, list] = {}
    for t in _graph(task):
        if t.task_family in _DISK_STAGES:
            stages.setdefault(t.task_family, []).append(t)
    memo: dict = {}
    todo_stages = {f: [t for t in ts if not t._fresh(memo)] for f, ts in stages.items()}
    text = _corpus_bytes(task) if todo_stages.get("PrepareCorpus") or todo_stages.get("ShardCorpus") else 0
    k = max([1] + [int(v) for v in str(getattr(task, "num_clusters", 1)).split(",") if v.strip()])  # Study: largest k
    n_models = sum(len(todo_stages.get(f, [])) for f in ("TrainSeed", "TrainDense", "TrainExpert", "FinetuneMoE"))
    merged = [t for t in todo_stages.get("MergeExperts", []) if t.method in ("average", "moe")]
    n_models += sum(1 if t.method == "average" else max(1, k // 2) for t in merged)  # a MoE ≈ k/2 dense models
    if todo_stages.get("FinetuneMoE"):
        n_models += max(1, k // 2) - 1
    model = _model_bytes(task) if n_models else 0  # a task with models upstream carries --seed-model
    parts = {
        "corpus": text if todo_stages.get("PrepareCorpus") else 0,
        "shards": text if todo_stages.get("ShardCorpus") else 0,
        "models": n_models * model,
        "checkpoints": 3 * model if n_models else 0,
    }
    return sum(parts.values()), parts


def _graph(task) -> list:
    """`task` and every task upstream of it, once each."""
    import luigi

    out, seen, todo = [], set(), [task]
    while todo:
        t = todo.pop()
        if t.task_id in seen:
            continue
        seen.add(t.task_id)
        out.append(t)
        todo.extend(luigi.task.flatten(t.requires()))
    return out


def _corpus_bytes(task) -> int:
    """Bytes of text behind --corpus (compressed files count 3×); 0 when unknown (a hub dataset)."""
    if task.corpus == "demo":
        return 8 << 20
    total = 0
    for path, size, _ in files_fingerprint(task.corpus) or []:
        total += size * (3 if str(path).endswith((".gz", ".parquet")) else 1)
    return total


def _model_bytes(task) -> int:
    """fp32 bytes of one model of the run: a scratch preset's parameter count, or the seed folder's weights."""
    if task.seed_model == "scratch":
        from experts.model import PRESETS, param_count

        p = PRESETS.get(task.model_size)
        return 4 * param_count(p, task.vocab_size) if p is not None else 0
    seed = Path(task.seed_model).expanduser()
    if not seed.is_dir():
        return 0  # a hub name: its size is not known before the download
    size = sum(f.stat().st_size for f in seed.glob("*.safetensors")) or sum(f.stat().st_size for f in seed.glob("*.bin"))
    try:
        dtype = str(json.loads((seed / "config.json").read_text()).get("torch_dtype") or "float32")
    except (OSError, ValueError):
        dtype = "float32"
    return size * (2 if "16" in dtype else 1)


def size_text(n: float) -> str:
    """`n` bytes for people: 512 B, 1.5 KB, 3.2 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
