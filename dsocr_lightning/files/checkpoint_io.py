"""Checkpoints written atomically (temp file + rename) and read back with `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..training.checks import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """A crash while saving leaves the previous checkpoint intact: the new one appears whole or not at all."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        """Only tensors and plain containers: a checkpoint cannot run code when it is read."""
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """A fit checkpoint's contents with its tensors memory-mapped (cheap: only what is used is read) and nothing but
    tensors and plain values unpickled. A file that is none is a `ConfigError` naming it and the reason; never
    torch's advice to load it with `weights_only=False`, which would run whatever code it holds."""
    if not Path(path).is_file():
        raise ConfigError(f"{what} {str(path)!r}: no such file")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{what} {str(path)!r} is no checkpoint that fit wrote (not a torch.save archive: empty, "
                          "truncated or another kind of file)")  # fmt: skip
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001  (whatever torch raises, the user gets the file and the reason)
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {load_failure(error)}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{what} {str(path)!r} is no checkpoint that fit wrote (it has no state_dict)")
    return checkpoint


def load_failure(error: Exception) -> str:
    """Why torch could not read a checkpoint, in one line and without its advice to unpickle unsafely."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].split(". ")[0]
        return f"it holds Python objects besides tensors and plain values ({detail}), which are never unpickled here"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first}".rstrip(": ")
