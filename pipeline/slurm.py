"""Stages as Slurm jobs, with Luigi still the scheduler: `--slurm-enabled` (or `[slurm] enabled = true`).

A Luigi worker (on a login node, with the local scheduler or a central `luigid`) that reaches a stage to run
submits it instead: `sbatch` runs `python -m pipeline.slurm <spec>` in a job with the stage's resources, the
job reconstructs the stage from its parameters (`Task.from_str_params`) and calls its `run()` (the same
outputs, stamp and `stage_log.jsonl` line, which names the job: `slurm_job_id`), and the worker waits for the
job and reports its exit. `--workers N` is how many jobs are in flight at once; dependencies, completeness
and resuming stay Luigi's. A worker killed while waiting cancels its job (`scancel`).

Which stages: `stages = gpu` (default) submits the stages that use GPUs (training: seed, experts, dense, MoE
finetuning; evaluations; the MoE merge with hidden-state routers) and runs the light ones in the worker;
`stages = training` submits only the training stages, so that the many short evaluations run in the worker's own
allocation (run the worker itself as a one-GPU job: one job instead of one per evaluation); `stages = all` submits
every stage. A GPU job asks for `--gres=<gres>:<gpu_count()>`, or `--gpus=<n>` with `gpu_flag = gpus` (none with
--device cpu). Job logs: `<run-dir>/slurm-jobs/<task id>-<random>.log`.

Several GPUs per expert (`--gpus-per-expert N`): the expert's job asks for N GPUs on one node (`--nodes=1
--gres=gpu:N`), or, with `gpus_per_node = g` < N, for N/g nodes of g GPUs each (`--nodes=N/g
--ntasks-per-node=1 --gres=gpu:g`). Inside the job the stage trains on all of them through `srun torchrun`
(`experts.launch.torchrun_command`: one torchrun per node, one rank per GPU, c10d rendezvous on the first node
for several nodes), DDP or FSDP after --sharding. With --device cpu the job gets N × max(cpus, 1) CPUs and N
gloo ranks (the same path, for trying it without GPUs: `GPUS_PER_EXPERT=2 bash bench/slurm_e2e.sh`).

Why not b2luigi's Slurm batch system: its `SendJobWorker` needs b2luigi task classes (it calls
`task.has_grouped_params()`), and each job re-runs the submitting script (`__main__.__file__ --batch-runner
--task-id ...`), which `luigi --module pipeline ...` is not; our stages would have to change base class and
entry point. Here a stage needs nothing but its parameters, which Luigi already serialises.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import luigi

from corpus.io import InputError, read_json, write_json

log = logging.getLogger("luigi-interface")
IN_JOB = "CBTM_SLURM_JOB"  # set inside the jobs this module submits: their stages run in place


class slurm(luigi.Config):  # noqa: N801  (luigi names config sections after the class: [slurm], --slurm-*)
    """Slurm settings: `[slurm]` in luigi.cfg or `--slurm-<name>` on the command line."""

    enabled = luigi.BoolParameter(default=False, description="submit stages as Slurm jobs (sbatch)")
    stages = luigi.ChoiceParameter(default="gpu", choices=["gpu", "training", "all"],
                                   description="gpu: the stages that use GPUs | training: only seed, experts, dense "
                                   "and MoE finetuning (evaluations run in the worker's own allocation) | all: every "
                                   "stage")
    partition = luigi.Parameter(default="", description="sbatch --partition")
    time = luigi.Parameter(default="", description="sbatch --time of each job, e.g. 24:00:00")
    gres = luigi.Parameter(default="gpu", description="GPUs are asked as --gres=<gres>:<n>, e.g. gpu:h100")
    gpus_per_node = luigi.IntParameter(default=0, description="GPUs per node of the partition: an expert with "
                                       "more --gpus-per-expert spans --gpus-per-expert / this nodes; 0: one node")
    gpu_flag = luigi.ChoiceParameter(default="gres", choices=["gres", "gpus"],
                                     description="gres: --gres=<gres>:<n> | gpus: --gpus=<n> (--gpus=<type>:<n> "
                                     "when --slurm-gres names a type, e.g. gpu:h100), for clusters that ask so")
    cpus_per_gpu = luigi.IntParameter(default=0, description="sbatch --cpus-per-task = this × GPUs; 0: unset")
    cpus = luigi.IntParameter(default=0, description="sbatch --cpus-per-task of jobs without GPUs; 0: unset")
    mem = luigi.Parameter(default="", description="sbatch --mem, e.g. 64G")
    sbatch_args = luigi.Parameter(default="", description="more sbatch arguments, e.g. '--account=x --qos=y'")
    poll_s = luigi.FloatParameter(default=5.0, description="seconds between job state checks (scontrol)")


def runs_as_job(stage) -> bool:
    """Whether `stage.run()` submits the stage instead of running it here."""
    cfg = slurm()
    if not cfg.enabled or os.environ.get(IN_JOB):
        return False
    if cfg.stages == "training":
        return bool(getattr(stage, "resumable", False))  # the training stages (seed, experts, dense, MoE finetune)
    return cfg.stages == "all" or bool(stage.gpu_stage)


def job_gpus(stage) -> int:
    return stage.gpu_count() if stage.gpu_stage and stage.device != "cpu" else 0


def job_nodes(stage, cfg: slurm | None = None) -> tuple[int, int]:
    """(nodes, GPUs per node) of the stage's job: its `job_gpus` on one node, or spread over nodes of
    `gpus_per_node` GPUs when it needs more (then a multiple of them: InputError otherwise)."""
    cfg = cfg or slurm()
    gpus = job_gpus(stage)
    g = cfg.gpus_per_node
    if not gpus or g <= 0 or gpus <= g:
        return 1, gpus
    if gpus % g:
        raise InputError(f"--gpus-per-expert {gpus} does not fill whole nodes of [slurm] gpus_per_node = {g}; "
                         f"use a multiple of {g}")
    return gpus // g, g


def cpu_ranks(stage) -> int:
    """Training processes of a --device cpu stage: --gpus-per-expert of them for an expert (gloo ranks), else 1."""
    return stage.gpu_count() if stage.device == "cpu" and stage.gpu_stage else 1


def sbatch_command(stage, spec: Path, log_file: Path, cfg: slurm | None = None) -> list[str]:
    """The sbatch command line that runs `python -m pipeline.slurm <spec>` for `stage`."""
    cfg = cfg or slurm()
    nodes, gpus = job_nodes(stage, cfg)
    cmd = ["sbatch", "--parsable", f"--job-name=cbtm-{stage.task_family}", f"--output={log_file}",
           f"--chdir={os.getcwd()}", f"--export=ALL,{IN_JOB}=1"]
    if nodes > 1 or gpus > 1 or cpu_ranks(stage) > 1:  # one node unless asked; one task per node (srun torchrun)
        cmd += [f"--nodes={nodes}", "--ntasks-per-node=1"]
    if cfg.partition:
        cmd.append(f"--partition={cfg.partition}")
    if cfg.time:
        cmd.append(f"--time={cfg.time}")
    if gpus and cfg.gpu_flag == "gpus":
        kind = cfg.gres.split(":", 1)[1] if ":" in cfg.gres else ""
        cmd.append(f"--gpus={kind + ':' if kind else ''}{nodes * gpus}")  # --gpus counts the job's, --gres a node's
    elif gpus:
        cmd.append(f"--gres={cfg.gres}:{gpus}")
    cpus = cfg.cpus_per_gpu * gpus if gpus else cfg.cpus
    if cpu_ranks(stage) > 1:
        cpus = cpu_ranks(stage) * max(cfg.cpus, 1)
    if cpus:
        cmd.append(f"--cpus-per-task={cpus}")
    if cfg.mem:
        cmd.append(f"--mem={cfg.mem}")
    cmd += shlex.split(cfg.sbatch_args)
    cmd.append("--wrap=" + shlex.join([sys.executable, "-m", "pipeline.slurm", str(spec)]))
    return cmd


def in_job() -> bool:
    """Whether this process is a job this module submitted."""
    return bool(os.environ.get(IN_JOB)) and bool(os.environ.get("SLURM_JOB_ID"))


def job_launch(stage) -> dict:
    """Inside a job: how the stage's training launches (`experts.launch.launch_training` keywords): its GPUs
    are the job's (on each node: the devices Slurm made visible), several devices through `srun torchrun` on the
    job's nodes. Outside a job: {}."""
    if not in_job():
        return {}
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    devices = stage.gpu_count() if stage.device != "cpu" else cpu_ranks(stage)
    return {"nodes": nodes, "srun": devices > 1 or nodes > 1}


