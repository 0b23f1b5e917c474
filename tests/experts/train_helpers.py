"""A simulated kill for the resume tests: `train_model`'s on_step callback raises `Killed` after a given step."""
from __future__ import annotations

import numpy as np
import pytest

from experts.model import ModelPreset
from experts.training import train_model

PRESET = ModelPreset(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, seq_len=16)
VOCAB, SEQ = 64, 16


def write_shard(tmp_path) -> str:
    """A learnable token stream (repeated short patterns with noise) as one (96, SEQ) uint16 shard."""
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(8), 200)[: 96 * SEQ] + rng.integers(0, 3, 96 * SEQ)
    path = tmp_path / "cluster_000.npy"
    np.save(path, (base % VOCAB).astype(np.uint16).reshape(96, SEQ))
    return str(path)


class Killed(Exception):
    pass


def kill_at(kill_step: int):
    """on_step callback that raises `Killed` at the end of step `kill_step`."""
    def on_step(step, state):
        if step == kill_step:
            raise Killed

    return on_step


def train_killed_at(kill_step: int, model, shard_paths, out, cfg) -> None:
    """Train `model` into `out`, killed at the end of step `kill_step` (its checkpoints stay behind)."""
    with pytest.raises(Killed):
        train_model(model, shard_paths, out, cfg, on_step=kill_at(kill_step))
