"""Merge a saved LoRA adapter into its base model and write a plain 16-bit checkpoint (no peft needed to load).

python -m dsocr_lightning export lora_model deepseek_ocr_persian --trust_remote_code true [--dtype bfloat16]

The adapter may be `lora_model` (last step), `lora_model_best` (best val/cer), or a fit checkpoint (`.ckpt`).
Memory stays near the size of the base checkpoint as stored (16-bit for DeepSeek-OCR): the base loads in its own
dtype, each LoRA layer is merged on its own (its update computed in float32 and added in float32, the sum rounded
once to the saved dtype), and the weights are written in shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .checks import ConfigError, looks_like_path
from .folders import replaced_folder
from .versions import adapter_version, checkpoint_version, require_environment

# Above this rounding error of the adapter's update the merged model drifts from the adapter's output. Measured on
# the real architecture (random weights, benchmarks/README.md): 17 % (bf16, a 60-step adapter) left the loss within
# bf16 noise; 59 % (bf16, an 8-step adapter) lost 0.19 of the 1.46 nats the adapter had gained (11 % in fp16: 0.0005).
ROUNDING_WARN = 0.3


def base_folder(base_model: str, revision: str | None) -> Path:
    """A local folder holding the base checkpoint's code and configs (downloaded for a hub id)."""
    if Path(base_model).is_dir():
        return Path(base_model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base_model, allow_patterns=["*.py", "*.json"], revision=revision))


def read_fit_checkpoint(adapter: str) -> dict[str, Any] | None:
    """The fit checkpoint `adapter` names (LoRA weights and hyper-parameters), read once; None for a folder."""
    path = Path(adapter)
    return (
        torch.load(path, map_location="cpu", weights_only=True) if path.suffix == ".ckpt" and path.is_file() else None
    )


def export_version(
    adapter: str, checkpoint: dict[str, Any] | None, base_model: str | None, revision: str | None
) -> str:
    """v1 or v2 for an adapter folder or a fit checkpoint, checked against this environment before any weights."""
    if checkpoint is not None:
        return checkpoint_version(base_model or checkpoint["hyper_parameters"]["model_name_or_path"], revision)
    version = adapter_version(adapter, revision)
    require_environment(version, f"adapter {adapter!r}")
    return version


