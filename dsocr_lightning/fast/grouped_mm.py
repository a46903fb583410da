"""Grouped matmuls for mixture-of-experts layers: tokens sorted by expert, one kernel per projection.

Shapes: T tokens, K experts per token, N = T*K (token, expert) assignments, E experts, r LoRA rank.
`torch._grouped_mm(x [N, in], w [E, in, out], offs [E])` multiplies rows offs[e-1]:offs[e] of x by w[e]; on an
H100 in bf16 it is one CUTLASS kernel whatever the split, elsewhere ATen's fallback runs it (CPU: per group). Where
it has no fused kernel, this project's Triton kernels (`triton_grouped.py`) take its place: `choose_kernel` decides
once per run which one the experts run, and says why. Every function here has a plain per-expert reference that it
must equal (tests compare them).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class Routing:
    """Where each assignment goes: `order` sorts the N flat (token, k) assignments by expert; `offs` ends groups."""

    order: torch.Tensor  # [N] long: flat assignment index, expert-major
    offs: torch.Tensor  # [E] int32: cumulative assignment counts per expert
    tokens: torch.Tensor  # [N] long: the token each sorted assignment reads (order // K)
    counts: torch.Tensor  # [E] long: assignments per expert


def route(topk_ids: torch.Tensor, num_experts: int) -> Routing:
    """Sort the [T, K] expert choices by expert (stable, so equal experts keep token order, as argsort in the loop)."""
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    # a scatter, not bincount: bincount on CUDA reads the largest id back (a sync, and no CUDA graph capture)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = counts.cumsum(0).to(torch.int32)
    return Routing(order, offs, order // topk_ids.shape[1], counts)


GroupedKernel = Literal["auto", "native", "triton", "loop"]


@dataclass(frozen=True)
class KernelChoice:
    """Which grouped matmul the experts run (`native`: torch._grouped_mm, `triton`: fast/triton_grouped.py, `loop`:
    transformers' per-expert loop) and why, decided once per run from the setting, device and compute dtype."""

    name: str
    why: str


def native_runs_fused(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm is one CUTLASS kernel on Hopper or newer in bf16; elsewhere on a GPU ATen's fallback runs a
    matmul per group after reading the group sizes back (a sync a call: slower than the loop, no CUDA graph)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 and dtype == torch.bfloat16


def triton_blocker(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot run here, or None. On the CPU they run only under Triton's interpreter (tests)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type == "cpu":
        return None if os.environ.get("TRITON_INTERPRET") == "1" else "Triton kernels need an NVIDIA GPU"
    if device.type != "cuda" or torch.version.hip:
        return f"Triton kernels here are written for NVIDIA GPUs, not {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (7, 5):
        return f"compute capability {capability[0]}.{capability[1]} is below Turing's 7.5"
    if dtype == torch.bfloat16 and capability < (8, 0):
        return "bfloat16 needs Ampere (8.0) or newer"
    return None


def choose_kernel(setting: GroupedKernel, device: torch.device, dtype: torch.dtype) -> KernelChoice:
    """`auto`: the native kernel where it is one fused kernel (and on the CPU, where ATen's per-group loop is what
    tests and CPU runs use), else Triton on NVIDIA GPUs from Turing on, else the loop. An explicit choice that
    cannot run here is refused (ValueError), never swapped for another."""
    where = f"{device.type} {str(dtype).removeprefix('torch.')}"
    if setting == "loop":
        return KernelChoice("loop", "fast.grouped_experts loop")
    native = hasattr(torch, "_grouped_mm")
    if setting == "native" and not native:
        raise ValueError(f"fast.grouped_experts native: torch {torch.__version__} has no _grouped_mm (2.9+)")
    fused = device.type == "cpu" or native_runs_fused(device, dtype)
    if setting == "native" or (setting == "auto" and native and fused):
        slow = "" if fused else " (ATen's per-group fallback, slower than the Triton kernels here)"
        return KernelChoice("native", f"torch._grouped_mm on {where}{slow}")
    blocked = triton_blocker(device, dtype)
    if setting == "triton" and blocked:
        raise ValueError(f"fast.grouped_experts triton: {blocked}")
    if blocked:
        return KernelChoice("loop", f"no fused grouped matmul on {where}: {blocked}")
    return KernelChoice("triton", f"Triton grouped matmuls on {where}")


def kernel_matmul(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The grouped matmul `x [N, in] sorted by expert, weight [E, out, in], offs -> [N, out]` of a kernel."""
    if name == "triton":
        from .triton_grouped import grouped_mm as triton_mm

        return lambda x, weight, offs: triton_mm(x, weight, offs, True)
    return grouped_mm


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


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, lora: LoraStack | None,
                   mm: Callable = grouped_mm) -> torch.Tensor:  # fmt: skip
    """Base projection + LoRA for every expert at once, in the dtypes peft's Linear uses (never W + BA); `mm` is the
    run's grouped matmul (`kernel_matmul`)."""
    base_dtype = compute_dtype(x, weight.dtype)
    out = mm(x.to(base_dtype), weight.to(base_dtype), offs)
    if lora is None:
        return out
    lora_dtype = compute_dtype(x, lora.a.dtype)  # peft multiplies in the adapter's dtype (float32) unless autocast
    low = mm(lora.dropout(x.to(lora_dtype)), cast_weight(lora.a, lora_dtype), offs)  # [N, r]
    return (out + mm(low, cast_weight(lora.b, lora_dtype), offs) * lora.scale).to(base_dtype)


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
