"""Data sources and split strings: imagefolder, JSONL manifest (with `{split}`), save_to_disk folder."""

import json

import pytest

from dsocr_lightning.data.datamodule import OCRDataModule, detect_source, parse_split
from dsocr_lightning.data.render import render_line


def test_parse_split():
    assert parse_split("train[:1000]") == ("train", slice(None, 1000))
    assert parse_split("test[10:-5]") == ("test", slice(10, -5))
    assert parse_split("validation") == ("validation", slice(None))
    with pytest.raises(ValueError, match="name or name"):
        parse_split("train[1000]")


def texts(data: OCRDataModule, split: str) -> list[str]:
    data.setup("fit")
    return [data.datasets[split][i]["text"] for i in range(len(data.datasets[split]))]


def test_jsonl_manifest_with_split_placeholder(tmp_path, standin_dir):
    for split, words in {"train": ["آب", "نان", "گل"], "test": ["ماه"]}.items():
        rows = []
        for i, word in enumerate(words):
            render_line(word).save(tmp_path / f"{split}{i}.png")
            rows.append({"file": f"{split}{i}.png", "label": word})
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    source = str(tmp_path / "{split}.jsonl")
    data = OCRDataModule(source, "jsonl", "train[1:]", "test", image_column="file", text_column="label",
                         tokenizer_name_or_path=str(standin_dir))  # fmt: skip
    assert texts(data, "train[1:]") == ["نان", "گل"] and texts(data, "test") == ["ماه"]
    sample = data.datasets["test"][0]
    assert sample["path"].endswith("test0.png") and sample["image"].size[0] > 0


def test_save_to_disk_folder_is_detected_and_sliced(tmp_path, lines_dir, standin_dir):
    import datasets

    table = datasets.load_dataset("imagefolder", data_dir=str(lines_dir))
    table.save_to_disk(str(tmp_path / "saved"))
    assert detect_source(str(tmp_path / "saved")) == "disk"
    data = OCRDataModule(str(tmp_path / "saved"), "auto", "train[:3]", "test[-2:]", image_column="image",
                         tokenizer_name_or_path=str(standin_dir))  # fmt: skip
    assert texts(data, "train[:3]") == table["train"]["text"][:3]
    assert texts(data, "test[-2:]") == table["test"]["text"][-2:]


def test_detect_source(tmp_path, lines_dir):
    (tmp_path / "m.jsonl").write_text("")
    assert detect_source(str(tmp_path / "m.jsonl")) == "jsonl"
    assert detect_source(str(tmp_path / "{split}.jsonl")) == "jsonl"
    assert detect_source(str(lines_dir)) == "imagefolder"
    assert detect_source("hezarai/parsynth-ocr-200k") == "hub"
