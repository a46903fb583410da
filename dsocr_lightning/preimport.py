"""Import Unsloth before anything imports transformers, when Unsloth will be the backend.

`import lightning` already imports transformers (through torchmetrics), so the choice is made from the command
line alone, before the CLI module is imported: `--model.backend` (and `--trainer.devices`, `strategy`, `num_nodes`,
`accelerator`) and the same keys of `--config` files, the last one given winning, as the CLI itself reads them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

TRAINER_KEYS = (("devices", "auto"), ("strategy", "auto"), ("num_nodes", 1), ("accelerator", "auto"))


def requested(argv: list[str], section: str, key: str, default: Any) -> Any:
    """The value the command line gives `section.key` (key may be dotted), from flags and config files, else
    `default`."""
    path, value, args = [section, *key.split(".")], default, iter(argv)
    for arg in args:
        flag, _, inline = arg.partition("=")
        if flag in ("--config", "-c"):
            file = Path(inline or next(args, ""))
            found = lookup(yaml.safe_load(file.read_text()) if file.is_file() else None, path)
            value = value if found is None else found
        elif flag == "--" + ".".join(path):
            value = inline or next(args, value)
    return value


def lookup(config: Any, path: list[str]) -> Any:
    for name in path:
        config = config.get(name) if isinstance(config, dict) else None
    return config


def device_count(devices: Any, accelerator: Any = "auto") -> int:
    """How many devices of one node a `trainer.devices` value asks for, as Lightning counts them: `auto` and -1 are
    every GPU (one process on the CPU), `2` two, `0,1` or `[0, 1]` those listed."""
    text = str(devices).strip().strip("[]").replace(" ", "")
    if text in ("auto", "-1"):
        import torch

        gpu = str(accelerator) in ("auto", "gpu", "cuda")
        return max(torch.cuda.device_count(), 1) if gpu else 1
    if "," in text:
        return len([part for part in text.split(",") if part])
    return int(text) if text.isdigit() else 1


def several_devices(devices: Any, strategy: Any, num_nodes: Any = 1, accelerator: Any = "auto") -> bool:
    """Whether a run with these trainer settings is data-parallel (more than one process, or a DDP/FSDP strategy)."""
    if any(name in str(strategy).lower() for name in ("ddp", "fsdp", "deepspeed")):  # a name or a class path
        return True
    return device_count(devices, accelerator) * int(str(num_nodes or 1)) > 1


def runs_on_several_devices(argv: list[str]) -> bool:
    return several_devices(*(requested(argv, "trainer", key, default) for key, default in TRAINER_KEYS))


def auto_picks_grouped_experts(argv: list[str]) -> bool:
    """What `loading.resolve_backend` will decide for `backend: auto` on this GPU, from the command line alone."""
    import torch

    from .fast import FastPaths, grouped_experts_apply

    enabled = str(requested(argv, "model", "fast.grouped_experts", True)).lower() != "false"
    name = str(requested(argv, "model", "dtype", "auto"))
    dtype = getattr(torch, name) if name != "auto" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else
                                                         torch.float16)  # fmt: skip
    return grouped_experts_apply(FastPaths(grouped_experts=enabled), torch.device("cuda"), dtype)


def import_unsloth_first(argv: list[str]) -> bool:
    """Import Unsloth now if the run will use it; True when it did."""
    backend = requested(argv, "model", "backend", "auto")
    if backend == "transformers" or importlib.util.find_spec("unsloth") is None:
        return False
    import torch

    if backend == "auto" and (not torch.cuda.is_available() or runs_on_several_devices(argv)):
        return False
    if backend == "auto" and auto_picks_grouped_experts(argv):
        return False  # auto picks transformers + grouped experts (loading.resolve_backend)
    import unsloth  # noqa: F401  (patches transformers and peft on import)

    return True
