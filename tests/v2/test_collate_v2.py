"""v2 batches come from transformers' processor: image-token counts, masks and labels on a line, a wide and a tall
page, and the model accepts them (its own placeholder check)."""

import pytest
import torch

from dsocr_lightning.data.batching import IGNORE_INDEX, BadSample
from dsocr_lightning.data.images import MODES
from dsocr_lightning.families.v2.collate import ProcessorCollator

pytestmark = pytest.mark.v2

# 1024 px global view: 16 x 16 = 256 tokens; each 768 px crop 12 x 12 = 144; one separator
EXPECTED = {"line": (0, 256 + 1), "wide": (3, 256 + 3 * 144 + 1), "tall": (3, 256 + 3 * 144 + 1)}


def collate(processor, pages, names, **settings):
    collator = ProcessorCollator(processor, mode=MODES["gundam"], **settings)
    return collator([{"image": pages[n], "text": f" {n} text ", "index": i} for i, n in enumerate(names)])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_token_counts_and_masks(processor, pages, name):
    batch = collate(processor, pages, [name])
    crops, tokens = EXPECTED[name]
    tokenizer, image_id = processor.tokenizer, processor.image_token_id
    ids, labels, mask = batch["input_ids"][0], batch["labels"][0], batch["images_seq_mask"][0]
    assert int(mask.sum()) == tokens == int((ids == image_id).sum())
    assert batch["num_local_patches"] == [crops]
    assert batch["pixel_values"].shape == (1, 3, 1024, 1024)
    assert (
        (batch["pixel_values_local"] is None)
        if not crops
        else batch["pixel_values_local"].shape == (crops, 3, 768, 768)
    )
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    prompt = int((labels == IGNORE_INDEX).sum())
    assert labels[:prompt].eq(IGNORE_INDEX).all() and not mask[prompt:].any()  # the image sits in the unlearned prompt
    assert tokenizer.decode(labels[prompt:]) == f"{name} text {tokenizer.eos_token}"  # response only, EOS learned


def test_mixed_batch_pads_right_and_prompts_left(processor, pages):
    batch = collate(processor, pages, ["line", "wide", "tall"], with_prompts=True)
    pad = processor.tokenizer.pad_token_id
    assert batch["num_local_patches"] == [0, 3, 3] and batch["pixel_values_local"].shape[0] == 6
    assert batch["input_ids"][0, -1] == pad and batch["labels"][0, -1] == IGNORE_INDEX
    assert (batch["attention_mask"] == (batch["input_ids"] != pad)).all()
    assert batch["prompt_input_ids"][0, 0] == pad and batch["prompt_input_ids"][1, -1] != pad


def test_without_crops_the_view_and_count_agree(processor, pages):
    collator = ProcessorCollator(processor, mode=MODES["tiny"])  # crop_mode false
    batch = collator([{"image": pages["wide"], "text": "x"}])
    assert batch["pixel_values"].shape[-1] == 768 and int(batch["images_seq_mask"].sum()) == 144 + 1


def test_the_model_takes_the_batch(v2_dir, processor, pages):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(v2_dir)
    batch = collate(processor, pages, ["line", "wide"])
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "pixel_values_local", "num_local_patches")
    with torch.no_grad():
        loss = model(**{k: batch[k] for k in keys}).loss
    assert torch.isfinite(loss)


def test_bad_samples_follow_the_policy(processor, pages):
    from dsocr_lightning.data.batching import BadSampleError

    samples = [{"image": pages["line"], "text": "ok", "index": 0}, {"image": None, "text": " ", "index": 1}]
    with pytest.raises(BadSampleError, match="index 1"):
        ProcessorCollator(processor)(samples)
    batch = ProcessorCollator(processor, policy="skip")(samples)
    assert batch["texts"] == ["ok"] and len(batch["skipped"]) == 1


def test_both_families_share_the_bookkeeping(processor, pages):
    """v1's collator and v2's differ only in their images: on the same samples (one of them bad) both give the same
    texts, indices, paths, skipped reports and learned labels."""
    from dsocr_lightning.families.v1.collate import OCRCollator

    samples = [{"image": pages["line"], "text": f"t{i}", "index": 10 + i, "path": f"{i}.png"} for i in range(3)]
    samples[1] |= {"text": " "}
    v1 = OCRCollator(processor.tokenizer, MODES["tiny"], policy="skip")(samples)  # v1's geometry, v2's tokenizer
    v2 = ProcessorCollator(processor, policy="skip")(samples)
    assert v2["indices"] == [10, 12] and v2["paths"] == ["0.png", "2.png"] and v2["texts"] == ["t0", "t2"]
    for key in ("texts", "indices", "paths", "skipped"):
        assert v1[key] == v2[key], key
    learned = [labels[labels != IGNORE_INDEX].tolist() for labels in (v1["labels"], v2["labels"])]
    assert learned[0] == learned[1] and "images" in v1 and "pixel_values" in v2


def test_the_scan_lists_every_bad_sample_whatever_the_policy(processor, pages):
    """The pre-scan runs the collator it is given (no copy with another policy, whose setup could differ)."""
    from dsocr_lightning.data.scan import scan_samples

    samples = [{"image": pages["line"], "text": "ok", "index": 0}, {"image": "missing.png", "text": "x", "index": 1},
               {"image": pages["line"], "text": "", "index": 2}]  # fmt: skip
    collator = ProcessorCollator(processor, policy="error", split="train")
    problems = scan_samples(samples, collator, batch_size=2, num_workers=0)
    assert [(split, index) for split, index, _, _ in problems] == [("train", 1), ("train", 2)]
    assert collator.processor is processor and collator.policy == "error"


def test_the_scan_makes_no_pixels_without_max_length(processor, pages, monkeypatch):
    """Without max_length the scan checks text and image only (no processor call); with it, all of `prepare`."""
    collator = ProcessorCollator(processor, mode=MODES["gundam"])
    calls = []
    encode_image = ProcessorCollator.encode_image
    monkeypatch.setattr(ProcessorCollator, "encode_image", lambda self, image: calls.append(image))
    collator.inspect({"image": pages["wide"], "text": "x"})
    with pytest.raises(BadSample, match="empty or whitespace-only text"):
        collator.inspect({"image": pages["line"], "text": " "})
    with pytest.raises(BadSample, match="unreadable image"):
        collator.inspect({"image": pages["line"].crop((0, 0, 0, 0)), "text": "x"})
    assert calls == []
    monkeypatch.undo()
    collator.max_length = len(encode_image(collator, pages["wide"]).prompt) + 1
    with pytest.raises(BadSample, match="tokens exceed max_length"):
        collator.inspect({"image": pages["wide"], "text": "x y z"})
