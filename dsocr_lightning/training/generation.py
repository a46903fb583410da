"""Batched greedy generation from left-padded prompts (what validation and prediction share)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..families import family
from ..fast.decode import Rules, graph_blocker, static_generate

log = logging.getLogger(__name__)

# Not cuDNN: its attention plans a graph per new shape, and every decode step has a new KV length
# (profiled on an H100: 1.8 ms of CPU per call, a third of a generate call's CPU time). The others do not.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class GenerationSettings:
    """Decoding as the reference `infer`: greedy with an n-gram repeat block, length capped."""

    max_new_tokens: int = 256  # cap on new tokens per line (the reference allows 8192)
    no_repeat_ngram_size: int = 20  # the reference's value (35 in its eval mode)
    # auto: a static KV cache with each step one CUDA graph replay on a GPU, run eagerly on a CPU (fast/decode.py),
    # where the model's layout allows, else transformers' generate (logged); static, graphs or generate to force one
    decoding: Literal["auto", "static", "graphs", "generate"] = "auto"
    # predict only: merge the LoRA into the base weights first (fewer kernels a step; on an H100 decoding ran 1.5x
    # faster at batch 1, 1.2x at batch 64); validation during training always decodes unmerged
    merge_lora_in_predict: bool = True


@torch.no_grad()
def generate_tokens(model: Any, tokenizer: Any, batch: dict[str, Any], settings: GenerationSettings) -> torch.Tensor:
    """New token ids `[B, T_new]` (PAD after EOS) for the left-padded prompts of `batch` (the collator's keys)."""
    owner = family(batch["family"])  # the family that made the batch
    prompt, tokenizer = batch["prompt_input_ids"], owner.tokenizer(tokenizer)
    path, parts = decoding_path(model, batch, settings)
    image_inputs = owner.prompt_image_inputs(batch)
    with sdpa_kernel(DECODE_ATTENTION):
        if path != "generate":
            rules = Rules(settings.no_repeat_ngram_size, tokenizer.pad_token_id, tokenizer.eos_token_id)
            return static_generate(model, parts, prompt, batch["prompt_attention_mask"], image_inputs,
                                   settings.max_new_tokens, rules, graphs=path == "graphs")  # fmt: skip
        out = model.generate(
            input_ids=prompt,
            attention_mask=batch["prompt_attention_mask"],
            **image_inputs,
            max_new_tokens=settings.max_new_tokens,
            no_repeat_ngram_size=settings.no_repeat_ngram_size,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return out[:, prompt.shape[1] :]


def decoding_path(model: Any, batch: dict[str, Any], settings: GenerationSettings) -> tuple[str, Any]:
    """(`graphs`, `static` or `generate`, the decoder's parts), logged the first time a model decodes that way."""
    parts = family(batch["family"]).decoder_parts(model)
    cuda = batch["prompt_input_ids"].device.type == "cuda"
    path, why = settings.decoding, ""
    if path in ("auto", "graphs") and not cuda:
        path, why = "static", " (no CUDA device: the same steps, eagerly)"
    blocker = graph_blocker(parts) if parts is not None else None
    if path in ("auto", "graphs") and blocker:
        path, why = "static", f" ({blocker})"
    if path == "auto":
        path = "graphs"
    if path != "generate" and parts is None:
        path, why = (
            "generate",
            " (no static-cache decoder for this model: its family has none, or Unsloth built its layers)",
        )
    if settings.decoding not in ("auto", path):
        raise ValueError(f"decoding: {settings.decoding} does not apply here{why}; use auto")
    if getattr(model, "_decoding_logged", None) != path:
        log.info("decoding: %s%s", DESCRIPTIONS[path], why)
        model._decoding_logged = path
    return path, parts


DESCRIPTIONS = {
    "graphs": "static KV cache, each step one CUDA graph replay (fast/decode.py)",
    "static": "static KV cache, steps run eagerly (fast/decode.py)",
    "generate": "transformers' generate",
}


Transcripts = tuple[list[str], list[bool]]  # texts, and whether each ended with the end token


def transcribe(model: Any, tokenizer: Any, batch: dict[str, Any], settings: GenerationSettings) -> Transcripts:
    """Greedy transcriptions of the batch's images (special tokens dropped, stripped), and whether each ended with the
    end token (False: decoding stopped at `max_new_tokens`; both decoders keep the EOS they emit)."""
    new_tokens = generate_tokens(model, tokenizer, batch, settings)
    tokenizer = family(batch["family"]).tokenizer(tokenizer)
    texts = [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return texts, (new_tokens == tokenizer.eos_token_id).any(dim=1).tolist()


def generate_texts(model: Any, tokenizer: Any, batch: dict[str, Any], settings: GenerationSettings) -> list[str]:
    """Greedy transcriptions of the batch's images, special tokens dropped, stripped."""
    return transcribe(model, tokenizer, batch, settings)[0]
