"""Run `experts.training.train_model` on one device in-process, or on several GPUs through torchrun (DDP or FSDP),
and claim this host's GPUs for it (`gpu_slots`).

`launch_training(..., gpus=[2, 3])` writes the job as JSON beside `out_dir`, then runs
`python -m torch.distributed.run --standalone --nproc_per_node=2 -m experts.launch <job.json>` with
`CUDA_VISIBLE_DEVICES=2,3` (and NVLink multicast off: NCCL_NVLS_ENABLE=0), so several experts can train at
once on one machine, each on its own GPUs, with no communication between them. `python -m experts.launch
job.json` is the per-rank entry point: it initialises the process group and calls `train_model`.

Several experts per GPU: `gpu_slots(1, lock_dir, slots_per_gpu=N, shared=True, weight=w)` gives one of N slots
of a GPU to each training process (file locks, so separate worker processes agree), on the GPU with the least
claimed weight (e.g. the tokens each expert trains), and `TrainConfig.experts_per_gpu = N` makes each process
allocate at most its share of that GPU's memory. The processes' kernels then share the GPU: time-sliced, or
run concurrently when the CUDA MPS daemon serves this host (`mps_status`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from corpus.io import InputError, read_json, write_json
from corpus.layout import TRAINING_INFO

log = logging.getLogger(__name__)

_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def launch_training(
    init: str | os.PathLike,
    shard_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    config,
    valid_paths: Sequence[str | os.PathLike] | None = None,
    tokenizer: str | os.PathLike | None = None,
    gpus: Sequence[int] | None = None,
    cpu_procs: int = 1,
    timeout: float | None = None,
    on_step=None,
    nodes: int = 1,
    srun: bool = False,
) -> dict:
    """Train one model on `gpus` (indices of the GPUs this process sees: physical ones unless CUDA_VISIBLE_DEVICES
    is set, e.g. by Slurm) and return its training.json dict.

    0 or 1 GPU (and `cpu_procs` == 1): `train_model` runs in this process (on `cuda:<gpu>` when one is given,
    which becomes the process's current device, so no other GPU is touched; `on_step` is passed on).
    Several GPUs, or `cpu_procs` > 1 on CPU (gloo; used by tests): a torchrun subprocess with one rank per
    device, DDP or FSDP after `config.sharding`; the job (init, shards, config) travels as
    `<out_dir>.launch.json`, removed afterwards.
    Inside a Slurm allocation (`srun=True`) the torchrun runs as a job step, `srun torchrun`, one per node on
    `nodes` nodes, each with one rank per GPU of `gpus` (the same local indices on every node; `gpus` index the
    devices this process sees, CUDA_VISIBLE_DEVICES included), so an expert trains on nodes × len(gpus) GPUs.
    """
    from experts.training import TrainConfig, train_model

    gpus = list(gpus or [])
    n = len(gpus) if gpus else cpu_procs
    if nodes < 1:
        raise InputError(f"nodes must be >= 1, got {nodes}")
    if gpus and config.experts_per_gpu > 1:
        mps = mps_status()
        log.info("%s shares GPU %s with up to %d other expert(s); CUDA MPS %s", Path(out_dir).name, gpus[0],
                 config.experts_per_gpu - 1, "serves them (kernels overlap)" if mps["running"] else
                 "is not running (the GPU time-slices between them; start it with `nvidia-cuda-mps-control -d`)"
                 if mps["control"] else "is not installed (the GPU time-slices between them)")
    if n <= 1 and nodes == 1:
        if gpus:
            config = TrainConfig.from_dict({**config.to_dict(), "device": f"cuda:{gpus[0]}"})
        return train_model(init, shard_paths, out_dir, config, valid_paths=valid_paths, tokenizer=tokenizer,
                           on_step=on_step)
    if on_step is not None:
        raise ValueError("on_step needs an in-process run (one GPU, or cpu_procs=1)")

    out_dir = Path(out_dir)
    job_path = out_dir.parent / f"{out_dir.name}.launch.json"
    cfg = config.to_dict()
    if not gpus:
        cfg["device"] = "cpu"
    write_json(job_path, {
        "init": str(init),
        "shard_paths": [str(p) for p in shard_paths],
        "out_dir": str(out_dir),
        "config": cfg,
        "valid_paths": [str(p) for p in valid_paths] if valid_paths else None,
        "tokenizer": str(tokenizer) if tokenizer else None,
    })
    env = {**os.environ, **_SAFE_ENV}
    if gpus:  # indices into what this process sees (a Slurm job's CUDA_VISIBLE_DEVICES, say), else physical
        seen = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(seen[g] if g < len(seen) else str(g) for g in gpus)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        if env.get("OMP_NUM_THREADS") in (None, env.get("CBTM_AUTO_THREADS")):  # unset, or the stage's own sizing
            env["OMP_NUM_THREADS"] = "1"  # one thread per CPU rank (corpus.threads sized the stage, not the ranks)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = torchrun_command(n, job_path, nodes=nodes, srun=srun)
    log.info("launching %s on %s%s: %s", out_dir.name, f"GPUs {gpus}" if gpus else f"{n} CPU processes",
             f" on each of {nodes} nodes" if nodes > 1 else "", shlex.join(cmd))
    try:
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    finally:
        job_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        lines = [l for l in tail if "InputError:" in l]
        if lines:
            raise InputError(lines[-1].split("InputError:", 1)[1].strip())
        raise RuntimeError(f"torchrun training of {out_dir} failed (exit {proc.returncode}):\n" + "\n".join(tail[-30:]))
    return read_json(out_dir / TRAINING_INFO)


def torchrun_command(n_per_node: int, job_path: str | os.PathLike, nodes: int = 1, srun: bool = False,
                     port: int | None = None) -> list[str]:
    """`python -m torch.distributed.run ... -m experts.launch <job_path>` with `n_per_node` ranks per node: one
    node standalone; several nodes meet at a c10d rendezvous on this host (the first node of a Slurm job runs
    the batch script), id = the Slurm job id. `srun=True` prefixes `srun --nodes=<nodes> --ntasks-per-node=1`, a
    job step that starts one torchrun on each node of the allocation (and is killed with the job)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n_per_node}"]
    if nodes > 1:
        job = os.environ.get("SLURM_JOB_ID", "0")
        if port is None:
            port = 29500 + (int(job) % 1000 if job.isdigit() else 0)
        cmd += [f"--nnodes={nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={socket.gethostname()}:{port}",
                f"--rdzv_id=cbtm-{job}"]
    else:
        cmd.append("--standalone")
    cmd += ["-m", "experts.launch", str(job_path)]
    if srun:
        cmd = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"] + cmd
    return cmd


