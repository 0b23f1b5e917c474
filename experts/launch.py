"""Run `experts.train.train_model` on one device in-process, or on several GPUs through torchrun (DDP or FSDP).

`launch_training(..., gpus=[2, 3])` writes the job as JSON beside `out_dir`, then runs
`python -m torch.distributed.run --standalone --nproc_per_node=2 -m experts.launch <job.json>` with
`CUDA_VISIBLE_DEVICES=2,3` (and NVLink multicast off: NCCL_NVLS_ENABLE=0), so several experts can train at
once on one machine, each on its own GPUs, with no communication between them. `python -m experts.launch
job.json` is the per-rank entry point: it initialises the process group and calls `train_model`.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from corpus.io import InputError, read_json, write_json

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
) -> dict:
    """Train one model on `gpus` (list of physical GPU indices) and return its training.json dict.

    0 or 1 GPU (and `cpu_procs` == 1): `train_model` runs in this process (on `cuda:<gpu>` when one is given,
    which becomes the process's current device, so no other GPU is touched; `on_step` is passed on).
    Several GPUs, or `cpu_procs` > 1 on CPU (gloo; used by tests): a torchrun subprocess with one rank per
    device, DDP or FSDP after `config.sharding`; the job (init, shards, config) travels as
    `<out_dir>.launch.json`, removed afterwards.
    """
    from experts.train import TrainConfig, train_model

    gpus = list(gpus or [])
    n = len(gpus) if gpus else cpu_procs
    if n <= 1:
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
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "experts.launch", str(job_path)]
    log.info("launching %s on %s", out_dir.name, f"GPUs {gpus}" if gpus else f"{n} CPU processes")
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
    return read_json(out_dir / "training.json")


def main(argv: Sequence[str] | None = None) -> None:
    """Per-rank entry point under torchrun: `python -m experts.launch job.json`."""
    import torch
    import torch.distributed as dist

    from experts.train import TrainConfig, train_model

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
