"""Known third-party noise, each silenced narrowly at its source (one logger or one message), with the reason.

What stays in a run's log is ours or actionable: Lightning's device lines and model summary, the data and model
lines of this package, the metrics, the paths written.
"""

from __future__ import annotations

import logging
import warnings


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message contains one of `needles`."""

    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(needle in record.getMessage() for needle in self.needles)


def silence_known_noise() -> None:
    # Lightning advertises its cloud logger at every Trainer start; nothing to act on.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(DropMessages("litlogger"))
    # bitsandbytes (imported by peft) looks on CPU for an optional 4-bit kernel package; 4-bit is never used on CPU.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Lightning 2.6 builds a torch `LeafSpec`, which torch 2.13 deprecates; harmless until Lightning follows.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