def job_local_gpus(n: int) -> list[int]:
    """Inside a job: the first `n` of the GPUs Slurm made visible on this node, as indices 0..n−1."""
    seen = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return list(range(min(n, len(seen))))


def run_as_job(stage) -> str:
    """Submit `stage` and wait for its job; returns the job id. A failed job raises with the end of its log
    (an InputError inside the job comes back as the same one-line InputError)."""
    cfg = slurm()
    jobs = Path(stage.run_dir) / "slurm-jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    name = f"{stage.task_id[:150]}-{uuid.uuid4().hex[:6]}"
    spec, log_file = jobs / f"{name}.json", jobs / f"{name}.log"
    write_json(spec, {"family": stage.task_family, "params": stage.to_str_params()})
    cmd = sbatch_command(stage, spec, log_file, cfg)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed for {stage.task_id}: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    log.info("%s → Slurm job %s (log %s)", stage.task_id, job_id, log_file)
    state = _wait(job_id, cfg.poll_s)
    if state != ("COMPLETED", "0:0"):
        text = log_file.read_text(errors="replace") if log_file.is_file() else ""
        errors = [line for line in text.splitlines() if "InputError:" in line]
        if errors:
            raise InputError(errors[-1].split("InputError:", 1)[1].strip())
        tail = "\n".join(text.splitlines()[-30:])
        raise RuntimeError(f"Slurm job {job_id} ({stage.task_id}) ended {state[0]} (exit {state[1]}); log "
                           f"{log_file}:\n{tail}")
    spec.unlink(missing_ok=True)
    return job_id


