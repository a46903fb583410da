"""In the v2 environment: the version comes from the checkpoint, and a v1 checkpoint or adapter fails before any
weight loads, saying what to install."""

import json

import pytest

from dsocr_lightning.families.detect import checkpoint_version, detect_version, environment_version

pytestmark = pytest.mark.v2
V1_CONFIG = {"model_type": "deepseek_vl_v2", "architectures": ["DeepseekOCRForCausalLM"],
             "vision_config": {"width": {"clip-l-14-224": {}, "sam_vit_b": {}}}}  # fmt: skip


def test_this_environment_runs_v2():
    assert environment_version() == "v2"


def test_the_stand_in_is_v2(v2_dir):
    assert detect_version(str(v2_dir)) == "v2"


def test_a_v1_checkpoint_fails_before_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(V1_CONFIG))  # no weights at all: they are never reached
    with pytest.raises(RuntimeError, match=r"v1 checkpoint .* Install `\.\[v1\]` in its own environment"):
        checkpoint_version(str(tmp_path))


def test_a_v1_adapter_on_the_v2_base_fails(v2_dir, tmp_path):
    v1_base = tmp_path / "v1_base"
    v1_base.mkdir()
    (v1_base / "config.json").write_text(json.dumps(V1_CONFIG))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "target_modules": ["q_proj"],
                                                             "base_model_name_or_path": str(v1_base)}))  # fmt: skip
    with pytest.raises(ValueError, match="trained on a DeepSeek-OCR v1 base"):
        checkpoint_version(str(v2_dir), adapter_path=str(adapter))
