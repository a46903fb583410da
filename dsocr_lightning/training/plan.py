"""What a run is and how it runs, decided once before anything heavy loads and handed to the module and the data
module: the model version (the checkpoint's config.json), the backend (`preimport.choose_backend`, the rule the import
order of Unsloth follows too), the grouped-expert kernel and the dtype the layers compute in.

`cli.preflight` decides it (`decide`), logs it in one line and sets it on both; they follow it instead of deciding
again. A module or data module built without the CLI (tests, benchmarks) has an empty plan, and decides each part
where it is needed, by the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RunPlan:
    """Decided by the CLI before anything loads (a value given here is replaced): empty = decide where needed."""

    version: str = ""  # v1 | v2: the checkpoint's model_type
    backend: str = ""  # transformers | unsloth
    experts: str = ""  # v1's grouped-expert kernel: native | triton | loop
    compute_dtype: str = ""  # what the layers multiply in: autocast's dtype under mixed precision, else the weights'
    why: str = ""  # the reasons, as logged

    def line(self) -> str:
        experts = f", experts: {self.experts} kernel" if self.experts else ""
        return f"run plan: DeepSeek-OCR {self.version}, {self.backend}{experts}, computing in {self.compute_dtype} " \
               f"({self.why})"  # fmt: skip


def decide(version: str, model: Any, trainer: Any) -> RunPlan:
    """The plan for a checkpoint of `version` with these settings on this machine (the family decides what is its
    own); ValueError (with the fix) for an explicit choice that cannot run here: Unsloth on several devices or without
    a GPU, 4-bit weights on transformers, the Triton kernel without an NVIDIA GPU, ..."""
    from ..families import family
    from .preimport import compute_dtype

    gpu = torch.cuda.is_available() and str(trainer.get("accelerator", "auto")) != "cpu"
    dtype = compute_dtype(model["dtype"], trainer.get("precision")) if gpu else torch.float32
    return family(version).decide(model, trainer, gpu, dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
