"""LoRA for DeepSeek-OCR 2: name-matched Linears plus PEFT `target_parameters` for the fused 3-D experts.

transformers stores each MoE layer's 64 routed experts as two 3-D parameters (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]) with no per-expert Linear: a `target_modules` list alone silently leaves every routed
expert without an adapter. PEFT's `target_parameters` reaches them, with one rank-r pair per expert.

`experts: split` (default) gives each expert's gate, up and down projection its own rank-r pair, as v1's per-expert
Linears get (and so v1's 77,509,632 trainable at full size): the fused `gate_up_proj` is kept as two parameters
`gate_proj` / `up_proj` (views of its halves) that the module concatenates when it computes. `experts: fused` puts
one pair on `gate_up_proj` (gate and up share the A factor: fewer parameters) and leaves the model's layout alone,
so the adapter loads with plain PEFT on a stock transformers model.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import defaultdict
from typing import Any, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

ExpertsLayout = Literal["split", "fused"]
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERT_PARAMETERS: dict[str, list[str]] = {
    "split": ["experts.gate_proj", "experts.up_proj", "experts.down_proj"],
    "fused": ["experts.gate_up_proj", "experts.down_proj"],
}
LANGUAGE, ENCODER = r"model\.language_model\.layers", r"model\.vision_tower\.vision_encoder\.layers"


class SplitGateUp:
    """Mixin for a fused-experts module whose `gate_up_proj` is held as two parameters, `gate_proj` and `up_proj`:
    reading `gate_up_proj` concatenates them (PEFT's parametrisations included), so the module's own forward and
    transformers' `experts_implementation` kernels compute as before."""

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return torch.cat([self.gate_proj, self.up_proj], dim=1)


def is_fused_experts(module: nn.Module) -> bool:
    param = getattr(module, "_parameters", {}).get("gate_up_proj")
    return param is not None and param.dim() == 3 and getattr(module, "is_concatenated", True)


@functools.cache
def split_class(fused: type) -> type:
    """`fused` with `SplitGateUp` mixed in: one class for all the model's experts modules, as torch.compile guards on a
    module's class (a class per instance made it compile each MoE decoder layer anew and look each one up among the
    others' entries at every call)."""
    return type(fused.__name__, (SplitGateUp, fused), {"__module__": fused.__module__})


def split_experts(model: nn.Module) -> int:
    """Hold every fused `gate_up_proj` as `gate_proj` + `up_proj` (views of its halves, no copy); returns the count."""
    count = 0
    for module in list(model.modules()):
        if not is_fused_experts(module):
            continue
        fused = module._parameters.pop("gate_up_proj")
        half = fused.shape[1] // 2
        module.gate_proj = nn.Parameter(fused.data[:, :half], requires_grad=fused.requires_grad)
        module.up_proj = nn.Parameter(fused.data[:, half:], requires_grad=fused.requires_grad)
        module._fused_class = type(module)
        module.__class__ = split_class(type(module))
        count += 1
    return count


def fuse_experts(model: nn.Module) -> int:
    """Undo `split_experts` (after a merge): one `gate_up_proj` parameter again, the model's own class back."""
    count = 0
    for module in list(model.modules()):
        if not isinstance(module, SplitGateUp):
            continue
        fused = torch.cat([module._parameters.pop("gate_proj").data, module._parameters.pop("up_proj").data], dim=1)
        module.__class__ = module.__dict__.pop("_fused_class")
        module.gate_up_proj = nn.Parameter(fused, requires_grad=False)
        count += 1
    return count


def target_module_pattern(names: list[str] | tuple[str, ...], encoder: bool) -> str:
    """Regex (PEFT full-matches it) for the Linears named `names` to adapt: the language model's, and the Qwen2
    encoder's if asked. SAM's layers are named differently (qkv, lin1, lin2) and are never adapted."""
    scopes = f"({LANGUAGE}|{ENCODER})" if encoder else LANGUAGE
    return rf"{scopes}\.\d+\.(self_attn|mlp|mlp\.shared_experts)\.({'|'.join(names)})"


def peft_config(r: int, alpha: int, dropout: float, use_rslora: bool, experts: ExpertsLayout, encoder: bool,
                names: list[str] | tuple[str, ...] = LINEAR_NAMES) -> Any:  # fmt: skip
    """LoraConfig for a v2 model; expert parameters are matched by suffix, in the language model only."""
    from peft import LoraConfig

    if dropout:
        raise ValueError(
            f"lora.dropout {dropout}: PEFT's adapters on 3-D expert parameters (target_parameters) do not support "
            "dropout; use 0.0 (the reference recipe's value) for DeepSeek-OCR 2"
        )
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", use_rslora=use_rslora,
        target_modules=target_module_pattern(names, encoder), target_parameters=list(EXPERT_PARAMETERS[experts]),
    )  # fmt: skip


def apply_lora(model: nn.Module, config: Any, experts: ExpertsLayout) -> Any:
    """The PEFT model; with `split`, the fused experts are split first."""
    from peft import get_peft_model

    if experts == "split":
        split_experts(model)
    return get_peft_model(model, config)


GROUP_RULES = [
    ("vision_encoder", "Qwen2 encoder (attention + MLP)"),
    (r"experts\.(base_layer\.)*lora_", "routed experts (3-D, target_parameters)"),
    ("shared_experts", "shared experts"),
    ("self_attn", "language attention"),
    (r"mlp\.(gate|up|down)_proj", "dense MLP (layer 0)"),
]


def group_of(name: str) -> str:
    return next((group for pattern, group in GROUP_RULES if re.search(pattern, name)), "other")


def adapted_groups(model: nn.Module) -> dict[str, int]:
    """Trainable parameters per group of adapted weights (what `load_model` logs)."""
    groups: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[group_of(name)] += param.numel()
    return dict(groups)


def expert_coverage(model: nn.Module) -> tuple[int, int]:
    """(MoE layers whose routed experts carry LoRA, MoE layers): the check that no expert went without one."""
    from peft.tuners.lora import ParamWrapper

    layers = [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")]
    adapted = sum(isinstance(m.experts, ParamWrapper) for m in layers)
    return adapted, len(layers)


def groups_report(model: nn.Module) -> list[str]:
    lines = [f"LoRA {group}: {count:,} trainable" for group, count in adapted_groups(model).items()]
    adapted, total = expert_coverage(model)
    lines.append(f"LoRA routed experts reached in {adapted} of {total} MoE layers")
    if adapted < total:
        raise RuntimeError(f"LoRA reached the routed experts of {adapted} of {total} MoE layers only")
    return lines


def count_on_meta(config: Any, r: int = 16, alpha: int = 16, experts: ExpertsLayout = "split",
                  encoder: bool = False) -> tuple[int, dict[str, int]]:  # fmt: skip
    """(trainable, per group) for `config` with LoRA, built on the meta device: no weight is allocated."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
        peft_model = apply_lora(model, peft_config(r, alpha, 0.0, False, experts, encoder), experts)
    groups = adapted_groups(peft_model)
    return sum(groups.values()), groups
