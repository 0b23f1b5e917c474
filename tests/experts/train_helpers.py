"""A simulated kill for the resume tests: `train_model`'s on_step callback raises `Killed` after a given step."""
from __future__ import annotations

import pytest

from experts.train import train_model


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
