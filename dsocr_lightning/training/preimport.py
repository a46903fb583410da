"""The backend rule (`choose_backend`), and Unsloth imported before anything imports transformers when it will be
the backend.

`import lightning` already imports transformers (through torchmetrics), so the import is decided from the command
line alone, before the CLI module is imported: `--model.backend` (and `load_in_4bit`, `dtype`,
`fast.grouped_experts`, `--trainer.devices`, `strategy`, `num_nodes`, `accelerator`, `precision`) and the same keys of
`--config` files, the last one given winning, as the CLI itself reads them. Loading applies the same rule to the
parsed settings (`loading.resolve_backend`).
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


def choose_backend(backend: str, load_in_4bit: bool, data_parallel: bool, kernel: str, cuda: bool,
                   unsloth: bool) -> tuple[str, str]:  # fmt: skip
    """(backend, why): `auto` takes transformers + peft wherever the grouped experts run (`kernel` is not the loop:
    every NVIDIA GPU from Turing on, and the CPU), Unsloth for 4-bit base weights or where they do not run, else
    transformers + peft. A contradiction raises ValueError with the fix."""
    if backend == "unsloth" or (backend == "auto" and load_in_4bit):
        why = "asked for" if backend == "unsloth" else "load_in_4bit: 4-bit base weights train on Unsloth only"
        blocker = unsloth_blocker(data_parallel, cuda, unsloth)
        if blocker:
            raise ValueError(f"backend unsloth ({why}): {blocker}")
        return "unsloth", why
    if load_in_4bit:
        raise ValueError("load_in_4bit trains on the Unsloth backend only: --model.backend unsloth (or auto)")
    if backend == "transformers":
        return "transformers", "asked for"
    if data_parallel or kernel != "loop" or not (cuda and unsloth):
        return "transformers", ("data-parallel" if data_parallel else f"grouped experts: {kernel} kernel"
                                if kernel != "loop" else "Unsloth not installed or no GPU")  # fmt: skip
    return "unsloth", "no grouped-expert kernel on this GPU, and Unsloth is installed"


def unsloth_blocker(data_parallel: bool, cuda: bool, unsloth: bool) -> str | None:
    if data_parallel:
        return "Unsloth trains on one GPU here: for several use backend transformers (or auto) without load_in_4bit"
    if not cuda:
        return "Unsloth needs an NVIDIA GPU; use backend transformers on this machine"
    if not unsloth:
        return "Unsloth is not installed: pip install -e '.[unsloth]'"
    return None


def compute_dtype(dtype: str, precision: Any) -> Any:
    """What the layers multiply in: autocast's dtype under mixed precision, else the weights' (`auto`: bf16 where the
    GPU has it, else fp16)."""
    import torch

    autocast = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(str(precision))
    if autocast is not None:
        return autocast
    if dtype != "auto":
        return getattr(torch, dtype)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def backend_from_argv(argv: list[str]) -> str:
    """The backend `choose_backend` gives this command line on this machine's GPU (transformers where the rule
    itself refuses: the CLI then says why)."""
    import torch

    from ..fast import FastPaths, expert_kernel

    want = lambda key, default: requested(argv, "model", key, default)
    dtype = compute_dtype(str(want("dtype", "auto")), requested(argv, "trainer", "precision", None))
    try:
        kernel = expert_kernel(FastPaths(grouped_experts=str(want("fast.grouped_experts", "auto"))),
                               torch.device("cuda"), dtype).name  # fmt: skip
        return choose_backend(str(want("backend", "auto")), str(want("load_in_4bit", False)).lower() == "true",
                              runs_on_several_devices(argv), kernel, True, True)[0]  # fmt: skip
    except ValueError:
        return "transformers"


def import_unsloth_first(argv: list[str]) -> bool:
    """Import Unsloth now if the run will use it; True when it did."""
    import torch

    if importlib.util.find_spec("unsloth") is None or not torch.cuda.is_available():
        return False
    if backend_from_argv(argv) != "unsloth":
        return False
    import unsloth  # noqa: F401  (patches transformers and peft on import)

    return True
