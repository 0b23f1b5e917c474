"""Issue 4 "many machines": two worker processes against one central `luigid` (on loopback) share the run
folder and train every expert exactly once."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.stamps import read_stage_log
from tests.pipeline.conftest import tiny_params, write_tiny_corpus

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _luigid() -> list[str]:
    exe = Path(sys.executable).with_name("luigid")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from luigi.cmdline import luigid; luigid()"]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"luigid exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError("luigid did not open its port")


def test_two_workers_train_each_expert_once(tmp_path):
    port = _free_port()
    (tmp_path / "luigid-logs").mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LUIGI_CONFIG_PATH": str(ROOT / "luigi.cfg"), "OMP_NUM_THREADS": "1"}
    luigid = subprocess.Popen(_luigid() + ["--port", str(port), "--address", "127.0.0.1",
                                           "--logdir", str(tmp_path / "luigid-logs"),
                                           "--state-path", str(tmp_path / "luigid-state")],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    workers = []
    try:
        _wait_for_port(port, luigid)
        run_dir = tmp_path / "run"
        # experts long enough (~2 s each) that a worker polling every 0.2 s takes the next one while the other trains
        params = tiny_params(write_tiny_corpus(tmp_path / "corpus"), run_dir, num_clusters=3, train_tokens=98304)
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
        cmd = [sys.executable, "-m", "luigi", "--module", "pipeline", "TrainExperts", *flags, "--workers", "1",
               "--worker-keep-alive", "--worker-wait-interval", "0.2", "--worker-wait-jitter", "0.2", "--no-lock",
               "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port)]
        for i in range(2):
            log = open(tmp_path / f"worker{i}.log", "w")
            workers.append((subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        codes = [p.wait(timeout=240) for p, _ in workers]
        logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
        assert codes == [0, 0], logs[codes.index(max(codes))][-3000:]
        runs = read_stage_log(run_dir)
        trained = [r["task_id"] for r in runs if r["stage"] == "TrainExpert"]
        assert len(trained) == 3 and len(set(trained)) == 3  # every expert, exactly once
        expert_pids = {r["pid"] for r in runs if r["stage"] == "TrainExpert"}
        assert expert_pids == {p.pid for p, _ in workers}, (expert_pids, [r["pid"] for r in runs])  # shared work
        for stage in ("PrepareCorpus", "EmbedCorpus", "FitClusters", "AssignClusters", "ShardCorpus", "TrainSeed"):
            assert [r["stage"] for r in runs].count(stage) == 1, stage
        assert sorted(p.name for p in next(run_dir.glob("experts-*")).iterdir()) == [
            "cluster_000", "cluster_001", "cluster_002"]
    finally:
        for p, log in workers:
            if p.poll() is None:
                p.kill()
            log.close()
        luigid.terminate()
        try:
            luigid.wait(timeout=10)
        except subprocess.TimeoutExpired:
            luigid.kill()
