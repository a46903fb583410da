"""Load DeepSeek-OCR (hub id or local folder) with LoRA, through Unsloth on a GPU or plain transformers + peft.

Both paths give a peft model whose only trainable weights are float32 LoRA adapters on the language model.
Heavy imports stay inside functions: Unsloth must be imported before transformers and peft when it is used.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from .checks import check_adapter, check_model_source, check_trust
from .fast import FastPaths, KernelChoice, apply_fast_paths, expert_kernel
from .fast.moe import is_picks
from .plan import RunPlan
from .preimport import choose_backend

log = logging.getLogger(__name__)

Backend = Literal["auto", "unsloth", "transformers"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# DeepSeek-OCR's remote-code forward takes no loss keyword arguments (`num_items_in_batch`): HF Trainer averages
# each micro-batch's mean loss there, and so does the module (versions.LoadedModel.step_token_loss).
TAKES_LOSS_KWARGS = False


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


def resolve_backend(settings: LoadSettings, data_parallel: bool, device: torch.device, dtype: torch.dtype) -> str:
    """preimport.choose_backend for these settings on `device` computing in `dtype` (logged)."""
    kernel = expert_kernel(settings.fast, device, dtype).name
    chosen, why = choose_backend(settings.backend, settings.load_in_4bit, data_parallel, kernel,
                                 torch.cuda.is_available(), unsloth_available())  # fmt: skip
    rank_zero_info(f"backend {settings.backend} -> {chosen} ({why})")
    return chosen


def resolve_dtype(dtype: DType) -> torch.dtype:
    """auto = bf16 where the GPU has it, fp16 on older GPUs (the T4), float32 on CPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def require_trust(settings: LoadSettings) -> None:
    check_trust(settings.trust_remote_code, settings.model_name_or_path)


def load_model(
    settings: LoadSettings,
    lora: LoraSettings,
    data_parallel: bool = False,
    device: torch.device | None = None,
    compute_dtype: torch.dtype | None = None,
    plan: RunPlan | None = None,
) -> tuple[Any, Any, str]:
    """(peft model, tokenizer, backend used), trainable-parameter count and fast paths logged. `device` and
    `compute_dtype` (autocast's, when it differs from the weights') say where and how the model will compute; the
    run's `plan` says the backend and the expert kernel (decided here by the same rules where it does not)."""
    require_trust(settings)
    check_model_source(settings.model_name_or_path, settings.revision)
    settings = replace(settings, model_name_or_path=absolute_source(settings.model_name_or_path))
    compute_dtype = compute_dtype or resolve_dtype(settings.dtype)
    device = device or run_device()
    backend = plan.backend if plan and plan.backend else resolve_backend(settings, data_parallel, device, compute_dtype)
    loader = load_with_unsloth if backend == "unsloth" else load_with_transformers
    try:
        model, tokenizer = loader(settings, lora, resolve_dtype(settings.dtype))
    except OSError as error:  # hub id unknown, offline, gated: transformers' message is long and indirect
        raise OSError(
            f"could not load {settings.model_name_or_path!r}: {error}\nOffline or behind a proxy? Download it "
            "where there is a network (huggingface_hub.snapshot_download) and pass the folder."
        ) from error
    if settings.adapter_path:
        load_adapter_weights(model, settings.adapter_path)
    for param in model.parameters():  # LoRA weights train in float32 whatever the base dtype
        if param.requires_grad:
            param.data = param.data.float()
    trainable, total = count_parameters(model)
    rank_zero_info(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%) [{backend}]")
    if backend == "unsloth":  # its compiled decoder layers may not call the patched methods: leave them as built
        rank_zero_info("fast paths: not applied on the Unsloth backend (its compiled layers are left as it built them)")
    else:
        kernel = KernelChoice(plan.experts, "the run's plan") if plan and plan.experts else None
        apply_fast_paths(model, settings.fast, device, compute_dtype, kernel)
    return model, tokenizer, backend


def absolute_source(name_or_path: str) -> str:
    """A local folder as an absolute path, a hub id as it is. The saved adapter records this as its base
    (`base_model_name_or_path`), so that peft, Unsloth and `export` find the base from any working folder."""
    return str(Path(name_or_path).resolve()) if Path(name_or_path).is_dir() else name_or_path


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


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts. Frozen views of a trainable parameter (the per-expert LoRA weights of
    grouped experts, fast/moe.py) are that parameter, counted once; the grouped experts' records of picked experts
    are not weights."""
    params = [p for name, p in model.named_parameters() if not is_picks(name)]
    trainable = {p.untyped_storage().data_ptr() for p in params if p.requires_grad}
    views = sum(p.numel() for p in params if not p.requires_grad and p.untyped_storage().data_ptr() in trainable)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) - views


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


def set_inference(model: Any, backend: str, inference: bool) -> None:
    """Unsloth keeps separate training and inference set-ups; plain peft needs nothing but eval()/train()."""
    if backend != "unsloth":
        return
    from unsloth import FastVisionModel

    (FastVisionModel.for_inference if inference else FastVisionModel.for_training)(model)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The checkpoint's tokenizer alone (no weights): what the data module's collator needs."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
