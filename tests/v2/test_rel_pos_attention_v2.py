"""The folded relative-position attention (fast/rel_pos_attention.py; DeepSeek-OCR 2's SAM uses it) against the
materialized bias it replaces."""

from __future__ import annotations

import pytest
import torch

from dsocr_lightning.fast.rel_pos_attention import folded_attention, reference_attention


@pytest.mark.parametrize(
    "height, width, size", [(3, 5, 8), (4, 4, 6), (7, 2, 16), (2, 3, 3)]
)  # 6: 14 -> padded to 16; 3: 8, none
def test_folded_attention_equals_the_biased_one(height, width, size):
    torch.manual_seed(0)
    shape = (2, 3, height * width)
    inputs = [torch.randn(*shape, size) for _ in range(3)] + [torch.randn(*shape, height), torch.randn(*shape, width)]
    inputs = [tensor.requires_grad_() for tensor in inputs]
    expected = reference_attention(*inputs)
    grads_expected = torch.autograd.grad(expected.square().sum(), inputs)
    folded = folded_attention(*inputs)
    grads = torch.autograd.grad(folded.square().sum(), inputs)
    torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_expected, strict=True):  # queries, keys, values, both tables
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_folded_attention_uses_both_tables():
    """A table swapped for another changes the result (the fold reads each, in its place)."""
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 2, 12, 8) for _ in range(3))
    rel_h, rel_w = torch.randn(1, 2, 12, 3), torch.randn(1, 2, 12, 4)
    base = folded_attention(query, key, value, rel_h, rel_w)
    assert not torch.allclose(base, folded_attention(query, key, value, rel_h.flip(-1), rel_w), atol=1e-3)
    assert not torch.allclose(base, folded_attention(query, key, value, rel_h, rel_w.flip(-1)), atol=1e-3)
