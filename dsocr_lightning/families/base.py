"""What a model family supplies: everything that differs between DeepSeek-OCR versions, behind one interface.

Shared code (the LightningModule, the DataModule, the CLI, export) holds a `Family` and asks it; it never asks which
version runs. A family's package imports nothing heavy when it is imported (Unsloth must come before transformers):
each method imports what it needs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class LoadedModel(NamedTuple):
    """What a family's loader gives the LightningModule, and what the family decides about its loss."""

    model: Any  # the peft model
    text_side: Any  # tokenizer (v1) or processor (v2)
    backend: str
    step_token_loss: bool  # the forward takes HF's loss keyword arguments (`num_items_in_batch`), so HF Trainer
    # normalises each optimizer step's loss by the label tokens of all its micro-batches, and so does this project
    version: str


class Family:
    """One DeepSeek-OCR version. Subclasses set the class attributes and implement the methods that raise here."""

    version: str = ""  # the name settings, checkpoints and logs use: v1, v2, ...
    install: str = ""  # how to install the environment this family runs in
    checkpoints: str = ""  # the public checkpoints of this family, for messages
    forward_keys: tuple[str, ...] = ()  # what the model's forward takes of a collated batch
    pixel_keys: tuple[str, ...] = ()  # the batch's pixel tensors: they meet the vision tower in the weights' dtype
    step_token_loss: bool = False  # see LoadedModel
    ignores: tuple[str, ...] = ()  # `--model.*` settings (lora.*, fast.*) this family has no use for

    # ---- which checkpoints and environments are this family's (read before anything loads) -------------------
    def claims(self, config: dict[str, Any], where: str) -> bool:
        """Whether a checkpoint's config.json is this family's (ValueError: a near miss, with the fix)."""
        raise NotImplementedError

    def runs_here(self, transformers: tuple[int, int]) -> bool:
        """Whether the installed transformers (major, minor), not imported, runs this family."""
        raise NotImplementedError

    def owns_adapter(self, saved: dict[str, Any]) -> bool:
        """Whether an adapter_config.json alone says it is this family's (otherwise its base decides)."""
        return False

    # ---- before loading: plan and checks ---------------------------------------------------------------------
    def decide(self, model: Any, trainer: Any, gpu: bool, dtype: torch.dtype) -> Any:
        """The run plan (training.plan.RunPlan) for these settings on this machine."""
        raise NotImplementedError

    def preflight(self, model: Any) -> None:
        """Checks of the model settings (a mapping of `--model.*`) before anything loads (ConfigError)."""

    def check_files(self, name: str, folder: Any, config: dict[str, Any]) -> None:
        """Checks of a local checkpoint folder beyond config, weights and tokenizer (ConfigError)."""

    # ---- loading -----------------------------------------------------------------------------------------------
    def load(self, settings: Any, lora: Any, data_parallel: bool, device: torch.device, compute_dtype: torch.dtype,
             plan: Any) -> tuple[Any, Any, str]:  # fmt: skip
        """(peft model with fresh LoRA layers, text side, backend) of `settings.model_name_or_path`."""
        raise NotImplementedError

    def load_adapter_weights(self, model: Any, adapter_path: str) -> None:
        """A saved adapter's weights into the fresh LoRA layers (its rank and targets must match)."""
        raise NotImplementedError

    def after_load(self, model: Any, settings: Any, lora: Any, backend: str, device: torch.device,
                   compute_dtype: torch.dtype, plan: Any) -> None:  # fmt: skip
        """Fast paths and reports, once the LoRA weights are in place and float32."""

    def load_text_side(self, name_or_path: str, trust_remote_code: bool, revision: str | None) -> Any:
        """What the collator needs (no weights)."""
        raise NotImplementedError

    def tokenizer(self, text_side: Any) -> Any:
        """The text tokenizer of the text side (the tokenizer itself, or a processor's)."""
        return text_side

    def write_standin(self, folder: str) -> None:
        """TEST ONLY: a tiny random checkpoint of this family."""
        raise NotImplementedError

    # ---- batches -----------------------------------------------------------------------------------------------
    def collator(self, text_side: Any, **settings: Any) -> Any:
        """The family's data.batching.SampleCollator on `text_side`."""
        raise NotImplementedError

    def prompt_image_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The image arguments of `generate` for the batch's prompts."""
        raise NotImplementedError

    def global_views(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Each row's global view [3, B, B] in [-1, 1] (what TensorBoard shows)."""
        raise NotImplementedError

    def cast_pixels(self, batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """The batch with its pixel tensors in `dtype`."""
        for key in self.pixel_keys:
            if batch.get(key) is not None:
                batch[key] = batch[key].to(dtype)
        return batch

    def compact(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch as it travels from a DataLoader worker (data/travel.py); `expand` undoes it on the device."""
        return batch

    def expand(self, batch: dict[str, Any]) -> dict[str, Any]:
        return batch

    def forward(self, model: Any, inputs: dict[str, Any], batch: dict[str, Any]) -> Any:
        """The model's output on `inputs` (the `forward_keys` of `batch`, padded, with the module's options)."""
        return model(**inputs)

    def decoder_parts(self, model: Any) -> Any:
        """The parts the static-cache decoder (fast/decode.py) needs, or None: decode with `generate`."""
        return None

    # ---- export ------------------------------------------------------------------------------------------------
    def export(self, source: Any, out_dir: str, dtype: str, trust_remote_code: bool, revision: str | None,
               max_shard_size: str) -> None:  # fmt: skip
        """Merge the adapter of `source` (files.export.AdapterSource) into its base and write it to `out_dir`."""
        raise NotImplementedError
