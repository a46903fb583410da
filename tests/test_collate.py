"""The collator against the contract: sequence layout, image-token counts, masking, PAD, EOS, left-padded prompts."""

import types

import pytest
from PIL import Image

from dsocr_lightning.data.batching import IGNORE_INDEX
from dsocr_lightning.data.images import MODES
from dsocr_lightning.families.v1.collate import OCRCollator
from dsocr_lightning.families.v1.images import image_token_count

BOS, EOS, PAD, IMG = 0, 1, 2, 128815
LINE = "سلام\u200cدنیا ۱۲۳"


def line_image(width=255, height=48):
    return Image.new("RGB", (width, height), "white")


def test_real_special_ids(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMG


def test_one_sample_layout(tokenizer):
    batch = OCRCollator(tokenizer)([{"image": line_image(), "text": f"  {LINE} "}])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    after = tokenizer.encode("\nFree OCR. ", add_special_tokens=False)
    response = tokenizer.encode(f"{LINE} {tokenizer.eos_token}", add_special_tokens=False)
    assert ids == [BOS] + [IMG] * 273 + after + response  # text before <image> is empty
    assert response[-1] == EOS
    prompt_len = 1 + 273 + len(after)
    assert labels == [IGNORE_INDEX] * prompt_len + response  # EOS is learned, the prompt is not
    assert batch["images_seq_mask"][0].sum() == 273
    assert batch["images_seq_mask"][0, 1:274].all()
    assert batch["images_spatial_crop"].tolist() == [[1, 1]]
    crops, glob = batch["images"][0]
    assert crops.shape == (1, 3, 1024, 1024) and glob.shape == (1, 3, 1024, 1024)


def test_padding_and_masks_across_a_batch(tokenizer):
    samples = [{"image": line_image(), "text": "ab"}, {"image": line_image(1920, 1280), "text": LINE}]
    batch = OCRCollator(tokenizer, MODES["gundam"])(samples)
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    counts = [image_token_count(1024, 640), image_token_count(1024, 640, 3, 2)]
    assert batch["images_seq_mask"].sum(1).tolist() == counts == [273, 893]
    assert batch["images_spatial_crop"].tolist() == [[1, 1], [3, 2]]
    assert batch["images"][1][0].shape == (6, 3, 640, 640)
    assert ids.shape == labels.shape == attn.shape == batch["images_seq_mask"].shape
    assert (attn == (ids != PAD).long()).all()
    short = int(attn[0].sum())
    assert (ids[0, short:] == PAD).all() and (labels[0, short:] == IGNORE_INDEX).all()
    assert ids[0, short - 1] == EOS and labels[0, short - 1] == EOS  # right padded, EOS kept
    assert not batch["images_seq_mask"][0, short:].any()
    assert batch["right_padded"] is True


def test_right_padding_needs_no_mask(real_routing_dir):
    """The module drops a right-padded batch's mask (transformers backend): the loss and every LoRA gradient are
    the masked ones."""
    from test_fast_moe import assert_rel_close, batch_of, lora_grads, lora_model

    from dsocr_lightning.families import family
    from dsocr_lightning.training.module import DeepSeekOCRModule

    model, tokenizer = lora_model(real_routing_dir, grouped=True)
    batch = batch_of(tokenizer, ["سلام دنیا و یک خط بلند", "آب"])
    assert batch["right_padded"] and not batch["attention_mask"].all()
    seen = {}
    fake = types.SimpleNamespace(
        backend="transformers", graph_pad=0, family=family("v1"), model=lambda **kw: seen.update(kw) or model(**kw)
    )
    loss = DeepSeekOCRModule.forward(fake, batch).loss
    assert seen["attention_mask"] is None
    loss.backward()
    unmasked = lora_grads(model)
    model.zero_grad()
    masked = model(**{k: batch[k] for k in family("v1").forward_keys}).loss
    masked.backward()
    assert loss.item() == pytest.approx(masked.item(), rel=1e-6)
    for name, grad in lora_grads(model).items():
        assert_rel_close(unmasked[name], grad, name)
    fake.backend = "unsloth"  # Unsloth's own kernels get the mask as before
    DeepSeekOCRModule.forward(fake, batch)
    assert seen["attention_mask"] is batch["attention_mask"]


def test_prompts_are_left_padded(tokenizer):
    samples = [{"image": line_image(), "text": "x"}, {"image": line_image(1920, 1280), "text": "y"}]
    batch = OCRCollator(tokenizer, with_prompts=True)(samples)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    last = tokenizer.encode(" ", add_special_tokens=False)[-1]  # the instruction ends in a space
    assert (ids[:, -1] == last).all()
    assert mask[0].sum() == 1 + 273 + 11 and mask[1].sum() == 1 + 893 + 11
    assert (ids[0, : ids.shape[1] - int(mask[0].sum())] == PAD).all()
    assert batch["prompt_images_seq_mask"].sum(1).tolist() == [273, 893]
    assert batch["texts"] == ["x", "y"]


@pytest.mark.parametrize("mode", ["tiny", "small", "base", "large", "gundam"])
def test_every_mode_gives_the_contract_count(tokenizer, mode):
    m = MODES[mode]
    batch = OCRCollator(tokenizer, m)([{"image": line_image(), "text": "z"}])
    assert int(batch["images_seq_mask"].sum()) == image_token_count(m.base_size, m.image_size)
    assert batch["images"][0][1].shape[-1] == m.base_size


def test_full_sequence_labels_mask_only_images(tokenizer):
    batch = OCRCollator(tokenizer, train_on_responses_only=False)([{"image": line_image(), "text": "ab"}])
    ids, labels, img = batch["input_ids"][0], batch["labels"][0], batch["images_seq_mask"][0]
    assert (labels[img] == IGNORE_INDEX).all()
    assert (labels[~img] == ids[~img]).all()


def test_bad_instruction_and_tokenizer_are_refused(tokenizer):
    with pytest.raises(ValueError, match="exactly one"):
        OCRCollator(tokenizer, instruction="Free OCR.")

    class PadIsEos:
        bos_token_id, eos_token_id, pad_token_id, unk_token_id = 0, 1, 1, 3

        def convert_tokens_to_ids(self, token):
            return IMG

    with pytest.raises(ValueError, match="PAD equals EOS"):
        OCRCollator(PadIsEos())
