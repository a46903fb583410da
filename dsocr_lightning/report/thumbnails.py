"""Small copies of the line images, inlined in the report (a data URI) or logged to TensorBoard: never the full
image, and one image in memory at a time."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..data.images import load_image
from ..training.checks import ConfigError


@dataclass
class ThumbnailSize:
    """The box a thumbnail fits in, aspect kept (a line image fills the width, a page the height)."""

    width: int = 800  # px at most
    height: int = 96  # px at most

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ConfigError(f"thumbnail {self.width} x {self.height} px: give a width and height of 1 px or more "
                              "(defaults 800 x 96)")  # fmt: skip


def thumbnail(source: Any, size: ThumbnailSize) -> Image.Image:
    """The image of `source` (a path or a PIL image) shrunk into the box (never enlarged); raises as PIL does."""
    image = load_image(source).copy()
    image.thumbnail((size.width, size.height), Image.Resampling.LANCZOS)
    return image


def data_uri(image: Image.Image) -> str:
    """A PNG data URI: text on a plain background stays sharp, and small."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def as_array(image: Image.Image) -> np.ndarray:
    """[H, W, 3] uint8, what TensorBoard's `add_image(..., dataformats="HWC")` takes."""
    return np.asarray(image.convert("RGB"))
