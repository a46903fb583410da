"""DeepSeek-OCR 2's forward without syncs (families/v2/forward.py) against the model's own forward: the same loss and
LoRA gradients (encoder LoRA included) with and without the padding mask and gradient checkpointing; transformers builds no mask and looks for
no packed sequences under `causal_only`, which restores the attention setting; a miscounted batch is refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_ocr2")
pytestmark = pytest.mark.v2

KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "pixel_values_local", "num_local_patches")


@pytest.fixture(scope="module")
def batch(processor, pages):
    from dsocr_lightning.data.images import MODES
    from dsocr_lightning.families.v2.collate import ProcessorCollator

    collate = ProcessorCollator(processor, mode=MODES["gundam"])
    return collate([{"image": pages["line"], "text": "line"}, {"image": pages["wide"], "text": "a wide page"}])


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "checkpointing"])
def model(v2_dir, request):
    """The stand-in as the loader gives it, LoRA on the encoder too (image features then carry gradients); with
    gradient checkpointing, PEFT's hook makes the input embeddings require grad."""
    from test_frozen_vision_v2 import checkpointed_model

    return checkpointed_model(v2_dir, encoder=True, checkpointing=request.param)


def loss_and_grads(model, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = run().loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def text_config(model):
    return model.get_base_model().model.language_model.config


@pytest.mark.parametrize("masked", [True, False], ids=["padding-mask", "right-padded-unmasked"])
def test_loss_and_lora_gradients_equal_the_models_forward(model, batch, masked):
    from dsocr_lightning.families.v2.forward import forward

    inputs = {key: batch[key] for key in KEYS} | {"use_cache": False, "num_items_in_batch": 7.0}
    if not masked:
        assert batch["right_padded"]
        inputs["attention_mask"] = None
    expected, expected_grads = loss_and_grads(model, lambda: model(**inputs))
    got, got_grads = loss_and_grads(model, lambda: forward(model, inputs, batch))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert got_grads.keys() == expected_grads.keys()
    assert any("vision_encoder" in name for name in got_grads)  # encoder LoRA: the features' gradients are compared
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert text_config(model)._attn_implementation == "sdpa"


def test_an_unmasked_batch_builds_no_mask_and_looks_for_no_packed_sequences(model, batch, monkeypatch):
    from transformers import masking_utils

    from dsocr_lightning.families.v2.forward import forward

    def refuse(*args, **kwargs):
        raise AssertionError("transformers read the position ids back (packed sequences)")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", refuse)
    inputs = {key: batch[key] for key in KEYS} | {"use_cache": False, "attention_mask": None}
    with torch.no_grad():
        with pytest.raises(AssertionError, match="packed sequences"):  # the model's own forward does look
            model(**inputs)
        assert torch.isfinite(forward(model, inputs, batch).loss)


def test_causal_only_restores_the_attention_after_an_error(model):
    from dsocr_lightning.families.v2.forward import CAUSAL_SDPA, causal_only

    config = text_config(model)
    with pytest.raises(RuntimeError, match="inside"), causal_only(config):
        assert config._attn_implementation == CAUSAL_SDPA
        raise RuntimeError("inside")
    assert config._attn_implementation == "sdpa"


def test_a_miscounted_batch_is_refused(model, batch):
    from dsocr_lightning.families.v2.forward import forward

    inputs = {key: batch[key] for key in KEYS} | {"use_cache": False}
    with torch.no_grad(), pytest.raises(ValueError, match="feature rows for"):
        forward(model, inputs, batch | {"image_tokens": batch["image_tokens"] - 1})


def test_a_batch_from_another_collator_is_refused_with_the_reason(model, batch):
    from dsocr_lightning.families.v2.forward import forward

    inputs = {key: batch[key] for key in KEYS} | {"use_cache": False}
    foreign = {key: value for key, value in batch.items() if key != "image_tokens"}
    with torch.no_grad(), pytest.raises(KeyError, match="image_tokens"):
        forward(model, inputs, foreign)
