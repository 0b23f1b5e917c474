"""Live training metrics: the TensorBoard event files a tiny CPU training writes hold training.json's curves."""
import sys

import numpy as np
import pytest

from experts.model import build_scratch_model
from experts.training import TrainConfig, checkpoint_dir, train_model
from experts.training.events import events_dir
from tests.experts.train_helpers import PRESET, SEQ, VOCAB, Killed, kill_at, write_shard


@pytest.fixture
def shards(tmp_path):
    valid = tmp_path / "valid_cluster_000.npy"
    np.save(valid, np.random.default_rng(1).integers(0, VOCAB, (8, SEQ)).astype(np.uint16))
    return [write_shard(tmp_path)], [str(valid)]


def _cfg(**kw):
    return TrainConfig(**{**dict(train_tokens=8 * 4 * SEQ, micro_batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                                 log_every=2, eval_every=4, checkpoint_every=0, device="cpu", compile=False, seed=3),
                          **kw})


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _close(events, curve):
    """Event values are float32: equal to training.json's floats at float32 precision, at the same steps."""
    assert [s for s, _ in events] == [s for s, _ in curve]
    np.testing.assert_allclose([v for _, v in events], [v for _, v in curve], rtol=1e-6)


def test_event_files_hold_the_training_curves(shards, tmp_path):
    pytest.importorskip("tensorboard")
    train, valid = shards
    out = tmp_path / "expert"
    res = train_model(build_scratch_model(PRESET, VOCAB, seed=0), train, out, _cfg(), valid_paths=valid)
    assert not events_dir(out).exists() and list((out / "tensorboard").glob("events.out.tfevents.*"))
    scalars = _scalars(out / "tensorboard")
    _close(scalars["train/loss"], res["loss_curve"])
    _close(scalars["valid/loss"], res["valid_curve"])
    assert [s for s, _ in scalars["train/lr"]] == list(range(1, res["steps"] + 1))
    assert scalars["train/tokens_per_s"] and all(v > 0 for _, v in scalars["train/tokens_per_s"])


def test_resumed_training_purges_the_events_past_its_checkpoint(shards, tmp_path):
    pytest.importorskip("tensorboard")
    train, valid = shards
    out, cfg = tmp_path / "resumed", _cfg(checkpoint_every=2, log_every=1)
    with pytest.raises(Killed):
        train_model(build_scratch_model(PRESET, VOCAB, seed=0), train, out, cfg, valid_paths=valid,
                    on_step=kill_at(5))
    assert (checkpoint_dir(out) / "trainer_state.json").is_file()
    assert [s for s, _ in _scalars(events_dir(out))["train/loss"]][:4] == [1, 2, 3, 4]  # written while training
    res = train_model(build_scratch_model(PRESET, VOCAB, seed=99), train, out, cfg, valid_paths=valid)
    assert res["resumed_at"] == [4]
    _close(_scalars(out / "tensorboard")["train/loss"], res["loss_curve"])  # steps 1..8 once each


def test_training_without_tensorboard_writes_no_events(shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    train, valid = shards
    out = tmp_path / "plain"
    res = train_model(build_scratch_model(PRESET, VOCAB, seed=0), train, out, _cfg(), valid_paths=valid)
    assert res["steps"] == 8 and not (out / "tensorboard").exists() and not events_dir(out).exists()


def test_a_branch_logs_against_the_global_step_of_its_schedule(shards, tmp_path):
    """A branch that continues the seed's schedule (schedule_start = the seed's steps) logs at the global step, so
    dense and the experts continue the seed's curve in TensorBoard instead of restarting at step 1."""
    pytest.importorskip("tensorboard")
    train, valid = shards
    out = tmp_path / "branch"
    res = train_model(build_scratch_model(PRESET, VOCAB, seed=0), train, out,
                      _cfg(schedule_start=20, schedule_steps=40), valid_paths=valid)
    scalars = _scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [20 + s for s, _ in res["loss_curve"]]
    assert [s for s, _ in scalars["valid/loss"]] == [20 + s for s, _ in res["valid_curve"]]
