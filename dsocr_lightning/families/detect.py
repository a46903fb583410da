"""Which model family a checkpoint is, read from its config.json before any weight loads, and whether this
environment can run it. Families need different transformers (v1: 4.56.2 for the remote code; v2: >= 5.10 for
transformers' own `deepseek_ocr2`), so they live in separate environments.

The version is never a setting: it comes from the checkpoint (each family claims its `model_type` / `architectures`),
and an adapter's from its `adapter_config.json` where a family recognises it, else from its base's config.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from . import VERSIONS, family


def read_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's config.json: from the folder, or this one file from the hub (never weights)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise ValueError(f"{name_or_path!r} is not a model checkpoint: it has no config.json")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name_or_path, "config.json", revision=revision))
        except Exception as error:  # offline, unknown id, gated: one plain message
            raise OSError(
                f"could not read config.json of {name_or_path!r} ({type(error).__name__}: {error}). Offline? "
                "Download the checkpoint where there is a network (huggingface_hub.snapshot_download) and pass the "
                "folder."
            ) from error
    return json.loads(path.read_text())


def version_of_config(config: dict[str, Any], where: str) -> str:
    """The family that claims a config.json; anything else is refused with the reason."""
    for version in VERSIONS:
        if family(version).claims(config, where):
            return version
    model_type, architectures = config.get("model_type"), sorted(config.get("architectures") or [])
    expected = ", or ".join(f"{family(v).checkpoints} ({v})" for v in reversed(VERSIONS))
    raise ValueError(f"{where} is not a DeepSeek-OCR checkpoint (model_type {model_type!r}, architectures "
                     f"{architectures}): expected {expected}")  # fmt: skip


def detect_version(name_or_path: str, revision: str | None = None) -> str:
    return version_of_config(read_config(name_or_path, revision), repr(name_or_path))


def environment_version() -> str | None:
    """Which family this environment runs, from the installed transformers (not imported): None if none."""
    try:
        installed = tuple(int(part) for part in importlib.metadata.version("transformers").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    return next((version for version in VERSIONS if family(version).runs_here(installed)), None)


def standin_version() -> str:
    """The family whose stand-in a run writes here: this environment's (v1 where none runs)."""
    return environment_version() or "v1"


def require_environment(version: str, where: str) -> None:
    """Fail now, before any weight loads, when this environment cannot run a `version` checkpoint."""
    if environment_version() == version:
        return
    try:
        installed = f"transformers {importlib.metadata.version('transformers')}"
    except importlib.metadata.PackageNotFoundError:
        installed = "no transformers"
    raise RuntimeError(
        f"{where} is a DeepSeek-OCR {version} checkpoint but this environment has {installed}. "
        f"Install `.[{version}]` in its own environment: {family(version).install}. Model versions need different "
        "transformers and cannot share one environment."
    )


def adapter_version(adapter_path: str, revision: str | None = None) -> str:
    """A saved adapter's family: the one that recognises its adapter_config.json, else its base's (v1 when the base
    cannot be read: v1 adapters name Linears only)."""
    path = Path(adapter_path) / "adapter_config.json"
    if not path.is_file():
        missing = "not found" if not Path(adapter_path).exists() else "has no adapter_config.json"
        raise FileNotFoundError(f"adapter {adapter_path!r} {missing}: expected a PEFT adapter folder (lora_model)")
    saved = json.loads(path.read_text())
    owner = next((version for version in VERSIONS if family(version).owns_adapter(saved)), None)
    if owner:
        return owner
    base = saved.get("base_model_name_or_path")
    try:
        return detect_version(base, revision) if base else "v1"
    except (OSError, ValueError):
        return "v1"


def checkpoint_version(name_or_path: str, revision: str | None = None, adapter_path: str | None = None) -> str:
    """The checkpoint's version, checked against this environment and against the adapter's, before weights load."""
    version = detect_version(name_or_path, revision)
    require_environment(version, repr(name_or_path))
    if adapter_path and (adapter := adapter_version(adapter_path)) != version:
        raise ValueError(
            f"adapter {adapter_path!r} was trained on a DeepSeek-OCR {adapter} base but {name_or_path!r} is "
            f"{version}: an adapter only fits the model version it was trained on"
        )
    return version
