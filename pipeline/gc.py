"""Stage folders no completed run uses any more: list them (a dry run, the default) or remove them (`--delete`).

    python -m pipeline.gc RUN_DIR [--delete] [--keep-runs N]

Every changed flag gives the stages it affects new folders (`<folder>-<hash>`), and the earlier settings' folders
stay behind. A folder is *in use* when the last `N` (default 1) completed `RunAll`s of the run folder depend on
it: their Report and WriteModelCards stages and, through the inputs each stage's stamp records, everything
upstream of them (the latest completed Study's stage likewise). `RunAll` records each completion in
`<run_dir>/runs.jsonl` (`record_completed_run`); a run folder of an earlier version falls back to the report
its `report.json` was published from.

Only stage folders the pipeline made are candidates: a top-level folder of a run folder that carries the
run-folder marker (`corpus.layout.RUN_MARKER`), named `<stage folder>-<8 hex>`, not a symlink, holding a stage
stamp whose hash is that name's. Anything else (the report, logs, a user's files, working folders of an
interrupted run) is never touched. Removal holds the run folder's lock, so no run writes meanwhile. A folder
written after the last completed RunAll (an unfinished run with new flags) is listed as such, and removed too
with `--delete`: rerunning that command then rebuilds it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from corpus.io import InputError, read_json
from corpus.layout import REPORT_JSON, RUN_MARKER, RUNS_LOG, STAGE_STAMP
_NAME = re.compile(r"^(?P<folder>[a-z][a-z-]*)-(?P<hash>[0-9a-f]{8})$")


def record_completed_run(run_dir: str | os.PathLike, roots: list) -> None:
    """Append `{at, roots}` to `<run_dir>/runs.jsonl`: `roots` (stages) are what a completed RunAll produced last."""
    line = json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "unix": time.time(),
                       "roots": [t.rel_path() for t in roots]}) + "\n"
    fd = os.open(Path(run_dir) / RUNS_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def completed_runs(run_dir: Path) -> list[dict]:
    """The completed RunAlls, oldest first: runs.jsonl, or the published report.json of an earlier version."""
    log = run_dir / RUNS_LOG
    if log.is_file():
        try:
            runs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        except ValueError as e:
            raise InputError(f"{log} has a line that is not JSON ({e}); gc removes nothing") from None
        if runs:
            return runs
    try:
        published = json.loads((run_dir / REPORT_JSON).read_text())["run"]["published"]
        return [{"at": published.get("at"), "roots": [published["report"]], "legacy": True}]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _stamp_of(run_dir: Path, rel: str) -> dict | None:
    """The stamp of the output at `rel`; None when that output is gone. An output whose stamp is missing or cannot
    be read is refused (InputError): its inputs are unknown, and removing them could remove what it was built from."""
    path = run_dir / rel
    for stamp in (path / STAGE_STAMP, path.with_name(path.name + ".stage.json")):
        if stamp.is_file():
            try:
                return read_json(stamp)
            except InputError as e:
                raise InputError(f"{e}; gc cannot tell what {rel} was built from, so it removes nothing") from None
    if path.exists():
        raise InputError(f"{path} has no stage stamp; gc cannot tell what it was built from, so it removes nothing")
    return None


def in_use(run_dir: Path, roots: list[str]) -> set[str]:
    """Top-level folders of `run_dir` that `roots` (outputs, relative paths) and their recorded inputs are in."""
    from pipeline.stamps import relative_run_ids

    seen, todo = set(), list(roots)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        stamp = _stamp_of(run_dir, rel) or {}
        todo += relative_run_ids(stamp.get("inputs_run_ids") or {}, (stamp.get("params") or {}).get("run_dir"))
    return {Path(rel).parts[0] for rel in seen if rel and not Path(rel).is_absolute()}


def stage_folders(run_dir: Path) -> dict[str, dict]:
    """{name: {stage, size, written}} of the top-level folders the pipeline made (module doc)."""
    out = {}
    for entry in sorted(os.scandir(run_dir), key=lambda e: e.name):
        m = _NAME.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        stamps = [p for p in Path(entry.path).rglob("*") if p.name == STAGE_STAMP or p.name.endswith(".stage.json")]
        info = None
        for p in stamps:
            try:
                s = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(s, dict) and s.get("hash") == m["hash"] and s.get("stage"):
                info = info or {"stage": s["stage"], "written": s.get("started_unix", 0)}
                info["written"] = max(info["written"], s.get("started_unix", 0))
        if info is not None:
            info["size"] = sum(p.stat().st_size for p in Path(entry.path).rglob("*")
                               if p.is_file() and not p.is_symlink())
            out[entry.name] = info
    return out


def unused(run_dir: str | os.PathLike, keep_runs: int = 1) -> tuple[dict[str, dict], float | None]:
    """({name: info} of the stage folders the last `keep_runs` completed RunAlls (and the latest Study) do not
    use, time of the last completion)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_MARKER).is_file():
        raise InputError(f"{run_dir} is not a run folder (no {RUN_MARKER}); gc touches nothing there")
    if keep_runs < 1:
        raise InputError(f"--keep-runs {keep_runs}: must be ≥ 1")
    runs = completed_runs(run_dir)
    if not runs:
        raise InputError(f"{run_dir}: no completed RunAll recorded (no {RUNS_LOG}, no published {REPORT_JSON}), so "
                         "nothing is known to be in use; gc removes nothing")
    folders = stage_folders(run_dir)
    roots = [r for run in runs[-keep_runs:] for r in run["roots"]]
    studies = [(info["written"], name) for name, info in folders.items() if info["stage"] == "Study"]
    roots += [max(studies)[1]] if studies else []
    live = in_use(run_dir, roots)
    if runs[-1].get("legacy"):  # an earlier version's RunAll: its model cards are the ones made from what it used
        live |= {name for name, info in folders.items() if info["stage"] == "WriteModelCards"
                 and in_use(run_dir, [name]) - {name} <= live}
    last = runs[-1].get("unix")
    return {name: info for name, info in folders.items() if name not in live}, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.gc", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run folder (--run-dir of its runs)")
    parser.add_argument("--delete", action="store_true", help="remove the folders listed (default: only list them)")
    parser.add_argument("--keep-runs", type=int, default=1, metavar="N",
                        help="keep what the last N completed RunAlls use (default: 1, the last one)")
    args = parser.parse_args(argv)
    from pipeline.lock import run_dir_lock
    from pipeline.preflight import size_text

    run_dir = Path(os.path.expanduser(args.run_dir))
    try:
        if not run_dir.is_dir():
            raise InputError(f"{run_dir}: no such folder")
        with run_dir_lock(run_dir, wait=0):  # no run writes the folder meanwhile
            found, last = unused(run_dir, args.keep_runs)
            total = sum(info["size"] for info in found.values())
            for name, info in found.items():
                late = " (written after the last completed RunAll)" if last and info["written"] > last else ""
                print(f"{'removing' if args.delete else 'unused'}  {size_text(info['size']):>9}  {name}  "
                      f"{info['stage']}{late}")
                if args.delete:
                    shutil.rmtree(run_dir / name)
            verb = "freed" if args.delete else "would free"
            hint = "" if args.delete or not found else f"; remove them with: python -m pipeline.gc {run_dir} --delete"
            print(f"{len(found)} stage folder(s) not used by the last {args.keep_runs} completed RunAll(s): "
                  f"{verb} {size_text(total)}{hint}")
    except InputError as e:
        print(f"gc: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
