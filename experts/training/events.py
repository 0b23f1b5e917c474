"""Live training metrics as TensorBoard event files, so that `tensorboard --logdir <run_dir>` shows every model
(seed, dense, each expert, the MoE finetune) while it trains.

`LiveMetrics(out_dir, resume_step, step_offset)` writes scalars to `events_dir(out_dir)` = `<out_dir>.tensorboard/` while
training (beside the `<out_dir>.ckpt/` checkpoints, and like them kept across a crash: a resumed run purges the
events past its checkpoint and goes on); `move_into(model_dir)` puts them in the finished model folder as
`<model_dir>/tensorboard/`. Scalars: `train/loss` (every step, the values of training.json's `loss_curve`),
`train/lr`, `train/tokens_per_s` (at each `log_every`), `valid/loss` (training.json's `valid_curve`).
Scalars are logged against the global step of the schedule: this run's step + `step_offset` (the
training's `schedule_start`: under `--branch-schedule continue` dense and every expert go on from the seed's last
step, so their curves continue the seed's in TensorBoard and line up with each other, instead of restarting at 1).
Without the `tensorboard` package nothing is written (said once in the log). Rank 0 only: other ranks pass
`enabled=False`.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

FLUSH_SECS = 10  # the writer's background flush period: what `tensorboard` shows lags by at most this
_missing_said = False


def events_dir(out_dir: str | os.PathLike) -> Path:
    """Where the event files of `out_dir`'s training live while it trains: `<out_dir>.tensorboard/`."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.tensorboard"


class LiveMetrics:
    """TensorBoard scalars of one training; every method is a no-op when disabled or without `tensorboard`.

    `resume_step`: the step the run resumes after (0 for a fresh start, whose stale events are removed);
    `step_offset`: added to every step (the global step of the schedule the run continues)."""

    def __init__(self, out_dir: str | os.PathLike, resume_step: int = 0, enabled: bool = True, step_offset: int = 0):
        self.dir = events_dir(out_dir)
        self.writer = None
        self.offset = int(step_offset)
        if not enabled:
            return
        try:  # optional dependency (the `tensorboard` extra); imported here so that training runs without it
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _say_missing()
            return
        if resume_step == 0:
            shutil.rmtree(self.dir, ignore_errors=True)  # a fresh start: events of an abandoned run are stale
        # purge_step: TensorBoard hides the events a killed run wrote past the checkpoint it resumes from
        self.writer = SummaryWriter(str(self.dir), purge_step=resume_step + 1 + self.offset if resume_step else None,
                                    flush_secs=FLUSH_SECS)

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, value, step + self.offset)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def move_into(self, model_dir: str | os.PathLike) -> None:
        """Close the writer and move the event files to `<model_dir>/tensorboard/`."""
        self.close()
        if self.dir.is_dir():
            shutil.move(str(self.dir), str(Path(model_dir) / "tensorboard"))


def _say_missing() -> None:
    global _missing_said
    if not _missing_said:
        log.info("tensorboard is not installed: no live training metrics (pip install tensorboard, or the "
                 "`tensorboard` extra); training.json still records the loss curves")
        _missing_said = True
