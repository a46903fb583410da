"""CUDA graphs of the compiled decoder layers in training (torch.compile's `reduce-overhead` mode).

Compiled, a layer's training forward is still a few dozen kernels launched from Python, and its backward as many:
at the guide's micro-batch of 2 lines an H100 stayed 20-50 % busy, waiting on the CPU. Replayed as CUDA graphs
(torch's cudagraph trees: one graph per layer forward and backward, per sequence length), a layer costs the CPU
one replay. What graphs need, and what this module provides:
- few shapes: a graph holds one sequence length, so training batches are padded on the right to a multiple of
  `graph_pad_multiple` tokens (`pad_length`; under causal attention real tokens never see the padding and the
  loss ignores it: the same loss, tests/test_layer_graphs.py);
- stable gradient buffers: a backward graph's outputs are overwritten by its next replay, so with gradient
  accumulation `.grad` must be a tensor of its own, allocated before the first backward and zeroed in place
  (`stable_grads`; the module then zeroes them in place, `zero_grads`);
- no recomputation of the layers from outside their graphs: gradient checkpointing off, or done by the layers
  themselves (transformers 5's `GradientCheckpointingLayer`), which the compiled region then takes over: the
  recomputation is part of the compiled backward graph (`layer_graph_blocker`; fast/compiled_layers.py).
torch skips graphs it cannot capture and says so only in a log line: `skipped_graphs` counts those skips, and the
module reports them after the first optimizer step, so the path that ran is the path logged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layout import checkpoints_itself, decoder_layers, text_model

PAD_VALUES = {"labels": -100, "images_seq_mask": False, "attention_mask": 0}  # input_ids: the tokenizer's PAD


def layer_graph_blocker(model: nn.Module) -> str | None:
    """Why the compiled layers of `model` cannot run as CUDA graphs, or None."""
    layers = decoder_layers(model)
    if layers and all(checkpoints_itself(layer) for layer in layers):
        return None  # checkpointed inside the compiled region, if at all
    if any(getattr(m, "gradient_checkpointing", False) for m in [text_model(model), *layers]):
        return "gradient checkpointing recomputes the layers inside backward (--model.gradient_checkpointing false)"
    return None


def graphs_active(model: nn.Module) -> bool:
    """Do the decoder layers of `model` train through CUDA graphs?"""
    layers = decoder_layers(model)
    return bool(layers) and all(getattr(layer, "_layer_graphs", False) for layer in layers)


def pad_length(batch: dict[str, Any], multiple: int, pad_id: int) -> dict[str, Any]:
    """`batch` with its token tensors ([B, L]) padded on the right to a length that is a multiple of `multiple`."""
    length = batch["input_ids"].shape[1]
    extra = -length % multiple
    if extra == 0:
        return batch
    values = PAD_VALUES | {"input_ids": pad_id}
    padded = {key: F.pad(batch[key], (0, extra), value=value) for key, value in values.items() if key in batch}
    return batch | padded


def stable_grads(params: Iterable[torch.Tensor]) -> int:
    """Give every parameter without one a zeroed `.grad` of its own; returns how many got one."""
    count = 0
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
            count += 1
    return count


def zero_grads(params: Iterable[torch.Tensor]) -> None:
    """Zero every existing `.grad` of `params` in place with one foreach call (the optimizer's `zero_grad` calls
    `zero_` tensor by tensor from Python: a few hundred LoRA tensors a step)."""
    grads = [param.grad for param in params if param.grad is not None]
    if grads:
        torch._foreach_zero_(grads)


def skipped_graphs() -> int:
    """How many compiled graphs torch ran without CUDA graphs in this process (why: TORCH_LOGS=perf_hints)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])
