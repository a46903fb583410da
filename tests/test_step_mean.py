"""The step's loss mean and skip count (training/step_mean.py) against torchmetrics' own MeanMetric / SumMetric."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric, SumMetric

from dsocr_lightning.training.step_mean import StepMean, StepSum


def test_step_mean_and_sum_are_torchmetrics_weighted_mean_and_sum():
    mean, theirs, total, their_total = StepMean(), MeanMetric(), StepSum(), SumMetric()
    for value, weight in [(2.5, 3.0), (1.0, 5.0), (4.0, 0.0), (3.25, 2.0)]:
        mean.update(torch.tensor(value), weight=weight)
        theirs.update(torch.tensor(value), weight=weight)
        total.update(value)
        their_total.update(value)
    assert mean.update_count == 4
    torch.testing.assert_close(mean.compute().float(), theirs.compute())
    torch.testing.assert_close(total.compute().float(), their_total.compute())
    mean.reset()
    assert mean.update_count == 0 and torch.isnan(mean.compute())
