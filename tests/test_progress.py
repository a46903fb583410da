"""The progress bar's training total: what is left of a `max_steps` run, in micro-batches."""

from types import SimpleNamespace

import pytest

from dsocr_lightning.callbacks import StepProgressBar


@pytest.mark.parametrize(("global_step", "total"), [(0, 40), (20, 40), (30, 20)])
def test_total_counts_micro_batches_left(global_step, total):
    """The demo: 40 steps of 2 micro-batches, 40 micro-batches an epoch (Lightning's own bar read 20 at step 20)."""
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=40, global_step=global_step, accumulate_grad_batches=2,
                                   num_training_batches=40)  # fmt: skip
    assert bar.total_train_batches == total
