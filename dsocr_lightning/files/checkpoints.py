"""The resume checkpoint, `last.ckpt`: written on its own schedule, whatever checkpoint is monitored.

Lightning's `save_last` follows the monitored checkpoint: with `monitor: val/cer` it writes `last.ckpt` only in a
step where a validation saved a top-k checkpoint, and it defers step-triggered saves until a validation has produced
the metric. A run killed before its first validation then has nothing to resume, and one killed later loses
everything since the last improvement. `LastCheckpoint` writes `last.ckpt` right after every N-th optimizer step and
after every validation of a fit, so `--ckpt_path last` loses at most N steps and continues exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from .checkpoint_io import read_checkpoint

log = logging.getLogger(__name__)


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` optimizer steps, after each validation of a fit, and at the end."""

    def __init__(self, every_n_train_steps: int = 10, dirpath: str | None = None) -> None:
        """
        Args:
            every_n_train_steps: optimizer steps between resume checkpoints (at most this many are lost to a kill);
                0 writes it after validations and at the end only.
            dirpath: folder of last.ckpt; default: the run's `checkpoints/` folder, beside the best checkpoint.
        """
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True,
                         every_n_train_steps=every_n_train_steps)  # fmt: skip
        self.step_seen, self.stepped, self.pending = -1, False, False

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"  # one per run; its cadence may change between a run and its resumption

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step_seen = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        """Only right after an optimizer step (never mid-accumulation); when a validation follows this batch the
        save waits for its end, so that the checkpoint holds its results (a resumed run does not validate twice)."""
        self.stepped, self.step_seen = trainer.global_step != self.step_seen, trainer.global_step
        every = self._every_n_train_steps
        if not self.stepped or not (self.pending or (every > 0 and trainer.global_step % every == 0)):
            return
        if validation_follows(trainer):
            self.pending = True  # a validation with no batches has no end: the next step then saves
        else:
            self.save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and self.stepped:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Epoch ends are no occasion of their own (runs are counted in optimizer steps)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        self.pending = False
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Ctrl-C: say what is kept and how to go on."""
        super().on_exception(trainer, pl_module, exception)
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.is_global_zero:
            log.warning(
                resume_hint(trainer.global_step, Path(self.dirpath or "") / "last.ckpt", self._every_n_train_steps)
            )


def resume_hint(step: int, last: Path, every: int) -> str:
    """What an interrupted fit keeps, and the command that continues it."""
    if not last.is_file():
        return (f"interrupted at step {step}, before the first resume checkpoint (every {every} steps): nothing to "
                "resume, run the command again")  # fmt: skip
    saved = read_checkpoint(last)["global_step"]
    return (f"interrupted at step {step}; {last} holds step {saved}: to continue, run the same command with "
            "--ckpt_path last")  # fmt: skip


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether the fit loop validates right after the current training batch (Lightning's own decision)."""
    loop = trainer.fit_loop
    return trainer.enable_validation and loop.epoch_loop._should_check_val_fx(loop._data_fetcher)


def best_checkpoint(trainer: L.Trainer) -> tuple[str, str, float] | None:
    """(path, monitored metric, score) of the monitored checkpoint callback's best checkpoint, if it saved one."""
    for callback in trainer.checkpoint_callbacks:
        path = callback.best_model_path
        if callback.monitor and path and Path(path).is_file() and callback.best_model_score is not None:
            return path, callback.monitor, float(callback.best_model_score)
    return None
