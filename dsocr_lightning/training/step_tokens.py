"""HF `Trainer`'s loss normalisation for a model that takes the loss keyword arguments (transformers' DeepSeek-OCR 2):
each micro-batch's summed token loss is divided by the label tokens of its whole optimizer step (all its
micro-batches, all ranks), not by its own. This module is the counting side: the training loader reads a step's
micro-batches ahead, as `Trainer.get_batch_samples` does, and each carries `step_label_tokens`, the count of the
step's micro-batches on this rank (the module sums it over ranks, as `average_tokens_across_devices` does), and
`label_tokens`, its own (what its share of the logged loss weighs).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..data.batching import IGNORE_INDEX

STEP_TOKENS_KEY = "step_label_tokens"
TOKENS_KEY = "label_tokens"


def learned_tokens(batch: dict[str, Any]) -> int:
    """Label tokens a shifted causal-LM loss learns from: `labels[..., 1:]` (position 0 is never predicted), as
    `Trainer._get_num_items_in_batch` counts them for such a loss; 0 for a batch whose samples were all skipped."""
    labels = batch.get("labels")
    return 0 if labels is None else int(labels[..., 1:].ne(IGNORE_INDEX).sum())


def with_step_tokens(batches: Iterator[dict[str, Any]], per_step: int, done: int = 0) -> Iterator[dict[str, Any]]:
    """`batches` in groups of `per_step` micro-batches, each annotated with its own and its group's `learned_tokens`.
    Groups end where Lightning steps the optimizer: at every `per_step`-th batch of the epoch, and at its last batch;
    `done` batches of the epoch were processed before (a resumed run), so the first group ends at the next multiple."""
    size = per_step - done % per_step
    while True:
        group = [batch for _, batch in zip(range(size), batches)]
        if not group:
            return
        for batch in group:
            batch[TOKENS_KEY] = learned_tokens(batch)
        total = sum(batch[TOKENS_KEY] for batch in group)
        for batch in group:
            batch[STEP_TOKENS_KEY] = total
            yield batch
        size = per_step
