"""How batches travel from the DataLoader workers to the device: in the family's compact form (`Family.compact`,
undone by `Family.expand` on the device), and a bad sample that stopped a worker's collator as its message.
"""

from __future__ import annotations

from typing import Any

from .batching import BadSampleError

BAD_SAMPLE = "bad_sample_error"  # a batch that is only the message of the bad sample that stopped the collator


class TravellingCollator:
    """A collator whose batches travel compacted (what the DataLoader workers run); picklable for them. A bad sample
    travels as its message, raised by `arrive`: a worker's exception would reach the user as a worker traceback of
    some hundred lines."""

    def __init__(self, collator: Any, family: Any) -> None:
        self.collator, self.family = collator, family

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            return self.family.compact(self.collator(samples))
        except BadSampleError as error:
            return {BAD_SAMPLE: str(error)}


def arrive(batch: dict[str, Any], family: Any) -> dict[str, Any]:
    """The collator's layout again (device side); a bad sample that stopped the worker's collator (policy `error`)
    is raised here, in the main process."""
    if BAD_SAMPLE in batch:
        raise BadSampleError(batch[BAD_SAMPLE])
    return family.expand(batch)
