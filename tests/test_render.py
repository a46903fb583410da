"""Synthetic lines: digit strips put each digit in its own cell; no text lands in two splits."""

import json

import numpy as np
import pytest

from dsocr_lightning.data.render import DIGITS, STRIP_CELL, STRIP_CELLS, render_digit_strip, write_imagefolder


def ink_per_cell(text: str) -> np.ndarray:
    """Dark pixels in each of the strip's cells."""
    dark = np.asarray(render_digit_strip(text).convert("L")) < 128
    return dark.reshape(STRIP_CELL[1], STRIP_CELLS, STRIP_CELL[0]).sum(axis=(0, 2))


def test_a_digit_strip_puts_digit_k_in_cell_k():
    image = render_digit_strip(DIGITS[:STRIP_CELLS])
    assert image.size == (STRIP_CELLS * STRIP_CELL[0], STRIP_CELL[1])
    assert (ink_per_cell(DIGITS[:STRIP_CELLS]) > 0).all()
    ink = ink_per_cell("۱۲۳")
    assert (ink[:3] > 0).all() and not ink[3:].any()  # left to right from the left edge, the rest blank
    # a digit's cell looks the same whatever stands around it
    one = np.asarray(render_digit_strip("۷۱").convert("L"))[:, STRIP_CELL[0] : 2 * STRIP_CELL[0]]
    alone = np.asarray(render_digit_strip("۵۱۹").convert("L"))[:, STRIP_CELL[0] : 2 * STRIP_CELL[0]]
    assert (one == alone).all()
    with pytest.raises(ValueError, match="Persian digits"):
        render_digit_strip("123")


@pytest.mark.parametrize("kind", ["words", "digits"])
def test_no_text_is_in_two_splits(tmp_path, kind):
    folder = write_imagefolder(tmp_path, {"train": 40, "test": 10}, seed=0, kind=kind)
    texts = {
        split: [json.loads(line)["text"] for line in (folder / split / "metadata.jsonl").read_text().splitlines()]
        for split in ("train", "test")
    }
    assert len(set(texts["train"]) | set(texts["test"])) == 50
    if kind == "digits":
        assert all(4 <= len(t) <= STRIP_CELLS and set(t) <= set(DIGITS) for t in texts["train"])
