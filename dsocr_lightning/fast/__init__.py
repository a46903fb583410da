"""Fast paths patched onto the loaded model (the public model code stays as it is).

- `moe.py` + `grouped_mm.py`: grouped experts with LoRA for every DeepSeek-V2 MoE layer of v1 (training and decoding;
  v2's fused experts: families/v2/experts.py on the same `grouped_mm.py`), on
  torch's `_grouped_mm` or the Triton kernels of `triton_grouped.py` (`choose_kernel`: once per run, logged);
- `vision.py`: the remote code's vision towers run batched (v1; transformers' v2 batches its views itself);
- `compiled_layers.py`: decoder layers compiled with `torch.compile` for training forwards;
- `layer_graphs.py`: ... replayed as CUDA graphs where gradient checkpointing is off;
- `frozen_graphs.py`: a frozen module's forward as CUDA graphs, one per input shape (v2's vision tower);
- `decode.py`: greedy decoding with a static KV cache, one CUDA graph replay a step (used by generation.py).
Each keeps the original as its reference; tests compare them. `apply_fast_paths` logs which paths run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .compiled_layers import compile_blocker, compile_layers
from .grouped_mm import GroupedKernel, KernelChoice, choose_kernel
from .layer_graphs import layer_graph_blocker
from .moe import patch_grouped_experts
from .vision import patch_batched_vision

log = logging.getLogger(__name__)


@dataclass
class FastPaths:
    """Which fast paths to patch onto the model after loading (both off = the original model code)."""

    # MoE experts as grouped matmuls, LoRA included: `native` (torch._grouped_mm: one kernel on Hopper in bf16),
    # `triton` (this project's kernels: NVIDIA GPUs from Turing on, fp16 and bf16), `loop` (transformers' per-expert
    # loop; v2: transformers' own experts kernel), `auto` (native where it is one kernel, else triton, else the loop;
    # logged). v1: fast/moe.py; v2: families/v2/experts.py
    grouped_experts: GroupedKernel = "auto"
    batched_vision: bool = True  # v1: SAM + CLIP over all views of a batch at once (v2: transformers does it)
    vision_chunk: int = 8  # views per batched vision call (bounds SAM's attention memory, ~0.4 GB a view)
    # decoder layers compiled (torch.compile, inductor) for training forwards, on one GPU with grouped experts
    # (elsewhere the log says why not): 1.2-1.6x the steps per second of the eager layers (benchmarks/README.md)
    compile_layers: bool = True
    # ... and replayed as CUDA graphs (forward and backward) where gradient checkpointing is off: a few CPU calls a
    # layer instead of a few dozen kernel launches. Batches are padded to a multiple of graph_pad_multiple tokens
    # (a graph holds one length)
    layer_graphs: bool = True
    graph_pad_multiple: int = 32
    # v2 only: run the fused experts on this transformers kernel (`eager`, `batched_mm`, `grouped_mm`) with PEFT's
    # LoRA instead of the grouped experts; null = the grouped experts (grouped_experts: loop = transformers' default)
    experts_implementation: str | None = None
    # v2: SAM's attention with its relative positions folded into queries and keys (attention without the [N, N]
    # bias it builds for every view; fast/rel_pos_attention.py). v1's remote code keeps its own (logged)
    fold_rel_pos: bool = True
    # v2: the frozen part of the vision tower (SAM, and the Qwen2 encoder unless lora.encoder) replayed as CUDA graphs
    # on a GPU, one per view count (fast/frozen_graphs.py; it runs without autograd either way). v1: not applicable
    vision_graphs: bool = True


def expert_kernel(paths: FastPaths, device: torch.device, dtype: torch.dtype) -> KernelChoice:
    """The grouped matmul the experts of a model computing in `dtype` on `device` will run (ValueError for an explicit
    choice that cannot run there)."""
    return choose_kernel(paths.grouped_experts, device, dtype)


def grouped_experts_line(model: nn.Module, choice: KernelChoice) -> str:
    if choice.name == "loop":
        return f"grouped experts: off, transformers' per-expert loop ({choice.why})"
    count = patch_grouped_experts(model, choice.name)
    return f"grouped experts: {count} MoE layers, {choice.name} kernel ({choice.why})"


def apply_fast_paths(model: nn.Module, paths: FastPaths, device: torch.device, dtype: torch.dtype,
                     kernel: KernelChoice | None = None) -> list[str]:  # fmt: skip
    """Patch `model` (the experts on `kernel`, the run's decision, else `expert_kernel`'s); returns (and logs) one
    line per path saying what runs."""
    lines = [grouped_experts_line(model, kernel or expert_kernel(paths, device, dtype))]
    if paths.batched_vision:
        found = patch_batched_vision(model, paths.vision_chunk)
        lines.append(f"batched vision: {'on' if found else 'not applicable (no SAM/CLIP towers)'}")
    lines.append(compiled_layers_line(model, paths, device, dtype))
    if paths.fold_rel_pos:
        lines.append("folded SAM relative positions: not applicable (v1's remote code keeps its own attention)")
    if paths.vision_graphs:
        lines.append("frozen vision graphs: not applicable (v1's remote code runs its towers itself, without autograd)")
    for line in lines:
        log.info("fast path: %s", line)
    return lines


def compiled_layers_line(model: nn.Module, paths: FastPaths, device: torch.device, dtype: torch.dtype) -> str:
    if not paths.compile_layers:
        return "compiled decoder layers: off (fast.compile_layers false; eager layers)"
    blocker = compile_blocker(model, device, dtype)
    if blocker:
        return f"compiled decoder layers: off ({blocker}; eager layers)"
    graph_blocked = layer_graph_blocker(model) if paths.layer_graphs else "fast.layer_graphs false"
    count = compile_layers(model, graphs=graph_blocked is None)
    line = f"compiled decoder layers: {count} layers, torch.compile (inductor) for training forwards"
    if graph_blocked is None:
        return f"{line}, as CUDA graphs (sequences padded to a multiple of {paths.graph_pad_multiple} tokens)"
    return f"{line}; CUDA graphs: off ({graph_blocked})"
