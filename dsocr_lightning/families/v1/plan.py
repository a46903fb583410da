"""v1's part of the run plan: the backend (Unsloth or transformers, by `preimport.choose_backend`, the rule the
import order of Unsloth follows too) and the grouped-expert kernel."""

from __future__ import annotations

from typing import Any

import torch

from ...fast import FastPaths, expert_kernel
from ...training.loading import unsloth_available
from ...training.plan import RunPlan, dtype_name
from ...training.preimport import TRAINER_KEYS, choose_backend, several_devices


def decide(model: Any, trainer: Any, gpu: bool, dtype: torch.dtype) -> RunPlan:
    """The backend and expert kernel for these settings (`model`, `trainer`: the CLI's mappings) on this machine."""
    fast = model["fast"] if isinstance(model["fast"], FastPaths) else FastPaths(**model["fast"])
    parallel = several_devices(*(trainer.get(key, default) for key, default in TRAINER_KEYS))
    kernel = expert_kernel(fast, torch.device("cuda" if gpu else "cpu"), dtype)
    backend, why = choose_backend(model["backend"], model["load_in_4bit"], parallel, kernel.name, gpu,
                                  unsloth_available())  # fmt: skip
    if backend == "unsloth":  # its compiled layers are left as it built them: no fast paths
        return RunPlan("v1", backend, "loop", dtype_name(dtype),
                       f"backend {model['backend']}: {why}; experts: Unsloth's own")  # fmt: skip
    return RunPlan("v1", backend, kernel.name, dtype_name(dtype),
                   f"backend {model['backend']}: {why}; experts: {kernel.why}")  # fmt: skip
