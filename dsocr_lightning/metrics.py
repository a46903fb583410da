"""Character error rate: corpus CER (torchmetrics), mean and median of per-sample CER (how the Unsloth
evaluation reports), raw and, optionally, after Persian normalisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchmetrics import CatMetric
from torchmetrics.functional.text import char_error_rate
from torchmetrics.text import CharErrorRate


def sample_cer(prediction: str, reference: str) -> float:
    """CER of one pair; an empty reference scores 0 for an empty prediction, else 1."""
    if not reference:
        return float(bool(prediction))
    return float(char_error_rate([prediction], [reference]))


class CERFlavour(torch.nn.Module):
    """Corpus CER plus the per-sample CERs (for their mean and median) of one text normalisation."""

    def __init__(self, normalize: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.normalize = normalize or (lambda text: text)
        self.corpus = CharErrorRate()
        self.per_sample = CatMetric()

    def update(self, predictions: list[str], references: list[str]) -> list[float]:
        predictions = [self.normalize(p) for p in predictions]
        references = [self.normalize(r) for r in references]
        self.corpus.update(predictions, references)
        cers = [sample_cer(p, r) for p, r in zip(predictions, references)]
        self.per_sample.update(torch.tensor(cers, device=self.per_sample.device))
        return cers

    def summary(self) -> dict[str, torch.Tensor]:
        """corpus, mean and median CER over everything seen since the last reset (all ranks)."""
        values = self.per_sample.compute().flatten()
        return {"cer": self.corpus.compute(), "cer_mean": values.mean(), "cer_median": values.median()}

    def reset(self) -> None:
        self.corpus.reset()
        self.per_sample.reset()


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

    def compute(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}/{k}": v for k, v in self.raw.summary().items()}
        if self.norm is not None:
            out |= {f"{prefix}/{k.replace('cer', 'cer_norm')}": v for k, v in self.norm.summary().items()}
        return out

    def reset(self) -> None:
        self.raw.reset()
        if self.norm is not None:
            self.norm.reset()