def _job_state(job_id: str) -> tuple[str, str] | None:
    """(state, exit code) from `scontrol show job` (kept MinJobAge after the end), None if unknown."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
    return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "")


def _wait(job_id: str, poll_s: float) -> tuple[str, str]:
    """Poll the job until it ends; cancel it if this worker is interrupted, terminated or hung up (SIGTERM,
    SIGHUP: a closed login shell), so that no job outlives the worker that waits for it."""
    import time

    done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}
    previous = {s: signal.signal(s, _raise_exit) for s in (signal.SIGTERM, signal.SIGHUP)} if _main_thread() else {}
    finished, unknown = False, 0
    try:
        while True:
            state = _job_state(job_id)
            unknown = unknown + 1 if state is None else 0
            if (state is not None and state[0] in done) or unknown >= 5:  # 5 failed queries: the job is gone
                finished = True
                return state or ("UNKNOWN", "")
            time.sleep(poll_s)
    finally:
        if not finished:
            subprocess.run(["scancel", job_id], capture_output=True)
            log.info("cancelled Slurm job %s", job_id)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> None:
    """Inside a job: rebuild the stage named by the spec file and run it here. (`python -m pipeline.slurm` imports
    the package `pipeline` first, which registers every stage with luigi.)"""
    spec = read_json(Path((argv or sys.argv[1:])[0]))
    task = luigi.task_register.Register.get_task_cls(spec["family"]).from_str_params(spec["params"])
    log.info("Slurm job %s runs %s", os.environ.get("SLURM_JOB_ID"), task.task_id)
    try:
        task.run()
    except InputError as e:
        print(f"InputError: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