def export(
    adapter: str,
    out_dir: str,
    base_model: str | None = None,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    trust_remote_code: bool = False,
    revision: str | None = None,
    max_shard_size: str = "1GB",
) -> Path:
    """Merge `adapter` into its base and save weights (safetensors), config, remote code and tokenizer.

    Args:
        adapter: a PEFT adapter folder as `fit` saves it (`lora_model`, `lora_model_best`) or a fit checkpoint (.ckpt).
        out_dir: where the merged checkpoint goes (replaced whole, never half-written).
        base_model: hub id or folder of the base; default: the one the adapter or checkpoint was trained from.
        dtype: dtype of the saved weights.
        trust_remote_code: run the base checkpoint's model code (DeepSeek-OCR v1 cannot load without it; v2 needs
            none).
        revision: hub revision of the base.
        max_shard_size: largest safetensors file written (saving holds about one shard in memory at a time).
    """
    checkpoint = read_fit_checkpoint(adapter)
    version = export_version(adapter, checkpoint, base_model, revision)
    if version == "v2":  # transformers' own DeepSeek-OCR 2: no remote code
        if Path(adapter).suffix == ".ckpt":
            raise ConfigError("a DeepSeek-OCR 2 export takes an adapter folder (lora_model or lora_model_best)")
        from .v2.export import export as export_v2

        return export_v2(adapter, out_dir, base_model, dtype, revision)
    if not trust_remote_code:
        raise ConfigError("export loads the base checkpoint's own model code: pass --trust_remote_code true")
    source = AdapterSource.open(adapter, base_model, checkpoint)
    peft_model = source.peft_model(revision)
    report_rounding(merge_lora_layers(peft_model, getattr(torch, dtype)), dtype)
    merged = peft_model.unload().to(getattr(torch, dtype))  # LoRA layers out (already merged), the rest converted
    with replaced_folder(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        for code in base_folder(source.base, revision).glob("*.py"):
            shutil.copy2(code, tmp / code.name)
        source.tokenizer().save_pretrained(tmp)
    rank_zero_info(f"merged {adapter} into {source.base}: {out_dir} ({dtype})")
    return Path(out_dir)


class AdapterSource:
    """Where the LoRA weights, their configuration and the base come from: an adapter folder or a `.ckpt`."""

    def __init__(self, path: Path, base: str, checkpoint: dict[str, Any] | None) -> None:
        self.path, self.base, self.checkpoint = path, base, checkpoint

    @classmethod
    def open(cls, adapter: str, base_model: str | None, checkpoint: dict[str, Any] | None) -> AdapterSource:
        """`checkpoint`: the fit checkpoint `adapter` names, as `read_fit_checkpoint` read it (None for a folder)."""
        path = Path(adapter)
        if checkpoint is not None:
            base = base_model or checkpoint["hyper_parameters"]["model_name_or_path"]
            return cls(path, base, checkpoint)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"{adapter!r} is neither an adapter folder (with adapter_config.json, as lora_model "
                              "and lora_model_best) nor a fit checkpoint (.ckpt)")  # fmt: skip
        base = base_model or json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return cls(path, base, None)

    def load_base(self, revision: str | None) -> torch.nn.Module:
        """The base in the dtype it is stored in (16-bit for DeepSeek-OCR): no float32 copy of 3B weights."""
        from transformers import AutoModel

        if looks_like_path(self.base) and not Path(self.base).is_dir():
            raise ConfigError(f"base model {self.base!r} not found: pass --base_model (a folder or hub id)")
        return AutoModel.from_pretrained(self.base, trust_remote_code=True, dtype="auto", use_safetensors=True,
                                         revision=revision)  # fmt: skip

    def peft_model(self, revision: str | None) -> Any:
        """The base with the LoRA layers and weights of the adapter (float32 LoRA weights, as peft keeps them)."""
        from peft import PeftModel, get_peft_model

        from .loading import LoraSettings, peft_config

        base = self.load_base(revision)
        if self.checkpoint is None:
            return PeftModel.from_pretrained(base, self.path)
        model = get_peft_model(base, peft_config(LoraSettings(**self.checkpoint["hyper_parameters"]["lora"])))
        from .fast.moe import per_expert_state_dict

        weights = {key.removeprefix("model."): value for key, value in self.checkpoint["state_dict"].items()}
        weights = per_expert_state_dict(weights)  # a checkpoint of grouped experts holds their LoRA stacked
        result = model.load_state_dict(weights, strict=False)
        missing = [key for key in result.missing_keys if "lora_" in key]
        if result.unexpected_keys or missing:
            raise ValueError(f"{self.path} does not fit its LoRA settings: {(result.unexpected_keys + missing)[:3]}")
        return model

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        folder = self.path if (self.path / "tokenizer_config.json").exists() else self.base
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
            raise ValueError("export merges plain LoRA adapters (no DoRA, no LoRA bias)")
        base = layer.get_base_layer()
        delta = sum(layer.get_delta_weight(name).float() for name in layer.active_adapters)
        exact = base.weight.float() + delta
        rounded = exact.to(dtype)
        lost += (rounded.float() - exact).pow(2).sum().item()
        update += delta.pow(2).sum().item()
        base.weight = torch.nn.Parameter(rounded, requires_grad=False)
    return (lost / update) ** 0.5 if update else 0.0


def report_rounding(error: float, dtype: str) -> None:
    rank_zero_info(f"merging in {dtype} changes the adapter's weight update by {100 * error:.1f} % (rounding)")
    if error > ROUNDING_WARN:
        rank_zero_warn(
            f"{dtype} rounds away {100 * error:.0f} % of the adapter's update: the merged model will not give the "
            "adapter's output. Export with --dtype float16 (or float32), or serve the adapter unmerged."
        )


def main(argv: list[str] | None = None) -> Path:
    from jsonargparse import CLI

    from .quiet import silence_known_noise

    silence_known_noise()
    return CLI(export, args=argv)
