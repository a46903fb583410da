"""Grouped experts (fast/moe.py, fast/grouped_mm.py) equal transformers' per-expert loop: outputs and the gradient of
every LoRA parameter in float32, uneven routing included; adapters keep the PEFT layout; decoding is unchanged.

"Real architecture" here is transformers' own `DeepseekV2MoE`, the class DeepSeek-OCR's remote code builds its
MoE layers from, with the real routing (64 experts, top 6, 2 shared experts) at tiny widths.
"""

import importlib.util

import pytest
import torch

from dsocr_lightning.data.images import MODES
from dsocr_lightning.data.render import render_line
from dsocr_lightning.families import family
from dsocr_lightning.families.v1.collate import OCRCollator
from dsocr_lightning.fast import FastPaths
from dsocr_lightning.fast.grouped_mm import grouped_mm, grouped_mm_reference, route
from dsocr_lightning.fast.moe import grouped_kernel, is_picks, moe_layers
from dsocr_lightning.training.generation import GenerationSettings, generate_tokens
from dsocr_lightning.training.loading import LoadSettings, LoraSettings, count_parameters, load_model

MODEL_KEYS = family("v1").forward_keys

REL = 1e-5
# torch's grouped matmul and this project's Triton kernels (on the CPU: Triton's interpreter, tests/conftest.py, ~100x
# slower than torch's per-group loop: one layer here, the model on the GPU, tests/test_triton_grouped.py)
KERNELS = ["native", pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                                     reason="Triton is not installed"))]  # fmt: skip
TEXTS = ["سلام دنیا", "کتاب ۱۲", "آب"]


def assert_rel_close(got: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    scale = expected.norm().item()
    diff = (got - expected).norm().item()
    assert diff <= REL * max(scale, 1e-12) or diff < 1e-12, f"{what}: |diff| {diff:.3g} vs |expected| {scale:.3g}"


def lora_model(folder, grouped: bool | str, dropout: float = 0.0):
    """The stand-in with LoRA; `grouped`: True (torch's kernel), False (the loop) or a kernel name."""
    kernel = grouped if isinstance(grouped, str) else ("native" if grouped else "loop")
    settings = LoadSettings(str(folder), "transformers", True, fast=FastPaths(grouped_experts=kernel))
    model, tokenizer, *_ = load_model(settings, LoraSettings(dropout=dropout))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.05)  # an adapter that does something (B starts at zero)
    return model.train(), tokenizer


def batch_of(tokenizer, texts=TEXTS, prompts=False):
    return OCRCollator(tokenizer, MODES["tiny"], with_prompts=prompts)(
        [{"image": render_line(t), "text": t} for t in texts]
    )


def lora_grads(model) -> dict[str, torch.Tensor]:
    """Gradient of every LoRA weight by its PEFT name; grouped experts' come from their stacked parameter."""
    named = dict(model.named_parameters())
    grads = {}
    for name, param in named.items():
        if "lora_" not in name:
            continue
        if ".experts." in name and not param.requires_grad:  # a view of stacked_<proj>_<A|B>
            prefix, rest = name.split(".experts.")
            expert, proj = rest.split(".")[:2]
            stacked = named[f"{prefix}.stacked_{proj}_{'A' if '.lora_A.' in name else 'B'}"]
            grads[name] = stacked.grad[int(expert)]
        else:
            grads[name] = param.grad if param.grad is not None else torch.zeros_like(param)
    return grads


def test_grouped_mm_equals_one_matmul_per_expert():
    torch.manual_seed(0)
    offs = torch.tensor([0, 3, 4, 4, 9, 12], dtype=torch.int32)  # experts with 0, 3, 1, 0, 5, 3 rows
    x = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(6, 8, 16, requires_grad=True)
    upstream = torch.randn(12, 8)
    got = grouped_mm(x, w, offs)
    got.backward(upstream)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    expected = grouped_mm_reference(x, w, offs)
    expected.backward(upstream)
    assert_rel_close(got, expected, "output")
    assert_rel_close(gx, x.grad, "grad x")
    assert_rel_close(gw, w.grad, "grad w")
    assert gw[0].abs().sum() == 0 and gw[3].abs().sum() == 0  # empty experts get zero gradient


def test_route_sorts_assignments_by_expert():
    ids = torch.tensor([[3, 0], [0, 2], [3, 1]])
    routing = route(ids, num_experts=5)
    assert routing.offs.tolist() == [2, 3, 4, 6, 6]
    assert ids.reshape(-1)[routing.order].tolist() == [0, 0, 1, 2, 3, 3]
    assert routing.tokens.tolist() == [0, 1, 2, 1, 0, 2]