def gpu_slots(n: int, lock_dir: str | os.PathLike, slots_per_gpu: int = 1, shared: bool = False,
              weight: float = 1.0, gpus: Sequence[int] | None = None) -> contextlib.AbstractContextManager:
    """Claim GPUs of this host for the duration of a block (exclusive file locks under `lock_dir`) and yield
    their indices, so that processes started independently (Luigi workers) never train on the same GPU slot.

    Every GPU has `slots_per_gpu` slots (`<host>-gpu<g>-slot<s>.lock`). `shared=False`: `n` whole GPUs, i.e.
    every slot of each. `shared=True` (n = 1): one slot, on the GPU whose held slots carry the least total
    `weight` (each holder writes its weight into its lock file), ties to the GPU with fewer holders, then the
    lower index; so experts of unequal size spread their work evenly over the GPUs. Claims are made one at a
    time under `<host>-claim.lock`, and a claim that cannot be met waits (polling every 2 s).
    `gpus`: the host's GPU indices; default: nvidia-smi's, or none when CUDA_VISIBLE_DEVICES is already set
    (the caller chose the GPUs). Yields [] when `n` is 0 or there is no GPU.
    """
    return _GpuSlots(n, Path(lock_dir), slots_per_gpu, shared, weight, gpus)


class _GpuSlots:
    def __init__(self, n: int, lock_dir: Path, slots_per_gpu: int, shared: bool, weight: float, gpus):
        if slots_per_gpu < 1:
            raise InputError(f"--experts-per-gpu must be >= 1, got {slots_per_gpu}")
        if shared and n > 1:
            raise InputError("a shared GPU slot is one slot of one GPU; several GPUs need whole GPUs")
        self.n, self.lock_dir, self.per_gpu, self.shared, self.weight = n, lock_dir, slots_per_gpu, shared, weight
        self.gpus_given = None if gpus is None else list(gpus)
        self.handles: list = []

    def _gpus(self) -> list[int]:
        if self.n == 0:
            return []
        if self.gpus_given is not None:
            return self.gpus_given
        if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            return []
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [int(line) for line in out.split() if line.strip().isdigit()]

    def _path(self, host: str, g: int, s: int) -> Path:
        return self.lock_dir / f"{host}-gpu{g}-slot{s}.lock"

    @staticmethod
    def _try_lock(path: Path):
        """An open handle holding `path`'s lock, or None when another process holds it."""
        import fcntl

        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError:
            f.close()
            return None

    @staticmethod
    def _held_weight(path: Path) -> float:
        try:
            return float(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 1.0

    def _claim(self, host: str, gpus: list[int]) -> list[tuple[int, list]] | None:
        """One attempt (under the claim lock): [(gpu, handles)] or None."""
        if not self.shared:
            got = []
            for g in gpus:
                hs = [self._try_lock(self._path(host, g, s)) for s in range(self.per_gpu)]
                if all(h is not None for h in hs):
                    got.append((g, hs))
                    if len(got) == self.n:
                        return got
                else:
                    for h in hs:
                        if h is not None:
                            h.close()
            for _, hs in got:
                for h in hs:
                    h.close()
            return None
        best = None  # (load, holders, gpu, handle of a free slot)
        for g in gpus:
            free, load, holders = None, 0.0, 0
            for s in range(self.per_gpu):
                path = self._path(host, g, s)
                h = self._try_lock(path)
                if h is None:  # held: count its holder's weight
                    load += self._held_weight(path)
                    holders += 1
                elif free is None:
                    free = h
                else:
                    h.close()
            if free is None:
                continue
            if best is None or (load, holders) < best[:2]:
                if best is not None:
                    best[3].close()
                best = (load, holders, g, free)
            else:
                free.close()
        return None if best is None else [(best[2], [best[3]])]

    def __enter__(self) -> list[int]:
        import fcntl

        gpus = self._gpus()
        if not gpus:
            return []
        if self.n > len(gpus):
            raise InputError(f"--gpus-per-expert {self.n}, but this host has {len(gpus)} GPU(s)")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        waited = 0.0
        while True:
            with open(self.lock_dir / f"{host}-claim.lock", "a+") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                got = self._claim(host, gpus)
                if got is not None:
                    for _, hs in got:
                        for h in hs:
                            h.seek(0)
                            h.truncate()
                            h.write(f"{self.weight if self.shared else 'whole'}\n")
                            h.flush()
                fcntl.flock(guard, fcntl.LOCK_UN)
            if got is not None:
                break
            if waited % 60 == 0:
                log.info("waiting for %s on %s", "a GPU slot" if self.shared else f"{self.n} free GPU(s)", host)
            time.sleep(2.0)
            waited += 2.0
        self.handles = [h for _, hs in got for h in hs]
        return [g for g, _ in got]

    def __exit__(self, *exc):
        for f in self.handles:
            f.close()
        self.handles = []
        return False


def mps_status() -> dict:
    """Whether CUDA MPS can serve this host's training processes: {"control": path of
    nvidia-cuda-mps-control or None, "pipe_dir": the pipe directory clients would use, "running": whether a
    daemon answers there}. Start one (as the user who runs the training) with
    `nvidia-cuda-mps-control -d` (pipe and log directories: CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY,
    default /tmp/nvidia-mps and /var/log/nvidia-mps), stop it with `echo quit | nvidia-cuda-mps-control`."""
    control = shutil.which("nvidia-cuda-mps-control")
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    running = Path(pipe_dir, "control").exists()
    return {"control": control, "pipe_dir": pipe_dir, "running": running}


def main(argv: Sequence[str] | None = None) -> None:
    """Per-rank entry point under torchrun: `python -m experts.launch job.json`."""
    import torch
    import torch.distributed as dist

    from experts.training import TrainConfig, train_model

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        raise SystemExit("usage: python -m experts.launch JOB.json (written by experts.launch.launch_training)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    job = read_json(argv[0])
    config = TrainConfig.from_dict(job["config"])
    use_cuda = config.device != "cpu" and torch.cuda.is_available()
    backend = config.ddp_backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    try:
        train_model(job["init"], job["shard_paths"], job["out_dir"], config,
                    valid_paths=job["valid_paths"], tokenizer=job["tokenizer"])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
