"""Callbacks: throughput and memory per optimizer step (`perf/*`), the count of skipped bad samples, and a progress
bar that counts what is left of the run."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


class SpeedMonitor(L.Callback):
    """Seconds per optimizer step, samples/s and peak CUDA memory, logged every optimizer step.

    Not Lightning's `ThroughputMonitor`: that one times micro-batches over a rolling window and logs no memory,
    while the benchmark tables (benchmarks/summarize.py) compare seconds per optimizer step and peak memory with the
    reference's Trainer; it has no state, so resuming does not depend on it either way.
    """

    def __init__(self) -> None:
        self.start: float | None = None
        self.samples = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.start is None:
            self.sync()
            self.start = time.perf_counter()
        self.samples += len(batch["texts"]) * trainer.world_size  # every rank's (shards are padded to equal size)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.sync()
        seconds = time.perf_counter() - (self.start or time.perf_counter())
        metrics = {"perf/step_seconds": seconds, "perf/samples_per_s": self.samples / max(seconds, 1e-9)}
        if torch.cuda.is_available():
            metrics["perf/peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            metrics["perf/peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        pl_module.log_dict(metrics, on_step=True)
        self.start, self.samples = time.perf_counter(), 0

    @staticmethod
    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


log = logging.getLogger(__name__)


class BadSamples(L.Callback):
    """Counts the samples the collator skipped (policy `skip`), logs `data/skipped` and the first reasons, and
    fails the run when more than `max_fraction` of the samples seen so far were bad."""

    def __init__(self, max_fraction: float = 0.01, min_samples: int = 100, show: int = 5) -> None:
        """
        Args:
            max_fraction: largest tolerated share of bad samples before the run stops.
            min_samples: samples to see before the share is judged (a few early bad ones are not a trend).
            show: how many reasons to log in full.
        """
        self.max_fraction, self.min_samples, self.show = max_fraction, min_samples, show
        self.bad = self.seen = 0

    def count(self, batch: dict[str, Any], pl_module: L.LightningModule, judge: bool = True) -> None:
        """Counts and reports the batch's skipped samples; `judge=False` (prediction) reports every one and never
        stops the run: each also gets its JSONL line with an `error` field."""
        skipped = batch.get("skipped", [])
        self.seen += len(skipped) + len(batch.get("texts", []))
        for split, index, path, reason in skipped:
            self.bad += 1
            if self.bad <= self.show or not judge:
                log.warning("skipped bad sample %d: split %r index %s (%s): %s", self.bad, split, index, path, reason)
        if skipped and judge:
            pl_module.log("data/skipped", float(self.bad), on_step=True, reduce_fx="max")
        if judge and self.seen >= self.min_samples and self.bad > self.max_fraction * self.seen:
            raise RuntimeError(
                f"{self.bad} of {self.seen} samples were bad (> {self.max_fraction:.1%}): fix the data or raise "
                "--bad_samples.max_fraction"
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.count(batch, pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch: Any, idx: int, dataloader_idx: int = 0) -> None:
        self.count(batch, pl_module)

    def on_test_batch_start(self, trainer, pl_module, batch: Any, idx: int, dataloader_idx: int = 0) -> None:
        self.count(batch, pl_module)

    def on_predict_batch_start(self, trainer, pl_module, batch: Any, idx: int, dataloader_idx: int = 0) -> None:
        self.count(batch, pl_module, judge=False)

    def state_dict(self) -> dict[str, int]:
        return {"bad": self.bad, "seen": self.seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.bad, self.seen = state["bad"], state["seen"]


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar, counting what a run is counted in: the optimizer steps of `max_steps` (the demo reads 400/400,
    not 800/800 micro-batches), from a resumed run's step on. A run counted in epochs keeps Lightning's count."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if counts_steps(trainer):
            self.train_progress_bar.total = trainer.max_steps
            self.train_progress_bar.set_description(f"Steps (epoch {trainer.current_epoch})")
            self.show_step(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if not counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.show_step(trainer):
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        return None

    def show_step(self, trainer: L.Trainer) -> bool:
        """The bar at the optimizer step done; True when it was redrawn."""
        bar = self.train_progress_bar
        if bar is None or bar.disable or not self._should_update(trainer.global_step, bar.total):
            return False
        bar.n = trainer.global_step
        bar.refresh()
        return True


def counts_steps(trainer: L.Trainer) -> bool:
    return trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0


class UnstartedRunCleanup(L.Callback):
    """A run that fails before its first optimizer step leaves no run folder behind: the one its logger made for it
    (a new `version_N`; the CLI adds this callback only then) holds nothing but the config and an events file. A
    folder holding anything else is kept; the logger's root goes too when this run made it and it is left empty."""

    MADE_AT_START = ("config.yaml", "hparams.yaml")

    def __init__(self, new_root: Path | None = None) -> None:
        self.new_root = new_root  # the logger's root folder, when it did not exist before this run

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        logger = trainer.logger
        if trainer.global_step or not trainer.is_global_zero or logger is None or logger.log_dir is None:
            return
        folder = Path(logger.log_dir)
        names = [path.name for path in folder.iterdir()] if folder.is_dir() else None
        if names is not None and all(name in self.MADE_AT_START or name.startswith("events.out.tfevents.")
                                     for name in names):  # fmt: skip
            shutil.rmtree(folder)
            log.info("removed %s, the run folder of this failed start (it held nothing else)", folder)
        if self.new_root is not None and self.new_root.is_dir() and not any(self.new_root.iterdir()):
            self.new_root.rmdir()
