"""Grouped matmuls for mixture-of-experts layers: tokens sorted by expert, one kernel per projection.

Shapes: T tokens, K experts per token, N = T*K (token, expert) assignments, E experts, r LoRA rank.
`torch._grouped_mm(x [N, in], w [E, in, out], offs [E])` multiplies rows offs[e-1]:offs[e] of x by w[e]; on an
H100 in bf16 it is one CUTLASS kernel whatever the split, elsewhere ATen's fallback runs it (CPU: per group).
Every function here has a plain per-expert reference below it that it must equal (tests compare them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """Where each assignment goes: `order` sorts the N flat (token, k) assignments by expert; `offs` ends groups."""

    order: torch.Tensor  # [N] long: flat assignment index, expert-major
    offs: torch.Tensor  # [E] int32: cumulative assignment counts per expert
    tokens: torch.Tensor  # [N] long: the token each sorted assignment reads (order // K)


def route(topk_ids: torch.Tensor, num_experts: int) -> Routing:
    """Sort the [T, K] expert choices by expert (stable, so equal experts keep token order, as argsort in the loop)."""
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    # a scatter, not bincount: bincount on CUDA reads the largest id back (a sync, and no CUDA graph capture)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    return Routing(order, offs, order // topk_ids.shape[1])


def grouped_mm_kind(device: torch.device, dtype: torch.dtype) -> str:
    """How torch runs `_grouped_mm` here: `native` (one CUTLASS kernel: Hopper or newer, bf16), `cpu` (ATen's
    per-group loop, all dtypes: tests and CPU runs), or `slow` (ATen's per-group fallback on any other GPU or
    dtype: at T4 settings (float16) on an H100 it ran 0.42 samples/s, slower than transformers' loop)."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 and dtype == torch.bfloat16:
        return "native"
    return "slow"


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [N, in] sorted by expert, weight [E, out, in] (nn.Linear layout) -> [N, out]: x_e @ weight[e].T."""
    return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)


def grouped_mm_reference(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The same, one matmul per expert."""
    starts = [0, *offs.tolist()[:-1]]
    return torch.cat([x[s:e] @ weight[i].T for i, (s, e) in enumerate(zip(starts, offs.tolist()))])


@dataclass
class LoraStack:
    """One adapter over all experts of a projection: A [E, r, in], B [E, out, r], y += B(A(dropout(x))) * scale."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    dropout: nn.Module


def compute_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """What nn.Linear would multiply in here: autocast's dtype when autocast is on, else `fallback`."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else fallback


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, lora: LoraStack | None) -> torch.Tensor:
    """Base projection + LoRA for every expert at once, in the dtypes peft's Linear uses (never W + BA)."""
    base_dtype = compute_dtype(x, weight.dtype)
    out = grouped_mm(x.to(base_dtype), weight.to(base_dtype), offs)
    if lora is None:
        return out
    lora_dtype = compute_dtype(x, lora.a.dtype)  # peft multiplies in the adapter's dtype (float32) unless autocast
    low = grouped_mm(lora.dropout(x.to(lora_dtype)), cast_weight(lora.a, lora_dtype), offs)  # [N, r]
    return (out + grouped_mm(low, cast_weight(lora.b, lora_dtype), offs) * lora.scale).to(base_dtype)


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`. Outside autograd (decoding) the cast copy is kept on the weight while its storage and
    version stay the same: a decode step would otherwise re-cast every expert's A and B of every MoE layer (66 casts,
    ~0.4 GB of traffic a token at bf16 autocast). An in-place update (an optimizer step) bumps the version."""
    if weight.dtype == dtype or torch.is_grad_enabled():
        return weight.to(dtype)
    key = (dtype, weight.data_ptr(), weight._version)
    cached = getattr(weight, "_cast_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        weight._cast_cache = cached
    return cached[1]


def drop_cast_copies(model: nn.Module) -> None:
    """Free the kept cast copies of `cast_weight` (~0.14 GB for DeepSeek-OCR's adapters), e.g. back to training."""
    for param in model.parameters():
        if hasattr(param, "_cast_cache"):
            del param._cast_cache


def combine(sorted_out: torch.Tensor, routing: Routing, topk_weight: torch.Tensor) -> torch.Tensor:
    """Expert outputs [N, H] (sorted) -> [T, H]: back to (token, k) order, weighted by the router, summed over k in
    float32, cast back; the arithmetic of transformers' loop, so the results agree to rounding."""
    unsorted = torch.empty_like(sorted_out)
    unsorted[routing.order] = sorted_out
    weighted = unsorted.view(*topk_weight.shape, -1).to(topk_weight.dtype) * topk_weight.unsqueeze(-1)
    return weighted.sum(dim=1).to(sorted_out.dtype)
