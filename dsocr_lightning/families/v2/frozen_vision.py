"""DeepSeek-OCR 2's frozen vision: the part of the vision tower that nothing trains runs without autograd and, on a
GPU, as CUDA graphs, one per view count (fast/frozen_graphs.py).

LoRA trains the language model and, with `lora.encoder`, the Qwen2 encoder; SAM never trains. Left as it is, under
gradient checkpointing the tower runs with autograd anyway: PEFT asks every sub-model's input embeddings to require
grad (transformers' `enable_input_require_grads`; SAM's patch embedding is one), so autograd records SAM and the
encoder, their checkpointed layers run again in backward, and backward computes gradients that reach no parameter.
Here the frozen part (the whole tower, or SAM alone when the encoder trains) runs under `torch.no_grad`: the loss and
every LoRA gradient are unchanged (tests/v2/test_frozen_vision_v2.py).

The modules keep their parameters, names and state_dicts: each instance's class becomes a subclass of transformers'
own whose only difference is `forward` (as families/v2/sam_attention.py does). The reference is transformers' forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ...fast.frozen_graphs import ShapeGraphs


def frozen_forward(self: nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
    """transformers' forward without autograd; through the CUDA graphs where the module has them and nothing but the
    last hidden state is asked for."""
    from transformers.modeling_outputs import BaseModelOutput

    with torch.no_grad():
        graphs = self.__dict__.get("_view_graphs")
        if graphs is None or any(value is not None and value is not False for value in kwargs.values()):
            return self.frozen_base.forward(self, pixel_values, **kwargs)
        # what else the captured kernels depend on; where the weights are: `_apply` forgets the graphs on a move
        tag = (self.training, torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda"))  # fmt: skip
        return BaseModelOutput(last_hidden_state=graphs(self.last_hidden_state, pixel_values, tag))


def frozen_apply(self: nn.Module, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """nn.Module's `_apply` (every `.to`, `.cuda`, `.half`), then the graphs forgotten: they read the old tensors."""
    self.frozen_base._apply(self, fn, *args, **kwargs)
    graphs = self.__dict__.get("_view_graphs")
    if graphs is not None:
        graphs.clear()
    return self


def last_hidden_state(self: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    return self.frozen_base.forward(self, pixel_values).last_hidden_state


@functools.cache
def frozen_class(base: type) -> type:
    """transformers' class with the frozen forward (one subclass per base class), named in this module so that a
    patched module pickles."""
    members = {"forward": frozen_forward, "last_hidden_state": last_hidden_state, "_apply": frozen_apply,
               "frozen_base": base, "__module__": __name__}  # fmt: skip
    frozen = type(f"Frozen{base.__name__}", (base,), members)
    globals()[frozen.__name__] = frozen
    return frozen


def trains(module: nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in module.parameters())


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The `DeepseekOcr2VisionModel` (SAM, then the Qwen2 encoder) of `model`, a peft model or not."""
    return next((m for m in model.modules() if hasattr(m, "sam_encoder") and hasattr(m, "vision_encoder")), None)


def patch_frozen_vision(model: nn.Module, graphs_blocked: str | None) -> str:
    """Run the frozen part of `model`'s vision tower without autograd, as CUDA graphs unless `graphs_blocked` says
    why not; returns the line that says what runs."""
    tower = vision_tower(model)
    if tower is None:
        return "frozen vision: not applicable (no DeepSeek-OCR 2 vision tower)"
    if trains(tower.sam_encoder):
        return "frozen vision: off (SAM has trainable parameters; transformers' forward with autograd)"
    frozen, part = (tower.sam_encoder, "SAM (the Qwen2 encoder trains: lora.encoder)") if trains(tower) else \
        (tower, "SAM and the Qwen2 encoder")  # fmt: skip
    if "frozen_base" not in vars(type(frozen)):  # not patched yet
        frozen.__class__ = frozen_class(type(frozen))
    for layer in frozen.modules():  # nothing to recompute without autograd (and no RNG state to stash in a capture)
        if getattr(layer, "gradient_checkpointing", False):
            layer.gradient_checkpointing = False
    frozen._view_graphs = (
        None if graphs_blocked else ShapeGraphs(f"frozen vision ({type(frozen).frozen_base.__name__})")
    )
    graphs = f"CUDA graphs: off ({graphs_blocked})" if graphs_blocked else "as CUDA graphs, one per view count"
    return f"frozen vision: {part} without autograd (no parameter of theirs trains), {graphs}"
