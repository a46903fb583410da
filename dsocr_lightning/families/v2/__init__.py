"""DeepSeek-OCR 2 on transformers' own implementation (`deepseek_ocr2`, transformers >= 5.10; the `v2` extra).

Its parts: the config of the public checkpoint (`config.py`), loading and LoRA on the fused 3-D experts
(`loading.py`, `lora.py`), those experts as grouped matmuls with their LoRA (`experts.py`; the compiled layers and
their CUDA graphs are the shared ones of `fast/`), the processor-based collator (`collate.py`), the module's forward
without transformers' read-backs (`forward.py`), the static-cache decoder's parts (`decode.py`), the merge
(`export.py`) and the tiny TEST STAND-IN (`standin.py`). Importing this package imports nothing heavy; its modules
need transformers 5.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import torch

from ..base import Family

MODEL_TYPES = {"deepseek_ocr2"}
ARCHITECTURES = {"DeepseekOcr2ForConditionalGeneration", "DeepseekOcr2Model"}
REMOTE_CODE_TYPES = {
    "deepseek_vl_v2",
    "DeepseekOCR",
    "dsocr_standin",
}  # DeepSeek's own remote-code v2 declares v1's model_type
NATIVE = "deepseek-community/DeepSeek-OCR-2"
IMAGE_KEYS = ("pixel_values", "pixel_values_local", "num_local_patches")  # a batch's image inputs, in the model's order


class V2(Family):
    version = "v2"
    install = 'pip install -e ".[v2,test]": transformers >= 5.10 with its deepseek_ocr2'
    checkpoints = NATIVE
    forward_keys = ("input_ids", "attention_mask", "labels", "pixel_values", "pixel_values_local", "num_local_patches")
    pixel_keys = ("pixel_values", "pixel_values_local")
    # transformers runs the vision tower over all views of a batch itself (global views, then crops); Unsloth's, the
    # remote code's
    ignores = ("fast.batched_vision", "fast.vision_chunk", "unsloth_force_compile", "trust_remote_code")
    # transformers' forward passes `num_items_in_batch` on to its loss: HF Trainer normalises each optimizer step's
    # loss by the label tokens of all its micro-batches, and so does the module (training/step_tokens.py)
    step_token_loss = True

    def claims(self, config: dict[str, Any], where: str) -> bool:
        if config.get("model_type") in MODEL_TYPES or set(config.get("architectures") or []) & ARCHITECTURES:
            return True
        if config.get("model_type") in REMOTE_CODE_TYPES and is_remote_code_v2(config):
            raise ValueError(
                f"{where} is DeepSeek-OCR 2 in its remote-code form, which does not run a language-model forward on "
                f"transformers 4.56.2: use transformers' own port, {NATIVE!r} (or convert this folder with "
                f"transformers' convert_deepseek_ocr2_weights_to_hf.py), in the v2 environment: {self.install}"
            )
        return False

    def runs_here(self, transformers: tuple[int, int]) -> bool:
        return transformers >= (5, 10) and importlib.util.find_spec("transformers.models.deepseek_ocr2") is not None

    def owns_adapter(self, saved: dict[str, Any]) -> bool:
        return bool(saved.get("target_parameters"))  # LoRA on 3-D expert parameters: v1 adapters name Linears only

    def decide(self, model: Any, trainer: Any, gpu: bool, dtype: torch.dtype) -> Any:
        from .loading import decide

        return decide(model, gpu, dtype)

    def preflight(self, model: Any) -> None:
        from ...training.checks import ConfigError

        if why := v1_only(model["backend"], model["load_in_4bit"], model["lora"]["loftq_config"]):
            raise ConfigError(why)

    def tokenizer(self, text_side: Any) -> Any:
        return text_side.tokenizer  # the processor's

    def load(self, settings: Any, lora: Any, data_parallel: bool, device: torch.device, compute_dtype: torch.dtype,
             plan: Any) -> tuple[Any, Any, str]:  # fmt: skip
        from .loading import load

        return load(settings, lora)

    def load_adapter_weights(self, model: Any, adapter_path: str) -> None:
        from .loading import load_adapter_weights

        load_adapter_weights(model, adapter_path)

    def after_load(self, model: Any, settings: Any, lora: Any, backend: str, device: torch.device,
                   compute_dtype: torch.dtype, plan: Any) -> None:  # fmt: skip
        from .loading import fast_paths

        fast_paths(model, settings, lora, device, compute_dtype, plan)

    def load_text_side(self, name_or_path: str, trust_remote_code: bool, revision: str | None) -> Any:
        from .loading import load_processor

        return load_processor(name_or_path, revision)

    def write_standin(self, folder: str) -> None:
        from .standin import write_v2_standin

        write_v2_standin(folder)

    def collator(self, text_side: Any, **settings: Any) -> Any:
        from .collate import ProcessorCollator

        return ProcessorCollator(text_side, **settings)

    def prompt_image_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {key: batch[key] for key in IMAGE_KEYS}

    def global_views(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        return list(batch["pixel_values"])  # the processor stacks the global views [B, 3, S, S]

    def forward(self, model: Any, inputs: dict[str, Any], batch: dict[str, Any]) -> Any:
        from .forward import forward

        return forward(model, inputs, batch)

    def decoder_parts(self, model: Any) -> Any:
        from .decode import decoder_parts

        return decoder_parts(model)

    def export(self, source: Any, out_dir: str, dtype: str, trust_remote_code: bool, revision: str | None,
               max_shard_size: str) -> None:  # fmt: skip
        from ...training.checks import ConfigError
        from .export import export

        if source.checkpoint is not None:
            raise ConfigError("a DeepSeek-OCR 2 export takes an adapter folder (lora_model or lora_model_best)")
        export(str(source.path), out_dir, source.base, dtype, revision)


def v1_only(backend: str, load_in_4bit: bool, loftq_config: Any) -> str | None:
    """Why these settings cannot load DeepSeek-OCR 2 (they are v1's Unsloth backend's), or None."""
    if backend == "unsloth" or load_in_4bit:
        named = "--model.backend unsloth" if backend == "unsloth" else "--model.load_in_4bit True"
        return f"{named}: DeepSeek-OCR 2 runs on transformers' own code here, without Unsloth or 4-bit weights " \
               "(those are v1's)"  # fmt: skip
    if loftq_config is not None:
        return "--model.lora.loftq_config: LoftQ is v1's Unsloth backend's; DeepSeek-OCR 2 takes plain LoRA"
    return None


def is_remote_code_v2(config: dict[str, Any]) -> bool:
    """DeepSeek's own (or Unsloth's) remote-code DeepSeek-OCR 2: v1's model_type, a Qwen2 vision encoder."""
    vision = json.dumps(config.get("vision_config", {})).lower()
    return "qwen2" in vision or "deepencoderv2" in vision


FAMILY = V2()
