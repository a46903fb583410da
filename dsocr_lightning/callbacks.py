"""Throughput and memory per optimizer step, logged as `perf/*` (what the benchmarks read)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class SpeedMonitor(L.Callback):
    """Seconds per optimizer step, samples/s and peak CUDA memory, logged every optimizer step."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.samples = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.start is None:
            self.sync()
            self.start = time.perf_counter()
        self.samples += len(batch["texts"])

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
