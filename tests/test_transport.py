"""Batches travel compacted (pixels as bytes, no zero placeholder crops) from the workers and take the collator's
layout again on the device: the same tensors, bit for bit, as the collator makes."""

import pytest
import torch
from PIL import Image

from dsocr_lightning.data.datamodule import OCRDataModule
from dsocr_lightning.data.images import MODES
from dsocr_lightning.data.render import render_line
from dsocr_lightning.families.v1.collate import OCRCollator
from dsocr_lightning.families.v1.images import to_tensor
from dsocr_lightning.families.v1.transport import PIXEL_OF_BYTE, compact, expand, to_bytes


def batches(tokenizer) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (1280, 1920, 3), generator=generator, dtype=torch.uint8).numpy()
    samples = [{"image": render_line("سلام ۱۲"), "text": "ab"},  # a line: no crops
               {"image": Image.fromarray(noise), "text": "cd"}]  # a page of every byte value: 3 x 2 crops  # fmt: skip
    collate = OCRCollator(tokenizer, MODES["gundam"])
    return collate(samples), collate(samples)


def test_compacted_batch_expands_to_the_collators(tokenizer):
    made, travelling = batches(tokenizer)
    compacted = compact(travelling)
    (line_crops, _), (page_crops, _) = compacted["images"]
    assert line_crops.shape == (0, 3, 1024, 1024) and page_crops.shape == (6, 3, 640, 640)  # only placeholders go
    assert line_crops.dtype == page_crops.dtype == compacted["images"][0][1].dtype == torch.uint8
    expanded = expand(compacted)
    for (crops, glob), (want_crops, want_glob) in zip(expanded["images"], made["images"]):
        assert crops.dtype == want_crops.dtype and torch.equal(crops, want_crops) and torch.equal(glob, want_glob)
    assert all(torch.equal(expanded[k], made[k]) for k in ("input_ids", "labels", "images_seq_mask"))


def test_the_data_module_compacts_and_expands(lines_dir, standin_dir):
    data = OCRDataModule(str(lines_dir), "imagefolder", "train[:2]", None, image_column="image",
                         tokenizer_name_or_path=str(standin_dir), batch_size=2, num_workers=0)  # fmt: skip
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert all(crops.shape[0] == 0 for crops, _ in batch["images"])  # lines travel without their placeholders
    batch = data.on_after_batch_transfer(batch, 0)
    assert all(crops.shape[0] == 1 and not crops.any() for crops, _ in batch["images"])
    assert all(glob.dtype == torch.float32 for _, glob in batch["images"])


def test_every_byte_maps_to_what_to_tensor_makes():
    image = Image.fromarray(torch.arange(256, dtype=torch.uint8).repeat(40, 1).unsqueeze(-1).expand(-1, -1, 3).numpy())
    pixels = to_tensor(image)  # a large tensor: the vectorised path, against the 256-value table
    assert torch.equal(PIXEL_OF_BYTE[to_bytes(pixels).long()], pixels)
    with pytest.raises(ValueError, match="no byte value"):
        to_bytes(pixels + 1e-3)


def test_a_compacted_batch_never_reaches_the_model(tokenizer):
    """If the data module's hook did not run, the module refuses the bytes instead of feeding them as pixels."""
    import types

    from dsocr_lightning.families import family
    from dsocr_lightning.training.module import DeepSeekOCRModule

    compacted = compact(batches(tokenizer)[0])
    fake = types.SimpleNamespace(base_dtype=torch.float32, family=family("v1"))
    with pytest.raises(RuntimeError, match="on_after_batch_transfer"):
        DeepSeekOCRModule.to_base_dtype(fake, compacted)
