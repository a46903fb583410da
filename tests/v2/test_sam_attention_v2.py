"""DeepSeek-OCR 2's SAM attention with folded relative positions (families/v2/sam_attention.py) against transformers'."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_ocr2")


def sam_encoder(v2_dir, global_layer: bool):
    """The stand-in's SAM encoder at 512 px (a 32 x 32 grid), windowed layers and optionally one global one, with
    random weights of a useful size (the stand-in's are ~1e-10 and its relative-position tables zeros: they would hide
    a misplaced table)."""
    from transformers import AutoConfig
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2SamVisionEncoder

    config = copy.deepcopy(AutoConfig.from_pretrained(v2_dir).vision_config.sam_config)
    config.image_size, config.num_hidden_layers = 512, 2
    config.global_attn_indexes = [1] if global_layer else []
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    encoder = DeepseekOcr2SamVisionEncoder(config).eval()
    for name, parameter in encoder.named_parameters():
        parameter.data.normal_(0, 0.5 if "rel_pos" in name else 0.2)
    return encoder


@pytest.mark.parametrize("global_layer", [False, True])
def test_folded_sam_attention_equals_transformers(v2_dir, global_layer):
    from dsocr_lightning.families.v2.sam_attention import patch_sam_attention

    encoder = sam_encoder(v2_dir, global_layer)
    pixels = torch.randn(2, 3, 512, 512)
    with torch.no_grad():
        expected = encoder(pixels).last_hidden_state
        names = list(encoder.state_dict())
        assert patch_sam_attention(encoder) == 2
        folded = encoder(pixels).last_hidden_state
    assert all(type(layer.attn).__name__.startswith("Folded") for layer in encoder.layers)
    assert list(encoder.state_dict()) == names  # the same parameters under the same names
    assert type(pickle.loads(pickle.dumps(encoder.layers[0].attn))) is type(encoder.layers[0].attn)
    assert expected.abs().mean() > 0.1  # an output to compare
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-4)


def test_fast_paths_fold_sam_attention_unless_told_not_to(v2_dir, caplog):
    from dsocr_lightning.fast import FastPaths
    from dsocr_lightning.training.loading import LoadSettings, LoraSettings, load_model

    for fold in (True, False):
        settings = LoadSettings(str(v2_dir), "transformers", fast=FastPaths(fold_rel_pos=fold))
        with caplog.at_level("INFO"):
            model, *_ = load_model(settings, LoraSettings())
        names = {type(module).__name__ for module in model.modules()}
        assert ("FoldedDeepseekOcr2SamVisionSdpaAttention" in names) is fold
    assert "SAM attention: 1 layers with the relative positions folded" in caplog.text
    assert "SAM attention: transformers' own (fast.fold_rel_pos false" in caplog.text


@pytest.mark.parametrize("sizes", [(14, 14), (64, 64), (16, 12), (12, 16)])
def test_rel_pos_table_is_transformers_get_rel_pos(v2_dir, sizes):
    from dsocr_lightning.families.v2.sam_attention import rel_pos_table

    attention = sam_encoder(v2_dir, global_layer=True).layers[1].attn
    expected = attention.get_rel_pos(*sizes, attention.rel_pos_h)
    assert expected.abs().mean() > 0.1
    assert torch.equal(rel_pos_table(*sizes, attention.rel_pos_h), expected)
