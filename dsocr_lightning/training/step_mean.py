"""The optimizer step's loss and skip count, accumulated on the device without reading anything back.

torchmetrics' `MeanMetric` / `SumMetric` check every update for NaN (`.any()`) and copy a Python weight to the GPU:
three CPU-GPU syncs per update, two updates per micro-batch. A sync makes the CPU wait for the GPU's queue to drain,
so it cannot queue the next kernels meanwhile. The module tests the loss for NaN/inf itself (`nonfinite_loss`: skip
before the update, stop before the step's value is computed), so these keep no check: a weighted sum and its weight (float32: MPS has no float64), summed over
ranks by `compute`.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class StepMean(Metric):
    """Weighted mean of the values given since the last reset: sum(value * weight) / sum(weight) (NaN for none)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor | float, weight: float = 1.0) -> None:
        self.total += value * weight  # a Python weight is a kernel argument, not a copy
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


class StepSum(Metric):
    """Sum of the values given since the last reset."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor | float) -> None:
        self.total += value

    def compute(self) -> torch.Tensor:
        return self.total
