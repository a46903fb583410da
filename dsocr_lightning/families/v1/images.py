"""Pixels and image-token counts for DeepSeek-OCR (v1), written from the contract in the project docs.

A view of side `s` becomes an `n x n` feature grid, `n = ceil(s / 64)` (patch 16, downsample 4). Each grid row
is followed by one newline token; one separator token closes the image. Large images in crop mode also get a
grid of `image_size` tiles, chosen to match the aspect ratio.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageOps

from ...data.images import Mode

PATCH_STRIDE = 64  # 16 px patches, 4x downsample
PAD_COLOR = (127, 127, 127)  # int(0.5 * 255): the normalisation mean, so padding normalises to ~0
MIN_CROPS, MAX_CROPS = 2, 9


def grid_side(side: int) -> int:
    """Feature-grid side for a square view of `side` pixels."""
    return math.ceil(side / PATCH_STRIDE)


def global_token_count(base_size: int) -> int:
    """Tokens of the global view: n rows of (n + newline), then the separator."""
    n = grid_side(base_size)
    return (n + 1) * n + 1


def crop_token_count(image_size: int, cols: int, rows: int) -> int:
    """Tokens of a `cols x rows` tile grid: (m*cols + newline) per feature row, m*rows rows."""
    if cols * rows <= 1:
        return 0
    m = grid_side(image_size)
    return (m * cols + 1) * (m * rows)


def image_token_count(base_size: int, image_size: int, cols: int = 1, rows: int = 1) -> int:
    """All image tokens of one sample."""
    return global_token_count(base_size) + crop_token_count(image_size, cols, rows)


def candidate_grids(min_num: int = MIN_CROPS, max_num: int = MAX_CROPS) -> list[tuple[int, int]]:
    """Every (cols, rows) with min_num <= cols*rows <= max_num, fewest tiles first."""
    grids = {(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if min_num <= i * j <= max_num}
    return sorted(grids, key=lambda g: (g[0] * g[1], g))


def choose_grid(width: int, height: int, image_size: int) -> tuple[int, int]:
    """Tile grid whose aspect ratio is closest to the image's; on a tie the larger grid wins when the image
    covers more than half of that grid's area."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids():
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1]: (x / 255 - 0.5) / 0.5."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


def global_view(image: Image.Image, base_size: int, crop_mode: bool) -> Image.Image:
    """The square global view: aspect-kept pad, except a plain LANCZOS resize for small sides without crops."""
    if not crop_mode and base_size <= 640:
        return image.resize((base_size, base_size), Image.Resampling.LANCZOS)
    return ImageOps.pad(image, (base_size, base_size), color=PAD_COLOR)


def cut_tiles(image: Image.Image, image_size: int, cols: int, rows: int) -> list[Image.Image]:
    """Resize (aspect not kept) to cols x rows tiles and cut them row-major."""
    resized = image.resize((image_size * cols, image_size * rows))
    boxes = [
        (c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size)
        for r in range(rows)
        for c in range(cols)
    ]
    return [resized.crop(box) for box in boxes]


def wants_crops(image: Image.Image, image_size: int, crop_mode: bool) -> bool:
    """Tiles are cut only in crop mode and only for images larger than one tile."""
    return crop_mode and (image.width > image_size or image.height > image_size)


def tile_grid(image: Image.Image, mode: Mode) -> tuple[int, int]:
    """(cols, rows) of the tiles `preprocess` cuts from `image`; (1, 1) for none."""
    if not wants_crops(image, mode.image_size, mode.crop_mode):
        return 1, 1
    return choose_grid(image.width, image.height, mode.image_size)


def preprocess(image: Image.Image, mode: Mode) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """One RGB image -> (crops [P,3,S,S] or zeros [1,3,B,B], global [1,3,B,B], (cols, rows))."""
    image = image.convert("RGB")
    base = mode.base_size
    glob = to_tensor(global_view(image, base, mode.crop_mode)).unsqueeze(0)
    cols, rows = tile_grid(image, mode)
    if (cols, rows) == (1, 1):
        return torch.zeros(1, 3, base, base), glob, (1, 1)
    tiles = cut_tiles(image, mode.image_size, cols, rows)
    return torch.stack([to_tensor(t) for t in tiles]), glob, (cols, rows)
