"""Callbacks: throughput and memory per optimizer step (`perf/*`), the count of skipped bad samples, and a progress
bar that counts what is left of the run."""

from __future__ import annotations

import logging
import time
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
    """Lightning's bar, with the training total a run with `max_steps` really has left: Lightning compares the
    remaining optimizer steps with micro-batches, so under gradient accumulation an epoch read `0/20`, then `21/?`."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            return min(trainer.num_training_batches, left)
        return trainer.num_training_batches
