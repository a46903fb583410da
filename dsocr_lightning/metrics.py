"""Character error rate: corpus CER (torchmetrics) and the mean of per-sample CER (how the Unsloth eval reports)."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.functional.text import char_error_rate
from torchmetrics.text import CharErrorRate


def sample_cer(prediction: str, reference: str) -> float:
    """CER of one pair; an empty reference scores 0 for an empty prediction, else 1."""
    if not reference:
        return float(bool(prediction))
    return float(char_error_rate([prediction], [reference]))


class CERMetrics(torch.nn.Module):
    """Both CER flavours, updated together, logged as `<prefix>/cer` and `<prefix>/cer_mean`."""

    def __init__(self) -> None:
        super().__init__()
        self.corpus = CharErrorRate()
        self.per_sample = MeanMetric()

    def update(self, predictions: list[str], references: list[str]) -> None:
        self.corpus.update(predictions, references)
        cers = torch.tensor([sample_cer(p, r) for p, r in zip(predictions, references)])
        self.per_sample.update(cers.to(self.per_sample.device))

    def metrics(self, prefix: str) -> dict[str, Metric]:
        return {f"{prefix}/cer": self.corpus, f"{prefix}/cer_mean": self.per_sample}
