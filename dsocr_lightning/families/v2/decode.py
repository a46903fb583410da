"""DeepSeek-OCR 2's parts for the static-cache decoder (fast/decode.py): transformers' own `deepseek_ocr2` language
model (`model.language_model.{embed_tokens, rotary_emb, layers, norm}`, `lm_head`), whose layers take the cache as
`cache=` (transformers >= 5.24) or `past_key_values=` (5.17, the GPU box's) and whose prefill is the model's own forward
with generate's position ids (its output names the cache as the layers do)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ...fast.decode import DecoderParts
from ...fast.layout import causal_lm

# Tokens equal to `generate`'s on the stand-in (tests/v2/test_fit_v2.py); faster than `generate` on a GPU at every
# measured batch size (benchmarks/README.md, "DeepSeek-OCR 2: decoding"), so `auto` takes it there too.
# CUDA graphs: the shared rule (fast/decode.py's graph_blocker): with the grouped experts (experts.py: nothing is
# read back), not with transformers' experts kernel (it asks which experts were hit: `nonzero`)


def decoder_parts(model: nn.Module) -> DecoderParts | None:
    """The decode-step pieces of a (peft-wrapped or plain) DeepSeek-OCR 2, or None where the layout differs."""
    causal = causal_lm(model)
    text = getattr(getattr(causal, "model", None), "language_model", None)
    needed = ("embed_tokens", "rotary_emb", "layers", "norm")
    if text is None or not all(hasattr(text, n) for n in needed) or not hasattr(causal, "lm_head"):
        return None
    implementation = getattr(text.config, "_attn_implementation", "sdpa")
    if implementation not in ("sdpa", "eager"):
        return None
    layers = list(text.layers[: text.config.num_hidden_layers])
    return DecoderParts(text.embed_tokens, text.rotary_emb, layers, text.norm, causal.lm_head,
                        eager_attention=implementation == "eager", cache_arg=cache_keyword(layers[0]),
                        prefill=prefill)  # fmt: skip


def cache_keyword(layer: nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache by: `cache` (transformers >= 5.24) or `past_key_values`."""
    parameters = inspect.signature(type(layer).forward).parameters  # the class: compiled layers wrap `forward`
    return "cache" if "cache" in parameters else "past_key_values"


def prefill(model: nn.Module, parts: DecoderParts, prompt: torch.Tensor, mask: torch.Tensor, images: dict) -> tuple:
    """generate's first step: the model's forward over the left-padded prompts, images included, position ids
    counted over each row's real tokens; (last logits [B, V] float32, the DynamicCache it filled)."""
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out: Any = causal_lm(model)(input_ids=prompt, attention_mask=mask, position_ids=positions, use_cache=True,
                                logits_to_keep=1, return_dict=True, **images)  # fmt: skip
    return out.logits[:, -1].float(), getattr(out, parts.cache_arg)
