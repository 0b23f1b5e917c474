"""The CPU data stages on corpora of 1×, 4×, 16×, 64× corpus_dev: wall time, peak RSS, throughput per stage.

    python bench/bench_scale.py --source ../shared/data/corpus_dev --scales 1,4 --out /tmp/scale   # 2 cores
    python bench/bench_scale.py --source .devdata/corpus_dev --scales 1,4,16 --workers 16 --out /tmp/scale

Corpora (`generate`, seeded): corpus_dev's documents (train+valid+test, ~72M characters, 7 domains in `source`)
are the pool. A synthetic corpus of scale s holds s × as many characters of text, written as JSON-lines shards of
~64 MiB (`part-00000.jsonl`, ...; shard i is filled up to its share of the characters). Document j of shard i is drawn with `numpy.random.default_rng([seed, scale, i])`: a
domain with probability ∝ its share of corpus_dev, a length (characters) copied from a random document of that
domain, then filled with text windows of 200–2,000 characters cut at spaces from random documents of the same
domain at random offsets. So documents are unique, keep their domain's vocabulary (domains still cluster) and
have corpus_dev's length distribution. Shards are generated in parallel, each from its own seed.

Each stage runs as the pipeline runs it: `luigi.build([<Stage>(...)], local_scheduler=True)` in a fresh Python
process (its inputs are already complete, so only that stage runs), --num-clusters 8, --model-size mini,
--device cpu, --data-workers W. Peak RSS: the stage's process tree (the process and its pool workers, summed,
sampled every 0.1 s with psutil when installed) and the main process alone (`ru_maxrss`). CPU seconds (user + sys)
of the tree: the stage process's own (`getrusage`) plus each descendant's last sampled CPU time, and the throughput
per CPU second ("per core"; robust to other jobs sharing the cores). Prints a markdown table and writes
`<out>/results.json` (and `--results PATH` after every stage, so a run cut short keeps what it measured).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("PrepareCorpus", "EmbedCorpus", "FitClusters", "AssignClusters", "TrainTokenizer", "TokenizeCorpus",
          "ShardCorpus")
SHARD_BYTES = 64 << 20


def _read_pool(source: Path) -> dict[str, list[str]]:
    pool: dict[str, list[str]] = {}
    for f in sorted(source.glob("*.jsonl*")):
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt") as fh:
            for line in fh:
                row = json.loads(line)
                if row.get("text", "").strip():
                    pool.setdefault(row.get("source", "?"), []).append(row["text"])
    return pool


def _shard(args) -> tuple[int, int]:
    """Write shard i of a scale; → (documents, characters)."""
    source, out, seed, scale, i, target = args
    pool = _POOL or _load_pool(source)
    domains = sorted(pool)
    weights = np.array([len(pool[d]) for d in domains], float)
    weights /= weights.sum()
    rng = np.random.default_rng([seed, scale, i])
    n_chars = j = 0
    tmp = out / f".part-{i:05d}.jsonl.tmp"
    with open(tmp, "w") as fh:
        while n_chars < target:
            d = domains[rng.choice(len(domains), p=weights)]
            docs = pool[d]
            length = len(docs[rng.integers(len(docs))])
            parts, got = [], 0
            while got < length:
                src = docs[rng.integers(len(docs))]
                w = int(min(len(src), rng.integers(200, 2000), length - got + 1))
                start = int(rng.integers(0, max(1, len(src) - w + 1)))
                sp = src.find(" ", start)
                start = sp + 1 if 0 <= sp < start + 50 else start
                piece = src[start: start + w]
                parts.append(piece)
                got += len(piece) + 1
                if not piece:
                    break
            text = " ".join(parts)
            n_chars += len(text)
            fh.write(json.dumps({"id": f"s{scale}-{i}-{j}", "text": text, "source": d}) + "\n")
            j += 1
    os.replace(tmp, out / f"part-{i:05d}.jsonl")
    return j, n_chars


_POOL: dict = {}


def _load_pool(source) -> dict:
    _POOL.update(_read_pool(Path(source)))
    return _POOL


def generate(source: Path, out: Path, scale: int, seed: int = 0, workers: int = 1) -> dict:
    """The corpus of `scale` × corpus_dev in `out` (module doc); reused when `out/corpus.json` exists."""
    info_path = out / "corpus.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    pool = _read_pool(source)
    chars_base = sum(len(t) for docs in pool.values() for t in docs)
    n_shards = max(1, int(round(chars_base * scale / SHARD_BYTES)))
    jobs = [(str(source), out, seed, scale, i, chars_base * scale // n_shards) for i in range(n_shards)]
    t0 = time.time()
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers, initializer=_load_pool, initargs=(str(source),)) as p:
            done = p.map(_shard, jobs)
    else:
        _POOL.update(pool)
        done = [_shard(j) for j in jobs]
    info = {"scale": scale, "n_docs": sum(d for d, _ in done), "n_chars": sum(c for _, c in done),
            "n_files": n_shards, "seconds": round(time.time() - t0, 1)}
    info_path.write_text(json.dumps(info))
    return info


CHILD = r"""
import json, resource, sys, time
import luigi
import pipeline
from pipeline.failures import install_log_filter

