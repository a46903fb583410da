"""A corpus of bad samples, each handled: stopped with a name (policy `error`) or skipped and counted (`skip`)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from dsocr_lightning.data.batching import BadSampleError
from dsocr_lightning.data.datamodule import OCRDataModule, OCRSamples
from dsocr_lightning.data.images import MODES, load_image
from dsocr_lightning.data.render import render_line
from dsocr_lightning.families.v1.collate import OCRCollator
from dsocr_lightning.families.v1.images import image_token_count
from dsocr_lightning.training.callbacks import BadSamples

MIXED = "قیمت ۲۵ هزار تومان for 3 items، می‌خواهم"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def manifest(tmp_path):
    """A JSONL manifest whose rows are good, corrupt, truncated, missing, empty-text and too long."""
    good = render_line("سلام دنیا")
    good.save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really an image")
    data = png_bytes(render_line("کتاب"))
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    rows = [
        {"image": "good.png", "text": "سلام دنیا"},
        {"image": "corrupt.png", "text": "x"},
        {"image": "truncated.png", "text": "کتاب"},
        {"image": "missing.png", "text": "y"},
        {"image": "good.png", "text": "   "},
        {"image": "good.png", "text": ""},
        {"image": "empty.png", "text": "z"},
        {"image": "good.png", "text": "ا" * 400},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


def samples_of(manifest, tokenizer_dir):
    data = OCRDataModule(str(manifest), "jsonl", "train", None, image_column="image", mode="tiny",
                         max_length=200, tokenizer_name_or_path=str(tokenizer_dir), scan=False)  # fmt: skip
    data.setup("fit")
    return data, [data.datasets["train"][i] for i in range(len(data.datasets["train"]))]


def test_error_policy_names_split_index_and_path(manifest, standin_dir):
    data, samples = samples_of(manifest, standin_dir)
    collate = data.collator(False, "train")
    assert collate(samples[:1])["input_ids"].shape[0] == 1
    for index in range(1, 8):
        with pytest.raises(BadSampleError, match=rf"split 'train' at index {index} \(.*\): "):
            collate([samples[0], samples[index]])


def test_skip_policy_drops_and_reports_each(manifest, standin_dir):
    data, samples = samples_of(manifest, standin_dir)
    data.hparams.bad_sample_policy = "skip"
    batch = data.collator(False, "train")(samples)
    assert batch["texts"] == ["سلام دنیا"] and batch["input_ids"].shape[0] == 1
    reasons = {index: reason for _, index, _, reason in batch["skipped"]}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert "unreadable" in reasons[1] and "unreadable" in reasons[2] and "missing.png" in reasons[3]
    assert "empty or whitespace-only" in reasons[4] and "empty or whitespace-only" in reasons[5]
    assert "exceed max_length 200" in reasons[7]
    all_bad = data.collator(False, "train")(samples[1:3])
    assert all_bad["texts"] == [] and "input_ids" not in all_bad and len(all_bad["skipped"]) == 2


def test_in_memory_zero_size_image_is_bad(tokenizer):
    rows = [{"image": Image.new("RGB", (0, 48)), "text": "a"}]
    collate = OCRCollator(tokenizer, MODES["tiny"], policy="skip")
    batch = collate([OCRSamples(rows, "image", "text")[0]])
    assert "zero-size image" in batch["skipped"][0][3]


def test_very_wide_line_is_cropped_not_rejected(tokenizer):
    line = Image.new("RGB", (20000, 200), "white")
    batch = OCRCollator(tokenizer, MODES["gundam"])([{"image": line, "text": "a"}])
    assert batch["images_spatial_crop"].tolist() == [[9, 1]]
    assert int(batch["images_seq_mask"].sum()) == image_token_count(1024, 640, 9, 1) == 1183


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "I;16", "RGBA", "1", "L", "I", "F"])
def test_every_pil_mode_becomes_rgb_text_on_white(mode):
    ink = render_line("سلام").convert("L")  # black text on white
    if mode in ("LA", "RGBA"):  # transparent background, opaque black text
        image = Image.new(mode, ink.size, (0, 0) if mode == "LA" else (0, 0, 0, 0))
        image.putalpha(Image.eval(ink, lambda v: 255 - v))
    elif mode == "I;16":
        image = Image.fromarray((np.asarray(ink, dtype=np.uint16) * 257).astype(np.uint16))
        assert image.mode == "I;16"
    else:
        image = ink.convert(mode)
    rgb = np.asarray(load_image(image))
    assert rgb.shape[2] == 3 and rgb.dtype == np.uint8
    assert rgb[0, 0].min() > 200 and rgb.min() < 60  # white background, dark ink


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (100, 20), "white")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    assert load_image(Image.open(io.BytesIO(buffer.getvalue()))).size == (20, 100)


def test_mixed_persian_latin_digits_zwnj_round_trip(tokenizer):
    batch = OCRCollator(tokenizer, MODES["tiny"])([{"image": render_line(MIXED), "text": MIXED}])
    learned = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(learned, skip_special_tokens=True) == MIXED + " "
    assert learned[-1] == tokenizer.eos_token_id


def test_missing_column_is_named(lines_dir, standin_dir):
    from dsocr_lightning.training.checks import ConfigError

    data = OCRDataModule(str(lines_dir), "imagefolder", "train", None, image_column="image_path",
                         tokenizer_name_or_path=str(standin_dir))  # fmt: skip
    with pytest.raises(ConfigError, match=r"no column\(s\) \['image_path'\].*'image'.*data.image_column"):
        data.setup("fit")


def test_instruction_without_image_and_tokenizer_without_pad(standin_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(standin_dir)
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        OCRCollator(tokenizer, instruction="Free OCR. ")
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="needs BOS, EOS and PAD"):
        OCRCollator(tokenizer)


class FakeModule:
    def __init__(self):
        self.logged = []

    def log(self, name, value, **kwargs):
        self.logged.append((name, value))


def test_bad_samples_callback_counts_and_fails_past_the_fraction():
    monitor, module = BadSamples(max_fraction=0.2, min_samples=8), FakeModule()
    batch = {"texts": ["a", "b", "c"], "skipped": [("train", 3, "x.png", "unreadable image")]}
    monitor.on_train_batch_start(None, module, batch, 0)
    assert (monitor.bad, monitor.seen) == (1, 4) and module.logged == [("data/skipped", 1.0)]
    monitor.on_train_batch_start(None, module, {"texts": ["a"] * 4, "skipped": []}, 1)
    with pytest.raises(RuntimeError, match="3 of 12 samples were bad"):
        monitor.on_train_batch_start(None, module, {"texts": ["a", "b"], "skipped": [("train", 9, "", "e")] * 2}, 2)


def test_scan_lists_every_bad_sample_before_the_model_loads(manifest, standin_dir, monkeypatch):
    from pathlib import Path

    from transformers import AutoModel

    from dsocr_lightning.cli import main
    from dsocr_lightning.training.checks import ConfigError

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the scan")

    monkeypatch.setattr(AutoModel, "from_pretrained", refuse)
    args = [
        "fit", "--config", str(Path(__file__).parents[1] / "configs/demo.yaml"),
        "--model.model_name_or_path", str(standin_dir), "--model.make_standin", "false",
        "--data.source", str(manifest), "--data.source_type", "jsonl", "--data.train_split", "train",
        "--data.val_split", "null", "--data.image_column", "image", "--data.max_length", "200",
        "--data.num_workers", "0", "--data.scan", "true",
    ]  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"7 of 8 samples of split 'train' are unusable:\n  split 'train' index 1 "
    ) as stop:
        main(args)
    listed = [line.split()[3] for line in str(stop.value).splitlines() if line.startswith("  split 'train' index ")]
    assert listed == ["1", "2", "3", "4", "5", "6", "7"] and "data.bad_sample_policy skip" in str(stop.value)
