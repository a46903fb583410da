"""The lines a report shows: each line's reference, prediction, CER and loop, gathered from every rank, and the
figures of a set of lines, computed by the same rules as the logged metrics (`metrics.py`, `line_metrics.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchmetrics.functional.text import word_error_rate

from ..training.line_metrics import Loop, is_exact, length_ratio


@dataclass
class Line:
    """One read line."""

    index: int  # position in the split or the prediction file
    path: str  # the image file ("" for an image the dataset holds in memory)
    reference: str
    prediction: str
    cer: float
    loop: Loop | None


@dataclass
class Figures:
    """The metrics of a set of lines, as validation logs them."""

    lines: int
    cer: float  # corpus CER: all edits over all reference characters
    cer_mean: float  # mean per-line CER
    cer_median: float  # lower middle per-line CER (as torch.median)
    wer: float  # corpus WER (torchmetrics)
    exact_lines: float  # share of lines read character for character
    loop_rate: float  # share of lines that loop (line_metrics.find_loop)
    loops: int
    length_ratio: float  # mean characters predicted per reference character


def figures(lines: list[Line]) -> Figures:
    """The figures of `lines` (non-empty references)."""
    cers = torch.tensor([line.cer for line in lines], dtype=torch.float64)
    lengths = torch.tensor([len(line.reference) for line in lines], dtype=torch.float64)
    loops = sum(line.loop is not None for line in lines)
    ratios = [r for r in (length_ratio(x.prediction, x.reference) for x in lines) if r is not None]
    return Figures(
        lines=len(lines),
        cer=float((cers * lengths).round().sum() / lengths.sum()),  # each line's edit count, a whole number
        cer_mean=float(cers.mean()),
        cer_median=float(cers.median()),
        wer=float(word_error_rate([x.prediction for x in lines], [x.reference for x in lines])),
        exact_lines=sum(is_exact(x.prediction, x.reference) for x in lines) / len(lines),
        loop_rate=loops / len(lines),
        loops=loops,
        length_ratio=sum(ratios) / len(ratios) if ratios else float("nan"),  # NaN as the metric, with no reference
    )


def worst_first(lines: list[Line]) -> list[Line]:
    """Highest CER first; loops before other lines of the same CER; then in split order."""
    return sorted(lines, key=lambda line: (-line.cer, line.loop is None, line.index))


def gather_lines(lines: list[Line]) -> list[Line]:
    """Every rank's lines on rank 0, in split order (each rank read its own shard); [] on the other ranks. A
    collective under DDP: every rank calls it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sorted(lines, key=lambda line: line.index)
    parts: list[list[Line]] | None = [[] for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    dist.gather_object(lines, parts, dst=0)
    return sorted((line for part in parts or [] for line in part), key=lambda line: line.index)
