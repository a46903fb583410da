"""The optional pre-scan (`data.scan: true`): every sample decoded, preprocessed and tokenised as the run would,
and every unusable one listed at once before the first step, instead of a stop at step 450 for row 900."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset

from .batching import SampleCollator
from .checks import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ProblemsOnly:
    """A collate function that runs the collator's checks and returns only the rejected samples' reports (all of
    them, whatever the collator's policy: the policy is applied to the whole list afterwards)."""

    collator: SampleCollator

    def __call__(self, samples: list[dict[str, Any]]) -> list[tuple[str, Any, str, str]]:
        return self.collator.triage(samples).skipped


def scan_samples(dataset: Dataset, collator: SampleCollator, batch_size: int, num_workers: int) -> list[tuple]:
    """(split, index, path, reason) of every sample the collator would reject, in the DataLoader's workers."""
    check = ProblemsOnly(collator)
    loader = DataLoader(dataset, batch_size=max(1, batch_size), num_workers=num_workers, collate_fn=check)
    return [problem for problems in loader for problem in problems]


def report_problems(split: str, problems: list[tuple], total: int, policy: str, show: int = 20) -> None:
    """All clear, a warning (policy `skip`), or a `ConfigError` listing them (policy `error`)."""
    if not problems:
        log.info("scanned %d samples of split %r: all usable", total, split)
        return
    lines = [f"  index {index} ({path or 'no path'}): {reason}" for _, index, path, reason in problems[:show]]
    if len(problems) > show:
        lines.append(f"  ... and {len(problems) - show} more")
    message = f"{len(problems)} of {total} samples of split {split!r} are unusable:\n" + "\n".join(lines)
    if policy == "error":
        raise ConfigError(f"{message}\nFix or remove them, or set data.bad_sample_policy skip to leave them out.")
    log.warning("%s\n(data.bad_sample_policy skip: they are left out)", message)
