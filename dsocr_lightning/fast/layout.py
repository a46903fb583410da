"""Where the parts of a DeepSeek-V2-style causal LM sit, under peft's wrapper or not (what the fast paths reach)."""

from __future__ import annotations

from torch import nn


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM itself: peft's base model, or `model` when it is not wrapped."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_model(model: nn.Module) -> nn.Module | None:
    """The module holding the decoder layers: `<causal LM>.model` (v1's remote code), or its `language_model` where
    the text model sits one level down (transformers' multimodal models, DeepSeek-OCR 2)."""
    inner = getattr(causal_lm(model), "model", None)
    return getattr(inner, "language_model", inner)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The language model's decoder layers, or [] where the layout differs."""
    layers = getattr(text_model(model), "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def expert_blocks(layers: list[nn.Module]) -> list[nn.Module]:
    """The MoE blocks (an `mlp` with routed `experts`) of these decoder layers."""
    return [layer.mlp for layer in layers if hasattr(getattr(layer, "mlp", None), "experts")]


def block_kernel(block: nn.Module) -> str | None:
    """The grouped matmul an MoE block's experts run (`native`, `triton`: recorded by each family's grouped-experts
    patch), None where they run transformers' own code."""
    return vars(block).get("_grouped_kernel")


def checkpoints_itself(layer: nn.Module) -> bool:
    """Does the layer own its gradient checkpointing (transformers 5's `GradientCheckpointingLayer`: a class-level
    switch), rather than the model's loop around it (v1's remote code)?"""
    return hasattr(type(layer), "gradient_checkpointing")
