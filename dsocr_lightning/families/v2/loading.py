"""Load DeepSeek-OCR 2 (transformers' `deepseek_ocr2`, no remote code) with LoRA on the language model's Linears and
on every routed expert's 3-D weights (PEFT `target_parameters`), optionally on the Qwen2 encoder too."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from ...fast import FastPaths, KernelChoice, compiled_layers_line, expert_kernel
from ...training.loading import LoadSettings, LoraSettings, absolute_source, resolve_dtype
from ...training.plan import RunPlan, dtype_name
from . import v1_only
from .experts import patch_grouped_experts
from .frozen_vision import patch_frozen_vision
from .lora import apply_lora, groups_report, peft_config
from .sam_attention import patch_sam_attention

log = logging.getLogger(__name__)


def check_source(name: str) -> None:
    """A local v2 folder must hold weights as safetensors (the config was read already)."""
    folder = Path(name)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        raise ValueError(f"{name!r} has no .safetensors weights; weights are only loaded from safetensors")


def load_processor(name_or_path: str, revision: str | None = None) -> Any:
    """The checkpoint's processor (tokenizer + image processor): what the v2 collator needs, no weights."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name_or_path, revision=revision)


def refuse_v1_only(settings: LoadSettings, lora: LoraSettings) -> None:
    """The CLI's check (`V2.preflight`) for callers that load without the CLI."""
    if why := v1_only(settings.backend, settings.load_in_4bit, lora.loftq_config):
        raise ValueError(why)


def lora_config(lora: LoraSettings) -> Any:
    return peft_config(lora.r, lora.alpha, lora.dropout, lora.use_rslora, lora.experts, lora.encoder,
                       tuple(lora.target_modules))  # fmt: skip


def load(settings: LoadSettings, lora: LoraSettings) -> tuple[Any, Any, str]:
    """(peft model, processor, "transformers"): LoRA on the Linears and the experts' 3-D weights."""
    from transformers import AutoModelForImageTextToText

    refuse_v1_only(settings, lora)
    source = absolute_source(settings.model_name_or_path)
    check_source(source)
    config = lora_config(lora)  # refuses what PEFT's 3-D adapters cannot do before the weights load
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(settings.dtype), "revision": settings.revision}
    if settings.fast.experts_implementation:
        kwargs["experts_implementation"] = settings.fast.experts_implementation
    model = AutoModelForImageTextToText.from_pretrained(source, use_safetensors=True, **kwargs)
    processor = load_processor(source, settings.revision)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.text_config.use_cache = False
    torch.manual_seed(lora.random_state)
    return apply_lora(model, config, lora.experts), processor, "transformers"


def decide(model: Any, gpu: bool, dtype: torch.dtype) -> RunPlan:
    """The run plan: transformers' own model (no remote code, no Unsloth); the experts on the grouped kernel of the
    shared rule (`fast.grouped_experts`), or on transformers' own kernel where `fast.experts_implementation` or
    `fast.grouped_experts: loop` asks for it."""
    fast = model["fast"] if isinstance(model["fast"], FastPaths) else FastPaths(**model["fast"])
    if fast.experts_implementation and fast.grouped_experts not in ("auto", "loop"):
        raise ValueError(f"fast.experts_implementation {fast.experts_implementation!r} runs transformers' experts "
                         f"kernel, fast.grouped_experts {fast.grouped_experts!r} the grouped experts: set one")  # fmt: skip
    if fast.experts_implementation:
        kernel = KernelChoice("loop", f"fast.experts_implementation {fast.experts_implementation!r}")
    else:
        kernel = expert_kernel(fast, torch.device("cuda" if gpu else "cpu"), dtype)
    why = kernel.why if kernel.name != "loop" else f"transformers' own kernel with PEFT's LoRA ({kernel.why})"
    return RunPlan("v2", "transformers", kernel.name, dtype_name(dtype), f"DeepSeek-OCR 2 on transformers' code; "
                   f"experts: {why}")  # fmt: skip


