"""DeepSeek-OCR 2 samples -> batches, with transformers' own processor doing all the image geometry.

v2's part of the shared collator (`batching.SampleCollator`): the processor expands `<image>` into the model's image
tokens and cuts the views: a 1024 px global view (256 tokens), plus 2-6 local 768 px crops (144 tokens each) when a
side exceeds 768 px, plus one separator token. Texts, labels, padding, prompts and the bad-sample policy are the
shared collator's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...data.batching import ImagePrompt, SampleCollator


@dataclass
class ProcessorCollator(SampleCollator):
    """The shared collator on a `DeepseekOcr2Processor` (`text_side`). `mode.crop_mode` false turns the local crops
    off (a 768 px view alone); the sizes are the processor's (the model's queries fix them: 256 for 1024 px, 144 for
    768 px)."""

    family = "v2"

    @property
    def processor(self) -> Any:
        return self.text_side

    @property
    def tokenizer(self) -> Any:
        return self.text_side.tokenizer

    def image_options(self) -> dict[str, Any]:
        """The processor's own settings; without crops its global view is drawn at `tile_size` (768 px, 144 + 1
        tokens) while transformers (5.24) counts the tokens from `size`: `size` is set to the tile so they agree."""
        if self.mode.crop_mode:
            return {}
        tile = self.processor.image_processor.tile_size
        return {"crop_to_patches": False, "size": {"height": tile, "width": tile}}

    def encode_image(self, image: Any) -> ImagePrompt:
        """(global view, crops or None) and [BOS] + the processor's prompt ids, image tokens expanded."""
        out = self.processor(images=image, text=self.instruction, return_tensors="pt", **self.image_options())
        ids = out["input_ids"][0].tolist()
        if not ids or ids[0] != self.bos_id:
            ids = [self.bos_id, *ids]
        pixels = (out["pixel_values"], out.get("pixel_values_local"))
        return ImagePrompt(pixels, ids, [token == self.image_id for token in ids])

    def model_inputs(self, pixels: list[Any], batch: dict[str, Any]) -> dict[str, Any]:
        """Global views stacked, every row's crops in one tensor (None when no row has any), crops per row (a list:
        transformers reads it on the CPU, and a tensor would travel to the GPU and be read back, a sync per batch), and
        the count of image tokens (what the forward checks the image features against: families/v2/forward.py)."""
        crops = [local for _, local in pixels if local is not None]
        return {
            "pixel_values": torch.cat([glob for glob, _ in pixels]),
            "pixel_values_local": torch.cat(crops) if crops else None,
            "num_local_patches": [0 if c is None else c.shape[0] for _, c in pixels],
            "image_tokens": int(batch["images_seq_mask"].sum()),
        }
