"""Faster decoding for DeepSeek-V2 mixture-of-experts layers: every expert in one batched matmul.

transformers' `DeepseekV2MoE.moe` loops over the 64 experts in Python: per layer and per decode step that is
~64 x 9 small kernels (base + LoRA for gate/up/down) and 64 GPU->CPU syncs (`if num_tokens == 0`), so a decode
step is launch-bound (the GPU idles). With few tokens per call (decode: one per sequence) it is cheaper to run
all experts on all tokens in three batched matmuls and weight the results by the router: the arithmetic grows
by E/K (64/6) but stays tiny, and the launches drop to a handful. Calls with many tokens (prefill, training)
keep the original loop. Same function up to float rounding; used only under `torch.no_grad` (generation).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)
DENSE_MAX_TOKENS = 128  # tokens per MoE call up to which the dense path is used (decode steps)


def lora_parts(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
    """(base weight [out, in], LoRA A [r, in], LoRA B [out, r], scale) of a plain or peft-LoRA Linear."""
    base = getattr(linear, "base_layer", linear)
    if not isinstance(base, nn.Linear) or base.bias is not None:
        raise TypeError(f"unsupported projection {type(linear).__name__}")
    adapters = list(getattr(linear, "active_adapters", []) or [])
    if not adapters:
        return base.weight, None, None, 0.0
    if len(adapters) != 1 or getattr(linear, "use_dora", {}).get(adapters[0], False):
        raise TypeError("only one plain LoRA adapter is supported")
    name = adapters[0]
    if name not in linear.lora_A:
        return base.weight, None, None, 0.0
    return base.weight, linear.lora_A[name].weight, linear.lora_B[name].weight, float(linear.scaling[name])


def stacked_projection(experts: nn.ModuleList, name: str, x: torch.Tensor) -> torch.Tensor:
    """`name` projection of every expert: x [T, in] (the same tokens for all) or [E, T, in] -> [E, T, out]."""
    parts = [lora_parts(getattr(expert, name)) for expert in experts]
    weight = torch.stack([p[0] for p in parts])  # [E, out, in]
    x = x.expand(len(experts), *x.shape) if x.dim() == 2 else x  # a view, no copy
    out = torch.einsum("eti,eoi->eto", x.to(weight.dtype), weight)
    if parts[0][1] is not None:
        a, b = torch.stack([p[1] for p in parts]), torch.stack([p[2] for p in parts])  # [E, r, in], [E, out, r]
        low = torch.einsum("eti,eri->etr", x.to(a.dtype), a)
        out = out + (torch.einsum("etr,eor->eto", low, b) * parts[0][3]).to(out.dtype)
    return out


def dense_moe(module: nn.Module, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weight: torch.Tensor):
    """Drop-in for `DeepseekV2MoE.moe`: hidden [T, H], topk_ids/topk_weight [T, K] -> [T, H]."""
    if hidden.shape[0] > DENSE_MAX_TOKENS or torch.is_grad_enabled():
        return type(module).moe(module, hidden, topk_ids, topk_weight)
    experts = module.experts
    gate, up = stacked_projection(experts, "gate_proj", hidden), stacked_projection(experts, "up_proj", hidden)
    outputs = stacked_projection(experts, "down_proj", experts[0].act_fn(gate) * up)  # [E, T, H]
    routing = torch.zeros(hidden.shape[0], len(experts), dtype=topk_weight.dtype, device=hidden.device)
    routing.scatter_(1, topk_ids, topk_weight)  # [T, E], the router's weights at the chosen experts
    return torch.einsum("te,eth->th", routing, outputs.to(routing.dtype)).to(hidden.dtype)


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """Every DeepSeek-V2-style MoE block: routed `experts` of gate/up/down projections and a `moe` method."""
    found = []
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.ModuleList) and hasattr(type(module), "moe") and len(experts):
            try:
                for name in ("gate_proj", "up_proj", "down_proj"):
                    lora_parts(getattr(experts[0], name))
            except (TypeError, AttributeError) as why:
                log.info("dense MoE decoding not used for %s: %s", type(module).__name__, why)
                continue
            found.append(module)
    return found


@contextmanager
def dense_moe_decoding(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """While active, small MoE calls of `model` run all experts batched; yields how many layers were switched."""
    layers = [layer for layer in moe_layers(model) if "moe" not in vars(layer)] if enabled else []  # not nested
    for layer in layers:
        layer.moe = types.MethodType(dense_moe, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.moe
