"""Import Unsloth before anything imports transformers, when Unsloth will be the backend.

`import lightning` already imports transformers (through torchmetrics), so the choice is made from the command
line alone, before the CLI module is imported: `--model.backend` and the `model.backend` of `--config` files,
the last one given winning, as the CLI itself reads them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml


def requested_backend(argv: list[str]) -> str:
    """The backend the command line asks for (`auto` when it names none)."""
    backend, args = "auto", iter(argv)
    for arg in args:
        key, _, value = arg.partition("=")
        if key in ("--config", "-c"):
            path = Path(value or next(args, ""))
            config = yaml.safe_load(path.read_text()) if path.is_file() else None
            backend = ((config or {}).get("model") or {}).get("backend", backend)
        elif key == "--model.backend":
            backend = value or next(args, backend)
    return backend


def import_unsloth_first(argv: list[str]) -> bool:
    """Import Unsloth now if the run will use it; True when it did."""
    backend = requested_backend(argv)
    if backend == "transformers" or importlib.util.find_spec("unsloth") is None:
        return False
    import torch

    if backend == "auto" and not torch.cuda.is_available():
        return False
    import unsloth  # noqa: F401  (patches transformers and peft on import)

    return True
