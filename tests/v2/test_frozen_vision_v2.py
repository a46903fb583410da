"""DeepSeek-OCR 2's frozen vision (families/v2/frozen_vision.py) against transformers' forward: under gradient
checkpointing, the same loss and LoRA gradients with the frozen part of the tower left out of autograd."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("transformers.models.deepseek_ocr2")
pytestmark = pytest.mark.v2


@pytest.fixture(scope="module")
def batch(processor, pages):
    from dsocr_lightning.data.images import MODES
    from dsocr_lightning.families.v2.collate import ProcessorCollator

    collate = ProcessorCollator(processor, mode=MODES["gundam"])
    out = collate([{"image": pages["line"], "text": "line"}, {"image": pages["wide"], "text": "wide"}])
    return {k: out[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "pixel_values_local",
                                 "num_local_patches")}  # fmt: skip


def checkpointed_model(v2_dir, encoder: bool, checkpointing: bool = True):
    """The stand-in as the loader gives it under gradient checkpointing (PEFT hooks every input embedding), LoRA B
    drawn so that every LoRA weight gets a gradient."""
    from test_lora_v2 import draw_lora_b

    from dsocr_lightning.families.v2.loading import load
    from dsocr_lightning.training.loading import LoadSettings, LoraSettings

    settings = LoadSettings(str(v2_dir), "transformers", dtype="float32", gradient_checkpointing=checkpointing)
    model, *_ = load(settings, LoraSettings(encoder=encoder))
    return draw_lora_b(model).train()


def loss_and_grads(model, batch):
    from dsocr_lightning.families.v2.frozen_vision import vision_tower

    tower = vision_tower(model)
    seen = {}

    def note(key):
        def hook(module, args, out):
            seen[key] = out[0].requires_grad

        return hook

    hooks = [part.register_forward_hook(note(key))
             for key, part in (("sam", tower.sam_encoder), ("encoder", tower.vision_encoder))]  # fmt: skip
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, seen


@pytest.mark.parametrize("encoder", [False, True])
def test_frozen_vision_keeps_the_loss_and_gradients(v2_dir, batch, encoder):
    from dsocr_lightning.families.v2.frozen_vision import patch_frozen_vision, vision_tower

    model = checkpointed_model(v2_dir, encoder)
    loss, grads, seen = loss_and_grads(model, batch)
    assert seen == {"sam": True, "encoder": True}  # transformers' tower under checkpointing: all in autograd
    line = patch_frozen_vision(model, "a test on a CPU")
    tower = vision_tower(model)
    checkpointing = {name for name, part in (("sam", tower.sam_encoder), ("encoder", tower.vision_encoder))
                     if any(getattr(m, "gradient_checkpointing", False) for m in part.modules())}  # fmt: skip
    assert checkpointing == ({"encoder"} if encoder else set())  # a frozen layer has nothing to recompute
    frozen_loss, frozen_grads, frozen_seen = loss_and_grads(model, batch)
    assert frozen_seen == {"sam": False, "encoder": encoder}
    assert ("SAM (the Qwen2 encoder trains" in line) is encoder
    assert line.endswith("CUDA graphs: off (a test on a CPU)")
    torch.testing.assert_close(frozen_loss, loss, rtol=0, atol=0)
    assert frozen_grads.keys() == grads.keys()
    assert any(".vision_encoder." in name for name in grads) is encoder
    for name, grad in grads.items():
        torch.testing.assert_close(frozen_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_graph_path_is_the_forward_and_a_patched_tower_copies(v2_dir, batch, monkeypatch):
    """On a CPU `ShapeGraphs` calls its function: the path through it must give transformers' output, extra outputs
    must bypass it, and a patched tower must deepcopy and pickle (the graphs stay behind)."""
    from dsocr_lightning.families.v2.frozen_vision import patch_frozen_vision, vision_tower
    from dsocr_lightning.fast.frozen_graphs import ShapeGraphs

    model = checkpointed_model(v2_dir, encoder=False, checkpointing=False).eval()  # PEFT's hooks do not pickle
    tower = vision_tower(model)
    pixels = batch["pixel_values"]
    with torch.no_grad():
        expected = tower(pixels).last_hidden_state
    patch_frozen_vision(model, None)
    calls = []
    real = ShapeGraphs.__call__
    monkeypatch.setattr(
        ShapeGraphs, "__call__", lambda self, fn, x, tag=None: calls.append(tag) or real(self, fn, x, tag)
    )
    assert torch.equal(tower(pixels).last_hidden_state, expected)
    assert calls == [(False, False, False, torch.get_autocast_dtype("cuda"))]  # eval, no inference mode or autocast
    tower._view_graphs.graphs["stale"] = None
    tower.float()  # a move or a cast: the graphs read the old tensors
    assert tower._view_graphs.graphs == {}
    for twin in (copy.deepcopy(tower), pickle.loads(pickle.dumps(tower))):
        assert type(twin) is type(tower) and twin._view_graphs.graphs == {}
        assert torch.equal(twin(pixels).last_hidden_state, expected)
    assert len(calls) == 3
    assert tower(pixels, output_hidden_states=True).hidden_states is not None and len(calls) == 3


def test_fast_paths_log_the_frozen_vision(v2_dir, caplog):
    from dsocr_lightning.fast import FastPaths
    from dsocr_lightning.training.loading import LoadSettings, LoraSettings, load_model

    for graphs in (True, False):
        settings = LoadSettings(str(v2_dir), "transformers", fast=FastPaths(vision_graphs=graphs))
        with caplog.at_level("INFO"):
            load_model(settings, LoraSettings())
    said = "frozen vision: SAM and the Qwen2 encoder without autograd (no parameter of theirs trains), CUDA graphs: off"
    assert f"{said} (CUDA graphs need a GPU, the model is on cpu)" in caplog.text
    assert f"{said} (fast.vision_graphs false)" in caplog.text