@pytest.mark.parametrize("kernel", KERNELS)
def test_layer_equals_the_loop_with_uneven_routing(real_routing_dir, kernel):
    reference, _ = lora_model(real_routing_dir, grouped=False)
    fast, _ = lora_model(real_routing_dir, grouped=kernel)
    (ref_layer,), (fast_layer,) = moe_layers(reference), moe_layers(fast)
    assert "moe" in vars(fast_layer) and "moe" not in vars(ref_layer)
    torch.manual_seed(1)
    hidden = torch.randn(7, reference.config.hidden_size)
    ids = torch.stack([torch.randperm(64)[:6] for _ in range(7)])
    ids[:, 0], ids[0, 1] = 5, 9  # expert 5 takes every token, expert 9 exactly one; most get none
    weights = torch.rand(7, 6)
    outputs = []
    for layer in (ref_layer, fast_layer):
        x = hidden.clone().requires_grad_()
        out = layer.moe(x, ids, weights)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        outputs.append((out, x.grad))
    assert_rel_close(outputs[1][0], outputs[0][0], "output")
    assert_rel_close(outputs[1][1], outputs[0][1], "input grad")
    expected, got = lora_grads(reference), lora_grads(fast)
    assert set(got) == set(expected) and len(expected) == 2 * 3 * 64 + 2 * 3 + 2 * 4 * 2 + 2 * 3
    for name in expected:
        assert_rel_close(got[name], expected[name], name)


def test_model_loss_and_every_lora_gradient_agree(real_routing_dir):
    (reference, tokenizer), (fast, _) = lora_model(real_routing_dir, False), lora_model(real_routing_dir, True)
    batch = batch_of(tokenizer)
    losses = []
    for model in (reference, fast):
        loss = model(**{k: batch[k] for k in MODEL_KEYS}).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=REL)
    expected, got = lora_grads(reference), lora_grads(fast)
    for name in expected:
        assert_rel_close(got[name], expected[name], name)
    assert count_parameters(fast) == count_parameters(reference)  # 326,656 trainable either way
    trainable = [p for name, p in fast.named_parameters() if p.requires_grad and not is_picks(name)]
    assert len(trainable) == 34  # 6 stacked (gate/up/down A and B) + 28 attention/dense/shared, not 412


