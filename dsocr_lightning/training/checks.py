"""Plain-spoken checks that fail early, before hours of GPU time, with the remedy in the message.

`ConfigError` is what a wrong setting or path raises; `python -m dsocr_lightning` prints its message alone (a few
lines naming the fix) instead of a traceback. The CLI runs these checks before anything loads.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
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


HUB_TIMEOUT_S = 3.0  # one try: a machine without network knows within this (the hub's own retries took 26 s)


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here (one quick request, asked once a process), or None."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001  (no network, DNS, proxy, TLS: all mean the hub is out of reach)
        text = str(error).lower()
        known = [why for key, why in NETWORK_FAILURES.items() if key in text]
        return known[0] if known else type(error).__name__
    return None


NETWORK_FAILURES = {  # what the HTTP client's message holds -> the reason in a few words
    "name resolution": "the host name does not resolve",
    "name or service not known": "the host name does not resolve",
    "refused": "connection refused",
    "timed out": f"no answer within {HUB_TIMEOUT_S:.0f} s",
    "timeout": f"no answer within {HUB_TIMEOUT_S:.0f} s",
    "unreachable": "network unreachable",
    "proxy": "the proxy failed",
    "ssl": "TLS failed",
}


def check_hub_reachable(what: str) -> None:
    """A hub id is only usable offline with HF_HUB_OFFLINE=1 (then from the local cache): without it, say so now."""
    why = hub_unreachable()
    if why is not None:
        from huggingface_hub import constants

        raise ConfigError(f"{what} is a hub id but the hub ({constants.ENDPOINT}) cannot be reached ({why}): with no "
                          "network set HF_HUB_OFFLINE=1 to use the local cache, or give a local folder")  # fmt: skip


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path.name} of {what} cannot be read ({error}): an unfinished download or copy? "
                          "fetch it again") from None  # fmt: skip


def check_safetensors(path: Path, what: str) -> None:
    """The header and size of a safetensors file (cheap: nothing is loaded) say whether it is whole."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except Exception as error:  # noqa: BLE001  (SafetensorError, OSError: the file is unusable either way)
        raise ConfigError(f"{path.name} of {what} cannot be read ({error}): an unfinished download or copy? "
                          "fetch it again") from None  # fmt: skip


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
    from ..families import family
    from ..families.detect import version_of_config

    config = read_json(folder / "config.json", repr(name))
    try:
        version = version_of_config(config, repr(name))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    family(version).check_files(name, folder, config)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"{name!r} has no .safetensors weights; weights are only loaded from safetensors")
    for path in weights:
        check_safetensors(path, repr(name))
    if not (folder / "tokenizer_config.json").exists():
        raise ConfigError(f"{name!r} has no tokenizer (tokenizer_config.json): download the whole checkpoint")


def check_hub_model(name: str, revision: str | None) -> None:
    if not hub_offline():
        return check_hub_reachable(f"model {name!r}")  # then the hub answers for it
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
    saved = read_json(config_path, f"adapter {path!r}")
    check_safetensors(Path(path) / "adapter_model.safetensors", f"adapter {path!r}")
    if saved.get("r") != r or set(saved.get("target_modules") or []) != set(target_modules):
        raise ConfigError(
            f"adapter {path} has r={saved.get('r')} on {sorted(saved.get('target_modules') or [])}; the model is "
            f"set up with r={r} on {sorted(target_modules)}: set model.lora to match"
        )


def check_ckpt_path(ckpt_path: str | None, subcommand: str) -> None:
    if ckpt_path == "best" and subcommand == "fit":
        raise ConfigError("--ckpt_path best: fit resumes a run from its last checkpoint: --ckpt_path last, or give a "
                          "checkpoint file")  # fmt: skip
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and not Path(ckpt_path).is_file():
        raise ConfigError(f"--ckpt_path {ckpt_path}: no such checkpoint file ('last' resumes this command's run)")


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


def check_accelerator(trainer: Any) -> None:
    """A GPU asked for where there is none (configs/t4.yaml on a laptop), or fp16 on the CPU, fails now."""
    accelerator, precision = str(trainer.get("accelerator", "auto")), str(trainer.get("precision"))
    gpu = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not gpu:
        raise ConfigError(f"trainer.accelerator {accelerator}: this machine has no CUDA GPU (torch {torch.__version__})"
                          ": run on a GPU machine, or --trainer.accelerator cpu --trainer.precision 32-true (slow; "
                          "configs/demo.yaml is a CPU run)")  # fmt: skip
    devices, available = str(trainer.get("devices", "auto")), torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and devices.isdigit() and int(devices) > available:
        raise ConfigError(f"trainer.devices {devices}: this machine has {available} CUDA GPU(s): --trainer.devices "
                          f"{available} (or fewer)")  # fmt: skip
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not gpu)
    if on_cpu and precision in ("16", "16-mixed", "16-true"):
        raise ConfigError(f"trainer.precision {precision} needs a CUDA GPU: on the CPU use --trainer.precision "
                          "32-true (or bf16-mixed)")  # fmt: skip


# setting: (whether a value is allowed, what is allowed); a value of None passes where the setting may be null
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.lr": (lambda v: v > 0, "a number > 0 (the recipe's: 2e-4)"),
    "model.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "model.warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "model.lora.r": (lambda v: v >= 1, "an integer >= 1"),
    "model.lora.alpha": (lambda v: v > 0, "a number > 0"),
    "model.lora.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model.generation.max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "model.log_samples": (lambda v: v >= 0, "an integer >= 0"),
    "model.cpu_threads": (lambda v: v >= 1, "an integer >= 1, or null"),
    "data.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "data.num_workers": (lambda v: v >= 0, "an integer >= 0"),
    "data.max_length": (lambda v: v >= 1, "an integer >= 1, or null"),
    "trainer.max_steps": (lambda v: v == -1 or v >= 1, "an integer >= 1 (optimizer steps), or -1 for max_epochs"),
    "trainer.accumulate_grad_batches": (lambda v: v >= 1, "an integer >= 1"),
    "last_checkpoint.every_n_train_steps": (lambda v: v >= 0, "an integer >= 0"),
    "bad_samples.max_fraction": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
}


def check_ranges(config: Any) -> None:
    """Each numeric setting in its range, before anything loads (a negative lr failed in the optimizer, after the
    model had loaded; lr 0 trained nothing, silently)."""
    for key, (allowed, wanted) in RANGES.items():
        value = config
        for part in key.split("."):
            value = value[part]
        if value is not None and not allowed(value):
            raise ConfigError(f"--{key} {value}: must be {wanted}")


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
