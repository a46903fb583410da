"""The model families: one folder per DeepSeek-OCR version, each supplying what differs (`base.Family`).

Adding a model version (say v3):
1. `families/v3/`: a `Family` subclass in its `__init__.py` (`FAMILY = V3()`), which claims the version's checkpoints
   (config.json), names the transformers it runs on, loads model + LoRA and its text side, builds its collator (the
   per-sample preparation on top of `data.batching.SampleCollator`), merges adapters for export and writes a tiny
   stand-in; fast-path patches where it has them.
2. Its name at the front of `VERSIONS` below.
3. An extra in pyproject.toml for its environment (and its pytest marker), tests under `tests/v3/` on its stand-in.
No shared module changes: shared code asks `family(version)`, which loads a family by name.
"""

from __future__ import annotations

import importlib
from functools import cache

from .base import Family, LoadedModel

VERSIONS = ("v2", "v1")  # newest first: detection asks them in this order (a newer one knows older forms of itself)

__all__ = ["VERSIONS", "Family", "LoadedModel", "family"]


@cache
def family(version: str) -> Family:
    """The family of `version` (its package imported on first use: nothing heavy)."""
    if version not in VERSIONS:
        raise ValueError(f"no model family {version!r}: known {', '.join(VERSIONS)}")
    return importlib.import_module(f"{__name__}.{version}").FAMILY
