"""The TEST STAND-IN checkpoint (random weights, not DeepSeek-OCR): tokenizer, loading, forward, LoRA, generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from dsocr_lightning.families.v1 import (
    standin,  # its checkpoint writer imports v1's model classes on first use: collected anywhere
)
from dsocr_lightning.families.v1.standin import expected_lora_params, image_token_count, write_tokenizer

IMAGE = 128815
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return standin.write_standin_checkpoint(tmp_path_factory.mktemp("standin_ckpt") / "ckpt")


@pytest.fixture()
def model(ckpt):
    return AutoModel.from_pretrained(ckpt, trust_remote_code=True, dtype=torch.float32).eval()


def lora(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=TARGETS)
    return get_peft_model(model, cfg)


def sample(n_text_before: int, count: int, n_text_after: int) -> list[int]:
    """BOS, some text ids, `count` image tokens, more text ids."""
    return [0, *range(10, 10 + n_text_before), *[IMAGE] * count, *range(40, 40 + n_text_after)]


def images_batch(left: bool = False, extra: int = 0):
    """Sample 0: no crops, base 128. Sample 1: 2x1 crop grid (i=2 columns, j=1 row) at S=64, base 128."""
    gen = torch.Generator().manual_seed(0)
    counts = [image_token_count(128, 128), image_token_count(128, 64, 2, 1)]
    assert counts == [(2 + 1) * 2 + 1, (1 * 2 + 1) * (1 * 1) + (2 + 1) * 2 + 1] == [7, 10]
    seqs = [sample(3, counts[0] + extra, 2), sample(1, counts[1], 4)]
    images = [
        (torch.zeros(1, 3, 128, 128), torch.rand(1, 3, 128, 128, generator=gen)),
        (torch.rand(2, 3, 64, 64, generator=gen), torch.rand(1, 3, 128, 128, generator=gen)),
    ]
    width = max(map(len, seqs))
    pad = [[2] * (width - len(s)) for s in seqs]
    ids = torch.tensor([p + s if left else s + p for s, p in zip(seqs, pad)])
    mask = torch.tensor(
        [[0] * len(p) + [1] * len(s) if left else [1] * len(s) + [0] * len(p) for s, p in zip(seqs, pad)]
    )
    return {
        "input_ids": ids, "attention_mask": mask, "images": images, "images_seq_mask": ids == IMAGE,
        "images_spatial_crop": torch.tensor([[1, 1], [2, 1]]),
    }  # fmt: skip


def test_tokenizer_ids_and_round_trip(tmp_path):
    write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids("<image>") == IMAGE and tok.padding_side == "right"
    assert len(tok) == 129280
    text = "می\u200cخواهم ۱۲۳ کتاب 45\tabc\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and all(3 <= i < IMAGE for i in ids)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.encode(f"سلام {tok.eos_token}", add_special_tokens=False)[-1] == 1
    assert tok.encode("x<image>y", add_special_tokens=False)[1] == IMAGE
    assert tok.decode([0, *ids, IMAGE, 1, 2], skip_special_tokens=True) == text


def test_checkpoint_loads_with_expected_module_names(ckpt, model):
    assert "TEST STAND-IN" in (ckpt / "README.md").read_text()
    assert AutoTokenizer.from_pretrained(ckpt).pad_token_id == 2
    names = {n for n, _ in model.named_modules()}
    cfg = model.config
    for layer in range(cfg.num_hidden_layers):
        assert {f"model.layers.{layer}.self_attn.{p}" for p in TARGETS[:4]} <= names
    assert "model.layers.0.mlp.gate_proj" in names
    assert f"model.layers.1.mlp.experts.{cfg.n_routed_experts - 1}.down_proj" in names
    assert "model.layers.1.mlp.shared_experts.up_proj" in names
    vision = [n for n in names if any(k in n for k in ("vision", "image_newline", "view_separator"))]
    assert vision and not any(t in n for n in vision for t in TARGETS)
    assert {"model.image_newline", "model.view_separator"} <= {n for n, _ in model.named_parameters()}


def test_checkpoint_is_deterministic(tmp_path):
    a = standin.write_standin_checkpoint(tmp_path / "a", seed=3)
    b = standin.write_standin_checkpoint(tmp_path / "b", seed=3)
    c = standin.write_standin_checkpoint(tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_forward_loss_logits_and_wrong_count(model):
    batch = images_batch()
    labels = batch["input_ids"].masked_fill(batch["images_seq_mask"] | (batch["attention_mask"] == 0), -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], 129280) and out.logits.dtype == torch.float32
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="image"):
        model(**images_batch(extra=1))


def test_lora_parameter_count_matches_the_formula(model):
    assert expected_lora_params(1280, 12, 6848, 896, 64, 2, 1, r=16) == 77_509_632
    cfg = model.config
    want = expected_lora_params(
        cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.moe_intermediate_size,
        cfg.n_routed_experts, cfg.n_shared_experts, cfg.first_k_dense_replace, r=16,
    )  # fmt: skip
    peft_model = lora(model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == want
    assert not any("vision" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_batched_left_padded_generate_equals_per_sample(model):
    batch = images_batch(left=True)
    kw = {
        "max_new_tokens": 6,
        "do_sample": False,
        "no_repeat_ngram_size": 20,
        "pad_token_id": 2,
        "eos_token_id": 1,
    }
    together = model.generate(**batch, **kw)[:, batch["input_ids"].shape[1] :]
    for b in range(2):
        keep = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][keep][None]
        alone = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), images=[batch["images"][b]],
            images_seq_mask=ids == IMAGE, images_spatial_crop=batch["images_spatial_crop"][b : b + 1], **kw,
        )[:, ids.shape[1]:]  # fmt: skip
        n = alone.shape[1]
        assert together[b, :n].tolist() == alone[0].tolist()


def test_kv_cache_matches_full_forward(model):
    batch = images_batch(left=True)
    full = model(**batch).logits[:, -1]
    prefix = {k: v[:, :-1] if k in ("input_ids", "attention_mask", "images_seq_mask") else v for k, v in batch.items()}
    prefix["images_seq_mask"] = prefix["input_ids"] == IMAGE
    pos = batch["attention_mask"].cumsum(-1) - 1
    first = model(**prefix, position_ids=pos[:, :-1].clamp(min=0), use_cache=True)
    step = model(
        input_ids=batch["input_ids"][:, -1:], attention_mask=batch["attention_mask"],
        position_ids=pos[:, -1:], past_key_values=first.past_key_values, use_cache=True,
    )  # fmt: skip
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_with_lora_backward(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = lora(model)
    peft_model.train()
    batch = images_batch()
    labels = batch["input_ids"].masked_fill(batch["images_seq_mask"] | (batch["attention_mask"] == 0), -100)
    peft_model(**batch, labels=labels).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_image_features_layout_and_counts(model):
    inner = model.model
    gen = torch.Generator().manual_seed(1)
    crops, global_view = torch.rand(6, 3, 100, 100, generator=gen), torch.rand(1, 3, 150, 150, generator=gen)
    with torch.no_grad():
        feats = inner.image_features(crops, global_view, torch.tensor([3, 2]))  # i=3 columns, j=2 rows
        tiles = inner.encode_view(crops)  # [6, m, m, h], side 100 -> m = 2 after zero padding
        glob = inner.encode_view(global_view)[0]  # side 150 -> n = 3
    assert feats.shape[0] == image_token_count(150, 100, 3, 2) == (2 * 3 + 1) * (2 * 2) + 4 * 3 + 1
    rows = []
    for r in range(2 * 2):  # tile k sits at row k // i, column k % i
        rows.extend(tiles[(r // 2) * 3 + c, r % 2, x] for c in range(3) for x in range(2))
        rows.append(inner.image_newline)
    for r in range(3):
        rows += [glob[r, x] for x in range(3)] + [inner.image_newline]
    torch.testing.assert_close(feats, torch.stack([*rows, inner.view_separator]).detach())


def test_labelled_logits_only_keeps_the_loss(model, tmp_path):
    """The demo's CPU shortcut: lm_head at the learned positions only, the same loss; logits_to_keep as HF's."""
    fast = AutoModel.from_pretrained(
        standin.write_standin_checkpoint(tmp_path / "fast", labelled_logits_only=True), trust_remote_code=True,
        dtype=torch.float32,
    ).eval()  # fmt: skip
    batch = images_batch()
    labels = batch["input_ids"].masked_fill(batch["images_seq_mask"] | (batch["attention_mask"] == 0), -100)
    out = fast(**batch, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, model(**batch, labels=labels).loss)
    torch.testing.assert_close(fast(**batch, logits_to_keep=1).logits[:, 0], model(**batch).logits[:, -1])
