"""Character error rate: corpus CER (torchmetrics), mean and median of per-sample CER (how the Unsloth
evaluation reports), raw and, optionally, after Persian normalisation.

Each figure is a torchmetrics `Metric` whose state every rank fills with its own lines and whose `compute` gathers all
ranks' states: under DDP the CER covers the whole split, each line once, the same figure as on one device (the
per-sample CERs are summed in float64, so the order the ranks add in does not show). The module logs the `Metric`
objects themselves, so Lightning neither warns about `sync_dist` nor reduces values that are already global.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchmetrics import CatMetric, MeanMetric, Metric
from torchmetrics.functional.text import char_error_rate
from torchmetrics.text import CharErrorRate


def sample_cer(prediction: str, reference: str) -> float:
    """CER of one pair; an empty reference scores 0 for an empty prediction, else 1."""
    if not reference:
        return float(bool(prediction))
    return float(char_error_rate([prediction], [reference]))


class MedianMetric(CatMetric):
    """The median of every value seen (all ranks); the lower middle value of an even count, as `torch.median`."""

    def compute(self) -> torch.Tensor:
        return super().compute().flatten().median()


class CERFlavour(torch.nn.Module):
    """Corpus CER plus the mean and median per-sample CER of one text normalisation."""

    def __init__(self, normalize: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.normalize = normalize or (lambda text: text)
        self.corpus = CharErrorRate()
        self.mean = MeanMetric().set_dtype(torch.float64)
        self.median = MedianMetric()

    def update(self, predictions: list[str], references: list[str]) -> list[float]:
        predictions = [self.normalize(p) for p in predictions]
        references = [self.normalize(r) for r in references]
        self.corpus.update(predictions, references)
        cers = [sample_cer(p, r) for p, r in zip(predictions, references)]
        values = torch.tensor(cers, dtype=torch.float64, device=self.mean.device)
        self.mean.update(values)
        self.median.update(values)
        return cers

    def metrics(self) -> dict[str, Metric]:
        """corpus, mean and median CER, as metrics that compute over everything seen since the last reset."""
        return {"cer": self.corpus, "cer_mean": self.mean, "cer_median": self.median}


class CERMetrics(torch.nn.Module):
    """Raw CER, and Persian-normalised CER when asked: logged as `<prefix>/cer`, `/cer_mean`, `/cer_median` and
    `<prefix>/cer_norm`, `/cer_norm_mean`, `/cer_norm_median`."""

    def __init__(self, normalize: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.raw = CERFlavour()
        self.norm = CERFlavour(normalize) if normalize is not None else None

    def update(self, predictions: list[str], references: list[str]) -> list[float]:
        """Per-sample raw CERs of this batch (for display)."""
        if self.norm is not None:
            self.norm.update(predictions, references)
        return self.raw.update(predictions, references)

    def metrics(self, prefix: str) -> dict[str, Metric]:
        """Name -> metric, to log as they are (Lightning computes them at the epoch's end, then resets them)."""
        out = {f"{prefix}/{k}": v for k, v in self.raw.metrics().items()}
        if self.norm is not None:
            out |= {f"{prefix}/{k.replace('cer', 'cer_norm')}": v for k, v in self.norm.metrics().items()}
        return out

    def compute(self, prefix: str) -> dict[str, torch.Tensor]:
        """Name -> value over everything seen since the last reset (all ranks)."""
        return {name: metric.compute() for name, metric in self.metrics(prefix).items()}
