"""Grouped experts for DeepSeek-V2 MoE layers (transformers' `DeepseekV2MoE`, what DeepSeek-OCR's code builds).

transformers' `moe` loops over the 64 experts in Python: per layer ~64 x 9 small matmuls with LoRA (base, A, B for
gate/up/down), a GPU->CPU sync per expert, and the same again in backward: a training micro-batch launched ~54,000
kernels and kept an H100 busy 5 % of the time. Here each layer runs its experts as 3 x 3 grouped matmuls
(`grouped_mm.py`: torch's `_grouped_mm` or the Triton kernels of `triton_grouped.py`, chosen once per run) over tokens
sorted by expert, training and decoding alike.

Layout. Each projection's frozen base weights are stacked once into [E, out, in] and every expert's weight
becomes a view of that stack; the LoRA A/B weights likewise become views of one trainable [E, r, in] / [E, out, r]
parameter per projection, registered on the MoE module as `stacked_<proj>_A/B` (no "lora_" in the name). The
optimizer, gradient clipping and checkpoints see ~66 stacked tensors instead of ~4,200, and the per-expert
parameters (frozen views) are what peft saves: adapters keep the PEFT layout, one LoRA pair per expert projection.
A device move or a `param.data = ...` elsewhere breaks the views; every call checks them and rebinds (logged).
The reference it must equal is the original loop, `type(layer).moe(layer, ...)`: tests/test_fast_moe.py.
"""

from __future__ import annotations

import logging
import re
import types
from dataclasses import dataclass

import torch
from torch import nn

from .grouped_mm import LoraStack, combine, grouped_linear, kernel_matmul, route

log = logging.getLogger(__name__)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
STACKED_NAME = re.compile(r"^(?P<layer>.*)\.stacked_(?P<proj>gate_proj|up_proj|down_proj)_(?P<side>[AB])$")
PICKS = "expert_picks"  # per MoE layer: a gradient-only record of the experts a step's tokens picked (RecordPicks)


@dataclass
class ProjectionStack:
    """One projection of all experts: the per-expert (peft) Linears and the stacked tensors they view."""

    linears: list[nn.Module]
    weight: torch.Tensor  # [E, out, in], frozen
    a: nn.Parameter | None  # [E, r, in]
    b: nn.Parameter | None  # [E, out, r]
    adapter: str | None


def base_linear(linear: nn.Module) -> nn.Module:
    """The frozen Linear under a peft LoRA layer, or `linear` itself when it is not wrapped."""
    return getattr(linear, "base_layer", linear)


def lora_adapter(linear: nn.Module) -> str | None:
    """The one plain LoRA adapter of a peft Linear (None for a plain Linear); anything else is refused."""
    base = base_linear(linear)
    if not isinstance(base, nn.Linear) or base.bias is not None:
        raise TypeError(f"unsupported expert projection {type(linear).__name__}")
    if not hasattr(linear, "lora_A"):
        return None
    adapters = [a for a in linear.active_adapters if a in linear.lora_A]
    if len(adapters) > 1 or any(linear.use_dora.get(a, False) for a in adapters) or linear.lora_variant:
        raise TypeError("grouped experts support one plain LoRA adapter (no DoRA or variants)")
    return adapters[0] if adapters else None


def lora_weights(linear: nn.Module, adapter: str) -> tuple[nn.Parameter, nn.Parameter]:
    return linear.lora_A[adapter].weight, linear.lora_B[adapter].weight


