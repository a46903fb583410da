"""Samples -> the batch DeepSeek-OCR's forward takes (see the contract doc's "Batch" table).

Sequence = [BOS] + text before <image> + image tokens + text after <image>   (the prompt, never learned)
         + tokens of f"{text.strip()} {eos}"                               (the response, learned, EOS included)
Training batches are right padded with PAD; generation prompts are left padded, so new tokens line up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .checks import ConfigError
from .images import MODES, Mode, image_token_count, load_image, preprocess, tile_grid

BadSamplePolicy = Literal["error", "skip"]
IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
DEFAULT_INSTRUCTION = "<image>\nFree OCR. "


@dataclass
class Encoded:
    """One tokenised sample: prompt and response ids, and where the image tokens sit in the prompt."""

    prompt: list[int]
    image_mask: list[bool]
    response: list[int]


class BadSampleError(ConfigError):
    """A sample that cannot be trained on, named by split, index and path (one `error:` line from the CLI)."""


class BadSample(Exception):
    """Internal: why one sample was rejected (the policy decides what happens next)."""


def split_instruction(instruction: str) -> tuple[str, str]:
    """Text before and after the single <image> placeholder."""
    if instruction.count(IMAGE_TOKEN) != 1:
        raise ValueError(f"the instruction must hold exactly one {IMAGE_TOKEN!r}, got {instruction!r}")
    before, after = instruction.split(IMAGE_TOKEN)
    return before, after


def special_ids(tokenizer: Any) -> tuple[int, int, int]:
    """(bos, pad, image) ids, refusing a tokenizer that lacks one (PAD must not be EOS: EOS is learned)."""
    bos, pad, eos = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if bos is None or pad is None or eos is None:
        raise ValueError(
            f"the tokenizer needs BOS, EOS and PAD tokens (bos={bos}, eos={eos}, pad={pad}); DeepSeek-OCR's "
            "tokenizer has PAD <｜▁pad▁｜> = 2: load the checkpoint's own tokenizer"
        )
    if pad == eos:
        raise ValueError("PAD equals EOS: EOS labels would be masked and the model would never learn to stop")
    if image is None or image == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token")
    return bos, pad, image


def pad_to(rows: list[list], value: Any, left: bool = False) -> list[list]:
    """Pad ragged rows to one length, on the right (training) or the left (generation)."""
    width = max(len(r) for r in rows)
    return [([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows]


@dataclass
class OCRCollator:
    """Turns `{"image", "text"}` samples into model batches; runs in DataLoader workers.

    Samples may also carry `index`, `path` and `error` (set by the dataset when the image could not be read).
    A bad sample raises `BadSampleError` (policy `error`) or is dropped and reported in `batch["skipped"]`
    (policy `skip`) as `(split, index, path, reason)`; a batch whose samples were all bad has no tensors.
    """

    tokenizer: Any
    mode: Mode = field(default_factory=lambda: MODES["gundam"])
    instruction: str = DEFAULT_INSTRUCTION
    train_on_responses_only: bool = True
    max_length: int | None = None
    with_prompts: bool = False  # also emit left-padded prompt-only tensors for generation
    policy: BadSamplePolicy = "error"
    split: str = "train"
    inference: bool = False  # transcriptions may be unknown (empty): only the prompt matters

    def __post_init__(self) -> None:
        self.before, self.after = split_instruction(self.instruction)
        self.bos_id, self.pad_id, self.image_id = special_ids(self.tokenizer)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, text: str, grid: tuple[int, int]) -> Encoded:
        """Prompt ids with `count` image tokens, and the response ids ending in EOS."""
        count = image_token_count(self.mode.base_size, self.mode.image_size, *grid)
        before, after = self.encode_text(self.before), self.encode_text(self.after)
        prompt = [self.bos_id, *before, *[self.image_id] * count, *after]
        image_mask = [False] * (1 + len(before)) + [True] * count + [False] * len(after)
        response = self.encode_text(f"{text.strip()} {self.tokenizer.eos_token}")
        return Encoded(prompt, image_mask, response)

    def prepare(self, sample: dict[str, Any]) -> tuple[tuple, Encoded]:
        """Pixels and tokens of one sample, or `BadSample` with the reason."""
        text, image = self.checked_text(sample), self.opened_image(sample)
        view = preprocess(image, self.mode)
        return view, self.checked_encoding(text, view[2])

    def inspect(self, sample: dict[str, Any]) -> None:
        """`prepare`'s checks without making the pixels (what the scan runs): `BadSample` with the reason, or None.
        The image-token count comes from the tile grid alone (`tile_grid`, which `preprocess` uses too)."""
        text, image = self.checked_text(sample), self.opened_image(sample)
        self.checked_encoding(text, tile_grid(image, self.mode))

    def checked_text(self, sample: dict[str, Any]) -> str:
        if sample.get("error"):
            raise BadSample(sample["error"])
        text = sample.get("text")
        if self.inference and text is None:
            text = ""
        if not isinstance(text, str) or (not text.strip() and not self.inference):
            raise BadSample(f"empty or whitespace-only text: {text!r}")
        return text

    def opened_image(self, sample: dict[str, Any]) -> Any:
        try:
            return load_image(sample["image"])
        except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for unreadable data
            raise BadSample(f"unreadable image: {error}") from error

    def checked_encoding(self, text: str, grid: tuple[int, int]) -> Encoded:
        enc = self.encode(text, grid)
        total = len(enc.prompt) + len(enc.response)
        if self.max_length is not None and total > self.max_length:
            raise BadSample(f"{total} tokens exceed max_length {self.max_length}")
        return enc

    def report(self, sample: dict[str, Any], position: int, reason: BadSample) -> tuple[str, Any, str, str]:
        """(split, index, path, reason) of a rejected sample."""
        return self.split, sample.get("index", position), str(sample.get("path", "")), str(reason)

    def labels_for(self, enc: Encoded) -> list[int]:
        """Response-only labels, or everything but the image positions."""
        if self.train_on_responses_only:
            return [IGNORE_INDEX] * len(enc.prompt) + enc.response
        prompt = [IGNORE_INDEX if m else t for t, m in zip(enc.prompt, enc.image_mask)]
        return prompt + enc.response

    def triage(self, samples: list[dict[str, Any]]) -> tuple[list, list, list]:
        """(good samples, their (view, encoded), skipped reports); raises under the `error` policy."""
        good, prepared, skipped = [], [], []
        for position, sample in enumerate(samples):
            try:
                prepared.append(self.prepare(sample))
                good.append(sample)
            except BadSample as reason:
                where = self.report(sample, position, reason)
                if self.policy == "error":
                    raise BadSampleError(
                        "bad sample in split {!r} at index {} ({}): {}".format(*where) + ": fix or remove it, or set "
                        "data.bad_sample_policy skip; data.scan true lists every unusable sample before the model loads"
                    ) from None
                skipped.append(where)
        return good, prepared, skipped

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good, prepared, skipped = self.triage(samples)
        batch: dict[str, Any] = {"texts": [s["text"] or "" for s in good], "skipped": skipped}
        batch["paths"] = [str(s.get("path", "")) for s in good]
        batch["indices"] = [s.get("index") for s in good]
        if not good:
            return batch
        views, encoded = [v for v, _ in prepared], [e for _, e in prepared]
        ids = pad_to([e.prompt + e.response for e in encoded], self.pad_id)
        batch |= {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(pad_to([self.labels_for(e) for e in encoded], IGNORE_INDEX), dtype=torch.long),
            "images_seq_mask": torch.tensor(
                pad_to([e.image_mask + [False] * len(e.response) for e in encoded], False), dtype=torch.bool
            ),
            "images": [(crops, glob) for crops, glob, _ in views],
            "images_spatial_crop": torch.tensor([list(grid) for _, _, grid in views], dtype=torch.long),
        }
        batch["attention_mask"] = mask = (batch["input_ids"] != self.pad_id).long()
        # padding only after each row's tokens: under causal attention it changes nothing the loss reads
        batch["right_padded"] = bool((mask[:, 1:] <= mask[:, :-1]).all())
        check_image_tokens(batch)
        if self.with_prompts:
            batch.update(self.prompt_batch(encoded))
        return batch

    def prompt_batch(self, encoded: list[Encoded]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (no response) for batched greedy generation."""
        ids = torch.tensor(pad_to([e.prompt for e in encoded], self.pad_id, left=True), dtype=torch.long)
        mask = pad_to([e.image_mask for e in encoded], False, left=True)
        return {
            "prompt_input_ids": ids,
            "prompt_attention_mask": (ids != self.pad_id).long(),
            "prompt_images_seq_mask": torch.tensor(mask, dtype=torch.bool),
        }


def check_image_tokens(batch: dict[str, Any]) -> None:
    """Each row's image positions must be exactly what its views produce (global grid + crop grid)."""
    for row, ((crops, glob), (cols, rows)) in enumerate(zip(batch["images"], batch["images_spatial_crop"].tolist())):
        tiles = crops.shape[0] if crops.any() else 1
        expected = image_token_count(glob.shape[-1], crops.shape[-1], cols, rows)
        if tiles != cols * rows or int(batch["images_seq_mask"][row].sum()) != expected:
            raise AssertionError(f"row {row}: image tokens disagree with its views ({cols} x {rows} grid)")
