"""Images as every model family takes them: decoded whole and in RGB, and the resolution modes a run chooses from
(`--data.mode`; each family cuts its views by them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


@dataclass(frozen=True)
class Mode:
    """One of the model's resolution modes: global view side, tile side, and whether tiles are cut."""

    base_size: int
    image_size: int
    crop_mode: bool


MODES: dict[str, Mode] = {
    "tiny": Mode(512, 512, False),
    "small": Mode(640, 640, False),
    "base": Mode(1024, 1024, False),
    "large": Mode(1280, 1280, False),
    "gundam": Mode(1024, 640, True),
}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF rotation applied, transparency over white, 16-bit/float scaled to 8 bits."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | Image.Image) -> Image.Image:
    """Open and fully decode a path (truncated files fail here, not later), or take a PIL image as is."""
    image = Image.open(source) if not isinstance(source, Image.Image) else source
    image.load()
    if image.width == 0 or image.height == 0:
        raise ValueError(f"zero-size image ({image.width} x {image.height})")
    return to_rgb(image)