def test_adapter_keeps_the_peft_layout_and_reloads(real_routing_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    (reference, tokenizer), (fast, _) = lora_model(real_routing_dir, False), lora_model(real_routing_dir, True)
    with torch.no_grad():  # a training update through the stacked parameters must show in the saved adapter
        for name, param in fast.named_parameters():
            if name.endswith("stacked_up_proj_B"):
                param.add_(1.0)
    fast.save_pretrained(tmp_path / "fast")
    reference.save_pretrained(tmp_path / "reference")
    saved, ref_saved = (
        load_file(tmp_path / "fast/adapter_model.safetensors"),
        load_file(tmp_path / "reference/adapter_model.safetensors"),
    )
    assert set(saved) == set(ref_saved)  # one LoRA pair per expert projection, PEFT's names
    up_b = [k for k in saved if ".experts.7.up_proj.lora_B" in k]
    assert torch.equal(saved[up_b[0]], ref_saved[up_b[0]] + 1.0)
    base = AutoModel.from_pretrained(real_routing_dir, trust_remote_code=True, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, tmp_path / "fast").eval()
    batch = batch_of(tokenizer)
    with torch.no_grad():
        got, expected = fast.eval()(**{k: batch[k] for k in MODEL_KEYS}), plain(**{k: batch[k] for k in MODEL_KEYS})
    assert_rel_close(got.logits, expected.logits, "logits")


def test_rebinds_after_the_model_is_moved(real_routing_dir):
    (reference, tokenizer), (fast, _) = lora_model(real_routing_dir, False), lora_model(real_routing_dir, True)
    fast.to(torch.float64).to(torch.float32)  # every parameter gets new storage, as a device move does
    (layer,) = moe_layers(fast)
    stacked = layer.stacked_gate_proj_A
    batch = batch_of(tokenizer)
    expected = reference(**{k: batch[k] for k in MODEL_KEYS}).loss
    got = fast(**{k: batch[k] for k in MODEL_KEYS}).loss
    assert got.item() == pytest.approx(expected.item(), rel=REL)
    assert layer.stacked_gate_proj_A is stacked  # an optimizer holding it keeps training the same tensor
    with torch.no_grad():
        stacked[3].fill_(0.5)
    assert torch.all(layer.experts[3].gate_proj.lora_A["default"].weight == 0.5)  # views again


def test_decoding_generates_the_same_tokens(real_routing_dir):
    (reference, tokenizer), (fast, _) = lora_model(real_routing_dir, False), lora_model(real_routing_dir, True)
    batch = batch_of(tokenizer, prompts=True)
    settings = GenerationSettings(max_new_tokens=10)
    expected = generate_tokens(reference.eval(), tokenizer, batch, settings)
    assert torch.equal(generate_tokens(fast.eval(), tokenizer, batch, settings), expected)


def test_lora_dropout_acts_on_the_grouped_path(real_routing_dir):
    model, _ = lora_model(real_routing_dir, grouped=True, dropout=0.5)
    (layer,) = moe_layers(model)
    hidden = torch.randn(5, model.config.hidden_size)
    ids, weights = layer.gate(hidden[None])
    with torch.no_grad():
        train = [layer.moe(hidden, ids, weights) for _ in range(2)]
        model.eval()
        evaluation = [layer.moe(hidden, ids, weights) for _ in range(2)]
    assert not torch.equal(train[0], train[1]) and torch.equal(evaluation[0], evaluation[1])


@pytest.mark.parametrize(
    ("capability", "dtype", "kernel"),
    [((9, 0), torch.bfloat16, "native"), ((9, 0), torch.float16, "triton"), ((8, 6), torch.bfloat16, "triton"),
     ((7, 5), torch.float16, "triton"), ((7, 5), torch.bfloat16, "loop"), ((7, 0), torch.float16, "loop")],
)  # fmt: skip
def test_auto_picks_the_fused_kernel_each_gpu_has(monkeypatch, real_routing_dir, capability, dtype, kernel):
    """`auto`: torch's kernel where it is one CUTLASS kernel (Hopper, bf16), the Triton kernels on every other NVIDIA
    GPU from Turing on (bf16 from Ampere), else the loop, and then Unsloth as the backend."""
    from dsocr_lightning.families.v1.loading import resolve_backend
    from dsocr_lightning.fast import apply_fast_paths, expert_kernel

    if importlib.util.find_spec("triton") is None and kernel == "triton":
        kernel = "loop"  # no Triton in this environment: auto says so and runs the loop
    model, _ = lora_model(real_routing_dir, grouped=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("dsocr_lightning.families.v1.loading.unsloth_available", lambda: True)
    cuda = torch.device("cuda")
    assert expert_kernel(FastPaths(), cuda, dtype).name == kernel
    lines = apply_fast_paths(model, FastPaths(), cuda, dtype)
    assert {grouped_kernel(layer) for layer in moe_layers(model)} == {None if kernel == "loop" else kernel}, lines
    assert f"{kernel} kernel" in lines[0] or (kernel == "loop" and "per-expert loop" in lines[0])
    settings = LoadSettings(str(real_routing_dir), "auto", True)
    assert resolve_backend(settings, False, cuda, dtype) == ("unsloth" if kernel == "loop" else "transformers")


def test_an_explicit_kernel_that_cannot_run_here_is_refused(monkeypatch):
    from dsocr_lightning.fast import expert_kernel

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (tests run Triton's interpreter on the CPU)
    with pytest.raises(ValueError, match="triton: .*(NVIDIA GPU|not installed)"):
        expert_kernel(FastPaths(grouped_experts="triton"), torch.device("cpu"), torch.float32)
    assert expert_kernel(FastPaths(grouped_experts="loop"), torch.device("cpu"), torch.float32).name == "loop"
    assert expert_kernel(FastPaths(), torch.device("cpu"), torch.float32).name == "native"


def test_checkpoint_weights_split_back_into_peft_names(real_routing_dir):
    (reference, _), (fast, _) = lora_model(real_routing_dir, False), lora_model(real_routing_dir, True)
    from dsocr_lightning.fast.moe import per_expert_state_dict

    trainable = {k: v.detach() for k, v in fast.named_parameters() if v.requires_grad and not is_picks(k)}
    split = per_expert_state_dict(trainable)
    expected = {k: v.detach() for k, v in reference.named_parameters() if v.requires_grad}
    assert set(split) == set(expected)
    assert all(torch.equal(split[k], expected[k]) for k in expected)


def test_decoding_reuses_the_cast_lora_weights_until_they_change():
    """Outside autograd the bf16 copy of a stacked LoRA weight is made once and kept while the weight is unchanged;
    an in-place update (what the optimizer does) or training (autograd on) never sees a stale copy."""
    from dsocr_lightning.fast.grouped_mm import cast_weight, drop_cast_copies

    weight = torch.nn.Parameter(torch.randn(4, 3, 5))
    with torch.no_grad():
        first = cast_weight(weight, torch.bfloat16)
        assert cast_weight(weight, torch.bfloat16) is first and torch.equal(first, weight.to(torch.bfloat16))
        weight.add_(1.0)  # an optimizer step
        second = cast_weight(weight, torch.bfloat16)
        assert second is not first and torch.equal(second, weight.to(torch.bfloat16))
        weight.data = torch.zeros_like(weight)  # new storage
        assert not cast_weight(weight, torch.bfloat16).any()
    trained = cast_weight(weight, torch.bfloat16)
    assert trained.requires_grad and trained is not weight._cast_cache[1]
    drop_cast_copies(torch.nn.ParameterList([weight]))
    assert not hasattr(weight, "_cast_cache")
