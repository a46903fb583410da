"""TEST STAND-IN for DeepSeek-OCR: a tiny random-weight checkpoint and a character tokenizer, for offline tests.

Nothing here is DeepSeek-OCR: only its interfaces (special-token ids, module names, forward/generate contract,
image-token counts) are mimicked, so the fine-tuning code can be exercised on a CPU in seconds.
"""

from __future__ import annotations

from typing import Any

from ...standin_tokenizer import IMAGE_TOKEN_ID, write_tokenizer
from ..images import image_token_count

__all__ = [
    "IMAGE_TOKEN_ID",
    "expected_lora_params",
    "image_token_count",
    "write_standin_checkpoint",
    "write_tokenizer",
]


def expected_lora_params(
    hidden: int, layers: int, intermediate: int, moe_intermediate: int, n_routed: int, n_shared: int,
    first_dense: int, r: int,
) -> int:  # fmt: skip
    """Trainable LoRA parameters for targets q/k/v/o/gate/up/down_proj: r * (in + out) per targeted Linear.

    Attention: 4 square [h, h] projections per layer. Dense MLP (layers < first_dense): 3 Linears between h and
    `intermediate`. MoE layers: every routed expert has 3 Linears between h and `moe_intermediate`, the shared
    experts are one MLP of width moe_intermediate * n_shared. The MoE gate is not a Linear named *_proj.
    """
    attention = 4 * (hidden + hidden)
    dense = 3 * (hidden + intermediate)
    moe = n_routed * 3 * (hidden + moe_intermediate) + 3 * (hidden + moe_intermediate * n_shared)
    n_dense = min(first_dense, layers)
    return r * (layers * attention + n_dense * dense + (layers - n_dense) * moe)


def __getattr__(name: str) -> Any:
    """The v1 checkpoint writer imports v1's model classes (transformers 4.56.2): loaded on first use only, so that
    the rest of this package (counts, the tokenizer writer) imports under transformers 5 too."""
    if name == "write_standin_checkpoint":
        from .checkpoint import write_standin_checkpoint

        return write_standin_checkpoint
    raise AttributeError(name)
