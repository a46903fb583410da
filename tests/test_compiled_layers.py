"""Compiled decoder layers (fast/compiled_layers.py) equal the same layers run eagerly: loss and the gradient of every
LoRA parameter, on the model with DeepSeek-OCR's routing and grouped experts, under bf16 autocast as training on a GPU
runs (torch.compile's grouped matmul takes bfloat16 only). On CPU the tests compile with `aot_eager` (dynamo's trace
and AOTAutograd's joint graph, without inductor's C++ codegen, which takes minutes on two cores); the GPU runs
inductor (benchmarks/train_speed.py)."""

import pytest
import torch
from test_fast_moe import REL, assert_rel_close, batch_of, lora_grads, lora_model

from dsocr_lightning.families import family
from dsocr_lightning.fast import FastPaths, compiled_layers_line
from dsocr_lightning.fast.compiled_layers import compile_layers
from dsocr_lightning.fast.layout import decoder_layers

MODEL_KEYS = family("v1").forward_keys


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**{k: batch[k] for k in MODEL_KEYS}).loss
    loss.backward()
    return loss.item(), {k: v.clone() for k, v in lora_grads(model).items()}


@pytest.fixture
def compiled_pair(real_routing_dir):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    (eager, tokenizer), (compiled, _) = lora_model(real_routing_dir, True), lora_model(real_routing_dir, True)
    assert compile_layers(compiled, backend="aot_eager") == len(decoder_layers(compiled)) > 1
    return eager, compiled, tokenizer


def test_loss_and_every_lora_gradient_equal_the_eager_layers(compiled_pair):
    eager, compiled, tokenizer = compiled_pair
    graphs = []
    for texts in (["سلام دنیا", "کتاب ۱۲", "آب"], ["یک", "دو سه چهار پنج"], ["یک دو سه چهار پنج شش هفت", "x"]):
        batch = batch_of(tokenizer, texts)
        (expected, expected_grads), (got, got_grads) = loss_and_grads(eager, batch), loss_and_grads(compiled, batch)
        assert got == pytest.approx(expected, rel=REL)
        assert expected_grads.keys() == got_grads.keys() and len(got_grads) > 100
        for name, grad in expected_grads.items():
            assert_rel_close(got_grads[name], grad, name)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0  # the compiled path did run
    assert graphs[2] == graphs[1]  # a new length compiles nothing new (a new batch size may)


def test_a_layer_past_the_recompile_limit_says_so_and_runs_eagerly(compiled_pair, caplog):
    eager, compiled, tokenizer = compiled_pair
    batch = batch_of(tokenizer)
    with torch._dynamo.config.patch(recompile_limit=1):  # the MoE layers' first call needs a second entry
        expected, got = loss_and_grads(eager, batch)[0], loss_and_grads(compiled, batch)[0]
    assert got == pytest.approx(expected, rel=REL)
    assert "hit torch.compile's recompile limit and runs eagerly" in caplog.text
    assert any(layer._compiled_forward is None for layer in decoder_layers(compiled))


def test_evaluation_and_no_grad_run_the_eager_layers(compiled_pair):
    _, compiled, tokenizer = compiled_pair
    batch = batch_of(tokenizer)
    compiled.eval()
    with torch.no_grad():
        compiled(**{k: batch[k] for k in MODEL_KEYS})
    compiled.train()
    with torch.no_grad():
        compiled(**{k: batch[k] for k in MODEL_KEYS})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # nothing was traced


def test_a_moved_expert_weight_is_rebound_before_the_compiled_call(compiled_pair):
    eager, compiled, tokenizer = compiled_pair
    batch = batch_of(tokenizer)
    loss_and_grads(compiled, batch)
    for model in (eager, compiled):  # breaks every expert's view of the stacked weights, as a device move does
        for name, param in model.named_parameters():
            if ".experts." in name and "base_layer" in name:
                param.data = param.data.clone()
    assert loss_and_grads(compiled, batch)[0] == pytest.approx(loss_and_grads(eager, batch)[0], rel=REL)


def test_compiled_layers_run_only_where_they_apply_and_the_log_says_why(real_routing_dir):
    model, _ = lora_model(real_routing_dir, True)
    cpu, cuda, on = torch.device("cpu"), torch.device("cuda"), FastPaths(compile_layers=True)
    line = lambda paths, device=cuda, dtype=torch.bfloat16: compiled_layers_line(model, paths, device, dtype)
    assert "off (fast.compile_layers false" in line(FastPaths(compile_layers=False))
    assert "takes bfloat16, not float32" in line(on, dtype=torch.float32)  # torch's kernel; Triton's takes fp16 too
    assert "on a GPU only: on cpu" in line(on, cpu)
    looped, _ = lora_model(real_routing_dir, False)
    assert "expert loop" in compiled_layers_line(looped, on, cuda, torch.bfloat16)
    assert not any(hasattr(layer, "_compiled_forward") for layer in decoder_layers(model))
