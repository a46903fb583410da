"""Samples -> DeepSeek-OCR 2 batches, with transformers' own processor doing all the image geometry.

The processor expands `<image>` into the model's image tokens and cuts the views: a 1024 px global view (256 tokens),
plus 2-6 local 768 px crops (144 tokens each) when a side exceeds 768 px, plus one separator token. Around it, the
same recipe as v1: [BOS] + the instruction's prompt (never learned) + tokens of f"{text.strip()} {eos}" (learned),
the same bad-sample policy, right padding for training and left-padded prompts for generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..collate import BadSample, Encoded, OCRCollator, pad_to, special_ids, split_instruction
from ..images import load_image


def checked_text(sample: dict[str, Any], inference: bool) -> str:
    """The sample's transcription, or `BadSample` (inference may have none)."""
    if sample.get("error"):
        raise BadSample(sample["error"])
    text = sample.get("text")
    if inference and text is None:
        text = ""
    if not isinstance(text, str) or (not text.strip() and not inference):
        raise BadSample(f"empty or whitespace-only text: {text!r}")
    return text


@dataclass
class ProcessorCollator(OCRCollator):
    """OCRCollator's interface and policies on a `DeepseekOcr2Processor` (passed as `tokenizer`). `mode.crop_mode`
    false turns the local crops off (a 768 px view alone); the sizes are the processor's (the model's queries fix
    them: 256 for 1024 px, 144 for 768 px)."""

    def __post_init__(self) -> None:
        self.processor = self.tokenizer
        self.tokenizer = self.processor.tokenizer
        split_instruction(self.instruction)  # exactly one <image>
        self.bos_id, self.pad_id, self.image_id = special_ids(self.tokenizer)

    def image_options(self) -> dict[str, Any]:
        """The processor's own settings; without crops its global view is drawn at `tile_size` (768 px, 144 + 1
        tokens) while transformers (5.24) counts the tokens from `size`: `size` is set to the tile so they agree."""
        if self.mode.crop_mode:
            return {}
        tile = self.processor.image_processor.tile_size
        return {"crop_to_patches": False, "size": {"height": tile, "width": tile}}

    def encode_prompt(self, image: Any) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
        """[BOS] + the processor's prompt ids (image tokens expanded), the global view and the crops (or None)."""
        out = self.processor(images=image, text=self.instruction, return_tensors="pt", **self.image_options())
        ids = out["input_ids"][0].tolist()
        if not ids or ids[0] != self.bos_id:
            ids = [self.bos_id, *ids]
        return ids, out["pixel_values"], out.get("pixel_values_local")

    def prepare(self, sample: dict[str, Any]) -> tuple[tuple, Encoded]:
        text = checked_text(sample, self.inference)
        try:
            prompt, pixels, local = self.encode_prompt(load_image(sample["image"]))
        except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for unreadable data
            raise BadSample(f"unreadable image: {error}") from error
        response = self.encode_text(f"{text.strip()} {self.tokenizer.eos_token}")
        enc = Encoded(prompt, [token == self.image_id for token in prompt], response)
        total = len(enc.prompt) + len(enc.response)
        if self.max_length is not None and total > self.max_length:
            raise BadSample(f"{total} tokens exceed max_length {self.max_length}")
        return (pixels, local), enc

    def inspect(self, sample: dict[str, Any]) -> None:
        """`prepare`'s checks for the scan: without `max_length` the text and the decoded image are all there is to
        check (no pixels made); with it, the processor alone knows the prompt's length, and `prepare` runs whole."""
        if self.max_length is not None:
            self.prepare(sample)
            return
        checked_text(sample, self.inference)
        try:
            load_image(sample["image"])
        except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for unreadable data
            raise BadSample(f"unreadable image: {error}") from error

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good, prepared, skipped = self.triage(samples)
        batch: dict[str, Any] = {"texts": [s["text"] or "" for s in good], "skipped": skipped}
        batch["paths"] = [str(s.get("path", "")) for s in good]
        if not good:
            return batch
        encoded, locals_ = [e for _, e in prepared], [local for (_, local), _ in prepared]
        ids = pad_to([e.prompt + e.response for e in encoded], self.pad_id)
        crops = [local for local in locals_ if local is not None]
        batch |= {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(pad_to([self.labels_for(e) for e in encoded], -100), dtype=torch.long),
            "images_seq_mask": torch.tensor(
                pad_to([e.image_mask + [False] * len(e.response) for e in encoded], False), dtype=torch.bool
            ),
            "pixel_values": torch.cat([pixels for (pixels, _), _ in prepared]),
            "pixel_values_local": torch.cat(crops) if crops else None,
            "num_local_patches": torch.tensor([0 if c is None else c.shape[0] for c in locals_], dtype=torch.long),
        }
        batch["attention_mask"] = (batch["input_ids"] != self.pad_id).long()
        if self.with_prompts:
            batch.update(self.prompt_batch(encoded))
        return batch
