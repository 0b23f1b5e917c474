"""CPU threads of one stage process: the cores this process may use ÷ the stages that run at once.

A process that takes every core of the machine while other stages (Luigi workers) or other jobs share it
oversubscribes the cores: each of torch's, OpenMP's and BLAS's thread pools spins for cores that are busy, and a
small model's step gets several times slower. `size_threads(concurrent)` sets torch's intra-op threads and every
BLAS/OpenMP pool (threadpoolctl) loaded so far to `available_cores() // concurrent`, and exports the same number
(`OMP_NUM_THREADS` ...) for libraries loaded later (torch reads it when imported), unless the user set a
thread variable (`THREAD_VARIABLES`): then nothing is changed.

`available_cores()` counts the CPUs the scheduler lets this process run on (`os.sched_getaffinity`: taskset,
Slurm's CPU binding) and caps them at the cgroup's CPU quota (`cpu.max` of cgroup v2, `cpu.cfs_quota_us` /
`cpu.cfs_period_us` of v1: containers, Slurm's cgroup plugin), rounded up.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
AUTO_MARK = "CBTM_AUTO_THREADS"  # the number size_threads exported: inherited by child processes and Slurm jobs,
#                                  a thread variable equal to it is ours to size again, not the user's choice
_EXPORTED: dict[str, str] = {}  # what size_threads itself put into os.environ in this process


def cgroup_cpu_limit(root: str | os.PathLike = "/sys/fs/cgroup", proc_cgroup: str | os.PathLike = "/proc/self/cgroup"
                     ) -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up), or None when there is none."""
    root = Path(root)
    own = ""
    try:
        for line in Path(proc_cgroup).read_text().splitlines():
            if line.startswith("0::"):  # cgroup v2: "0::/path/of/the/group"
                own = line[3:].strip().lstrip("/")
    except OSError:
        pass
    for path in ([root / own / "cpu.max"] if own else []) + [root / "cpu.max"]:
        try:
            quota, period = path.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    try:  # cgroup v1
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def available_cores() -> int:
    """CPUs this process may run on (affinity), capped by its cgroup's CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return max(1, min(n, quota) if quota else n)


def user_set_threads() -> str | None:
    """The thread variable the user set (one of `THREAD_VARIABLES`), or None."""
    for name in THREAD_VARIABLES:
        value = os.environ.get(name)
        if value is not None and value != _EXPORTED.get(name) and value != os.environ.get(AUTO_MARK):
            return name
    return None


def size_threads(concurrent: int = 1) -> int | None:
    """Give this process `available_cores() // concurrent` threads (at least 1): torch's intra-op pool, the
    loaded BLAS/OpenMP pools, and `THREAD_VARIABLES` for libraries loaded later. Returns the number, or None when
    the user set a thread variable (then their setting stands)."""
    if user_set_threads():
        return None
    n = max(1, available_cores() // max(1, int(concurrent)))
    for name in THREAD_VARIABLES:  # read by torch, OpenMP and BLAS when they load
        os.environ[name] = _EXPORTED[name] = str(n)
    os.environ[AUTO_MARK] = str(n)
    torch = sys.modules.get("torch")  # already loaded: set it (not imported here: a stage without torch stays light)
    if torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn depends on it; without it torch's setting and the variables still apply
        return n
    threadpool_limits(limits=n)  # the BLAS/OpenMP pools loaded so far
    return n
