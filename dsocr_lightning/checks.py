"""Plain-spoken checks that fail early, before hours of GPU time, with the remedy in the message.

`ConfigError` is what a wrong setting or path raises; `python -m dsocr_lightning` prints its message alone (a few
lines naming the fix) instead of a traceback. The CLI runs these checks before anything loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

DOWNLOAD_HINT = (
    "python -c 'from huggingface_hub import snapshot_download; "
    'snapshot_download("unsloth/DeepSeek-OCR", local_dir="{folder}")\''
)


class ConfigError(ValueError):
    """A setting or path that cannot work; the message says what to change."""


def looks_like_path(name: str) -> bool:
    """A hub id is `owner/name`; anything else (`deepseek_ocr`, `./x`, `/a/b`, `~/x`, `a/b/c`) is a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}


def check_model_source(name: str, revision: str | None = None) -> None:
    """A local model folder must exist and hold a DeepSeek-OCR checkpoint: config, remote code, safetensors,
    tokenizer. A hub id must be in the local cache when the hub is switched off."""
    if not looks_like_path(name):
        return check_hub_model(name, revision)
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"model folder {name!r} not found (looked for {folder.resolve()}). Download it first:\n  "
            + DOWNLOAD_HINT.format(folder=name)
            + "\nor give a hub id such as unsloth/DeepSeek-OCR."
        )
    if not (folder / "config.json").exists():
        raise ConfigError(f"{name!r} has no config.json, so it is no model checkpoint (an unfinished download? "
                          "run snapshot_download again)")  # fmt: skip
    check_model_files(name, folder)


def check_model_files(name: str, folder: Path) -> None:
    from .versions import version_of_config

    config = json.loads((folder / "config.json").read_text())
    try:
        version = version_of_config(config, repr(name))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    module = config.get("auto_map", {}).get("AutoModel", "").split(".")[0]
    if version == "v1" and not (folder / f"{module}.py").exists():  # v2 is transformers' own code
        raise ConfigError(f"{name!r} lacks its model code ({module or 'no auto_map'}.py): expected the "
                          "unsloth/DeepSeek-OCR or deepseek-ai/DeepSeek-OCR files")  # fmt: skip
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{name!r} has no .safetensors weights; weights are only loaded from safetensors")
    if not (folder / "tokenizer_config.json").exists():
        raise ConfigError(f"{name!r} has no tokenizer (tokenizer_config.json): download the whole checkpoint")


def check_hub_model(name: str, revision: str | None) -> None:
    if not hub_offline():
        return  # the hub answers for it
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        raise ConfigError(
            f"{name!r} is not in the local Hugging Face cache and the hub is switched off (HF_HUB_OFFLINE=1): "
            "download it where there is a network (snapshot_download) and pass the folder"
        )


def check_trust(trust_remote_code: bool, name: str) -> None:
    if not trust_remote_code:
        raise ConfigError(
            "DeepSeek-OCR ships its model code inside the checkpoint: set trust_remote_code: true to run that "
            f"code from {name!r} (read it first if you do not trust the source)"
        )


def check_adapter(path: str, r: int, target_modules: list[str]) -> None:
    """A saved PEFT adapter folder whose rank and targets are the configured ones."""
    config_path = Path(path) / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"adapter {path!r} not found: expected a folder with adapter_config.json (lora_model)")
    saved = json.loads(config_path.read_text())
    if saved.get("r") != r or set(saved.get("target_modules") or []) != set(target_modules):
        raise ConfigError(
            f"adapter {path} has r={saved.get('r')} on {sorted(saved.get('target_modules') or [])}; the model is "
            f"set up with r={r} on {sorted(target_modules)}: set model.lora to match"
        )


def check_ckpt_path(ckpt_path: str | None) -> None:
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).is_file():
        raise ConfigError(f"--ckpt_path {ckpt_path}: no such checkpoint file ('last' resumes the newest run)")


def check_checkpointing(best: Any) -> None:
    """`last.ckpt` belongs to the resume checkpoint (`last_checkpoint`); the monitored one keeps the best only."""
    if best["save_last"]:
        raise ConfigError("checkpoint.save_last: last.ckpt is written by last_checkpoint (every N steps and after "
                          "each validation); leave checkpoint.save_last false")  # fmt: skip
    monitor, filename = best["monitor"], best["filename"] or ""
    if monitor and best["every_n_train_steps"]:
        raise ConfigError(f"checkpoint.every_n_train_steps: the best checkpoint is judged at validations (by {monitor})"
                          "; for a resume checkpoint every N steps use --last_checkpoint.every_n_train_steps N")  # fmt: skip
    if monitor is None and "{val/" in filename:
        raise ConfigError(f"checkpoint.filename {filename!r} names a metric but checkpoint.monitor is null: a "
                          "checkpoint saved before validation would be named 0.0000; set checkpoint.save_top_k 0 "
                          "for no best checkpoint")  # fmt: skip


def check_backend(model: Any, trainer: Any) -> None:
    """The grouped-expert kernel and the backend, decided by the rules loading applies (fast.expert_kernel,
    preimport.choose_backend) for this machine: an explicit choice that cannot run here (Unsloth on several devices,
    4-bit weights on transformers, the Triton kernel without an NVIDIA GPU, ...) fails now, naming the fix."""
    from .fast import FastPaths, expert_kernel
    from .loading import unsloth_available
    from .preimport import TRAINER_KEYS, choose_backend, compute_dtype, several_devices

    gpu = torch.cuda.is_available() and str(trainer.get("accelerator", "auto")) != "cpu"
    dtype = compute_dtype(model["dtype"], trainer.get("precision")) if gpu else torch.float32
    fast = model["fast"] if isinstance(model["fast"], FastPaths) else FastPaths(**model["fast"])
    parallel = several_devices(*(trainer.get(key, default) for key, default in TRAINER_KEYS))
    try:
        kernel = expert_kernel(fast, torch.device("cuda" if gpu else "cpu"), dtype).name
        choose_backend(model["backend"], model["load_in_4bit"], parallel, kernel, gpu, unsloth_available())
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_precision(precision: str | None) -> None:
    """bf16 asked for on a GPU without it (the T4) fails late and obscurely: say so now."""
    if precision and "bf16" in str(precision) and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name()
        raise ConfigError(f"{name} has no bf16: use --trainer.precision 16-mixed (configs/t4.yaml does)")


def out_of_memory_message(error: BaseException, batch_size: int, mode: str) -> str:
    return (
        f"CUDA out of memory ({error}). Remedies: a smaller micro-batch (--data.batch_size, currently "
        f"{batch_size}) with more --trainer.accumulate_grad_batches; --model.gradient_checkpointing true; "
        f"a smaller --data.mode than {mode!r} (tiny/small/base) or --data.crop_mode false; "
        f"--model.load_in_4bit true on the Unsloth backend."
    )
