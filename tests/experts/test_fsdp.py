"""FSDP2 training (`TrainConfig(sharding="fsdp")`) on 2 CPU processes (gloo) against one process.

Run as a script under torchrun, this file is the per-rank entry point of a sharded training that stops itself
after `kill_at` steps (a simulated kill), so the test can resume from the checkpoint the sharded run wrote.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus.io import InputError
from experts.model import ModelPreset, build_scratch_model
from experts.training import TrainConfig, train_model
from experts.training.checkpoint import checkpoint_dir, load_checkpoint
from tests.experts.train_helpers import Killed, kill_at, train_killed_at

PRESET = ModelPreset(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, seq_len=16)
VOCAB, SEQ = 64, 16
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(8), 102 * SEQ // 8) + rng.integers(0, 3, 102 * SEQ)
    blocks = (base % VOCAB).astype(np.uint16).reshape(102, SEQ)
    np.save(tmp_path / "cluster_000.npy", blocks[:96])
    np.save(tmp_path / "valid_cluster_000.npy", blocks[96:])  # 6 blocks: 3 per rank
    return str(tmp_path / "cluster_000.npy"), str(tmp_path / "valid_cluster_000.npy")


def _cfg(**kw):
    # 6 steps of 8 blocks; on 2 ranks 2 micro-batches of 2 each (gradient accumulation); clipping active
    base = dict(train_tokens=6 * 8 * SEQ, micro_batch_size=2, global_batch_tokens=8 * SEQ, lr=3e-3, min_lr=3e-4,
                warmup_steps=0, grad_clip=0.05, log_every=0, checkpoint_every=2, device="cpu", compile=False, seed=3,
                sharding="fsdp")
    base.update(kw)
    return TrainConfig(**base)


def _env():
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}


def test_sharding_option_is_checked(shards, tmp_path):
    with pytest.raises(InputError, match="--sharding must be ddp or fsdp"):
        _cfg(sharding="zero3")
    # a checkpoint of a one-process run (optimizer keyed by index) is refused by an FSDP resume, clearly
    cfg = _cfg(train_tokens=4 * 8 * SEQ, micro_batch_size=8, global_batch_tokens=None)
    train_killed_at(2, build_scratch_model(PRESET, VOCAB), [shards[0]], tmp_path / "one", cfg)
    model = build_scratch_model(PRESET, VOCAB)
    with pytest.raises(InputError, match="written with --sharding ddp"):
        load_checkpoint(checkpoint_dir(tmp_path / "one"), model, torch.optim.AdamW(model.parameters()), "cpu", fsdp=True)


@pytest.mark.skipif(
    not os.environ.get("CBTM_TEST_DDP"),
    reason="two torchrun launches of 2 CPU ranks (gloo) take ~30 s on 2 cores (each rank imports torch+transformers); set CBTM_TEST_DDP=1",
)
def test_fsdp_two_cpu_processes_equal_one_process_and_resume(shards, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from experts.launch import launch_training

    train, valid = shards
    init = tmp_path / "init"
    build_scratch_model(PRESET, VOCAB).save_pretrained(init)
    cfg = _cfg()
    single = train_model(str(init), [train], tmp_path / "single", cfg, valid_paths=[valid])
    assert single["world_size"] == 1  # sharding is ignored on one device

    # sharded run, killed after step 4 (checkpoints at steps 2 and 4, gathered from both ranks' shards)
    out = tmp_path / "fsdp"
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"init": str(init), "shards": [train], "valid": [valid], "out": str(out),
                               "config": cfg.to_dict(), "kill_at": 4}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(job)], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = checkpoint_dir(out)
    assert not out.exists() and json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4

    res = launch_training(str(init), [train], out, cfg, valid_paths=[valid], cpu_procs=2, timeout=180)
    assert res["world_size"] == 2 and res["plan"]["grad_accum"] == 2 and res["resumed_at"] == [4]
    assert not ckpt.exists()
    assert [s for s, _ in res["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([l for _, l in res["loss_curve"]], [l for _, l in single["loss_curve"]], rtol=1e-5)
    np.testing.assert_allclose(res["valid_loss"], single["valid_loss"], rtol=1e-5)
    a, b = load_file(str(tmp_path / "single" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()  # the tied lm_head is not saved twice
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.skipif(not os.environ.get("CBTM_TEST_DDP"), reason="a torchrun launch of 2 CPU ranks; set CBTM_TEST_DDP=1")
def test_fsdp_keeps_the_same_best_weights_as_one_process(shards, tmp_path):
    """The overfitting guard under FSDP: the best weights are gathered from the shards and saved as one process
    would save them (validation on random tokens, so an early evaluation is best)."""
    from safetensors.torch import load_file

    from experts.launch import launch_training

    train, _ = shards
    noise = tmp_path / "valid_noise.npy"
    np.save(noise, np.random.default_rng(1).integers(0, VOCAB, (6, SEQ)).astype(np.uint16))
    init = tmp_path / "init"
    build_scratch_model(PRESET, VOCAB).save_pretrained(init)
    cfg = _cfg(eval_every=1, keep_best=True, grad_clip=1.0)
    single = train_model(str(init), [train], tmp_path / "single", cfg, valid_paths=[str(noise)])
    res = launch_training(str(init), [train], tmp_path / "fsdp", cfg, valid_paths=[str(noise)], cpu_procs=2,
                          timeout=180)
    assert res["world_size"] == 2 and res["kept_step"] == single["kept_step"] < 6
    a, b = load_file(str(tmp_path / "single" / "model.safetensors")), load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _rank_main(job_path: str) -> None:
    """One torchrun rank: sharded `train_model` that raises after `kill_at` steps (the test's simulated kill)."""
    import torch.distributed as dist

    job = json.loads(Path(job_path).read_text())
    dist.init_process_group("gloo")
    try:
        train_model(job["init"], job["shards"], job["out"], TrainConfig.from_dict(job["config"]),
                    valid_paths=job["valid"], on_step=kill_at(job["kill_at"]))
    except Killed:
        pass
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1])
