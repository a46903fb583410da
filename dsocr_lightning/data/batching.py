"""What every model family's collator shares: the prompt/response recipe, the bad-sample policy, the bookkeeping of
texts, indices, paths and skipped samples, label padding and left-padded prompt batches.

Sequence = the family's prompt ([BOS] + instruction with its image tokens expanded; never learned)
         + tokens of f"{text.strip()} {eos}"                       (the response, learned, EOS included)
Training batches are right padded with PAD; generation prompts are left padded, so new tokens line up.

A family (v1's `families.v1.collate.OCRCollator`, v2's `families.v2.collate.ProcessorCollator`) supplies only its per-sample preparation
(`encode_image`: pixels, prompt ids, image positions) and how its pixels stack into the model's inputs
(`model_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from ..training.checks import ConfigError
from .images import MODES, Mode, load_image

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


class ImagePrompt(NamedTuple):
    """A family's preparation of one image: its pixels (in the family's form), the prompt ids, the image positions."""

    pixels: Any
    prompt: list[int]
    image_mask: list[bool]


class Triage(NamedTuple):
    """A list of samples sorted out: the usable ones with their (pixels, tokens), and (split, index, path, reason)
    of each rejected one."""

    good: list[dict[str, Any]]
    prepared: list[tuple[Any, Encoded]]
    skipped: list[tuple[str, Any, str, str]]


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


def checked_text(sample: dict[str, Any], inference: bool) -> str:
    """The sample's transcription, or `BadSample` with the reason (inference may have none)."""
    if sample.get("error"):
        raise BadSample(sample["error"])
    text = sample.get("text")
    if inference and text is None:
        text = ""
    if not isinstance(text, str) or (not text.strip() and not inference):
        raise BadSample(f"empty or whitespace-only text: {text!r}")
    return text


