"""Line metrics beside CER: word error rate, exact lines, loop rate and the mean length ratio.

Each is a torchmetrics `Metric` that every rank fills with its own lines and whose `compute` gathers all ranks (as the
CER ones in `metrics.py`): under DDP each figure covers the whole split, each line once. The per-line rules
(`is_exact`, `find_loop`, `length_ratio`) are the ones the error report uses, so its figures are the logged ones.

Loop rate: the share of outputs that loop, by `find_loop`'s rule (README, "Loop rate").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.text import WordErrorRate

from .checks import ConfigError


@dataclass
class LoopSettings:
    """When a repeated span at the end of an output counts as a loop (README, "Loop rate")."""

    min_repeats: int = 3  # copies of the span the output has beyond those the reference ends in
    min_chars: int = 10  # characters those extra copies span, at least

    def __post_init__(self) -> None:
        if self.min_repeats < 1 or self.min_chars < 1:
            raise ConfigError(f"loop.min_repeats ({self.min_repeats}) and loop.min_chars ({self.min_chars}) count "
                              "copies and characters: give each 1 or more (defaults 3 and 10)")  # fmt: skip


@dataclass(frozen=True)
class Loop:
    """Why one output counts as a loop: it ran to `max_new_tokens`, or it ends in `copies` copies of `unit`."""

    reached_cap: bool
    unit: str = ""
    copies: int = 0

    def describe(self) -> str:
        if self.reached_cap:
            return "reached max_new_tokens without the end token"
        return f"ends in {self.copies} copies of {self.unit!r}"


def trailing_copies(text: str, unit: str) -> int:
    """How many back-to-back copies of `unit` `text` ends in."""
    copies, end = 0, len(text)
    while end >= len(unit) and text.startswith(unit, end - len(unit)):
        copies, end = copies + 1, end - len(unit)
    return copies


def repeated_tail(prediction: str, reference: str | None, settings: LoopSettings) -> Loop | None:
    """The shortest span the prediction ends in at least `min_repeats` more copies of than the reference does,
    those extra copies spanning at least `min_chars` characters; None when there is none."""
    for size in range(1, len(prediction) // settings.min_repeats + 1):
        unit = prediction[-size:]
        copies = trailing_copies(prediction, unit)
        extra = copies - (trailing_copies(reference, unit) if reference else 0)
        if extra >= settings.min_repeats and extra * size >= settings.min_chars:
            return Loop(False, unit, copies)
    return None


def find_loop(prediction: str, reference: str | None, ended: bool, settings: LoopSettings) -> Loop | None:
    """Whether one output loops: decoding reached `max_new_tokens` without the end token (`ended` False), or the
    text ends in a repeated span (`repeated_tail`)."""
    if not ended:
        return Loop(True)
    return repeated_tail(prediction, reference, settings)


def is_exact(prediction: str, reference: str) -> bool:
    """The line is read character for character (its CER is 0)."""
    return prediction == reference


def length_ratio(prediction: str, reference: str) -> float | None:
    """Characters of the prediction per character of the reference; None for an empty reference."""
    return len(prediction) / len(reference) if reference else None


def mean_metric() -> MeanMetric:
    return MeanMetric().set_dtype(torch.float64)


class LineMetrics(torch.nn.Module):
    """WER (torchmetrics'), exact line accuracy, loop rate and mean length ratio, logged as `<prefix>/wer`,
    `/exact_lines`, `/loop_rate`, `/length_ratio`."""

    def __init__(self, loop: LoopSettings | None = None) -> None:
        super().__init__()
        self.loop = loop or LoopSettings()
        self.wer = WordErrorRate()
        self.exact = mean_metric()
        self.loops = mean_metric()
        self.length = mean_metric()

    def update(self, predictions: list[str], references: list[str], ended: list[bool]) -> list[Loop | None]:
        """Each line's loop (None: no loop) of this batch."""
        loops = [find_loop(p, r, e, self.loop) for p, r, e in zip(predictions, references, ended)]
        self.wer.update(predictions, references)
        self.exact.update(self.values([is_exact(p, r) for p, r in zip(predictions, references)]))
        self.loops.update(self.values([loop is not None for loop in loops]))
        ratios = [length_ratio(p, r) for p, r in zip(predictions, references)]
        self.length.update(self.values([x or 0.0 for x in ratios]), self.values([x is not None for x in ratios]))
        return loops

    def values(self, items: list) -> torch.Tensor:
        return torch.tensor([float(x) for x in items], dtype=torch.float64, device=self.exact.device)

    def metrics(self, prefix: str) -> dict[str, Metric]:
        """Name -> metric, to log as they are (Lightning computes them at the epoch's end, then resets them)."""
        names = {"wer": self.wer, "exact_lines": self.exact, "loop_rate": self.loops, "length_ratio": self.length}
        return {f"{prefix}/{name}": metric for name, metric in names.items()}
