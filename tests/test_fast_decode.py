"""Static-cache decoding (fast/decode.py) equals transformers' `generate`: greedy tokens, token for token, in
float32 on the CPU, on the stand-in with DeepSeek-OCR's routing (64 experts, 6 per token, 2 shared; LoRA active
and unmerged) and on the plain stand-in; with left padding, the n-gram block, rows that end early, and a decoder
kept across batches. The CUDA graph replays the same step; tests/test_gpu.py checks it on a GPU."""

import importlib.util
import types

import pytest
import torch
from test_fast_moe import batch_of, lora_model

from dsocr_lightning.data.images import MODES
from dsocr_lightning.families.v1.collate import OCRCollator
from dsocr_lightning.fast.decode import banned_ngram_mask, banned_ngram_mask_reference, output_width
from dsocr_lightning.training.generation import GenerationSettings, generate_tokens

LINES = ["سلام دنیا", "کتاب ۱۲ و یک خط بلندتر از همه", "آب"]


def padded_batch(tokenizer, texts=LINES) -> dict:
    """Prompts of the collator (same length in the tiny mode), the first row's BOS turned into left padding: rows of
    different lengths, as views with crops make them."""
    batch = batch_of(tokenizer, texts, prompts=True)
    batch["prompt_input_ids"][0, 0] = tokenizer.pad_token_id
    batch["prompt_attention_mask"][0, 0] = 0
    return batch


@pytest.fixture(scope="module")
def model_and_tokenizer(real_routing_dir):
    model, tokenizer = lora_model(real_routing_dir, grouped=True)
    return model.eval(), tokenizer


def both(model, tokenizer, batch, new_tokens: int, ngram: int) -> tuple[torch.Tensor, torch.Tensor]:
    settings = {"max_new_tokens": new_tokens, "no_repeat_ngram_size": ngram}
    expected = generate_tokens(model, tokenizer, batch, GenerationSettings(**settings, decoding="generate"))
    return generate_tokens(model, tokenizer, batch, GenerationSettings(**settings, decoding="static")), expected


@pytest.mark.parametrize("size", [2, 3, 5])
def test_ngram_block_equals_the_dictionary_rule(size):
    generator = torch.Generator().manual_seed(size)
    ids = torch.randint(0, 4, (6, 40), generator=generator)  # 4 tokens: many repeats
    for length in (size - 1, size, 17, 40):
        got = banned_ngram_mask(ids, torch.tensor([length]), size, 7)
        assert torch.equal(got, banned_ngram_mask_reference(ids, length, size, 7)), length
    assert banned_ngram_mask_reference(ids, 40, size, 7).any()  # the comparison saw bans


@pytest.mark.parametrize("ngram", [0, 3, 20])
def test_static_decoding_equals_generate(model_and_tokenizer, ngram):
    model, tokenizer = model_and_tokenizer
    batch = padded_batch(tokenizer)
    assert not batch["prompt_attention_mask"].all()  # left padding is exercised
    got, expected = both(model, tokenizer, batch, 40, ngram)
    assert expected.shape == (3, 40) and torch.equal(got, expected)


