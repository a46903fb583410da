"""SAM's attention with decomposed relative positions, without the [N, N] bias tensor.

SAM adds to each query-key score a bias that is the sum of two tables, for a grid of H x W tokens (N = H * W, row-major):
`rel_h` [B, heads, N, H] (each query against each key row) and `rel_w` [B, heads, N, W] (... each key column). The
reference builds bias[q, k] = rel_h[q, row(k)] + rel_w[q, col(k)] as a [B, heads, N, N] tensor (26 GB for 64 views of
1024 px in bf16) and hands it to SDPA, which must then read it back and cannot run flash attention.

Folded: each query gets rel_h / scale and rel_w / scale appended, each key the one-hot vectors of its row and column,
so that scale * (q' . k') = scale * (q . k) + bias[q, k]: the same scores from a plain, maskless attention whose head is
H + W wider (value zero-padded to that width too, so that flash attention applies; the padding is cut off after).
With a power-of-two scale (head size 64: 1/8) dividing by it is exact in bf16; the bias is then summed in float32
inside the kernel where the reference rounds it to bf16 first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_attention(query, key, value, rel_h, rel_w):
    """The plain way (transformers' SAM): SDPA with the materialized bias. query/key/value [B, heads, N, C]."""
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)  # [B, heads, N, H, W] -> [B, heads, N, N]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)


def folded_attention(query, key, value, rel_h, rel_w):
    """`reference_attention`'s result from a maskless SDPA over queries and keys widened by H + W (padded to a
    multiple of 8, which flash attention's head sizes need)."""
    scale, size = query.shape[-1] ** -0.5, value.shape[-1]
    height, width = rel_h.shape[-1], rel_w.shape[-1]
    grid = torch.arange(height * width, device=key.device)
    places = torch.cat([F.one_hot(grid // width, height), F.one_hot(grid % width, width)], -1).to(key.dtype)  # [N, H+W]
    folded_q = torch.cat([query, rel_h / scale, rel_w / scale], -1)
    folded_k = torch.cat([key, places.expand(*key.shape[:-1], -1)], -1)
    pad = -folded_q.shape[-1] % 8
    if pad:  # F.pad copies even when there is nothing to add (~1.2 GB each at 64 views)
        folded_q, folded_k = F.pad(folded_q, (0, pad)), F.pad(folded_k, (0, pad))
    folded_v = F.pad(value, (0, folded_q.shape[-1] - size))
    return F.scaled_dot_product_attention(folded_q, folded_k, folded_v, scale=scale)[..., :size]
