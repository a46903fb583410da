"""Dense MoE decoding computes what transformers' expert loop computes, LoRA included, and generates the same."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel

from dsocr_lightning import fastmoe
from dsocr_lightning.collate import OCRCollator
from dsocr_lightning.fastmoe import dense_moe_decoding, moe_layers
from dsocr_lightning.generation import GenerationSettings, generate_tokens
from dsocr_lightning.images import MODES
from dsocr_lightning.loading import TARGET_MODULES
from dsocr_lightning.render import render_line

stacked = fastmoe.stacked_projection


def lora_model(standin_dir):
    model = AutoModel.from_pretrained(standin_dir, trust_remote_code=True, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=TARGET_MODULES)).eval()
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)  # an adapter that does something
    return model


def test_dense_layer_equals_the_loop(standin_dir):
    model = lora_model(standin_dir)
    (layer,) = moe_layers(model)
    hidden = torch.randn(5, model.config.hidden_size)
    ids, weights = layer.gate(hidden[None])
    with torch.no_grad():
        expected = type(layer).moe(layer, hidden, ids, weights)
        with dense_moe_decoding(model) as switched:
            got = layer.moe(hidden, ids, weights)
    assert switched == 1 and "moe" not in vars(layer)  # restored afterwards
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dense_decoding_generates_the_same_tokens(standin_dir, tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(fastmoe, "stacked_projection", lambda *a: calls.append(1) or stacked(*a))
    model = lora_model(standin_dir)
    texts = ["سلام دنیا", "کتاب ۱۲", "آب"]
    collate = OCRCollator(tokenizer, MODES["tiny"], with_prompts=True)
    batch = collate([{"image": render_line(t), "text": t} for t in texts])
    expected = generate_tokens(model, tokenizer, batch, GenerationSettings(12, dense_moe=False))
    got = generate_tokens(model, tokenizer, batch, GenerationSettings(12, dense_moe=True))
    assert torch.equal(got, expected)
    assert len(calls) == 3 * 11  # gate/up/down at each of the 11 decode steps after the prefill
    assert not any("moe" in vars(layer) for layer in moe_layers(model))
