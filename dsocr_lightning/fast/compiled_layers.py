"""Decoder layers compiled with `torch.compile` for training (regional compilation: one layer's code, reused by all).

A training micro-batch of the language model is ~600 small kernels a layer (LoRA on seven projections, rotary,
norms, routing, casts) dispatched one by one from Python, and as many autograd nodes in backward: on an H100 the
CPU, not the GPU, set the pace. Compiled, each layer's forward runs as a few fused kernels behind one call and its
backward as one autograd node. The layer code is the model's own (transformers' `DeepseekV2DecoderLayer` with
peft's LoRA and the grouped experts); `torch.compile` traces it, so the reference is the same layer run eagerly
(tests/test_compiled_layers.py compares outputs and every LoRA gradient).

A layer that checkpoints itself (transformers 5's `GradientCheckpointingLayer`) is checkpointed inside its compiled
region instead (`torch.utils.checkpoint` traced by dynamo: the backward graph recomputes the forward's activations),
not around it: transformers 5.17 checkpoints around the layer's call and, on an H100 with torch 2.11, the
recomputation then saved other tensors than the compiled forward had (torch's CheckpointError); 5.24 checkpoints
inside `forward`, which the compiled region would trace anyway. One way for both: the layer's own switch is turned
off and the compiled code checkpoints.

Only training forwards (module in train mode, autograd on) take the compiled path: evaluation and decoding run the
layers as they are (decoding captures its own CUDA graphs; fast/decode.py). The grouped experts' check that the
experts still view their stacked weights reads storage pointers, which compiled code cannot: it runs eagerly,
before each compiled call.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from .layout import block_kernel, checkpoints_itself, decoder_layers, expert_blocks
from .moe import ensure_bound, is_moe_layer, runs_grouped

log = logging.getLogger(__name__)


def compile_blocker(model: nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the decoder layers of `model`, computing in `dtype` on `device`, should not be compiled, or None."""
    layers = decoder_layers(model)
    if not layers:
        return "no decoder layers where expected"
    kernels = [block_kernel(block) for block in expert_blocks(layers)]
    if not all(kernels):
        return "transformers' expert loop has data-dependent shapes: a graph break at every expert"
    if "native" in kernels and dtype != torch.bfloat16:
        return f"torch.compile's _grouped_mm takes bfloat16, not {str(dtype).removeprefix('torch.')}"
    if device.type != "cuda":
        return f"compiled on a GPU only: on {device.type} inductor's build of the layers takes minutes"
    return None


def compile_layers(model: nn.Module, backend: str = "inductor", graphs: bool = False) -> int:
    """Give every decoder layer of `model` a compiled training forward; returns how many layers got one. `graphs`:
    replay each layer's forward and backward as CUDA graphs (inductor's cudagraph trees; fast/layer_graphs.py)."""
    layers = decoder_layers(model)
    options = inductor_options(graphs) if backend == "inductor" else None
    for layer in layers:
        if hasattr(layer, "_compiled_forward"):
            continue  # already done
        eager = layer.forward
        region = functools.partial(checkpointed, eager) if take_over_checkpointing(layer) else eager
        layer._compiled_forward = torch.compile(region, backend=backend, options=options, dynamic=None)
        layer._layer_graphs = graphs
        layer.forward = functools.partial(training_forward, layer, eager)
    if layers:  # one entry per layer kind (dense, MoE) x static / dynamic shapes, with room for train/eval modes
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # raise, not a quiet switch to eager: see below
        # under DDP, dynamo would split each layer's graph at gradient-bucket boundaries (its DDP optimizer, made for
        # one graph of the whole model): a layer is already one region, whose backward hands DDP its gradients
        torch._dynamo.config.optimize_ddp = False
    return len(layers)


def take_over_checkpointing(layer: nn.Module) -> bool:
    """Turn off a layer's own gradient checkpointing (transformers' `GradientCheckpointingLayer` flag) so that its
    compiled region checkpoints instead; True where it did. `_checkpointed` keeps the decision for the eager fallback."""
    layer._checkpointed = checkpoints_itself(layer) and layer.gradient_checkpointing
    if layer._checkpointed:
        layer.gradient_checkpointing = False
    return layer._checkpointed


def checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    """`forward` under non-reentrant activation checkpointing (what the loaders ask transformers for)."""
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def inductor_options(graphs: bool) -> dict[str, bool]:
    """Inductor's settings for the layers. Fused, inductor keeps a bf16 op's result in float32 for the next op
    where eager rounds it to bf16: on an H100 that moved the losses of steps 3-5 by up to 0.065 from the eager
    layers'; rounding as eager does (`emulate_precision_casts`) brought them back within 0.001 at the same speed."""
    return {"emulate_precision_casts": True, "triton.cudagraphs": graphs}


def mark_length_dynamic(args: tuple, kwargs: dict) -> None:
    """One graph for every sequence length from the first call on: left to itself, dynamo compiles the first length
    statically and recompiles for the second (~20 s on an H100, in the middle of training). Marks each dimension of
    the inputs (hidden states, position ids, rotary cos/sin, a 4-D mask) as long as the sequence."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return
    length = hidden.shape[1]
    for tensor in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(tensor, torch.Tensor):
            for dim in range(1, tensor.dim()):
                if tensor.shape[dim] == length:
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def training_forward(layer: nn.Module, eager: Any, *args: Any, **kwargs: Any) -> Any:
    """The compiled forward in training (train mode, autograd on), the layer's own everywhere else."""
    if layer.training and torch.is_grad_enabled() and layer._compiled_forward is not None:
        mlp = getattr(layer, "mlp", None)
        if is_moe_layer(mlp) and runs_grouped(mlp):
            ensure_bound(mlp)  # what grouped_moe checks itself when it runs eagerly
        mark_length_dynamic(args, kwargs)
        try:
            return layer._compiled_forward(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as error:  # said once, this layer eager from now on
            log.warning("compiled decoder layers: layer %s hit torch.compile's recompile limit and runs eagerly from "
                        "now on (%s)", getattr(layer.self_attn, "layer_idx", "?"), str(error).splitlines()[0])  # fmt: skip
            layer._compiled_forward = None
    if layer._checkpointed and layer.training and torch.is_grad_enabled():
        return checkpointed(eager, *args, **kwargs)
    return eager(*args, **kwargs)
