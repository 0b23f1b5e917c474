"""Stages as Slurm jobs: the sbatch command a stage gets, the job-side round trip of its parameters, and (opt-in,
CBTM_TEST_SLURM=1 with slurm-wlm and munge installed, as root) a tiny RunAll on a real single-node Slurm."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import luigi
import pytest

from pipeline import TrainExpert
from pipeline.merging import MergeExperts
from corpus.io import InputError
from experts.launch import torchrun_command
from pipeline.slurm import IN_JOB, job_gpus, job_launch, runs_as_job, sbatch_command, slurm
from tests.pipeline.conftest import tiny_params


@pytest.fixture
def slurm_cfg():
    cfg = luigi.configuration.get_config()
    cfg.set("slurm", "enabled", "true")
    yield cfg
    cfg.remove_section("slurm")


def _expert(tmp_path, **kw):
    (tmp_path / "corpus").mkdir(exist_ok=True)  # parameters are checked at construction: the corpus must exist
    return TrainExpert(cluster_id=1, **tiny_params(tmp_path / "corpus", tmp_path / "run", **kw))


def test_sbatch_command_asks_for_the_stage_resources(tmp_path, slurm_cfg):
    slurm_cfg.set("slurm", "partition", "gpu")
    slurm_cfg.set("slurm", "time", "12:00:00")
    slurm_cfg.set("slurm", "cpus_per_gpu", "8")
    slurm_cfg.set("slurm", "sbatch_args", "--account=lab --qos=high")
    stage = _expert(tmp_path, device="cuda", gpus_per_expert=2)
    cmd = sbatch_command(stage, tmp_path / "spec.json", tmp_path / "job.log")
    assert cmd[0] == "sbatch" and "--parsable" in cmd
    for arg in ("--partition=gpu", "--time=12:00:00", "--gres=gpu:2", "--cpus-per-task=16", "--account=lab",
                "--qos=high", f"--export=ALL,{IN_JOB}=1", f"--output={tmp_path / 'job.log'}"):
        assert arg in cmd, arg
    wrapped = shlex.split(cmd[-1].split("=", 1)[1])
    assert wrapped == [sys.executable, "-m", "pipeline.slurm", str(tmp_path / "spec.json")]
    cpu = _expert(tmp_path, device="cpu")
    assert job_gpus(cpu) == 0 and not any(a.startswith("--gres") for a in sbatch_command(cpu, Path("s"), Path("l")))
    assert stage.resources == {}  # Slurm, not Luigi's [resources] gpu, hands out the GPUs


def test_several_gpus_per_expert_one_node_or_several(tmp_path, slurm_cfg):
    stage = _expert(tmp_path, device="cuda", gpus_per_expert=2)
    cmd = sbatch_command(stage, tmp_path / "spec.json", tmp_path / "job.log")
    assert {"--nodes=1", "--ntasks-per-node=1", "--gres=gpu:2"} <= set(cmd)  # one node, one torchrun on it
    slurm_cfg.set("slurm", "gpus_per_node", "4")
    slurm_cfg.set("slurm", "cpus_per_gpu", "8")
    wide = _expert(tmp_path, device="cuda", gpus_per_expert=8)
    cmd = sbatch_command(wide, tmp_path / "spec.json", tmp_path / "job.log")
    assert {"--nodes=2", "--ntasks-per-node=1", "--gres=gpu:4", "--cpus-per-task=32"} <= set(cmd)
    with pytest.raises(InputError, match="--gpus-per-expert 6 does not fill whole nodes"):
        sbatch_command(_expert(tmp_path, device="cuda", gpus_per_expert=6), tmp_path / "s", tmp_path / "l")
    one = sbatch_command(_expert(tmp_path, device="cuda"), tmp_path / "s", tmp_path / "l")
    assert "--gres=gpu:1" in one and not any(a.startswith("--nodes") for a in one)
    # --device cpu: N gloo ranks, N CPUs (× [slurm] cpus)
    slurm_cfg.set("slurm", "cpus", "3")
    cpu = sbatch_command(_expert(tmp_path, device="cpu", gpus_per_expert=2), tmp_path / "s", tmp_path / "l")
    assert {"--nodes=1", "--cpus-per-task=6"} <= set(cpu) and not any(a.startswith("--gres") for a in cpu)


def test_inside_the_job_training_launches_through_srun_torchrun(tmp_path, monkeypatch):
    stage = _expert(tmp_path, device="cuda", gpus_per_expert=4)
    assert job_launch(stage) == {}  # not in a job: the host's own GPU slots
    monkeypatch.setenv(IN_JOB, "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert job_launch(stage) == {"nodes": 2, "srun": True}
    with stage.gpu_slots() as gpus:  # the job's GPUs on this node, no slot files
        assert gpus == [0, 1]
    assert not (tmp_path / "run" / ".gpu-locks").exists()
    cmd = torchrun_command(2, "job.json", nodes=2, srun=True)
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--nnodes=2" in cmd and "--rdzv_backend=c10d" in cmd and "--rdzv_id=cbtm-4242" in cmd
    assert any(a.startswith("--rdzv_endpoint=") and a.endswith(":29742") for a in cmd)
    assert cmd[-3:] == ["-m", "experts.launch", "job.json"] and "--nproc_per_node=2" in cmd
    single = torchrun_command(2, "job.json")
    assert single[0] != "srun" and "--standalone" in single and not any("rdzv" in a for a in single)
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    assert job_launch(_expert(tmp_path, device="cpu", gpus_per_expert=2)) == {"nodes": 1, "srun": True}
    assert job_launch(_expert(tmp_path, device="cpu")) == {"nodes": 1, "srun": False}


def test_which_stages_become_jobs(tmp_path, slurm_cfg, monkeypatch):
    expert = _expert(tmp_path)
    light = MergeExperts(method="average", **tiny_params(tmp_path / "corpus", tmp_path / "run"))
    assert runs_as_job(expert) and not runs_as_job(light)
    slurm_cfg.set("slurm", "stages", "all")
    assert runs_as_job(light)
    monkeypatch.setenv(IN_JOB, "1")  # inside the job the stage runs in place
    assert not runs_as_job(expert)
    slurm_cfg.set("slurm", "enabled", "false")
    monkeypatch.delenv(IN_JOB)
    assert not runs_as_job(expert) and slurm().enabled is False


def test_job_rebuilds_the_same_stage(tmp_path):
    stage = _expert(tmp_path, top_k="all", temperature=0.3)
    again = luigi.task_register.Register.get_task_cls(stage.task_family).from_str_params(stage.to_str_params())
    assert again.task_id == stage.task_id and again.out_path() == stage.out_path()


@pytest.mark.skipif(not (os.environ.get("CBTM_TEST_SLURM") and shutil.which("slurmctld") and os.geteuid() == 0),
                    reason="opt-in: CBTM_TEST_SLURM=1, slurm-wlm and munge installed, run as root")
def test_run_all_on_single_node_slurm(tmp_path):
    script = Path(__file__).resolve().parents[2] / "bench" / "slurm_e2e.sh"
    out = subprocess.run(["bash", str(script), str(tmp_path / "slurm")], capture_output=True, text=True,
                         timeout=1800, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK: every expert and every other GPU stage ran as a COMPLETED Slurm job" in out.stdout


def test_gpus_flag_and_training_only_jobs(tmp_path, slurm_cfg):
    """`gpu_flag = gpus` asks --gpus=<type>:<n> instead of --gres; `stages = training` submits only the training
    stages, so the evaluations run in the worker's own allocation (one job for all of them)."""
    from pipeline.evaluation import EvaluatePerplexity

    slurm_cfg.set("slurm", "gpu_flag", "gpus")
    slurm_cfg.set("slurm", "gres", "gpu:h100")
    stage = _expert(tmp_path, device="cuda", gpus_per_expert=2)
    cmd = sbatch_command(stage, tmp_path / "spec.json", tmp_path / "job.log")
    assert "--gpus=h100:2" in cmd and not any(a.startswith("--gres") for a in cmd)
    slurm_cfg.set("slurm", "gres", "gpu")
    assert "--gpus=2" in sbatch_command(stage, tmp_path / "spec.json", tmp_path / "job.log")
    evaluation = EvaluatePerplexity(model="dense", **tiny_params(tmp_path / "corpus", tmp_path / "run", device="cuda"))
    assert runs_as_job(evaluation)
    slurm_cfg.set("slurm", "stages", "training")
    assert runs_as_job(stage) and not runs_as_job(evaluation)


def test_hangup_cancels_the_job(monkeypatch):
    """SIGHUP (the login shell closed) ends a waiting worker like SIGTERM: its job is cancelled, not orphaned."""
    import signal

    slurm_module = sys.modules["pipeline.slurm"]  # `pipeline.slurm` the attribute is the [slurm] config class
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        if cmd[0] == "scontrol":
            os.kill(os.getpid(), signal.SIGHUP)
        return subprocess.CompletedProcess(cmd, 0, stdout="JobState=RUNNING ExitCode=0:0", stderr="")

    monkeypatch.setattr(slurm_module.subprocess, "run", fake_run)
    with pytest.raises(SystemExit):
        slurm_module._wait("123", poll_s=0.01)
    assert ["scancel", "123"] in calls
