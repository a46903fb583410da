"""Where the parts of a DeepSeek-V2-style causal LM sit, under peft's wrapper or not (what the fast paths reach)."""

from __future__ import annotations

from torch import nn


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM itself: peft's base model, or `model` when it is not wrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers (`<causal LM>.model.layers`), or [] where the layout differs."""
    layers = getattr(getattr(causal_lm(model), "model", None), "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []
