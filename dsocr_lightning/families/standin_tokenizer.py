"""Character-level TEST STAND-IN tokenizer with DeepSeek-OCR's special-token ids (not its real vocabulary)."""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
UNK, IMAGE, USER, ASSISTANT = "<unk>", "<image>", "<|User|>", "<|Assistant|>"
IMAGE_TOKEN_ID = 128815
PLACEHOLDER, PLACEHOLDER_RE = "<｜place▁holder▁no▁{}｜>", r"<｜place▁holder▁no▁\d+｜>"
# Ids of the special tokens; the characters fill 3.. and the chat markers sit just above <image>.
SPECIAL_IDS = {
    BOS: 0,
    EOS: 1,
    PAD: 2,
    IMAGE: IMAGE_TOKEN_ID,
    USER: IMAGE_TOKEN_ID + 1,
    ASSISTANT: IMAGE_TOKEN_ID + 2,
}


def standin_characters() -> list[str]:
    """The characters that get one token each: tab, newline, printable ASCII, Arabic block, ZWNJ, ZWJ."""
    ascii_printable = [chr(c) for c in range(0x20, 0x7F)]
    arabic = [chr(c) for c in range(0x0600, 0x0700)]
    return ["\t", "\n", *ascii_printable, *arabic, "\u200c", "\u200d"]


def _vocab(vocab_size: int) -> dict[str, int]:
    """token -> id for every id < vocab_size: specials at their fixed ids, characters from 3, <unk> right
    after them, and placeholders in the rest (a vocab with holes makes `tokenizers` warn it may be corrupt)."""
    chars = standin_characters()
    vocab = {c: 3 + k for k, c in enumerate(chars)}
    vocab[UNK] = 3 + len(chars)
    vocab.update(SPECIAL_IDS)
    taken = set(vocab.values())
    # Multi-character strings: a merge-free BPE never produces them from text.
    vocab.update({PLACEHOLDER.format(i): i for i in range(vocab_size) if i not in taken})
    return vocab


def build_tokenizer(vocab_size: int = 129280) -> PreTrainedTokenizerFast:
    """In-memory stand-in tokenizer: BPE without merges and without pre-tokenizer = one token per char."""
    if vocab_size <= max(SPECIAL_IDS.values()):
        raise ValueError(f"vocab_size must exceed {max(SPECIAL_IDS.values())} (the <image> id is fixed)")
    core = Tokenizer(models.BPE(vocab=_vocab(vocab_size), merges=[], unk_token=UNK, fuse_unk=False))
    # Placeholders decode to nothing (a random model emits them); the characters concatenate back, no spaces.
    core.decoder = decoders.Sequence([decoders.Replace(Regex(PLACEHOLDER_RE), ""), decoders.Fuse()])
    # Specials already sit in the vocab, so they keep their ids; they match inside raw text too.
    core.add_special_tokens([BOS, EOS, PAD, UNK, IMAGE, USER, ASSISTANT])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT], padding_side="right", model_max_length=8192 * 16,
        clean_up_tokenization_spaces=False, model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip


def write_tokenizer(folder, vocab_size: int = 129280) -> PreTrainedTokenizerFast:
    """Save the stand-in tokenizer into `folder` (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    tokenizer = build_tokenizer(vocab_size)
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    log.debug("wrote the stand-in tokenizer (%d tokens) to %s", len(tokenizer), folder)
    return tokenizer