def test_rows_that_end_early(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batch = padded_batch(tokenizer)
    free = generate_tokens(model, tokenizer, batch, GenerationSettings(12, 3, decoding="generate"))
    ends = types.SimpleNamespace(pad_token_id=tokenizer.pad_token_id, eos_token_id=int(free[1, 4]))
    got, expected = both(model, ends, batch, 30, 3)
    assert (expected[1, 5:] == tokenizer.pad_token_id).all() and torch.equal(got, expected)
    one = {
        k: v[1:2] if isinstance(v, (torch.Tensor, list)) else v for k, v in batch.items()
    }  # flags, names as they are
    got, expected = both(model, ends, one, 30, 3)  # its only row ends: generate stops after 5 tokens
    assert expected.shape == (1, 5) and torch.equal(got, expected)


def test_output_width():
    new = torch.tensor([[5, 1, 0, 0], [5, 5, 5, 1]])
    assert output_width(new, torch.tensor([True, True]), eos=1) == 4
    assert output_width(new[:, :3], torch.tensor([True, False]), eos=1) == 3


def test_decoder_is_kept_and_rebuilt_when_the_model_changes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    first, second = (padded_batch(tokenizer, texts) for texts in (LINES, LINES[::-1]))
    both(model, tokenizer, first, 8, 3)
    kept = model._static_decoder[1]
    got, expected = both(model, tokenizer, second, 8, 3)
    assert model._static_decoder[1] is kept and torch.equal(got, expected)
    unmerged = got
    model.merge_adapter()  # merged weights: a decoder built for the unmerged model must not be reused
    try:
        got, expected = both(model, tokenizer, second, 8, 3)
        assert model._static_decoder[1] is not kept and torch.equal(got, expected)
        assert torch.equal(got, unmerged)  # what predict's merge_lora_in_predict relies on
    finally:
        model.unmerge_adapter()


def test_plain_standin(standin_dir):
    model, tokenizer = lora_model(standin_dir, grouped=True)
    got, expected = both(model.eval(), tokenizer, padded_batch(tokenizer), 24, 20)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_cuda_graph_replays_the_eager_steps(real_routing_dir):
    """On the GPU under bf16 autocast with float32 LoRA weights (as validation runs): the captured step, replayed in a
    later call too, gives the eager step's tokens exactly. Random images: the GPU machine may lack Persian shaping."""
    model, tokenizer = lora_model(real_routing_dir, grouped=True)
    model = model.to("cuda").eval()
    generator = torch.Generator().manual_seed(0)
    samples = [{"image": noise_image(generator, width), "text": "x"} for width in (300, 500, 200)]
    batch = OCRCollator(tokenizer, MODES["tiny"], with_prompts=True)(samples)
    batch["prompt_input_ids"][0, 0], batch["prompt_attention_mask"][0, 0] = tokenizer.pad_token_id, 0
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    batch["images"] = [(c.cuda(), g.cuda()) for c, g in batch["images"]]
    runs = []
    for path in ("static", "graphs", "graphs", "generate"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            runs.append(generate_tokens(model, tokenizer, batch, GenerationSettings(40, 20, decoding=path)))
    assert model._static_decoder[1].graph is not None
    assert torch.equal(runs[1], runs[0]) and torch.equal(runs[2], runs[0])
    assert (runs[0][:, :8] == runs[3][:, :8]).float().mean() >= 0.9  # against generate: bf16 kernels differ


def noise_image(generator: torch.Generator, width: int):
    from PIL import Image

    pixels = torch.randint(0, 256, (64, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_static_decoding_under_cpu_autocast(model_and_tokenizer):
    """bf16 autocast over float32 weights: the prompt's keys come out float32, a step's bf16 (kept as the cache's
    dtype, as DynamicCache's concatenation promotes them)."""
    model, tokenizer = model_and_tokenizer
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = both(model, tokenizer, padded_batch(tokenizer), 24, 20)
    assert torch.equal(got, expected)


def test_transformers_expert_loop(real_routing_dir):
    """The per-expert loop (fp16 or pre-Hopper GPUs) decodes through the same static steps, eagerly on a GPU."""
    model, tokenizer = lora_model(real_routing_dir, grouped=False)
    got, expected = both(model.eval(), tokenizer, padded_batch(tokenizer), 24, 20)
    assert torch.equal(got, expected)


def test_graphs_only_where_every_expert_matmul_can_be_captured(real_routing_dir, monkeypatch):
    """A CUDA graph cannot hold transformers' expert loop, nor torch's grouped matmul where it runs ATen's fallback
    (float32 or fp16 weights, pre-Hopper GPUs: it reads the group sizes back to the CPU), so decoding picks the eager
    steps there; the Triton kernels read nothing back, and are captured wherever they run."""
    from dsocr_lightning.fast import decode

    looped, _ = lora_model(real_routing_dir, grouped=False)
    assert "expert loop" in decode.graph_blocker(decode.decoder_parts(looped))
    grouped, _ = lora_model(real_routing_dir, grouped=True)  # float32 weights on the CPU: ATen's fallback
    assert "no fused kernel" in decode.graph_blocker(decode.decoder_parts(grouped))
    monkeypatch.setattr(decode, "native_runs_fused", lambda device, dtype: True)
    assert decode.graph_blocker(decode.decoder_parts(grouped)) is None
    if importlib.util.find_spec("triton") is not None:
        triton, _ = lora_model(real_routing_dir, grouped="triton")
        monkeypatch.setattr(decode, "native_runs_fused", lambda device, dtype: False)
        assert decode.graph_blocker(decode.decoder_parts(triton)) is None


def test_auto_decodes_static_on_a_gpu_where_the_family_blocks_graphs(monkeypatch, caplog):
    """A family's decoder parts may refuse CUDA graphs: there `auto` decodes with the static cache, eagerly, and says
    why; `graphs` asked for is refused in words."""
    import logging

    from dsocr_lightning.fast.decode import DecoderParts
    from dsocr_lightning.training import generation

    parts = DecoderParts(*[None] * 5, eager_attention=False, graph_blocker="no graphs yet")
    monkeypatch.setattr(generation, "family", lambda name: types.SimpleNamespace(decoder_parts=lambda model: parts))
    on_gpu = {"family": "any", "prompt_input_ids": types.SimpleNamespace(device=torch.device("cuda", 0))}
    with caplog.at_level(logging.INFO, logger=generation.__name__):
        chosen = generation.decoding_path(types.SimpleNamespace(), on_gpu, GenerationSettings(decoding="auto"))
    assert chosen == ("static", parts) and "(no graphs yet)" in caplog.text
    with pytest.raises(ValueError, match="no graphs yet"):
        generation.decoding_path(types.SimpleNamespace(), on_gpu, GenerationSettings(decoding="graphs"))
