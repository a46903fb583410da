"""DeepSeek-OCR (v1) samples -> the batch its remote code's forward takes (see the contract doc's "Batch" table).

v1's part of the shared collator (`batching.SampleCollator`): its own image geometry (`images.preprocess`: a global
view plus crop tiles, the image-token count from the grid) and its pixel inputs (`images`, `images_spatial_crop`).
Prompt = [BOS] + text before <image> + image tokens + text after <image>.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...data.batching import ImagePrompt, SampleCollator, split_instruction
from .images import image_token_count, preprocess, tile_grid


@dataclass
class OCRCollator(SampleCollator):
    """The shared collator on v1's tokenizer (`text_side`) and hand-written image geometry (`mode`)."""

    family = "v1"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.before, self.after = split_instruction(self.instruction)

    @property
    def tokenizer(self) -> Any:
        return self.text_side

    def encode_image(self, image: Any) -> ImagePrompt:
        """The views of `mode` ((crops, global view, grid)) and the prompt with the grid's image-token count."""
        view = preprocess(image, self.mode)
        return ImagePrompt(view, *self.prompt_for(view[2]))

    def counted_prompt(self, image: Any) -> tuple[list[int], list[bool]]:
        """The prompt from the tile grid alone (`tile_grid`, which `preprocess` cuts by): no pixels made."""
        return self.prompt_for(tile_grid(image, self.mode))

    def prompt_for(self, grid: tuple[int, int]) -> tuple[list[int], list[bool]]:
        """Prompt ids with the grid's image-token count, and the image positions."""
        count = image_token_count(self.mode.base_size, self.mode.image_size, *grid)
        before, after = self.encode_text(self.before), self.encode_text(self.after)
        prompt = [self.bos_id, *before, *[self.image_id] * count, *after]
        return prompt, [False] * (1 + len(before)) + [True] * count + [False] * len(after)

    def model_inputs(self, pixels: list[Any], batch: dict[str, Any]) -> dict[str, Any]:
        """`images` as (crops, global view) per row and their grids."""
        inputs = {
            "images": [(crops, glob) for crops, glob, _ in pixels],
            "images_spatial_crop": torch.tensor([list(grid) for _, _, grid in pixels], dtype=torch.long),
        }
        check_image_tokens(inputs["images"], inputs["images_spatial_crop"], batch["images_seq_mask"])
        return inputs


def check_image_tokens(images: list, grids: torch.Tensor, images_seq_mask: torch.Tensor) -> None:
    """Each row's image positions must be exactly what its views produce (global grid + crop grid)."""
    for row, ((crops, glob), (cols, rows)) in enumerate(zip(images, grids.tolist())):
        tiles = crops.shape[0] if crops.any() else 1
        expected = image_token_count(glob.shape[-1], crops.shape[-1], cols, rows)
        if tiles != cols * rows or int(images_seq_mask[row].sum()) != expected:
            raise AssertionError(f"row {row}: image tokens disagree with its views ({cols} x {rows} grid)")
