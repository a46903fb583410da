"""export: adapter + base -> one plain checkpoint whose logits equal the adapter model's, loadable without peft."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from dsocr_lightning.collate import OCRCollator
from dsocr_lightning.export import export, report_rounding, update_rounding_error
from dsocr_lightning.images import MODES
from dsocr_lightning.loading import TARGET_MODULES, LoadSettings, LoraSettings, load_model
from dsocr_lightning.module import save_adapter
from dsocr_lightning.render import render_line

KEYS = ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")
ROOT = Path(__file__).parents[1]
RELOAD = """
import sys, torch
sys.modules["peft"] = None  # the merged checkpoint must load with no peft at all
from transformers import AutoModel
batch = torch.load(sys.argv[2], weights_only=True)
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(**batch).logits, sys.argv[3])
"""


@pytest.fixture(scope="module")
def adapter(standin_dir, tmp_path_factory):
    model = AutoModel.from_pretrained(standin_dir, trust_remote_code=True, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGET_MODULES)).eval()
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(standin_dir).save_pretrained(folder)
    return model, folder


def test_merged_logits_equal_adapter_logits_without_peft(adapter, standin_dir, tokenizer, tmp_path):
    model, folder = adapter
    out = export(str(folder), str(tmp_path / "merged"), dtype="float32", trust_remote_code=True)
    assert not (out / "adapter_config.json").exists() and (out / "modeling_dsocr_standin.py").exists()
    assert "auto_map" in json.loads((out / "config.json").read_text())
    batch = OCRCollator(tokenizer, MODES["tiny"])([{"image": render_line("سلام"), "text": "سلام"}])
    inputs = {k: batch[k] for k in KEYS}
    torch.save(inputs, tmp_path / "batch.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "batch.pt"), str(tmp_path / "l.pt")],
                          check=False, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.testing.assert_close(torch.load(tmp_path / "l.pt", weights_only=True), expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_export_and_trust(adapter, tmp_path):
    _, folder = adapter
    with pytest.raises(ValueError, match="trust_remote_code true"):
        export(str(folder), str(tmp_path / "x"))
    out = export(str(folder), str(tmp_path / "bf16"), trust_remote_code=True)
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}  # noqa: SIM118


def test_adapter_names_its_base_from_any_working_folder(standin_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(standin_dir.parent)  # the user trains with a relative folder, e.g. ./deepseek_ocr
    settings = LoadSettings(standin_dir.name, "transformers", trust_remote_code=True)
    model, tokenizer, _ = load_model(settings, LoraSettings())
    save_adapter(model, tokenizer, tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)  # ... and loads the adapter somewhere else
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(standin_dir.resolve())
    assert (export("adapter", "merged", trust_remote_code=True) / "model.safetensors").exists()


def test_rounding_error_of_the_merged_update():
    torch.manual_seed(0)
    layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(256, 256)), LoraConfig(r=4, target_modules=["0"]))
    lora_b = layer.base_model.model[0].lora_B["default"].weight
    lora_b.data.normal_(0, 0.05)
    errors = {dtype: update_rounding_error(layer, dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    assert errors[torch.float32] == 0 and 0 < errors[torch.float16] < errors[torch.bfloat16] < 0.3
    lora_b.data.mul_(1e-4)  # an update far below bf16's spacing at the weights' size: rounded away whole
    assert update_rounding_error(layer, torch.bfloat16) > 0.9
    with pytest.warns(UserWarning, match="--dtype float16"):
        report_rounding(update_rounding_error(layer, torch.bfloat16), "bfloat16")
