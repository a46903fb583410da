"""export: adapter + base -> one plain checkpoint whose logits equal the adapter model's, loadable without peft;
merged in the base's own 16-bit dtype with one rounding, at about the memory of that 16-bit checkpoint."""

import copy
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

from dsocr_lightning.data.images import MODES
from dsocr_lightning.data.render import render_line
from dsocr_lightning.families.v1 import (
    standin,  # its checkpoint writer imports v1's model classes on first use: collected anywhere
)
from dsocr_lightning.families.v1.collate import OCRCollator
from dsocr_lightning.families.v1.export import merge_lora_layers
from dsocr_lightning.files.export import export
from dsocr_lightning.files.rounding import report_rounding
from dsocr_lightning.training.loading import TARGET_MODULES, LoadSettings, LoraSettings, load_model
from dsocr_lightning.training.module import save_adapter

KEYS = ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")
ROOT = Path(__file__).parents[1]
UMASK = os.umask(0o022)
os.umask(UMASK)
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


def test_bfloat16_export_rounds_the_float32_merge_once(adapter, tmp_path):
    model, folder = adapter
    with pytest.raises(ValueError, match="trust_remote_code true"):
        export(str(folder), str(tmp_path / "x"))
    out = export(str(folder), str(tmp_path / "bf16"), trust_remote_code=True)
    expected = copy.deepcopy(model).merge_and_unload().to(torch.bfloat16).state_dict()  # float32 merge, then round
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert set(weights.keys()) == set(expected)
        assert all(torch.equal(weights.get_tensor(k), expected[k]) for k in weights.keys())  # noqa: SIM118
    assert out.stat().st_mode & 0o777 == 0o777 & ~UMASK  # readable, not mkdtemp's 0700
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o666 & ~UMASK}  # nor safetensors' 0600


def test_failed_export_leaves_nothing_behind(adapter, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="disk full"):
        export(str(adapter[1]), str(tmp_path / "out" / "merged"), trust_remote_code=True)
    assert list((tmp_path / "out").iterdir()) == []


EXPORT_MEMORY = """
import sys
from peft import PeftModel, get_peft_model  # the libraries' own memory is no part of what export needs
from transformers import AutoModel, AutoTokenizer
from dsocr_lightning.files.export import main

def status(key):  # kB; VmHWM: this process's peak RSS (ru_maxrss would include the forking parent's)
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

rss = status("VmRSS")
main([sys.argv[1], sys.argv[2], "--trust_remote_code", "true"])
print(status("VmHWM") - rss)
"""


def test_export_of_a_16bit_base_peaks_near_its_size(tmp_path):
    """A bf16 stand-in with the real vocabulary at hidden size 512 (141M parameters, 270 MiB in bf16): the export
    process grows by less than 1.5 times that (3 times before: a float32 copy of the base, then the merge)."""
    base = standin.write_standin_checkpoint(tmp_path / "base", hidden_size=512, dtype=torch.bfloat16)
    model = AutoModel.from_pretrained(base, trust_remote_code=True, dtype=torch.float32)
    size16 = 2 * sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGET_MODULES))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "adapter")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", EXPORT_MEMORY, str(tmp_path / "adapter"), str(tmp_path / "merged")],
                          check=False, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 1.5 * size16
    expected = model.merge_and_unload().to(torch.bfloat16).state_dict()  # as before: float32 merge, one rounding
    with safe_open(str(tmp_path / "merged/model.safetensors"), "pt") as weights:
        assert all(torch.equal(weights.get_tensor(k), expected[k]) for k in weights.keys())  # noqa: SIM118


def test_adapter_names_its_base_from_any_working_folder(standin_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(standin_dir.parent)  # the user trains with a relative folder, e.g. ./deepseek_ocr
    settings = LoadSettings(standin_dir.name, "transformers", trust_remote_code=True)
    model, tokenizer, *_ = load_model(settings, LoraSettings())
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

    def error(scale: float, dtype: torch.dtype) -> float:
        copy_ = copy.deepcopy(layer)
        copy_.base_model.model[0].lora_B["default"].weight.data.mul_(scale)
        return merge_lora_layers(copy_, dtype)

    errors = {dtype: error(1.0, dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16)}
    assert errors[torch.float32] == 0 and 0 < errors[torch.float16] < errors[torch.bfloat16] < 0.3
    assert error(1e-4, torch.bfloat16) > 0.9  # an update far below bf16's spacing at the weights' size: rounded away
    with pytest.warns(UserWarning, match="--dtype float16"):
        report_rounding(error(1e-4, torch.bfloat16), "bfloat16")
