"""DeepSeek-OCR 2's SAM attention with its relative positions folded into the queries and keys (fast/rel_pos_attention.py):
transformers' SDPA attention module of the SAM encoder, whose forward builds a [B, heads, N, N] bias for every view.

The modules keep their class's parameters and methods (state_dicts do not change): each instance's class becomes a
subclass of transformers' own whose only difference is `forward`. The reference it must equal is transformers'
forward (tests/v2/test_sam_attention_v2.py: the SAM encoder's output before and after, float32).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ...fast.rel_pos_attention import folded_attention


def folded_forward(self: nn.Module, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple:
    """[B, H, W, dim] -> ([B, H, W, dim], None), as transformers' SDPA SAM attention."""
    batch, height, width, _ = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, height * width, 3, self.num_attention_heads, -1)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, C]
    if self.use_rel_pos:
        grid_query = query.unflatten(2, (height, width))  # [B, heads, H, W, C]
        rows = rel_pos_table(height, height, self.rel_pos_h)  # [H (query row), H (key row), C]
        columns = rel_pos_table(width, width, self.rel_pos_w)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, rows).flatten(2, 3)  # [B, heads, N, H]
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, columns).flatten(2, 3)  # [B, heads, N, W]
        attended = folded_attention(query, key, value, rel_h, rel_w)
    else:
        attended = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    return self.proj(attended.transpose(1, 2).reshape(batch, height, width, -1)), None


def rel_pos_table(size_q: int, size_k: int, table: torch.Tensor) -> torch.Tensor:
    """[size_q, size_k, C]: the row of `table` ([offsets, C]) for each query-key offset after resampling it to
    2 max(sizes) - 1 offsets, as transformers' `get_rel_pos`, but with the indices made on the table's device (a CUDA
    graph cannot copy them there from the CPU: families/v2/frozen_vision.py captures SAM)."""
    offsets = 2 * max(size_q, size_k) - 1
    resampled = F.interpolate(table.T[None], size=offsets, mode="linear")[0].T  # [offsets, C]
    stretch_q, stretch_k = max(size_k / size_q, 1.0), max(size_q / size_k, 1.0)
    query = torch.arange(size_q, device=table.device)[:, None] * stretch_q
    key = torch.arange(size_k, device=table.device)[None, :] * stretch_k
    return resampled[(query - key + (size_k - 1) * stretch_k).long()]


@functools.cache
def folded_class(base: type) -> type:
    """transformers' attention class with the folded forward (one subclass per base class), named in this module so
    that a patched module pickles."""
    folded = type(f"Folded{base.__name__}", (base,), {"forward": folded_forward, "__module__": __name__})
    globals()[folded.__name__] = folded
    return folded


def patch_sam_attention(model: nn.Module) -> int:
    """Give every SDPA SAM attention module of `model` the folded forward; returns how many. (transformers' eager
    SAM attention, which also returns the attention weights, is left as it is.)"""
    from transformers.models.deepseek_ocr2 import modeling_deepseek_ocr2 as modeling

    base = modeling.DeepseekOcr2SamVisionSdpaAttention
    modules = [module for module in model.modules() if type(module) is base]
    for module in modules:
        module.__class__ = folded_class(base)
    return len(modules)
