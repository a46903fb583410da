"""Import Unsloth before anything imports transformers, when Unsloth will be the backend.

`import lightning` already imports transformers (through torchmetrics), so the choice is made from the command
line alone, before the CLI module is imported: `--model.backend` (and `--trainer.devices`/`--trainer.strategy`)
and the same keys of `--config` files, the last one given winning, as the CLI itself reads them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml


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


def runs_on_several_devices(argv: list[str]) -> bool:
    devices = str(requested(argv, "trainer", "devices", "auto"))
    strategy = str(requested(argv, "trainer", "strategy", "auto"))
    return "ddp" in strategy or "fsdp" in strategy or (devices.isdigit() and int(devices) > 1) or "," in devices


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
