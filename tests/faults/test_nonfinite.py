"""NaN and inf are errors, never scores: training stops at a non-finite loss (keeping its last good checkpoint),
evaluations refuse non-finite log-probabilities, weights are checked when loaded, and a corrupt expert is named
with the command that rebuilds just it."""
from __future__ import annotations

import json
import os
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus.io import InputError
from tests.faults.conftest import CHECKPOINT_EVERY, run_args
from tests.faults.harness import copy_run, flags, leftovers, normalized_report, run_cli
from tests.pipeline.conftest import tiny_params, write_tiny_corpus
from tests.tasks.conftest import FixedModel, make_tokenizer


def _poison_at(step: int):
    """on_step callback: after optimizer step `step`, one weight becomes NaN (as a diverging update would)."""
    def on_step(done, state):
        if done == step:
            on_step.model.model.norm.weight.data[0] = float("nan")
    return on_step


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    from experts.model import ModelPreset, build_scratch_model
    from experts.training import TrainConfig, checkpoint_dir, train_model

    rng = np.random.default_rng(0)
    shard = tmp_path / "cluster_000.npy"
    np.save(shard, (rng.integers(0, 64, 64 * 16)).astype(np.uint16).reshape(64, 16))
    model = build_scratch_model(ModelPreset(32, 2, 4, 64, 16), 64)
    cfg = TrainConfig(train_tokens=10 * 4 * 16, micro_batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                      log_every=0, checkpoint_every=2, device="cpu", compile=False)
    on_step = _poison_at(5)  # the loss of step 6 is NaN; it reaches the host at the step-6 checkpoint
    on_step.model = model
    out = tmp_path / "expert"
    with pytest.raises(InputError) as err:
        train_model(model, [str(shard)], out, cfg, on_step=on_step)
    msg = str(err.value)
    assert msg == (f"training {out} stopped: loss nan at step 6 (finite up to step 5; last good checkpoint "
                   f"{checkpoint_dir(out)} kept); lower the learning rate or check the data")
    assert not out.exists()
    state = json.loads((checkpoint_dir(out) / "trainer_state.json").read_text())
    assert state["step"] == 4  # written before the NaN, never after
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint_dir(out) / "model.safetensors")).values())


def test_diverging_run_stops_in_one_line(tmp_path):
    """`--learning-rate 1e4` (the issue's probe): the seed's training stops with the step, exit code 30."""
    params = tiny_params(write_tiny_corpus(tmp_path / "corpus", n_train=10, n_eval=2), tmp_path / "run",
                         tasks="none", learning_rate=1e4)
    res = run_cli(["RunAll", "--local-scheduler", *flags(params)], tmp_path)
    assert res.code == 30, res.out[-3000:]
    [line] = res.error_lines
    assert "InputError: training " in line and "/.seed-" in line and "stopped: loss nan at step" in line
    assert "Traceback" not in res.out
    assert not list((tmp_path / "run").glob("eval-*"))  # nothing was evaluated


def test_perplexity_refuses_non_finite_log_probabilities():
    from tasks.perplexity import evaluate_perplexity

    tok = make_tokenizer(["the cat sat", "a dog ran"])
    logits = torch.zeros(len(tok))
    logits[3] = float("nan")
    with pytest.raises(InputError, match=r"model nan gave a non-finite log-probability \(nan\) to a token of "
                                         r"document 'b': its weights are corrupt or its training diverged"):
        evaluate_perplexity(FixedModel(tok, logits, name="nan"), [{"id": "b", "text": "the cat sat"}])
    minus_inf = torch.zeros(len(tok))
    minus_inf[tok.convert_tokens_to_ids("cat")] = -float("inf")  # probability 0 for a real token: not a score either
    with pytest.raises(InputError, match=r"\(-inf\)"):
        evaluate_perplexity(FixedModel(tok, minus_inf, name="inf"), [{"id": "b", "text": "the cat sat"}])


