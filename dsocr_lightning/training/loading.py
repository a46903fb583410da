"""Load a DeepSeek-OCR checkpoint (hub id or local folder) with LoRA: the settings, and the steps every model family
shares around its own loader (`families.base.Family.load`): the saved adapter's weights, LoRA in float32, the count
of trainable weights, then the family's fast paths.

Heavy imports stay inside functions: Unsloth must be imported before transformers and peft when it is used.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from ..families import LoadedModel, family
from ..fast import FastPaths
from ..fast.moe import is_picks

log = logging.getLogger(__name__)

Backend = Literal["auto", "unsloth", "transformers"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """LoRA as the reference recipe: r16 on every attention and MLP projection of the language model."""

    r: int = 16  # adapter rank
    alpha: int = 16  # scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))  # module-name suffixes
    use_rslora: bool = False  # rank-stabilised scaling
    random_state: int = 3407  # seed of the adapter initialisation
    loftq_config: dict[str, Any] | None = None  # LoftQ initialisation (Unsloth path only), None for plain LoRA
    experts: Literal["split", "fused"] = "split"  # v2's fused 3-D experts: own pair per gate/up/down (as v1), or
    # one pair on gate_up_proj (plain-PEFT layout, fewer parameters); v1 ignores it
    encoder: bool = False  # v2: also adapt the Qwen2 vision encoder (DeepSeek froze it last); v1 ignores it


@dataclass
class LoadSettings:
    """Where the model comes from and how it is placed in memory."""

    model_name_or_path: str = "unsloth/DeepSeek-OCR"
    backend: Backend = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    dtype: DType = "auto"
    load_in_4bit: bool = False
    gradient_checkpointing: bool = True
    unsloth_force_compile: bool = True
    adapter_path: str | None = None
    fast: FastPaths = field(default_factory=FastPaths)


def unsloth_available() -> bool:
    return importlib.util.find_spec("unsloth") is not None


def run_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: DType) -> torch.dtype:
    """auto = bf16 where the GPU has it, fp16 on older GPUs (the T4), float32 on CPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(settings: LoadSettings, lora: LoraSettings, data_parallel: bool = False,
               device: torch.device | None = None, compute_dtype: torch.dtype | None = None,
               plan: Any = None) -> LoadedModel:  # fmt: skip
    """The model of the plan's family (else the checkpoint's) with LoRA and the saved adapter's weights; the
    trainable count and fast paths logged. `device` and `compute_dtype` (autocast's, when it differs from the
    weights') say where and how the model will compute."""
    from ..families.detect import checkpoint_version

    version = plan.version if plan and plan.version else checkpoint_version(
        settings.model_name_or_path, settings.revision, settings.adapter_path)  # fmt: skip
    owner = family(version)
    compute_dtype, device = compute_dtype or resolve_dtype(settings.dtype), device or run_device()
    model, text_side, backend = owner.load(settings, lora, data_parallel, device, compute_dtype, plan)
    if settings.adapter_path:
        owner.load_adapter_weights(model, settings.adapter_path)
    for param in model.parameters():  # LoRA weights train in float32 whatever the base dtype
        if param.requires_grad:
            param.data = param.data.float()
    trainable, total = count_parameters(model)
    rank_zero_info(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%) [{backend}, "
                   f"{version}]")  # fmt: skip
    owner.after_load(model, settings, lora, backend, device, compute_dtype, plan)
    return LoadedModel(model, text_side, backend, owner.step_token_loss, version)


def absolute_source(name_or_path: str) -> str:
    """A local folder as an absolute path, a hub id as it is. The saved adapter records this as its base
    (`base_model_name_or_path`), so that peft, Unsloth and `export` find the base from any working folder."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else name_or_path


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts. Frozen views of a trainable parameter (the per-expert LoRA weights of
    grouped experts, fast/moe.py) are that parameter, counted once; the grouped experts' records of picked experts
    are not weights."""
    params = [p for name, p in model.named_parameters() if not is_picks(name)]
    trainable = {p.untyped_storage().data_ptr() for p in params if p.requires_grad}
    views = sum(p.numel() for p in params if not p.requires_grad and p.untyped_storage().data_ptr() in trainable)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) - views


def set_inference(model: Any, backend: str, inference: bool) -> None:
    """Unsloth keeps separate training and inference set-ups; plain peft needs nothing but eval()/train()."""
    if backend != "unsloth":
        return
    from unsloth import FastVisionModel

    (FastVisionModel.for_inference if inference else FastVisionModel.for_training)(model)