@dataclass
class SampleCollator:
    """Turns `{"image", "text"}` samples into model batches; runs in DataLoader workers.

    Samples may also carry `index`, `path` and `error` (set by the dataset when the image could not be read).
    A bad sample raises `BadSampleError` (policy `error`) or is dropped and reported in `batch["skipped"]`
    (policy `skip`) as `(split, index, path, reason)`; a batch whose samples were all bad has no tensors.
    Every batch carries `texts`, `indices` and `paths` of its usable samples, in order, and `family`: the version
    of the family that made it (what shared code asks about the batch's model inputs).
    """

    family = ""  # set by each family's collator class: v1, v2, ...

    text_side: Any  # the checkpoint's tokenizer (v1) or processor (v2)
    mode: Mode = field(default_factory=lambda: MODES["gundam"])
    instruction: str = DEFAULT_INSTRUCTION
    train_on_responses_only: bool = True
    max_length: int | None = None
    with_prompts: bool = False  # also emit left-padded prompt-only tensors for generation
    policy: BadSamplePolicy = "error"
    split: str = "train"
    inference: bool = False  # transcriptions may be unknown (empty): only the prompt matters

    def __post_init__(self) -> None:
        split_instruction(self.instruction)  # exactly one <image>
        self.bos_id, self.pad_id, self.image_id = special_ids(self.tokenizer)

    # ---- what a family supplies ------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The text tokenizer of `text_side`."""
        raise NotImplementedError

    def encode_image(self, image: Any) -> ImagePrompt:
        """Pixels, prompt ids and image positions of one RGB image; OSError or ValueError when it is unusable."""
        raise NotImplementedError

    def model_inputs(self, pixels: list[Any], batch: dict[str, Any]) -> dict[str, Any]:
        """The family's pixel inputs of a batch (and any key its forward needs beyond the shared token tensors)."""
        raise NotImplementedError

    def counted_prompt(self, image: Any) -> tuple[list[int], list[bool]] | None:
        """Prompt ids and image positions without making the pixels (what the pre-scan checks), or None where only
        the pixels tell the image-token count."""
        return None

    # ---- shared ---------------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prepare(self, sample: dict[str, Any]) -> tuple[Any, Encoded]:
        """Pixels and tokens of one sample, or `BadSample` with the reason."""
        text, image = checked_text(sample, self.inference), self.opened_image(sample)
        try:
            pixels, prompt, image_mask = self.encode_image(image)
        except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for unreadable data
            raise BadSample(f"unreadable image: {error}") from error
        return pixels, self.checked_encoding(text, prompt, image_mask)

    def inspect(self, sample: dict[str, Any]) -> None:
        """`prepare`'s checks without making the pixels where the family counts image tokens without them (what the
        pre-scan runs): `BadSample` with the reason, or None. Without `max_length` the text and the decoded image are
        all there is to check."""
        text, image = checked_text(sample, self.inference), self.opened_image(sample)
        counted = self.counted_prompt(image)
        if counted is not None:
            self.checked_encoding(text, *counted)
        elif self.max_length is not None:
            self.prepare(sample)

    def opened_image(self, sample: dict[str, Any]) -> Any:
        try:
            return load_image(sample["image"])
        except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for unreadable data
            raise BadSample(f"unreadable image: {error}") from error

    def checked_encoding(self, text: str, prompt: list[int], image_mask: list[bool]) -> Encoded:
        enc = Encoded(prompt, image_mask, self.encode_text(f"{text.strip()} {self.tokenizer.eos_token}"))
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

    def triage(self, samples: list[dict[str, Any]]) -> Triage:
        """Every sample prepared or rejected with its reason, whatever the policy (the pre-scan lists them all)."""
        found = Triage([], [], [])
        for position, sample in enumerate(samples):
            try:
                found.prepared.append(self.prepare(sample))
                found.good.append(sample)
            except BadSample as reason:
                found.skipped.append(self.report(sample, position, reason))
        return found

    def enforce_policy(self, skipped: list[tuple[str, Any, str, str]]) -> None:
        """Policy `error`: the first rejected sample stops the run, named by split, index and path."""
        if skipped and self.policy == "error":
            raise BadSampleError(
                "bad sample in split {!r} at index {} ({}): {}".format(*skipped[0]) + ": fix or remove it, or set "
                "data.bad_sample_policy skip; data.scan true lists every unusable sample before the model loads"
            ) from None

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good, prepared, skipped = self.triage(samples)
        self.enforce_policy(skipped)
        batch: dict[str, Any] = {
            "family": self.family,
            "texts": [s["text"] or "" for s in good],
            "indices": [s.get("index") for s in good],
            "paths": [str(s.get("path", "")) for s in good],
            "skipped": skipped,
        }
        if not good:
            return batch
        encoded = [enc for _, enc in prepared]
        batch |= self.token_batch(encoded)
        batch |= self.model_inputs([pixels for pixels, _ in prepared], batch)
        if self.with_prompts:
            batch |= self.prompt_batch(encoded)
        return batch

    def token_batch(self, encoded: list[Encoded]) -> dict[str, Any]:
        """Right-padded ids, labels (IGNORE_INDEX on padding), image positions and attention mask; `right_padded`
        tells the module that the padding mask can be left out (padding only after each row's tokens: under causal
        attention it changes nothing the loss reads; same loss, tests/test_collate.py and tests/v2/test_loss_v2.py)."""
        ids = torch.tensor(pad_to([e.prompt + e.response for e in encoded], self.pad_id), dtype=torch.long)
        masks = [e.image_mask + [False] * len(e.response) for e in encoded]
        mask = (ids != self.pad_id).long()
        return {
            "input_ids": ids,
            "labels": torch.tensor(pad_to([self.labels_for(e) for e in encoded], IGNORE_INDEX), dtype=torch.long),
            "images_seq_mask": torch.tensor(pad_to(masks, False), dtype=torch.bool),
            "attention_mask": mask,
            "right_padded": bool((mask[:, 1:] <= mask[:, :-1]).all()),
        }

    def prompt_batch(self, encoded: list[Encoded]) -> dict[str, torch.Tensor]:
        """Left-padded prompts (no response) for batched greedy generation."""
        ids = torch.tensor(pad_to([e.prompt for e in encoded], self.pad_id, left=True), dtype=torch.long)
        mask = pad_to([e.image_mask for e in encoded], False, left=True)
        return {
            "prompt_input_ids": ids,
            "prompt_attention_mask": (ids != self.pad_id).long(),
            "prompt_images_seq_mask": torch.tensor(mask, dtype=torch.bool),
        }
