"""CUDA graphs of the compiled decoder layers (fast/layer_graphs.py): what they need from the training step (padded
lengths, gradient buffers of their own) leaves the loss and gradients as they were; where graphs cannot run, the log
says why. The graphs themselves run on a GPU only (the `gpu` test; benchmarks/train_speed.py)."""

import types

import pytest
import torch
from test_fast_decode import noise_image
from test_fast_moe import REL, assert_rel_close, batch_of, lora_grads, lora_model

from dsocr_lightning.data.images import MODES
from dsocr_lightning.families import family
from dsocr_lightning.families.v1.collate import OCRCollator
from dsocr_lightning.fast import FastPaths, compiled_layers_line
from dsocr_lightning.fast.compiled_layers import compile_layers
from dsocr_lightning.fast.layer_graphs import graphs_active, layer_graph_blocker, pad_length, stable_grads
from dsocr_lightning.fast.layout import decoder_layers
from dsocr_lightning.training.module import DeepSeekOCRModule


def module_loss(model, tokenizer, batch, graph_pad: int) -> torch.Tensor:
    """The module's training forward (padding included) on `model`, without a Trainer."""
    fake = types.SimpleNamespace(backend="transformers", model=model, graph_pad=graph_pad, training=True,
                                 tokenizer=tokenizer, family=family("v1"))  # fmt: skip
    return DeepSeekOCRModule.forward(fake, batch).loss


def test_padding_to_a_multiple_keeps_the_loss_and_every_gradient(real_routing_dir):
    model, tokenizer = lora_model(real_routing_dir, grouped=True)
    batch = batch_of(tokenizer, ["سلام دنیا و یک خط بلند", "آب"])
    length = batch["input_ids"].shape[1]
    padded = pad_length(batch, 64, tokenizer.pad_token_id)
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] > length
    assert (padded["labels"][:, length:] == -100).all() and not padded["images_seq_mask"][:, length:].any()
    assert (padded["input_ids"][:, length:] == tokenizer.pad_token_id).all()
    grads = []
    for pad in (0, 64):
        model.zero_grad(set_to_none=True)
        loss = module_loss(model, tokenizer, batch, pad)
        loss.backward()
        grads.append((loss.item(), {k: v.clone() for k, v in lora_grads(model).items()}))
    (plain, plain_grads), (got, got_grads) = grads
    assert got == pytest.approx(plain, rel=REL)
    for name, grad in plain_grads.items():
        assert_rel_close(got_grads[name], grad, name)
    assert pad_length(padded, 64, tokenizer.pad_token_id) is padded  # already a multiple: untouched


def test_stable_gradients_accumulate_in_their_own_memory():
    layer = torch.nn.Linear(4, 3)
    assert stable_grads(layer.parameters()) == 2
    pointer = layer.weight.grad.data_ptr()
    x = torch.randn(5, 4)
    for _ in range(2):
        layer(x).sum().backward()
    assert layer.weight.grad.data_ptr() == pointer
    assert torch.allclose(layer.weight.grad, 2 * torch.ones(3, 1) * x.sum(0))
    assert stable_grads(layer.parameters()) == 0  # buffers already there are kept


def test_zero_grad_zeroes_the_gradient_buffers_in_place():
    layer, frozen = torch.nn.Linear(4, 3), torch.nn.Parameter(torch.ones(2), requires_grad=False)
    optimizer = torch.optim.SGD([*layer.parameters(), frozen], lr=0.1)  # a parameter without .grad is left alone
    fake = types.SimpleNamespace(graph_pad=32, picked=types.SimpleNamespace(zero=lambda: None))
    stable_grads(layer.parameters())
    layer(torch.randn(5, 4)).sum().backward()
    pointers = [p.grad.data_ptr() for p in layer.parameters()]
    assert all(p.grad.any() for p in layer.parameters())
    DeepSeekOCRModule.optimizer_zero_grad(fake, 0, 0, optimizer)
    assert [p.grad.data_ptr() for p in layer.parameters()] == pointers and frozen.grad is None
    assert not any(p.grad.any() for p in layer.parameters())