def fast_paths(model: Any, settings: LoadSettings, lora: LoraSettings, device: torch.device,
               compute_dtype: torch.dtype, plan: Any) -> None:  # fmt: skip
    """The adapted groups, then the fast paths (grouped experts on the plan's kernel, the shared compiled layers and
    CUDA graphs), each logged with what runs and why."""
    for line in groups_report(model):
        rank_zero_info(line)
    kernel = plan.experts if plan and plan.experts else decide({"fast": settings.fast}, device.type == "cuda",
                                                               compute_dtype).experts  # fmt: skip
    if kernel == "loop":
        implementation = model.get_base_model().config.text_config._experts_implementation
        experts = f"experts: transformers' {implementation!r} with PEFT's LoRA ({lora.experts} layout)"
    else:
        experts = f"grouped experts: {patch_grouped_experts(model, kernel)} MoE layers, {kernel} kernel, LoRA included"
    lines = [experts, compiled_layers_line(model, settings.fast, device, compute_dtype), sam_line(model, settings),
             patch_frozen_vision(model, vision_graphs_blocker(settings.fast, device))]  # fmt: skip
    for line in lines:
        log.info("fast path: %s", line)


def vision_graphs_blocker(fast: FastPaths, device: torch.device) -> str | None:
    if not fast.vision_graphs:
        return "fast.vision_graphs false"
    return None if device.type == "cuda" else f"CUDA graphs need a GPU, the model is on {device.type}"


def sam_line(model: Any, settings: LoadSettings) -> str:
    if not settings.fast.fold_rel_pos:
        return "SAM attention: transformers' own (fast.fold_rel_pos false: a [N, N] bias per view)"
    return (
        f"SAM attention: {patch_sam_attention(model)} layers with the relative positions folded into queries and keys"
    )


def load_adapter_weights(model: Any, adapter_path: str) -> None:
    """A saved v2 adapter's weights into the freshly made LoRA layers; rank and targets must match."""
    saved = json.loads((Path(adapter_path) / "adapter_config.json").read_text())
    config = model.peft_config["default"]
    mine = (config.r, config.target_modules, sorted(config.target_parameters or []))
    theirs = (saved["r"], saved["target_modules"], sorted(saved.get("target_parameters") or []))
    if mine != theirs:
        raise ValueError(
            f"adapter {adapter_path} has r={theirs[0]} on {theirs[1]} + {theirs[2]}; the model is set up with "
            f"r={mine[0]} on {mine[1]} + {mine[2]}: set model.lora (r, target_modules, experts, encoder) to match"
        )
    load_adapter_state(model, adapter_path)
    rank_zero_info(f"loaded LoRA adapter weights from {adapter_path}")


def load_adapter_state(model: Any, adapter_path: str, adapter_name: str = "default") -> None:
    """Copy `adapter_model.safetensors` into the model's LoRA weights by name, every one accounted for.

    Not through `peft.set_peft_model_state_dict`: under transformers 5 it first applies the checkpoint's weight
    conversion to the adapter's keys, and deepseek_ocr2's renaming (`model.layers.` -> `model.language_model.layers.`)
    also rewrites keys that are native already (`language_model.language_model...`): PEFT 0.21.2 then loads nothing
    and only warns about missing keys (measured with transformers 5.24)."""
    from safetensors.torch import load_file

    state = {
        re.sub(r"\.(lora_[AB])\.", rf".\1.{adapter_name}.", key): value
        for key, value in load_file(Path(adapter_path) / "adapter_model.safetensors").items()
    }
    wanted = {name for name, _ in model.named_parameters() if ".lora_" in name}
    if set(state) != wanted:
        raise ValueError(
            f"adapter {adapter_path} does not fit the model: missing {sorted(wanted - set(state))[:3]}, unexpected "
            f"{sorted(set(state) - wanted)[:3]}"
        )
    model.load_state_dict(state, strict=False)


def peft_model_from_adapter(model: Any, adapter_path: str) -> Any:
    """What `PeftModel.from_pretrained` does, with `load_adapter_state` for the weights (see there)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig.from_pretrained(adapter_path)
    config.inference_mode = False
    peft_model = get_peft_model(model, config)
    load_adapter_state(peft_model, adapter_path)
    return peft_model
