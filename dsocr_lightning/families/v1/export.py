"""Merge a saved DeepSeek-OCR (v1) adapter, or the LoRA of a fit checkpoint, into its base: a plain 16-bit checkpoint
with the base's remote code and tokenizer, which loads without peft."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...files.folders import replaced_folder
from ...files.rounding import report_rounding
from ...training.checks import ConfigError

if TYPE_CHECKING:  # (files.export asks this family to merge: no import of it here)
    from ...files.export import AdapterSource


def export(source: AdapterSource, out_dir: str, dtype: str, trust_remote_code: bool, revision: str | None,
           max_shard_size: str) -> None:  # fmt: skip
    """See `files.export.export`: v1 loads the base's remote code, so it asks for `trust_remote_code`."""
    if not trust_remote_code:
        raise ConfigError("export loads the base checkpoint's own model code: pass --trust_remote_code true")
    model = peft_model(source, revision)
    report_rounding(merge_lora_layers(model, getattr(torch, dtype)), dtype)
    merged = model.unload().to(getattr(torch, dtype))  # LoRA layers out (already merged), the rest converted
    with replaced_folder(out_dir, "export", "export folder") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        for code in base_folder(source.base, revision).glob("*.py"):
            shutil.copy2(code, tmp / code.name)
        tokenizer(source).save_pretrained(tmp)


def base_folder(base_model: str, revision: str | None) -> Path:
    """A local folder holding the base checkpoint's code and configs (downloaded for a hub id)."""
    if Path(base_model).is_dir():
        return Path(base_model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base_model, allow_patterns=["*.py", "*.json"], revision=revision))


def load_base(source: AdapterSource, revision: str | None) -> torch.nn.Module:
    """The base in the dtype it is stored in (16-bit for DeepSeek-OCR): no float32 copy of 3B weights."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(source.base, trust_remote_code=True, dtype="auto", use_safetensors=True,
                                     revision=revision)  # fmt: skip


def peft_model(source: AdapterSource, revision: str | None) -> Any:
    """The base with the LoRA layers and weights of the adapter (float32 LoRA weights, as peft keeps them)."""
    from peft import PeftModel, get_peft_model

    from ...training.loading import LoraSettings
    from .loading import peft_config

    base = load_base(source, revision)
    if source.checkpoint is None:
        return PeftModel.from_pretrained(base, source.path)
    model = get_peft_model(base, peft_config(LoraSettings(**source.checkpoint["hyper_parameters"]["lora"])))
    from ...fast.moe import per_expert_state_dict

    weights = {key.removeprefix("model."): value for key, value in source.checkpoint["state_dict"].items()}
    weights = per_expert_state_dict(weights)  # a checkpoint of grouped experts holds their LoRA stacked
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shapes of another rank
        raise ConfigError(
            f"{source.path} does not fit its base {source.base!r}: {str(error).splitlines()[-1]}"
        ) from None
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        raise ConfigError(f"{source.path} does not fit its LoRA settings: {(result.unexpected_keys + missing)[:3]}")
    return model


def tokenizer(source: AdapterSource) -> Any:
    from transformers import AutoTokenizer

    folder = source.path if (source.path / "tokenizer_config.json").exists() else source.base
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


@torch.no_grad()
def merge_lora_layers(peft_model: torch.nn.Module, dtype: torch.dtype) -> float:
    """Merge every LoRA layer into its base weight, one layer at a time: W' = round(W + dW), with the update
    dW = B A * scale and the sum computed in float32 and rounded once to `dtype` (peft rounds dW to the weights'
    dtype before adding). Returns ||W' - (W + dW)|| / ||dW|| over all layers: how much of the adapter's update the
    merged weights lose when stored (and run) in `dtype`; unmerged, dW is kept exact."""
    from peft.tuners.lora import LoraLayer

    lost = update = 0.0
    for layer in [m for m in peft_model.modules() if isinstance(m, LoraLayer)]:
        if any(layer.use_dora.values()) or any(layer.lora_bias.values()):
            raise ConfigError("export merges plain LoRA adapters (no DoRA, no LoRA bias)")
        base = layer.get_base_layer()
        delta = sum(layer.get_delta_weight(name).float() for name in layer.active_adapters)
        exact = base.weight.float() + delta
        rounded = exact.to(dtype)
        lost += (rounded.float() - exact).pow(2).sum().item()
        update += delta.pow(2).sum().item()
        base.weight = torch.nn.Parameter(rounded, requires_grad=False)
    return (lost / update) ** 0.5 if update else 0.0
