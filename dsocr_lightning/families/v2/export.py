"""Merge a saved DeepSeek-OCR 2 adapter into its base: a plain native checkpoint (fused experts, processor) that
`AutoModelForImageTextToText.from_pretrained` loads without peft."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...files.folders import replaced_folder
from ...files.rounding import report_rounding
from .loading import peft_model_from_adapter
from .lora import EXPERT_PARAMETERS, fuse_experts, split_experts


def layout_of(saved: dict) -> str:
    """`split` or `fused`, from the adapter's expert targets."""
    return "split" if set(EXPERT_PARAMETERS["split"]) <= set(saved.get("target_parameters") or []) else "fused"


@torch.no_grad()
def update_rounding_error(peft_model: torch.nn.Module, dtype: torch.dtype) -> float:
    """||round(W + dW) - (W + dW)|| / ||dW|| over all LoRA weights, 3-D expert parameters included."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    lost = update = 0.0
    for layer in peft_model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        weight = layer.get_param() if isinstance(layer, ParamWrapper) else layer.get_base_layer().weight
        for name in layer.active_adapters:
            delta = layer.get_delta_weight(name).float()
            merged = weight.float() + delta
            lost += (merged.to(dtype).float() - merged).pow(2).sum().item()
            update += delta.pow(2).sum().item()
    return (lost / update) ** 0.5 if update else 0.0


def export(adapter_dir: str, out_dir: str, base_model: str | None = None, dtype: str = "bfloat16",
           revision: str | None = None) -> Path:  # fmt: skip
    """See `dsocr_lightning.files.export.export` (v2 needs no remote code): the split experts fused again."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    adapter = Path(adapter_dir)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    base = base_model or saved["base_model_name_or_path"]
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32, use_safetensors=True,
                                                        revision=revision)  # fmt: skip
    if layout_of(saved) == "split":
        split_experts(model)
    peft_model, saved_dtype = peft_model_from_adapter(model, adapter_dir), getattr(torch, dtype)
    report_rounding(update_rounding_error(peft_model, saved_dtype), dtype)
    merged = peft_model.merge_and_unload()
    fuse_experts(merged)
    merged = merged.to(saved_dtype)
    processor_source = adapter if (adapter / "processor_config.json").exists() else base
    # as v1's export: swapped in whole, no temporary folder left on failure, never over anything but an earlier export
    with replaced_folder(out_dir, "export", "export folder") as tmp:
        merged.save_pretrained(tmp)
        AutoProcessor.from_pretrained(processor_source).save_pretrained(tmp)
    return Path(out_dir)