def bind_views(stacked: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Make each parameter's data its slice of `stacked` (same storage: in-place updates show on both sides)."""
    for index, param in enumerate(params):
        param.data = stacked[index]


def build_stack(module: nn.Module, name: str) -> ProjectionStack:
    """Stack projection `name` of every expert of `module` and rebind the experts to views of the stack."""
    linears = [getattr(expert, name) for expert in module.experts]
    adapters = {lora_adapter(linear) for linear in linears}
    if len(adapters) != 1:
        raise TypeError(f"experts of one layer disagree on their LoRA adapters: {adapters}")
    adapter = adapters.pop()
    bases = [base_linear(linear).weight for linear in linears]
    weight = torch.stack([p.data for p in bases])
    bind_views(weight, bases)
    a = b = None
    if adapter is not None:
        a, b = (stacked_parameter(module, f"stacked_{name}_{side}", [lora_weights(lin, adapter)[i] for lin in linears])
                for i, side in enumerate("AB"))  # fmt: skip
    return ProjectionStack(linears, weight, a, b, adapter)


def stacked_parameter(module: nn.Module, attr: str, params: list[nn.Parameter]) -> nn.Parameter:
    """One parameter holding `params` stacked (trainable if they were); they become its frozen views. Reuses the
    registered parameter when there is one, so an optimizer that already holds it keeps it."""
    data = torch.stack([p.data for p in params])
    stacked = getattr(module, attr, None)
    if stacked is None:
        stacked = nn.Parameter(data, requires_grad=params[0].requires_grad)
        module.register_parameter(attr, stacked)
    else:
        stacked.data = data
    bind_views(stacked.data, params)
    for param in params:
        param.requires_grad_(False)
    return stacked


def is_bound(stack: ProjectionStack) -> bool:
    """Do the first and last experts still view the stacked tensors (a cheap check, run every call)?"""
    ends = [stack.linears[0], stack.linears[-1]]
    pairs = [(stack.weight, [base_linear(lin).weight for lin in ends])]
    if stack.adapter is not None:
        a_ends, b_ends = zip(*(lora_weights(lin, stack.adapter) for lin in ends))
        pairs += [(stack.a, a_ends), (stack.b, b_ends)]
    return all(
        first.data_ptr() == st.data_ptr() and last.data_ptr() == st[-1].data_ptr() and last.device == st.device
        for st, (first, last) in pairs
    )


def lora_stack(stack: ProjectionStack) -> LoraStack | None:
    """The adapter as peft would apply it now: none when disabled, merged into the base, or absent."""
    first = stack.linears[0]
    if stack.adapter is None or getattr(first, "disable_adapters", False) or getattr(first, "merged", False):
        return None
    dropout = first.lora_dropout[stack.adapter]
    return LoraStack(stack.a, stack.b, float(first.scaling[stack.adapter]), dropout)


class RecordPicks(torch.autograd.Function):
    """The router weights unchanged; in backward, `picks` gets the rows each expert took, whatever the loss. Summed
    over a step's micro-batches (and over ranks by DDP), `picks.grad` says which experts the step's tokens picked:
    the reference's expert that no token picked has no gradient, and its optimizer skips it (optim.py)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, picks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(counts)
        return weights.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (counts,) = ctx.saved_tensors
        return grad, counts.to(torch.float32), None


def grouped_moe(module: nn.Module, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weight: torch.Tensor):
    """Drop-in for `DeepseekV2MoE.moe`: hidden [T, H], topk_ids / topk_weight [T, K] -> [T, H]."""
    # compiled code cannot read storage pointers: compiled layers check the binding before their call instead
    stacks = module._grouped_stacks if torch.compiler.is_compiling() else ensure_bound(module)
    routing = route(topk_ids, len(module.experts))
    picks = getattr(module, PICKS, None)
    if picks is not None and torch.is_grad_enabled():
        topk_weight = RecordPicks.apply(topk_weight, picks, routing.counts)
    x = hidden[routing.tokens]  # [N, H], sorted by expert
    mm = module._grouped_mm
    gate, up = (grouped_linear(x, s.weight, routing.offs, lora_stack(s), mm) for s in stacks[:2])
    act = module.experts[0].act_fn(gate) * up  # [N, moe_intermediate]
    down = grouped_linear(act, stacks[2].weight, routing.offs, lora_stack(stacks[2]), mm)
    return combine(down, routing, topk_weight).to(hidden.dtype)


def ensure_bound(module: nn.Module) -> list[ProjectionStack]:
    stacks = module._grouped_stacks
    if not all(is_bound(stack) for stack in stacks):
        log.info("grouped experts: rebinding %s after a device or data change", type(module).__name__)
        module._grouped_stacks = stacks = [build_stack(module, name) for name in PROJECTIONS]
    return stacks


def is_moe_layer(module: nn.Module) -> bool:
    """A DeepSeek-V2-style MoE block: routed `experts` with gate/up/down projections and a `moe` method."""
    experts = getattr(module, "experts", None)
    return isinstance(experts, nn.ModuleList) and hasattr(type(module), "moe") and len(experts) > 0


def runs_grouped(layer: nn.Module) -> bool:
    """Has `patch_grouped_experts` switched this MoE layer (its instance `moe` shadows the class's loop)?"""
    return "moe" in vars(layer)


def moe_blocks(layers: list[nn.Module]) -> list[nn.Module]:
    """The MoE blocks (`mlp`) of these decoder layers."""
    return [layer.mlp for layer in layers if is_moe_layer(getattr(layer, "mlp", None))]


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """Every MoE block of `model`."""
    return [m for m in model.modules() if is_moe_layer(m)]


def looped_expert_layers(model: nn.Module) -> int:
    """MoE layers that run transformers' per-expert loop with trainable expert weights: an expert no token picked
    in a micro-batch gets no gradient there (the grouped layers' stacked weights always get one)."""
    return sum(
        not runs_grouped(layer) and any(p.requires_grad for p in layer.experts.parameters())
        for layer in moe_layers(model)
    )


def patch_grouped_experts(model: nn.Module, kernel: str = "native") -> int:
    """Switch every MoE layer of `model` to grouped experts on `kernel` (`native` or `triton`, grouped_mm.py's
    choice); returns how many were switched."""
    layers = moe_layers(model)
    for layer in layers:
        layer._grouped_mm = kernel_matmul(kernel)
        if not runs_grouped(layer):
            layer._grouped_stacks = [build_stack(layer, name) for name in PROJECTIONS]
            layer.moe = types.MethodType(grouped_moe, layer)
            if any(stack.a is not None and stack.a.requires_grad for stack in layer._grouped_stacks):
                device = layer._grouped_stacks[0].weight.device
                layer.register_parameter(PICKS, nn.Parameter(torch.zeros(len(layer.experts), device=device)))
        layer._grouped_kernel = kernel  # once switched (fast/layout.py's block_kernel reads it)
    return len(layers)


def is_picks(name: str) -> bool:
    """Is this parameter name a MoE layer's record of picked experts (trained by nobody, saved nowhere)?"""
    return name == PICKS or name.endswith(f".{PICKS}")


def grouped_kernel(layer: nn.Module) -> str | None:
    """The grouped matmul a switched MoE layer runs (`native`, `triton`), None for transformers' loop."""
    return getattr(layer, "_grouped_kernel", None) if runs_grouped(layer) else None


def expert_lora_views(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """For each stacked LoRA parameter (its name in `model`), the per-expert peft parameters it serves, in expert
    order: the tensors the reference trains, frozen views of the stack here."""
    views = {}
    for name, layer in model.named_modules():
        if not runs_grouped(layer):
            continue
        for proj, stack in zip(PROJECTIONS, layer._grouped_stacks):
            for index, side in enumerate("AB" if stack.adapter is not None else ""):
                views[f"{name}.stacked_{proj}_{side}".lstrip(".")] = [
                    lora_weights(linear, stack.adapter)[index] for linear in stack.linears
                ]
    return views


def per_expert_state_dict(state: dict[str, torch.Tensor], adapter: str = "default") -> dict[str, torch.Tensor]:
    """Weights as a checkpoint of a grouped model holds them, with each stacked [E, ...] LoRA tensor split back into
    PEFT's per-expert names (`<layer>.experts.<e>.<proj>.lora_<A|B>.<adapter>.weight`): what a plain peft model
    loads."""
    out = {}
    for key, value in state.items():
        match = STACKED_NAME.match(key)
        if match is None:
            out[key] = value
            continue
        layer, proj, side = match["layer"], match["proj"], match["side"]
        for expert, weight in enumerate(value.unbind(0)):
            out[f"{layer}.experts.{expert}.{proj}.lora_{side}.{adapter}.weight"] = weight.clone()
    return out
