"""Several experts per GPU: GPU slots shared by weight, and experts trained at once in separate processes (as Luigi
workers with --experts-per-gpu run them) equal experts trained alone, also after a real kill and resume."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from experts.launch import gpu_slots
from experts.model import ModelPreset, build_scratch_model
from experts.training import TrainConfig, checkpoint_dir, train_model

ROOT = Path(__file__).resolve().parents[2]
PRESET = ModelPreset(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, seq_len=16)
VOCAB, SEQ = 64, 16


def test_shared_slots_go_to_the_gpu_with_the_least_weight(tmp_path):
    held, got = [], []
    for w in (5.0, 3.0, 1.0, 1.0, 1.0):  # 2 GPUs × 3 slots
        slot = gpu_slots(1, tmp_path, slots_per_gpu=3, shared=True, weight=w, gpus=[0, 1])
        got += slot.__enter__()
        held.append(slot)
    assert got == [0, 1, 1, 1, 0]  # loads 5 | 3 → 5 | 4 → 5 | 5, GPU 1 full (3 slots) → GPU 0
    for slot in held:
        slot.__exit__(None, None, None)
    with gpu_slots(1, tmp_path, slots_per_gpu=3, shared=True, weight=1.0, gpus=[0, 1]) as gpus:
        assert gpus == [0]  # all released: tie → lower index
    with gpu_slots(0, tmp_path, slots_per_gpu=3, shared=True, gpus=[0, 1]) as gpus:
        assert gpus == []


def test_a_whole_gpu_waits_for_its_shared_slots(tmp_path):
    entered = threading.Event()

    def whole():
        with gpu_slots(1, tmp_path, slots_per_gpu=2, gpus=[0]):
            entered.set()

    with gpu_slots(1, tmp_path, slots_per_gpu=2, shared=True, gpus=[0]) as gpus:
        assert gpus == [0]
        t = threading.Thread(target=whole)
        t.start()
        time.sleep(0.5)
        assert not entered.is_set()  # one of the two slots is held: the GPU is not whole
    t.join(timeout=10)
    assert entered.is_set()


_CHILD = """
import json, os, signal, sys
from experts.launch import gpu_slots, launch_training
from experts.training import TrainConfig
job = json.loads(sys.argv[1])
def on_step(step, state):
    if step == job["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)  # a real kill: nothing after this step is written
with gpu_slots(1, job["locks"], slots_per_gpu=2, shared=True, weight=job["weight"]) as gpus:
    launch_training(job["init"], [job["shard"]], job["out"], TrainConfig(**job["config"]), gpus=gpus or None,
                    on_step=on_step)
"""


def _together(jobs: list[dict], kill_at: int) -> list[int]:
    """Start one process per job at once (as Luigi workers do) and wait for all; returns their exit codes."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps({**job, "kill_at": kill_at})], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for job in jobs]
    codes = []
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode in (0, -9), err[-3000:]
        codes.append(p.returncode)
    return codes


@pytest.mark.skipif(
    not os.environ.get("CBTM_TEST_DDP"),
    reason="four CPU processes (two at a time, each imports torch+transformers) take ~20 s on 2 free cores; "
           "set CBTM_TEST_DDP=1",
)
def test_experts_trained_together_equal_experts_trained_alone_and_resume_after_a_kill(tmp_path):
    init = tmp_path / "seed"
    build_scratch_model(PRESET, VOCAB).save_pretrained(init)
    rng = np.random.default_rng(0)
    jobs = []
    for c, blocks in enumerate((3, 5)):  # unequal batches, as compute matching gives clusters of unequal size
        shard = tmp_path / f"cluster_{c:03d}.npy"
        base = np.tile(np.arange(8) * (c + 1), 100)[: 40 * SEQ] + rng.integers(0, 3, 40 * SEQ)
        np.save(shard, (base % VOCAB).astype(np.uint16).reshape(40, SEQ))
        config = dict(train_tokens=8 * blocks * SEQ, global_batch_tokens=blocks * SEQ, micro_batch_size=2, lr=3e-3,
                      min_lr=3e-4, warmup_steps=2, log_every=3, checkpoint_every=2, device="cpu", compile=False,
                      seed=3 + c, experts_per_gpu=2)
        jobs.append({"init": str(init), "shard": str(shard), "out": str(tmp_path / "joint" / f"cluster_{c:03d}"),
                     "config": config, "weight": float(blocks), "locks": str(tmp_path / "locks")})
    alone = [train_model(str(init), [j["shard"]], tmp_path / "alone" / Path(j["out"]).name, TrainConfig(**j["config"]))
             for j in jobs]

    assert _together(jobs, kill_at=5) == [-9, -9]  # both killed after step 5: checkpoints of step 4 stay
    for j in jobs:
        assert not Path(j["out"]).exists() and (checkpoint_dir(j["out"]) / "trainer_state.json").is_file()
    assert _together(jobs, kill_at=-1) == [0, 0]  # the same command again resumes both

    from safetensors.torch import load_file

    for j, ref in zip(jobs, alone):
        out = Path(j["out"])
        res = json.loads((out / "training.json").read_text())
        assert res["resumed_at"] == [4] and res["plan"]["micro_batches"] == ref["plan"]["micro_batches"]
        assert res["loss_curve"] == ref["loss_curve"]  # exact, all 8 steps
        a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "alone" / out.name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpu_indices_go_through_the_visible_devices_and_srun_launches_torchrun(tmp_path, monkeypatch):
    """In a Slurm job that sees GPUs 4,5,6, GPUs [1, 2] of the job are physical 5,6 for the torchrun it starts."""
    import experts.launch as launch

    seen = {}

    def fake_run(cmd, env, **kw):  # records what would be started; a one-line failure as a rank would print
        seen.update(cmd=cmd, cvd=env["CUDA_VISIBLE_DEVICES"])
        return subprocess.CompletedProcess(cmd, 1, "", "InputError: stop here\n")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    config = TrainConfig(train_tokens=64, device="cuda")
    with pytest.raises(launch.InputError, match="stop here"):
        launch.launch_training("init", ["a.npy"], tmp_path / "out", config, gpus=[1, 2], srun=True)
    assert seen["cvd"] == "5,6" and seen["cmd"][0] == "srun" and "--nproc_per_node=2" in seen["cmd"]
    assert not (tmp_path / "out.launch.json").exists()  # the job file is removed whatever happened
