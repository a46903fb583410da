"""Plain-spoken checks that fail early, before hours of GPU time, with the remedy in the message."""

from __future__ import annotations

import json
from pathlib import Path

import torch

KNOWN_MODEL_TYPES = {"deepseek_vl_v2", "DeepseekOCR", "dsocr_standin"}


def looks_like_path(name: str) -> bool:
    """A hub id is `owner/name`; anything with a leading `.`, `/`, `~` or more slashes is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def check_model_source(name: str) -> None:
    """A local model folder must exist and hold a DeepSeek-OCR checkpoint: config, remote code, safetensors."""
    if not looks_like_path(name):
        return  # a hub id: the hub answers for it
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {name!r} does not exist (snapshot_download it, or give a hub id)")
    config_path = folder / "config.json"
    if not config_path.exists():
        raise ValueError(f"{name!r} is not a model checkpoint: it has no config.json")
    config = json.loads(config_path.read_text())
    module = config.get("auto_map", {}).get("AutoModel", "").split(".")[0]
    if config.get("model_type") not in KNOWN_MODEL_TYPES or not (folder / f"{module}.py").exists():
        raise ValueError(
            f"{name!r} is not a DeepSeek-OCR checkpoint (model_type {config.get('model_type')!r}, "
            f"remote code {module or 'missing'}): expected unsloth/DeepSeek-OCR or deepseek-ai/DeepSeek-OCR files"
        )
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{name!r} has no .safetensors weights; weights are only loaded from safetensors")


def check_precision(precision: str | None) -> None:
    """bf16 asked for on a GPU without it (the T4) fails late and obscurely: say so now."""
    if precision and "bf16" in str(precision) and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise ValueError(f"{name} has no bf16: use --trainer.precision 16-mixed (configs/t4.yaml does)")


def out_of_memory_message(error: BaseException, batch_size: int, mode: str) -> str:
    return (
        f"CUDA out of memory ({error}). Remedies: a smaller micro-batch (--data.batch_size, currently "
        f"{batch_size}) with more --trainer.accumulate_grad_batches; --model.gradient_checkpointing true; "
        f"a smaller --data.mode than {mode!r} (tiny/small/base) or --data.crop_mode false; "
        f"--model.load_in_4bit true on the Unsloth backend."
    )