install_log_filter()
stage, params = sys.argv[1], json.loads(sys.argv[2])
t = time.time()
ok = luigi.build([getattr(pipeline, stage)(**params)], local_scheduler=True, log_level="WARNING")
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"ok": bool(ok), "seconds": time.time() - t, "cpu_self_s": ru.ru_utime + ru.ru_stime,
                  "rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_child_max_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_stage(stage: str, params: dict, env: dict) -> dict:
    """One stage in a fresh process; wall time, peak RSS of the process tree (psutil) and of the main process."""
    try:
        import psutil
    except ImportError:
        psutil = None
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, stage, json.dumps(params)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    tree_peak = 0.0
    cpu_desc: dict[int, float] = {}  # pid → last seen user + sys CPU seconds of each descendant
    if psutil is not None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                kids = root.children(recursive=True)
                tree_peak = max(tree_peak, sum(p.memory_info().rss for p in [root] + kids if p.is_running()) / 2**20)
                for p in kids:
                    with contextlib.suppress(psutil.Error):
                        t = p.cpu_times()
                        cpu_desc[p.pid] = t.user + t.system
            except psutil.Error:
                pass
            time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.time() - t0
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{stage} failed:\n{err[-3000:]}")
    res = json.loads(lines[-1])
    if not res["ok"]:
        raise RuntimeError(f"{stage} failed:\n{err[-3000:]}")
    # CPU seconds of the tree: the stage process's own (it reports it) + its descendants' as last sampled (pool
    # workers, a forkserver and the workers forked from it, which the stage process does not reap itself;
    # the last < 0.1 s of each worker is not seen)
    res.update(wall_s=wall, cpu_s=res["cpu_self_s"] + sum(cpu_desc.values()), rss_tree_mib=tree_peak or None)
    return res


def stage_amount(stage: str, run_dir: Path) -> dict:
    """Documents (and tokens) a stage processed, read from its output folder."""
    def one(prefix):
        found = sorted(run_dir.glob(f"{prefix}-*"))
        return found[-1] if found else None

    corpus = one("corpus")
    n_docs = sum(json.loads((corpus / "stats.json").read_text())["n_docs"].values()) if corpus else 0
    if stage in ("TokenizeCorpus", "ShardCorpus"):
        tokens = one("tokens")
        meta = json.loads((tokens / "meta.json").read_text())
        return {"docs": n_docs, "tokens": sum(s["n_tokens"] for s in meta["splits"].values())}
    if stage == "FitClusters":
        return {"docs": None}
    return {"docs": n_docs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="../shared/data/corpus_dev")
    ap.add_argument("--scales", default="1,4")
    ap.add_argument("--out", default="/tmp/bench_scale")
    ap.add_argument("--workers", type=int, default=0, help="--data-workers; 0 = the cores available")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the run folders (default: remove after each scale)")
    ap.add_argument("--results", default="", help="also write the results JSON here after every stage")
    args = ap.parse_args(argv)
    from corpus.threads import available_cores

    workers = args.workers or available_cores()
    out = Path(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # TOKENIZERS_PARALLELISM as the pipeline leaves it (the pools
           # set it off for their workers; TrainTokenizer's BPE trainer uses every core)
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1])] +
                                         [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    rows = []
    for scale in [int(s) for s in args.scales.split(",")]:
        info = generate(Path(args.source), out / f"corpus-{scale}x", scale, args.seed, workers)
        print(f"corpus {scale}x: {info['n_docs']} docs, {info['n_chars'] / 2**20:.0f} Mi characters, {info['n_files']} "
              f"files (generated in {info['seconds']} s)", flush=True)
        run_dir = out / f"run-{scale}x"
        params = {"run_dir": str(run_dir), "corpus": str(out / f"corpus-{scale}x"), "label_field": "source",
                  "num_clusters": 8, "model_size": "mini", "device": "cpu", "data_workers": workers,
                  "seed": args.seed}
        for stage in args.stages.split(","):
            res = run_stage(stage, params, env)
            amount = stage_amount(stage, run_dir)
            row = {"scale": scale, "stage": stage, "mib_text": info["n_chars"] / 2**20, **amount, **res}
            rows.append(row)
            print(f"  {stage:15s} {res['seconds']:7.1f} s  cpu {res['cpu_s']:7.1f} s  main {res['rss_main_mib']:6.0f} "
                  f"MiB  tree {res['rss_tree_mib'] or 0:6.0f} MiB  {_rate(row)}  per core {_rate(row, 'cpu_s')}",
                  flush=True)
            for path in filter(None, [out / "results.json", args.results]):
                Path(path).write_text(json.dumps(rows, indent=1))
        if not args.keep:
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
    print(table(rows, workers))


def _rate(r: dict, per: str = "seconds") -> str:
    """Tokens or documents per second of the stage (`per="seconds"`), or per CPU second of its process tree
    (`per="cpu_s"`: user + sys of the process and its pool workers, robust to other jobs sharing the cores)."""
    if not r.get(per):
        return ""
    if r.get("tokens"):
        return f"{r['tokens'] / r[per] / 1e6:.2f}M tok/s"
    return f"{r['docs'] / r[per] / 1e3:.2f}k docs/s" if r.get("docs") else ""


def table(rows: list[dict], workers: int) -> str:
    scales = sorted({r["scale"] for r in rows})
    head = "| stage | " + " | ".join(f"{s}× ({next(r['mib_text'] for r in rows if r['scale'] == s):.0f} Mi chars)"
                                     for s in scales) + " |"
    lines = [f"data workers: {workers}; each cell: stage seconds, peak RSS of the process tree (main process), "
             "throughput; CPU seconds (user + sys) of the stage's process tree and throughput per CPU second", "",
             head, "|---|" + "---|" * len(scales)]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        cells = []
        for s in scales:
            r = next((r for r in rows if r["scale"] == s and r["stage"] == stage), None)
            if r is None:
                cells.append("–")
                continue
            cells.append(f"{r['seconds']:.1f} s, {r['rss_tree_mib'] or 0:,.0f} ({r['rss_main_mib']:,.0f}) MiB, "
                         f"{_rate(r)}" + (f"; {r['cpu_s']:.0f} CPU s, {_rate(r, 'cpu_s')} per core"
                                          if r.get("cpu_s") else ""))
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
