"""DeepSeek-OCR 2's forward for the module's batches, without the CPU-GPU syncs transformers' own forward makes.

transformers' forward reads two things back from the GPU before its first decoder layer: the count of image
placeholder tokens (to check it against the image features: two syncs) and, for a batch without a padding mask,
whether it packs several sequences in a row. Each read makes the CPU wait for the vision tower, whose GPU time the
CPU could spend queueing the decoder's kernels. Here the same computation without them:
- the placeholder count comes from the collator (`image_tokens`, counted on the CPU) and is checked against the
  features' row count (a shape); the features are scattered into the token embeddings as transformers does
  (`masked_scatter` at the collator's image positions) and the model gets `inputs_embeds`;
- a right-padded batch, whose padding mask the module leaves out, runs transformers' own SDPA attention under a name
  that has no mask function (`causal_only`): transformers then builds no mask and looks for no packed sequences,
  and SDPA runs causal, as it does when transformers finds neither.
The reference is the model's own forward on the same inputs: tests/v2/test_forward_v2.py (loss and every LoRA
gradient equal).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from ...fast.layout import causal_lm
from . import IMAGE_KEYS

CAUSAL_SDPA = "dsocr_causal_sdpa"  # transformers' SDPA attention, registered without a mask function


@functools.cache  # once a process: the registry is global
def register_causal_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


@contextlib.contextmanager
def causal_only(config: Any) -> Iterator[None]:
    """The text model's SDPA attention under `CAUSAL_SDPA` for the block (nothing changes for another attention)."""
    before = config._attn_implementation
    if before != "sdpa":
        yield
        return
    register_causal_sdpa()
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = before


def embedded_inputs(inner: Any, inputs: dict[str, Any], image_mask: torch.Tensor, image_tokens: int) -> dict[str, Any]:
    """`inputs` with `input_ids` and the image inputs replaced by `inputs_embeds`: the token embeddings [B, L, H] of
    `inner` (the DeepseekOcr2Model) with the image features at `image_mask` [B, L] (bool), of which the collator
    counted `image_tokens`."""
    rest = {key: value for key, value in inputs.items() if key not in (*IMAGE_KEYS, "input_ids")}
    embeds = inner.get_input_embeddings()(inputs["input_ids"])
    images = inner.get_image_features(*(inputs.get(key) for key in IMAGE_KEYS), return_dict=True).pooler_output
    features = torch.cat(images, dim=0).to(embeds.device, embeds.dtype)
    if features.shape[0] != image_tokens:
        raise ValueError(f"image features and image tokens do not match: {features.shape[0]} feature rows for "
                         f"{image_tokens} image tokens")  # fmt: skip
    return rest | {"inputs_embeds": embeds.masked_scatter(image_mask.unsqueeze(-1), features)}


def forward(model: Any, inputs: dict[str, Any], batch: dict[str, Any]) -> Any:
    """The model's output on `inputs` (from `batch`, which carries the collator's image positions and count)."""
    if inputs.get("pixel_values") is None:
        return model(**inputs)
    if missing := [key for key in ("images_seq_mask", "image_tokens") if key not in batch]:
        raise KeyError(f"the DeepSeek-OCR 2 forward needs the batch's {missing}: the v2 collator's batches "
                       "(families/v2/collate.py, through OCRDataModule) carry them")  # fmt: skip
    inner = causal_lm(model).model  # DeepseekOcr2Model
    inputs = embedded_inputs(inner, inputs, batch["images_seq_mask"], batch["image_tokens"])
    unmasked = inputs.get("attention_mask") is None
    config = inner.language_model.config
    # (eager checkpointed layers recompute in backward, after the name is back: the same function, the same None mask)
    with causal_only(config) if unmasked else contextlib.nullcontext():
        return model(**inputs)
