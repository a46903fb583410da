"""TEST STAND-IN for DeepSeek-OCR 2: a tiny random native `deepseek_ocr2` checkpoint, written offline.

Same classes, module names, fused 3-D experts and processor geometry as the real model (1024 px global view of 256
tokens, 768 px crops of 144); tiny widths, random weights and a small character tokenizer. NOT DeepSeek-OCR 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..standin_tokenizer import ASSISTANT, BOS, EOS, IMAGE, PAD, UNK, USER, standin_characters
from .config import tiny_config

log = logging.getLogger(__name__)
README = (
    "# TEST STAND-IN, random weights, not DeepSeek-OCR 2\n\nWritten by dsocr_lightning.families.v2.standin for tests.\n"
)


def build_tokenizer() -> object:
    """Character tokenizer with DeepSeek's special tokens (BOS 0, EOS 1, PAD 2, <image>) in a small vocabulary, so
    that a tiny model's logits stay small on a CPU."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, EOS: 1, PAD: 2}
    for token in [*standin_characters(), UNK, IMAGE, USER, ASSISTANT]:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([BOS, EOS, PAD, UNK, IMAGE, USER, ASSISTANT])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT], padding_side="right", model_max_length=65536,
        clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip


def write_v2_standin(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """config.json, model.safetensors (seeded random init), tokenizer and processor into `folder`; loads back with
    `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained(folder)`, no remote code."""
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.models.deepseek_ocr2 import DeepseekOcr2ImageProcessorPil, DeepseekOcr2Processor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config).to(dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model.save_pretrained(folder)
    DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessorPil(), tokenizer=tokenizer).save_pretrained(folder)
    (folder / "README.md").write_text(README, encoding="utf-8")
    log.info("wrote the TEST STAND-IN v2 checkpoint (random weights, not DeepSeek-OCR 2) to %s", folder)
    return folder
