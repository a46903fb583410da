"""Grouped experts with LoRA for DeepSeek-OCR 2's fused 3-D experts (transformers' `DeepseekOcr2TextExperts`).

PEFT adapts a 3-D expert parameter through a parametrization: every forward rebuilds the whole adapted stack,
W + s * B @ A ([E, out, in] for all 64 experts, ~0.3 GB a layer at full size in bf16), and transformers' kernel then
multiplies by it. Here the same LoRA weights (PEFT's own parameters, PEFT's names: adapters and checkpoints do not
change) are applied the way peft applies a Linear's, y = x W_e^T + s * (x A_e^T) B_e^T, with the grouped matmuls
v1's experts run (`fast/grouped_mm.py`: tokens sorted by expert, one kernel per projection, torch's or Triton's).

PEFT's layout for an adapted [E, out, in] parameter (its `_did_swap_in_out_features`): lora_A.weight [E * r, in]
is A [E, r, in] row-major (read as a view); lora_B.weight [out, r * E] holds B_e[:, j] at column j * E + e (its
columns are gathered expert-major each forward: r * E columns, a few MB).
The reference it must equal is PEFT's own forward (the wrapper's class `forward`): tests/v2/test_experts_v2.py.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from ...fast.grouped_mm import LoraStack, combine, grouped_linear, kernel_matmul, route


@dataclass
class ExpertProjection:
    """One 3-D weight of the experts module and the PEFT wrapper that adapts it (None: not adapted)."""

    name: str  # gate_up_proj | gate_proj | up_proj | down_proj
    wrapper: nn.Module | None


def unwrap(experts: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(the experts module under PEFT's nested ParamWrappers, {parameter name: its wrapper})."""
    wrappers = {}
    while hasattr(experts, "parameter_name") and hasattr(experts, "base_layer"):
        wrappers[experts.parameter_name] = experts
        experts = experts.base_layer
    return experts, wrappers


def projections(experts: nn.Module) -> list[ExpertProjection]:
    """The projections a (wrapped) experts module computes, in order: gate and up (fused or split), then down."""
    base, wrappers = unwrap(experts)
    names = ["gate_up_proj"] if "gate_up_proj" in base._parameters else ["gate_proj", "up_proj"]
    for wrapper in wrappers.values():
        if not getattr(wrapper, "_did_swap_in_out_features", False):
            raise TypeError(f"{wrapper.parameter_name}: PEFT reads it as [E, in, out]; expected transformers' "
                            "[E, out, in]")  # fmt: skip
    return [ExpertProjection(name, wrappers.get(name)) for name in [*names, "down_proj"]]


def adapter_of(wrapper: nn.Module) -> str | None:
    """The wrapper's one active adapter (None: none active; TypeError: several)."""
    adapters = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
    if len(adapters) > 1:
        raise TypeError("grouped experts support one active LoRA adapter")
    return adapters[0] if adapters else None


def lora_stack(wrapper: nn.Module | None) -> LoraStack | None:
    """The wrapper's one active adapter as A [E, r, in], B [E, out, r]; None where peft would apply none."""
    if wrapper is not None and wrapper.disable_adapters and wrapper.merged:
        wrapper.unmerge()  # what peft's own forward does: adapters off means the base weights
    if wrapper is None or wrapper.disable_adapters or wrapper.merged or (adapter := adapter_of(wrapper)) is None:
        return None
    experts = wrapper.num_experts
    if wrapper.lora_B[adapter].weight.shape[1] != wrapper._expert_major.numel():
        raise TypeError(f"grouped experts were set up for another LoRA rank than adapter {adapter!r}'s; patch again")
    a = wrapper.lora_A[adapter].weight.view(experts, -1, wrapper.in_features)
    # B's columns gathered expert-major: [out, E * r], read as B_e [E, out, r] (row stride E * r, unit column stride)
    b = wrapper.lora_B[adapter].weight[:, wrapper._expert_major].view(wrapper.out_features, experts, -1)
    return LoraStack(a, b.transpose(0, 1), float(wrapper.scaling[adapter]), nn.Identity())


def expert_major_columns(rank: int, experts: int) -> torch.Tensor:
    """For column e * r + j of an expert-major B, its column in PEFT's B [out, r * E] (B_e[:, j] at j * E + e). A
    gather, not `.permute(...).contiguous()`: compiled, inductor gave that copy the permuted strides (it follows its
    input's order), which the grouped matmul refuses (measured: torch 2.11 on an H200, 2.13 on a CPU)."""
    return (torch.arange(experts)[:, None] + torch.arange(rank)[None, :] * experts).reshape(-1)


def grouped_experts(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Drop-in for the experts' forward: hidden [T, H], top_k_index / top_k_weights [T, K] -> [T, H]."""
    base, parts, mm = module._grouped_base, module._grouped_projections, module._grouped_mm
    routing = route(top_k_index, base.num_experts)
    x = hidden[routing.tokens]  # [N, H], sorted by expert

    def project(inputs: torch.Tensor, part: ExpertProjection) -> torch.Tensor:
        return grouped_linear(inputs, base._parameters[part.name], routing.offs, lora_stack(part.wrapper), mm)

    if len(parts) == 2:  # fused gate_up_proj [E, 2I, H]
        gate, up = project(x, parts[0]).chunk(2, dim=-1)
    else:
        gate, up = project(x, parts[0]), project(x, parts[1])
    down = project(base.act_fn(gate) * up, parts[-1])
    return combine(down, routing, top_k_weights).to(hidden.dtype)


def is_moe_block(module: nn.Module) -> bool:
    """A DeepSeek-OCR 2 MoE block: a router (`gate`) and fused 3-D `experts`, PEFT-wrapped or not."""
    experts = getattr(module, "experts", None)
    if experts is None or not hasattr(module, "gate"):
        return False
    base, _ = unwrap(experts)
    return isinstance(base._parameters.get("down_proj"), nn.Parameter) and base.down_proj.dim() == 3


def patch_grouped_experts(model: nn.Module, kernel: str) -> int:
    """Run the experts of every MoE block of `model` as grouped matmuls on `kernel` (`native` or `triton`); the
    block records its kernel (`_grouped_kernel`, what fast/compiled_layers.py reads). Returns the block count."""
    blocks = [m for m in model.modules() if is_moe_block(m)]
    for block in blocks:
        experts = block.experts
        experts.__dict__["_grouped_base"] = unwrap(experts)[0]  # (not as a submodule: no second name in state_dict)
        experts._grouped_projections = projections(experts)
        experts._grouped_mm = kernel_matmul(kernel)
        for wrapper in (part.wrapper for part in experts._grouped_projections if part.wrapper is not None):
            rank = next(iter(wrapper.lora_B.values())).weight.shape[1] // wrapper.num_experts
            columns = expert_major_columns(rank, wrapper.num_experts).to(block.gate.weight.device)
            wrapper.register_buffer("_expert_major", columns, persistent=False)  # (moves with the model)
        experts.forward = types.MethodType(grouped_experts, experts)
        block._grouped_kernel = kernel
    return len(blocks)