def test_fewshot_refuses_non_finite_label_scores():
    from tasks.fewshot import score_labels

    tok = make_tokenizer(["yes no maybe"])
    logits = torch.zeros(len(tok))
    logits[0] = float("nan")
    with pytest.raises(InputError, match=r"model nan gave a non-finite log-probability to a label of prompt 0"):
        score_labels(FixedModel(tok, logits, name="nan"), [[1, 4], [1, 5]], [[4], [5]])


def _garble_tensor_data(path: Path) -> None:
    """Overwrite the tensor bytes of a safetensors file with random bytes (its header stays valid)."""
    blob = path.read_bytes()
    start = 8 + struct.unpack("<Q", blob[:8])[0]
    path.write_bytes(blob[:start] + np.random.default_rng(0).bytes(len(blob) - start))


def test_corrupt_expert_is_named_with_the_command_that_rebuilds_it(reference, tmp_path):
    run_dir = copy_run(reference["run_dir"], tmp_path / "run")
    expert = next(run_dir.glob("experts-*")) / "cluster_001"
    _garble_tensor_data(expert / "model.safetensors")
    res = run_cli(run_args(reference, run_dir, force_stage="EvaluatePerplexity"), tmp_path)
    assert res.code == 30
    named = [line for line in res.error_lines if f"corrupt weights in {expert}:" in line]
    assert named and all("Traceback" not in line for line in res.out.splitlines())
    command = named[0].split("rebuild it with: ", 1)[1]
    argv = shlex.split(command)
    assert argv[:5] == ["luigi", "--module", "pipeline", "TrainExpert", "--local-scheduler"]
    assert argv[-2:] == ["--force-stage", "TrainExpert"] and "--cluster-id" in argv
    assert argv[argv.index("--cluster-id") + 1] == "1" and argv[argv.index("--run-dir") + 1] == str(run_dir)
    fixed = run_cli(argv[3:], tmp_path, checkpoint_every=CHECKPOINT_EVERY)  # the printed command, as given
    assert fixed.code == 0, fixed.out[-3000:]
    res = run_cli(run_args(reference, run_dir), tmp_path)
    assert res.code == 0, res.out[-3000:]
    assert normalized_report(run_dir) == reference["report"]  # retrained to the same weights
    assert leftovers(run_dir) == []


def test_load_refuses_garbage_weights(reference, tmp_path):
    from experts.model import load_causal_lm

    expert = copy_run(next(reference["run_dir"].glob("experts-*")) / "cluster_000", tmp_path / "expert")
    _garble_tensor_data(expert / "model.safetensors")
    with pytest.raises(InputError, match=rf"corrupt weights in {expert}: \d+ non-finite values in \d+ tensor"):
        load_causal_lm(expert)
    (expert / "model.safetensors").write_bytes(os.urandom(1000))  # the header too
    with pytest.raises(InputError, match=rf"corrupt or unreadable checkpoint in {expert}"):
        load_causal_lm(expert)


def _crash_prepare_corpus():
    from pipeline.corpus import PrepareCorpus

    def build(self, out):
        raise RuntimeError("disk controller on fire")

    PrepareCorpus.build = build


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_failure_is_one_line_unless_debugging(tmp_path, debug, monkeypatch):
    """A failure that is no InputError: one line, its traceback kept in <run_dir>/errors/; CBTM_DEBUG=1 logs it."""
    if debug:
        monkeypatch.setenv("CBTM_DEBUG", "1")
    params = tiny_params(write_tiny_corpus(tmp_path / "corpus", n_train=4, n_eval=2), tmp_path / "run", tasks="none")
    res = run_cli(["PrepareCorpus", "--local-scheduler", *flags(params)], tmp_path, setup=_crash_prepare_corpus)
    assert res.code == 30
    [saved] = (tmp_path / "run" / "errors").iterdir()
    assert "Traceback" in saved.read_text() and "disk controller on fire" in saved.read_text()
    if debug:
        assert "Traceback" in res.out
    else:
        assert "Traceback" not in res.out
        assert f"RuntimeError: disk controller on fire (traceback in {saved})" in res.out.splitlines()