def test_every_micro_batch_starts_with_gradient_buffers_of_its_own():
    """Lightning sets every .grad to None before validation: the next backward would then keep a graph's output as
    .grad (overwritten by its next replay; on the GPU the first zero_grad after validation failed). The module gives
    them buffers again before each training micro-batch."""
    layer = torch.nn.Linear(4, 3)
    fake = types.SimpleNamespace(graph_pad=32, trainable=list(layer.parameters()))
    DeepSeekOCRModule.on_train_batch_start(fake, {}, 0)
    grad = layer.weight.grad
    assert grad is not None and not grad.any()
    layer.zero_grad(set_to_none=True)  # what Lightning's on_validation_model_zero_grad does
    DeepSeekOCRModule.on_train_batch_start(fake, {}, 1)
    assert layer.weight.grad is not None and layer.bias.grad is not None


def test_graphs_are_refused_where_the_model_checkpoints_around_its_layers_and_the_log_says_why():
    """v1's remote code checkpoints from the model's loop, around plain layers: the recomputation would run outside
    the layers' graphs."""
    causal_lm = torch.nn.Module()
    causal_lm.model = torch.nn.Module()
    causal_lm.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    causal_lm.model.gradient_checkpointing = True
    assert "gradient checkpointing" in layer_graph_blocker(causal_lm)
    causal_lm.model.gradient_checkpointing = False
    assert layer_graph_blocker(causal_lm) is None


def test_layers_that_checkpoint_themselves_are_checkpointed_inside_their_graphs(real_routing_dir):
    """transformers' `GradientCheckpointingLayer`s (the stand-in's, v2's): the compiled region takes the checkpoint
    over, so graphs may hold the recomputation."""
    model, _ = lora_model(real_routing_dir, True)  # loaded as the guide trains: gradient checkpointing on
    assert layer_graph_blocker(model) is None
    line = compiled_layers_line(model, FastPaths(), torch.device("cuda"), torch.bfloat16)  # nothing runs on CUDA
    assert "as CUDA graphs" in line and graphs_active(model)
    layers = decoder_layers(model)
    assert layers and all(layer._checkpointed and not layer.gradient_checkpointing for layer in layers)


def noise_batch(tokenizer, texts: list[str]) -> dict:
    """A CUDA batch of random-pixel images (the GPU machine may lack Persian shaping) with `texts` as labels."""
    generator = torch.Generator().manual_seed(len(texts[0]))
    samples = [{"image": noise_image(generator, 100 + 50 * i), "text": text} for i, text in enumerate(texts)]
    batch = OCRCollator(tokenizer, MODES["tiny"])(samples)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["images"] = [(c.cuda(), g.cuda()) for c, g in batch["images"]]
    return batch


@pytest.mark.gpu
@pytest.mark.parametrize(("kernel", "dtype"), [("native", torch.bfloat16), ("triton", torch.float16),
                                               ("triton", torch.bfloat16)])  # fmt: skip
def test_layer_graphs_give_the_compiled_layers_losses_and_gradients(real_routing_dir, kernel, dtype):
    """Four accumulated micro-batches of two lengths (warm-up, recording and replays of both): the eager layers, the
    compiled layers and the graphed layers give the same losses and gradients, with torch's grouped matmul in bf16
    (Hopper) and the Triton kernels in fp16 (as a T4 trains) and bf16."""
    results = []
    for mode in ("eager", "compiled", "graphs"):
        torch._dynamo.reset()
        model, tokenizer = lora_model(real_routing_dir, kernel)
        model = model.cuda()
        if mode != "eager":
            compile_layers(model, graphs=mode == "graphs")
        stable_grads(p for p in model.parameters() if p.requires_grad)
        losses = []
        for texts in (["abc def", "xy"], ["a long line of text that needs another graph length", "z"]) * 2:
            with torch.autocast("cuda", dtype=dtype):
                loss = module_loss(model, tokenizer, noise_batch(tokenizer, texts), 32)
            loss.backward()
            losses.append(loss.item())
        results.append((losses, {k: v.float().cpu() for k, v in lora_grads(model).items()}))
    (losses, grads), *others = results
    for other_losses, other_grads in others:
        assert other_losses == pytest.approx(losses, rel=1e-3)
        for name, grad in grads.items():
            assert (other_grads[name] - grad).norm() <= 2e-2 * grad.norm() + 1e-8, name
