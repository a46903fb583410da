"""The model version comes from the checkpoint's config.json; in the v1 environment a DeepSeek-OCR 2 checkpoint or
adapter fails before any weight loads, saying what to install."""

import json

import pytest

from dsocr_lightning.families.detect import adapter_version, detect_version, environment_version, version_of_config
from dsocr_lightning.training.checks import ConfigError
from dsocr_lightning.training.loading import LoadSettings, LoraSettings, load_model

V2_CONFIG = {"model_type": "deepseek_ocr2", "architectures": ["DeepseekOcr2ForConditionalGeneration"]}
REMOTE_V2 = {"model_type": "deepseek_vl_v2", "vision_config": {"model_name": "deepencoderv2",
                                                               "width": {"qwen2-0-5b": {"dim": 896}}}}  # fmt: skip


def folder_with(tmp_path, name, config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))  # no weights: they must never be reached
    return folder


def test_this_environment_runs_v1():
    assert environment_version() == "v1"


def test_versions_from_config(standin_dir):
    assert detect_version(str(standin_dir)) == "v1"
    assert version_of_config(V2_CONFIG, "x") == "v2"
    with pytest.raises(ValueError, match="remote-code form.*deepseek-community/DeepSeek-OCR-2"):
        version_of_config(REMOTE_V2, "x")
    with pytest.raises(ValueError, match="not a DeepSeek-OCR checkpoint"):
        version_of_config({"model_type": "llama"}, "x")


def test_a_v2_checkpoint_fails_before_weights(tmp_path):
    folder = folder_with(tmp_path, "v2", V2_CONFIG)
    with pytest.raises(RuntimeError, match=r"v2 checkpoint .* Install `\.\[v2\]` in its own environment"):
        load_model(LoadSettings(str(folder), backend="transformers"), LoraSettings())


def test_adapters_carry_their_version(standin_dir, tmp_path):
    v2_adapter = folder_with(tmp_path, "a2", {})
    (v2_adapter / "adapter_config.json").write_text(json.dumps({"target_parameters": ["experts.gate_proj"]}))
    assert adapter_version(str(v2_adapter)) == "v2"
    (v2_adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(standin_dir)}))
    assert adapter_version(str(v2_adapter)) == "v1"


def test_a_v2_adapter_on_the_v1_base_fails(standin_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"target_parameters": ["experts.gate_up_proj"]}))
    settings = LoadSettings(str(standin_dir), backend="transformers", trust_remote_code=True,
                            adapter_path=str(adapter))  # fmt: skip
    with pytest.raises(ValueError, match="trained on a DeepSeek-OCR v2 base"):
        load_model(settings, LoraSettings())


def test_export_of_a_v2_adapter_says_what_to_install(tmp_path):
    from dsocr_lightning.files.export import export

    adapter = folder_with(tmp_path, "adapter", {})
    (adapter / "adapter_config.json").write_text(json.dumps({"target_parameters": ["experts.gate_up_proj"]}))
    with pytest.raises(ConfigError, match=r"Install `\.\[v2\]`"):  # python -m prints it as one error: line
        export(str(adapter), str(tmp_path / "out"))
