"""Pixels and image-token counts against the contract."""

import pytest
import torch
from PIL import Image

from dsocr_lightning.data.images import MODES, Mode
from dsocr_lightning.families.v1.images import candidate_grids, choose_grid, image_token_count, preprocess


@pytest.mark.parametrize(
    ("mode", "expected"), [("tiny", 73), ("small", 111), ("base", 273), ("large", 421), ("gundam", 273)]
)
def test_global_token_counts_per_mode(mode, expected):
    m = MODES[mode]
    assert image_token_count(m.base_size, m.image_size) == expected


def test_crop_grid_token_counts():
    assert image_token_count(1024, 640, 3, 3) == 1203  # 273 + (10*3+1)*(10*3)
    assert image_token_count(1024, 640, 2, 1) == 273 + 21 * 10
    assert image_token_count(1024, 640, 1, 2) == 273 + 11 * 20


def test_candidate_grids_cover_2_to_9_tiles():
    grids = candidate_grids()
    assert all(2 <= c * r <= 9 for c, r in grids)
    assert (1, 2) in grids and (9, 1) in grids and (3, 3) in grids and (1, 1) not in grids
    assert len(grids) == len(set(grids))


@pytest.mark.parametrize(
    ("size", "grid"), [((1920, 1280), (3, 2)), ((1280, 1920), (2, 3)), ((4000, 500), (8, 1)), ((1300, 1300), (2, 2))]
)
def test_choose_grid_closest_aspect(size, grid):
    assert choose_grid(*size, 640) == grid


def test_choose_grid_tie_prefers_larger_grid_only_for_large_images():
    # a square image ties (2,2) and (3,3); the larger wins when the image covers > half of 9 tiles
    assert choose_grid(1000, 1000, 640) == (2, 2)
    assert choose_grid(1500, 1500, 640) == (3, 3)


def test_small_line_in_gundam_mode_has_no_crops():
    crops, glob, grid = preprocess(Image.new("RGB", (255, 48), "white"), MODES["gundam"])
    assert grid == (1, 1)
    assert crops.shape == (1, 3, 1024, 1024) and not crops.any()
    assert glob.shape == (1, 3, 1024, 1024) and glob.dtype == torch.float32
    # the line is centred and padded with grey 127: (127/255 - 0.5)/0.5
    assert glob[0, :, 0, 0].allclose(torch.full((3,), 127 / 127.5 - 1))
    assert glob[0, :, 512, 512].allclose(torch.ones(3))


def test_large_image_is_cut_row_major():
    image = Image.new("RGB", (1920, 1280), "black")
    image.paste((255, 255, 255), (0, 0, 640, 640))  # only the top-left tile is white
    crops, _, grid = preprocess(image, MODES["gundam"])
    assert grid == (3, 2) and crops.shape == (6, 3, 640, 640)
    assert crops[0].mean() > 0.9 and all(crops[k].mean() < -0.9 for k in range(1, 6))


def test_small_modes_resize_without_padding():
    crops, glob, grid = preprocess(Image.new("RGB", (255, 48), "white"), MODES["tiny"])
    assert glob.shape == (1, 3, 512, 512) and glob.min() == 1.0  # stretched, no grey border
    assert grid == (1, 1) and crops.shape == (1, 3, 512, 512)


def test_large_mode_pads_and_never_crops():
    crops, glob, grid = preprocess(Image.new("RGB", (3000, 800), "white"), MODES["large"])
    assert glob.shape == (1, 3, 1280, 1280) and grid == (1, 1) and not crops.any()


def test_custom_sizes():
    crops, glob, grid = preprocess(Image.new("RGB", (900, 300), "white"), Mode(768, 512, True))
    assert glob.shape == (1, 3, 768, 768) and grid == (3, 1) and crops.shape == (3, 3, 512, 512)
    assert image_token_count(768, 512, *grid) == 13 * 12 + 1 + (8 * 3 + 1) * 8
