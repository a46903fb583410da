"""v2 fixtures: the tiny TEST STAND-IN of DeepSeek-OCR 2 (native `deepseek_ocr2`, random weights) and test pages."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

# name -> (width, height): a Parsynth-like line, a wide page and a tall page (both sides > 768 px: crops)
PAGES = {"line": (255, 48), "wide": (2000, 600), "tall": (600, 2000)}


@pytest.fixture(scope="session")
def v2_dir(tmp_path_factory):
    from dsocr_lightning.families.v2.standin import write_v2_standin

    return write_v2_standin(tmp_path_factory.mktemp("v2") / "ckpt")


@pytest.fixture(scope="session")
def processor(v2_dir):
    from dsocr_lightning.families.v2.loading import load_processor

    return load_processor(str(v2_dir))


def page(size: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle((10, 10, size[0] // 2, size[1] // 2), fill="black")
    return image


@pytest.fixture(scope="session")
def pages():
    return {name: page(size) for name, size in PAGES.items()}
