"""DeepSeek-OCR (v1, 3B): the checkpoint's own remote code on transformers 4.56.2, trained through Unsloth or plain
transformers + peft.

Its parts: loading and adapters (`loading.py`), its image geometry and collator (`images.py`, `collate.py`), how its
batches travel from the workers (`transport.py`), the merge (`export.py`) and the tiny TEST STAND-IN (`standin/`).
Its fast paths (grouped experts, batched vision, compiled layers and CUDA graphs, static-cache decoding) are the
patches of `dsocr_lightning/fast/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..base import Family

MODEL_TYPES = {"deepseek_vl_v2", "DeepseekOCR", "dsocr_standin"}


class V1(Family):
    version = "v1"
    install = 'pip install -e ".[dev]" (or ".[unsloth]" on a GPU): transformers 4.56.2 for the remote code'
    checkpoints = "unsloth/DeepSeek-OCR or deepseek-ai/DeepSeek-OCR"
    forward_keys = ("input_ids", "attention_mask", "labels", "images", "images_seq_mask", "images_spatial_crop")
    ignores = ("lora.experts", "lora.encoder", "fast.experts_implementation")  # v2's: fused experts, Qwen2 encoder
    # its remote-code forward takes no loss keyword arguments (`num_items_in_batch`): HF Trainer averages each
    # micro-batch's mean loss there, and so does the module
    step_token_loss = False

    def claims(self, config: dict[str, Any], where: str) -> bool:
        return config.get("model_type") in MODEL_TYPES

    def runs_here(self, transformers: tuple[int, int]) -> bool:
        return transformers[:2] == (4, 56)

    def decide(self, model: Any, trainer: Any, gpu: bool, dtype: torch.dtype) -> Any:
        from .plan import decide

        return decide(model, trainer, gpu, dtype)

    def preflight(self, model: Any) -> None:
        from ...training.checks import check_adapter, check_trust

        check_trust(model["trust_remote_code"], model["model_name_or_path"])
        if model["adapter_path"]:
            check_adapter(model["adapter_path"], model["lora"]["r"], list(model["lora"]["target_modules"]))

    def check_files(self, name: str, folder: Path, config: dict[str, Any]) -> None:
        from ...training.checks import ConfigError

        module = config.get("auto_map", {}).get("AutoModel", "").split(".")[0]
        if not (folder / f"{module}.py").exists():
            raise ConfigError(f"{name!r} lacks its model code ({module or 'no auto_map'}.py): expected the "
                              "unsloth/DeepSeek-OCR or deepseek-ai/DeepSeek-OCR files")  # fmt: skip

    def load(self, settings: Any, lora: Any, data_parallel: bool, device: torch.device, compute_dtype: torch.dtype,
             plan: Any) -> tuple[Any, Any, str]:  # fmt: skip
        from .loading import load

        return load(settings, lora, data_parallel, device, compute_dtype, plan)

    def load_adapter_weights(self, model: Any, adapter_path: str) -> None:
        from .loading import load_adapter_weights

        load_adapter_weights(model, adapter_path)

    def after_load(self, model: Any, settings: Any, lora: Any, backend: str, device: torch.device,
                   compute_dtype: torch.dtype, plan: Any) -> None:  # fmt: skip
        from .loading import fast_paths

        fast_paths(model, settings, backend, device, compute_dtype, plan)

    def load_text_side(self, name_or_path: str, trust_remote_code: bool, revision: str | None) -> Any:
        from .loading import load_tokenizer

        return load_tokenizer(name_or_path, trust_remote_code, revision)

    def write_standin(self, folder: str) -> None:
        from .standin import write_standin_checkpoint

        # lm_head only where labels are learned: the same loss, most of a CPU training step saved
        write_standin_checkpoint(folder, labelled_logits_only=True)

    def collator(self, text_side: Any, **settings: Any) -> Any:
        from .collate import OCRCollator

        return OCRCollator(text_side, **settings)

    def prompt_image_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The views, with the prompts' image mask."""
        return {
            "images": batch["images"],
            "images_seq_mask": batch["prompt_images_seq_mask"],
            "images_spatial_crop": batch["images_spatial_crop"],
        }

    def global_views(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        return [glob[0] for _, glob in batch["images"]]  # rows pair (crops, global view [1, 3, B, B])

    def cast_pixels(self, batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        if any(glob.dtype == torch.uint8 for _, glob in batch.get("images", [])):
            raise RuntimeError(
                "pixels still as bytes: batches from OCRDataModule's loaders need its on_after_batch_transfer"
            )
        batch["images"] = [(crops.to(dtype), glob.to(dtype)) for crops, glob in batch.get("images", [])]
        return batch

    def compact(self, batch: dict[str, Any]) -> dict[str, Any]:
        from .transport import compact

        return compact(batch) if batch["texts"] else batch  # (every sample skipped: no pixels)

    def expand(self, batch: dict[str, Any]) -> dict[str, Any]:
        from .transport import expand

        return expand(batch) if batch["texts"] else batch

    def decoder_parts(self, model: Any) -> Any:
        from ...fast.decode import decoder_parts

        return decoder_parts(model)

    def export(self, source: Any, out_dir: str, dtype: str, trust_remote_code: bool, revision: str | None,
               max_shard_size: str) -> None:  # fmt: skip
        from .export import export

        export(source, out_dir, dtype, trust_remote_code, revision, max_shard_size)


FAMILY = V1()
