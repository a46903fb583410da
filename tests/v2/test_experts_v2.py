"""DeepSeek-OCR 2's grouped experts with LoRA (families/v2/experts.py) equal PEFT's own forward on the fused 3-D
experts (the reference: PEFT folds W + s B A, transformers multiplies): loss and every LoRA gradient, both expert
layouts; the adapter off; and the shared compiled decoder layers on v2's layers equal the eager ones."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from dsocr_lightning.fast import FastPaths, compiled_layers_line
from dsocr_lightning.fast.compiled_layers import checkpointed, compile_layers
from dsocr_lightning.fast.grouped_mm import route
from dsocr_lightning.fast.layout import block_kernel, decoder_layers, expert_blocks

pytest.importorskip("transformers.models.deepseek_ocr2")


def peft_model(v2_dir, layout: str, r: int = 4):
    """The stand-in with LoRA (B random, so every adapter moves the outputs)."""
    from transformers import AutoModelForImageTextToText

    from dsocr_lightning.families.v2.lora import apply_lora, peft_config

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(v2_dir)
    model = apply_lora(model, peft_config(r, 2 * r, 0.0, False, layout, False), layout)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def grouped_pair(v2_dir, layout: str, r: int = 4):
    from dsocr_lightning.families.v2.experts import patch_grouped_experts

    reference = peft_model(v2_dir, layout, r)
    grouped = copy.deepcopy(reference)
    assert patch_grouped_experts(grouped, "native") == 1  # the stand-in's one MoE layer
    return reference, grouped


def loss_and_grads(model, ids: torch.Tensor, autocast: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(got: dict, expected: dict, rel: float) -> None:
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        gap = (got[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-12)
        assert gap < rel, (name, float(gap))


@pytest.mark.parametrize("layout", ["split", "fused"])
def test_grouped_experts_equal_pefts_forward(v2_dir, layout, monkeypatch):
    from dsocr_lightning.families.v2 import experts

    reference, grouped = grouped_pair(v2_dir, layout)
    routed = []
    monkeypatch.setattr(experts, "route", lambda *args: routed.append(1) or route(*args))
    ids = torch.randint(3, 60, (3, 24), generator=torch.Generator().manual_seed(1))
    (expected, expected_grads), (got, got_grads) = loss_and_grads(reference, ids), loss_and_grads(grouped, ids)
    assert routed == [1]  # the grouped path ran (once: the stand-in's one MoE layer), PEFT's did for the reference
    assert got == pytest.approx(expected, rel=1e-6)
    assert sum(".experts." in name for name in got_grads) == (6 if layout == "split" else 4)  # every expert A and B
    assert_close(got_grads, expected_grads, rel=1e-5)  # float32 (measured: 7e-7)
    assert grouped.state_dict().keys() == reference.state_dict().keys()  # PEFT's names: adapters do not change


@pytest.mark.parametrize("merged", [False, True])
def test_the_adapter_off_is_the_base_model(v2_dir, merged):
    reference, grouped = grouped_pair(v2_dir, "split")
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(2))
    if merged:  # adapters off after a merge: peft unmerges on the fly, and so must the grouped experts
        reference.merge_adapter(), grouped.merge_adapter()
    with torch.no_grad(), reference.disable_adapter(), grouped.disable_adapter():
        expected, got = (m(input_ids=ids).logits for m in (reference, grouped))
    with torch.no_grad():
        adapted = grouped(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)  # the LoRA does move the logits


def recording_backend(seen: list):
    """aot_eager that records the targets of each graph dynamo captures."""
    from torch._dynamo.backends.common import aot_autograd

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    return backend


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_v2_layers_equal_the_eager_layers(v2_dir, checkpointing):
    """The shared compiled layers (dynamo's trace and AOTAutograd's joint graph, run as aot_eager on a CPU) find v2's
    decoder layers and train as the eager grouped ones, under bf16 autocast as on a GPU. With checkpointing, the
    checkpoint is inside the compiled region (the layers' own switch is off) and the reference checkpoints eagerly."""
    torch._dynamo.reset()
    _, eager = grouped_pair(v2_dir, "split", r=8)  # compiled, the grouped matmul wants 16-byte rows: 8 bf16
    if checkpointing:
        eager.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled, seen = copy.deepcopy(eager.train()), []  # (compiled forwards are training forwards)
    assert compile_layers(compiled, backend=recording_backend(seen)) == len(decoder_layers(compiled)) == 2
    assert [block_kernel(block) for block in expert_blocks(decoder_layers(compiled))] == ["native"]
    assert [(layer.gradient_checkpointing, layer._checkpointed) for layer in decoder_layers(compiled)] == [
        (False, checkpointing)
    ] * 2
    for length in (24, 40):
        ids = torch.randint(3, 60, (2, length), generator=torch.Generator().manual_seed(length))
        (expected, expected_grads), (got, got_grads) = (
            loss_and_grads(m, ids, autocast=True) for m in (eager, compiled)
        )
        assert got == pytest.approx(expected, rel=1e-2)
        assert_close(got_grads, expected_grads, rel=5e-2)  # bf16: fused ops round in other places
    assert seen, "the compiled path did not run"
    assert ("tag_activation_checkpoint" in seen) == checkpointing


def test_a_layer_that_falls_back_to_eager_stays_checkpointed(v2_dir, monkeypatch):
    """A compiled layer that hit torch.compile's recompile limit runs eagerly, still under checkpointing (its own
    switch is off: the fallback checkpoints in its place)."""
    from dsocr_lightning.fast import compiled_layers

    _, model = grouped_pair(v2_dir, "split", r=8)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compile_layers(model.train(), backend="aot_eager")
    calls = []
    monkeypatch.setattr(compiled_layers, "checkpointed", lambda *a, **k: calls.append(1) or checkpointed(*a, **k))
    for layer in decoder_layers(model):
        layer._compiled_forward = None
    loss_and_grads(model, torch.randint(3, 60, (2, 16)))
    assert calls == [1, 1]


@pytest.mark.parametrize(
    ("fast", "expected"),
    [
        ({}, "native"),  # the CPU's grouped matmul (ATen's per-group loop)
        ({"grouped_experts": "loop"}, "loop"),
        ({"experts_implementation": "eager"}, "loop"),
        ({"experts_implementation": "eager", "grouped_experts": "triton"}, "refused"),  # (triton: none on a CPU)
    ],
)
def test_the_plan_decides_the_experts_once(fast, expected):
    from dsocr_lightning.families.v2.loading import decide

    if expected == "refused":  # two settings that contradict each other: neither is swapped for the other
        with pytest.raises(ValueError, match="set one"):
            decide({"fast": FastPaths(**fast)}, gpu=False, dtype=torch.float32)
        return
    plan = decide({"fast": FastPaths(**fast)}, gpu=False, dtype=torch.float32)
    assert (plan.version, plan.experts) == ("v2", expected), plan.why


def test_fast_paths_say_what_runs(v2_dir, caplog):
    from dsocr_lightning.families.v2.loading import decide, fast_paths
    from dsocr_lightning.training.loading import LoadSettings, LoraSettings

    model = peft_model(v2_dir, "split")
    plan = decide({"fast": FastPaths()}, gpu=False, dtype=torch.float32)
    with caplog.at_level(logging.INFO):
        fast_paths(model, LoadSettings(), LoraSettings(), torch.device("cpu"), torch.float32, plan)
    assert "grouped experts: 1 MoE layers, native kernel" in caplog.text
    assert "compiled decoder layers: off (" in caplog.text  # (a CPU: no inductor build, no bf16 grouped matmul)


def test_graph_padding_reads_the_pad_id_through_the_processor(v2_dir, processor):
    """The module's training forward pads v2 batches for the layer graphs with the processor's tokenizer's PAD: the
    same loss as unpadded (a v2 run with graphs once failed here, the processor has no pad_token_id)."""
    import types

    from dsocr_lightning.families import family
    from dsocr_lightning.training.module import DeepSeekOCRModule

    model = peft_model(v2_dir, "split").train()
    ids = torch.randint(3, 60, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a shorter second row: right padding already
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    batch |= dict.fromkeys(("pixel_values", "pixel_values_local", "num_local_patches"))
    losses = []
    for pad in (0, 32):
        fake = types.SimpleNamespace(backend="transformers", model=model, graph_pad=pad, training=True,
                                     tokenizer=processor, family=family("v2"))  # fmt: skip
        losses.append(DeepSeekOCRModule.forward(fake, batch).loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_v2_layers_under_checkpointing_compile_and_may_run_as_graphs(v2_dir):
    """transformers 5's layers checkpoint themselves, so their compiled region can take the checkpoint over and CUDA
    graphs can hold the recomputation (v1's remote code checkpoints around its layers: graphs stay off there)."""
    from dsocr_lightning.fast.layer_graphs import layer_graph_blocker
    from dsocr_lightning.training.loading import LoadSettings

    _, model = grouped_pair(v2_dir, "split")
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert layer_graph_blocker(model) is None
    line = compiled_layers_line(model, LoadSettings().fast, torch.device("cuda"), torch.bfloat16)
    assert line.startswith("compiled decoder layers: 2 layers") and "as CUDA graphs" in line, line
    assert all(layer._checkpointed for layer in decoder_layers(model))


def test_v2_decoding_graphs_follow_the_shared_rule(v2_dir):
    """The static decoder's CUDA graphs: refused with transformers' experts kernel (it reads the hit experts back),
    left to the grouped kernel's own rule with the grouped experts (on a CPU: no fused kernel)."""
    from dsocr_lightning.families.v2.decode import decoder_parts
    from dsocr_lightning.fast.decode import graph_blocker

    reference, grouped = grouped_pair(v2_dir, "split")
    assert "expert loop" in graph_blocker(decoder_parts(reference))
    assert "no fused kernel" in graph_blocker(decoder_parts(grouped))


def test_the_moe_layers_share_one_compiled_entry(v2_dir):
    """torch.compile guards on a module's class: the split experts' class is one for all layers (not one per layer),
    so every MoE layer runs the same compiled entry, not one compiled and looked up per layer."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from dsocr_lightning.families.v2.experts import patch_grouped_experts
    from dsocr_lightning.families.v2.lora import apply_lora, peft_config

    config = AutoConfig.from_pretrained(v2_dir)
    config.text_config.num_hidden_layers, config.text_config.mlp_layer_types = 4, ["dense"] + ["sparse"] * 3
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    model = apply_lora(model, peft_config(8, 16, 0.0, False, "split", False), "split")
    assert patch_grouped_experts(model, "native") == 3
    torch._dynamo.reset()
    entries = []
    compile_layers(model.train(), backend=lambda gm, example: entries.append(gm) or gm.forward)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.randint(3, 60, (2, 24)), use_cache=False)
    assert len(entries) == 2  # the dense first layer (its input needs no gradient), then every MoE layer's one
