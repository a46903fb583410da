"""Clear errors, each naming the remedy, and the safe-loading rules."""

import json
import shutil

import pytest
import torch

from dsocr_lightning.checks import check_model_source, check_precision
from dsocr_lightning.data import OCRDataModule
from dsocr_lightning.loading import LoadSettings, LoraSettings, load_model, resolve_backend
from dsocr_lightning.module import DeepSeekOCRModule


def test_model_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model_source(str(tmp_path / "deepseek_ocr"))


def test_model_folder_of_another_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a DeepSeek-OCR checkpoint"):
        check_model_source(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        check_model_source(str(tmp_path))


def test_weights_only_from_safetensors(standin_dir, tmp_path):
    copy = shutil.copytree(standin_dir, tmp_path / "ckpt")
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no .safetensors weights"):
        check_model_source(str(copy))


def test_remote_code_needs_explicit_trust(standin_dir):
    with pytest.raises(ValueError, match="trust_remote_code: true"):
        load_model(LoadSettings(str(standin_dir), "transformers", trust_remote_code=False), LoraSettings())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_unsloth_without_a_gpu():
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        resolve_backend("unsloth")
    assert resolve_backend("auto") == "transformers"


def test_bf16_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ValueError, match="Tesla T4 has no bf16: use --trainer.precision 16-mixed"):
        check_precision("bf16-mixed")
    check_precision("16-mixed")


def test_dataset_id_not_found_offline(standin_dir):
    data = OCRDataModule("nobody-here/no-such-dataset", "hub", tokenizer_name_or_path=str(standin_dir))
    with pytest.raises(Exception, match=r"could not load split 'train\[:1000\]' of 'nobody-here/no-such-dataset'"):
        data.setup("fit")


def test_split_not_found(lines_dir, standin_dir):
    data = OCRDataModule(str(lines_dir), "imagefolder", "validation", None, image_column="image",
                         tokenizer_name_or_path=str(standin_dir))  # fmt: skip
    with pytest.raises(ValueError, match=r"could not load split 'validation'.*(Unknown split|validation)"):
        data.setup("fit")


def test_out_of_memory_names_the_remedies():
    module = DeepSeekOCRModule()

    def runs_out(**kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    module.model = runs_out
    batch = {k: None for k in ("input_ids", "attention_mask", "labels", "images", "images_seq_mask")}
    batch |= {"images_spatial_crop": None, "texts": ["a", "b"]}
    with pytest.raises(RuntimeError, match=r"--data.batch_size, currently 2.*gradient_checkpointing.*--data.mode"):
        module.guarded_forward(batch)
