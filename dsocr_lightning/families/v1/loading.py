"""Load DeepSeek-OCR (v1) with LoRA through its checkpoint's remote code: on Unsloth (GPU) or plain transformers +
peft; its adapters, its tokenizer, and the fast paths patched onto it (`fast/`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from ...fast import KernelChoice, apply_fast_paths, expert_kernel
from ...training.checks import check_adapter, check_model_source, check_trust
from ...training.loading import LoadSettings, LoraSettings, absolute_source, resolve_dtype, unsloth_available
from ...training.preimport import choose_backend


def load(settings: LoadSettings, lora: LoraSettings, data_parallel: bool, device: torch.device,
         compute_dtype: torch.dtype, plan: Any) -> tuple[Any, Any, str]:  # fmt: skip
    """(peft model, tokenizer, backend): the run `plan`'s backend, decided here by the same rule where it has none."""
    require_trust(settings)
    check_model_source(settings.model_name_or_path, settings.revision)
    settings = replace(settings, model_name_or_path=absolute_source(settings.model_name_or_path))
    backend = plan.backend if plan and plan.backend else resolve_backend(settings, data_parallel, device, compute_dtype)
    loader = load_with_unsloth if backend == "unsloth" else load_with_transformers
    try:
        model, tokenizer = loader(settings, lora, resolve_dtype(settings.dtype))
    except OSError as error:  # hub id unknown, offline, gated: transformers' message is long and indirect
        raise OSError(
            f"could not load {settings.model_name_or_path!r}: {error}\nOffline or behind a proxy? Download it "
            "where there is a network (huggingface_hub.snapshot_download) and pass the folder."
        ) from error
    return model, tokenizer, backend


def fast_paths(model: Any, settings: LoadSettings, backend: str, device: torch.device, compute_dtype: torch.dtype,
               plan: Any) -> None:  # fmt: skip
    """The fast paths of `fast/` (the experts on the plan's kernel), logged; none on Unsloth."""
    if backend == "unsloth":  # its compiled decoder layers may not call the patched methods: leave them as built
        rank_zero_info("fast paths: not applied on the Unsloth backend (its compiled layers are left as it built them)")
        return
    kernel = KernelChoice(plan.experts, "the run's plan") if plan and plan.experts else None
    apply_fast_paths(model, settings.fast, device, compute_dtype, kernel)


def resolve_backend(settings: LoadSettings, data_parallel: bool, device: torch.device, dtype: torch.dtype) -> str:
    """preimport.choose_backend for these settings on `device` computing in `dtype` (logged)."""
    kernel = expert_kernel(settings.fast, device, dtype).name
    chosen, why = choose_backend(settings.backend, settings.load_in_4bit, data_parallel, kernel,
                                 torch.cuda.is_available(), unsloth_available())  # fmt: skip
    rank_zero_info(f"backend {settings.backend} -> {chosen} ({why})")
    return chosen


def require_trust(settings: LoadSettings) -> None:
    check_trust(settings.trust_remote_code, settings.model_name_or_path)


def load_adapter_weights(model: Any, adapter_path: str) -> None:
    """Put a saved PEFT adapter's weights into the freshly made LoRA layers (the same code path for both
    backends); its rank and targets must be the ones configured."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = model.peft_config["default"]
    check_adapter(adapter_path, config.r, list(config.target_modules))  # the CLI's preflight check, for every caller
    result = set_peft_model_state_dict(model, load_file(Path(adapter_path) / "adapter_model.safetensors"))
    if result.unexpected_keys:
        raise ValueError(f"adapter {adapter_path} has weights the model lacks: {result.unexpected_keys[:5]}")
    rank_zero_info(f"loaded LoRA adapter weights from {adapter_path}")


def peft_config(lora: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.use_rslora,
        bias="none",
    )


def load_with_transformers(settings: LoadSettings, lora: LoraSettings, dtype: torch.dtype) -> tuple[Any, Any]:
    """AutoModel with the checkpoint's remote code, peft LoRA, non-reentrant gradient checkpointing."""
    from peft import get_peft_model
    from transformers import AutoModel, AutoTokenizer

    if lora.loftq_config is not None:
        raise ValueError("loftq_config is supported on the Unsloth backend only")
    common = {"trust_remote_code": True, "revision": settings.revision}
    tokenizer = AutoTokenizer.from_pretrained(settings.model_name_or_path, **common)
    model = AutoModel.from_pretrained(settings.model_name_or_path, dtype=dtype, use_safetensors=True, **common)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    torch.manual_seed(lora.random_state)  # adapter init seeded like Unsloth's random_state
    return get_peft_model(model, peft_config(lora)), tokenizer


def load_with_unsloth(settings: LoadSettings, lora: LoraSettings, dtype: torch.dtype) -> tuple[Any, Any]:
    """FastVisionModel with the recipe's arguments (Unsloth is imported before transformers here)."""
    import unsloth  # noqa: F401  (patches transformers/peft; must come first)
    from transformers import AutoModel
    from unsloth import FastVisionModel

    model, tokenizer = FastVisionModel.from_pretrained(
        settings.model_name_or_path,
        load_in_4bit=settings.load_in_4bit,
        auto_model=AutoModel,
        trust_remote_code=True,
        unsloth_force_compile=settings.unsloth_force_compile,
        use_gradient_checkpointing="unsloth" if settings.gradient_checkpointing else False,
        dtype=dtype,
        revision=settings.revision,
    )
    model = FastVisionModel.get_peft_model(
        model,
        target_modules=list(lora.target_modules),
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias="none",
        random_state=lora.random_state,
        use_rslora=lora.use_rslora,
        loftq_config=lora.loftq_config,
    )
    FastVisionModel.for_training(model)
    return model, tokenizer


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The checkpoint's tokenizer alone (no weights): what the data module's collator needs."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
