"""corpus.threads: CPU threads per stage process = the cores the process may use ÷ the stages running at once."""
from __future__ import annotations

import luigi.worker
import pytest
import torch

from corpus import threads


@pytest.fixture
def keep_threads(monkeypatch):
    """Restore torch's threads and the thread variables after the test."""
    before = torch.get_num_threads()
    for name in (*threads.THREAD_VARIABLES, threads.AUTO_MARK):
        monkeypatch.setenv(name, "0")  # recorded, so that teardown restores what size_threads writes
        monkeypatch.delenv(name)
    monkeypatch.setattr(threads, "_EXPORTED", {})
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cpu_max, expected", [("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1),
                                               ("max 100000", None)])
def test_cgroup_v2_quota(tmp_path, cpu_max, expected):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job\n")
    assert threads.cgroup_cpu_limit(tmp_path, proc) == expected


def test_cgroup_v1_quota_and_none(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path, tmp_path / "missing") == 3
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None


def test_available_cores_capped_by_quota(monkeypatch):
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1)
    assert threads.available_cores() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cores() >= 1


def test_cores_divided_by_concurrent_stages(monkeypatch, keep_threads):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    assert threads.size_threads(2) == 2
    assert torch.get_num_threads() == 2
    assert all(threads.os.environ[v] == "2" for v in threads.THREAD_VARIABLES)
    # its own exported variables are not the user's choice: the next stage sizes again
    assert threads.size_threads(4) == 1 and torch.get_num_threads() == 1
    assert threads.size_threads(8) == 1  # never below one thread


def test_user_setting_wins(monkeypatch, keep_threads):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.user_set_threads() == "OMP_NUM_THREADS"
    assert threads.size_threads(2) is None
    assert torch.get_num_threads() == 3


def test_luigi_worker_count_is_recorded(monkeypatch):
    from pipeline import cli

    monkeypatch.setitem(cli._WORKERS, "processes", 1)
    cli.install_worker_count()
    with luigi.worker.Worker(worker_processes=3):
        assert cli.concurrent_stages() == 3


def test_torch_imported_later_takes_the_size(tmp_path):
    """A stage that imports torch after the sizing (size_threads does not import it) gets the same threads."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in (*threads.THREAD_VARIABLES, threads.AUTO_MARK)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    code = ("import sys; from corpus import threads; n = threads.size_threads(threads.available_cores()); "
            "assert 'torch' not in sys.modules; import torch; print(n, torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]


def test_inherited_sizing_is_sized_again(monkeypatch, keep_threads):
    """A child process or Slurm job inherits the worker's exported variables with the mark: it sizes itself again
    (its own cores), while a variable the user set without the mark still wins."""
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv(threads.AUTO_MARK, "2")  # as inherited: this process exported nothing itself
    assert threads.user_set_threads() is None and threads.size_threads(1) == 4
    monkeypatch.setattr(threads, "_EXPORTED", {})
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.user_set_threads() == "OMP_NUM_THREADS" and threads.size_threads(1) is None
