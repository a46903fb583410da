"""Merge a saved LoRA adapter into its base model and write a plain 16-bit checkpoint (no peft needed to load).

python -m dsocr_lightning export lora_model deepseek_ocr_persian --trust_remote_code true [--dtype bfloat16]
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .versions import adapter_version, require_environment

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


def export(
    adapter_dir: str,
    out_dir: str,
    base_model: str | None = None,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> Path:
    """Merge `adapter_dir` into its base and save weights (safetensors), config, remote code and tokenizer.

    Args:
        adapter_dir: a PEFT adapter folder as `fit` saves it (adapter + tokenizer).
        out_dir: where the merged checkpoint goes (replaced whole, never half-written).
        base_model: hub id or folder of the base; default: the adapter's `base_model_name_or_path`.
        dtype: dtype of the saved weights.
        trust_remote_code: run the base checkpoint's model code (DeepSeek-OCR v1 cannot load without it; v2 needs
            none).
        revision: hub revision of the base.
    """
    version = adapter_version(adapter_dir, revision)
    require_environment(version, f"adapter {adapter_dir!r}")
    if version == "v2":  # transformers' own DeepSeek-OCR 2: no remote code
        from .v2.export import export as export_v2

        return export_v2(adapter_dir, out_dir, base_model, dtype, revision)
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    if not trust_remote_code:
        raise ValueError("export loads the base checkpoint's own model code: pass --trust_remote_code true")
    adapter = Path(adapter_dir)
    base = base_model or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = AutoModel.from_pretrained(base, trust_remote_code=True, dtype=torch.float32, use_safetensors=True,
                                      revision=revision)  # fmt: skip
    peft_model, saved_dtype = PeftModel.from_pretrained(model, adapter), getattr(torch, dtype)
    report_rounding(update_rounding_error(peft_model, saved_dtype), dtype)
    merged = peft_model.merge_and_unload().to(saved_dtype)
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    merged.save_pretrained(tmp, safe_serialization=True)
    for code in base_folder(base, revision).glob("*.py"):
        shutil.copy2(code, tmp / code.name)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").exists() else base
    AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=True).save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    rank_zero_info(f"merged {adapter} into {base}: {target} ({dtype})")
    return target


@torch.no_grad()
def update_rounding_error(peft_model: torch.nn.Module, dtype: torch.dtype) -> float:
    """||round(W + dW) - (W + dW)|| / ||dW|| over all LoRA layers: how much of the adapter's weight update
    `dW = B A * scale` the merged weights lose when stored (and run) in `dtype`. Unmerged, dW is kept exact."""
    from peft.tuners.lora import LoraLayer

    lost = update = 0.0
    for layer in peft_model.modules():
        if isinstance(layer, LoraLayer):
            for name in layer.active_adapters:
                delta = layer.get_delta_weight(name).float()
                merged = layer.get_base_layer().weight.float() + delta
                lost += (merged.to(dtype).float() - merged).pow(2).sum().item()
                update += delta.pow(2).sum().item()
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

    return CLI(export, args=argv)
