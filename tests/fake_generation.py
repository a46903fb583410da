"""Decoding stand-in for tests of the CER bookkeeping (not of decoding: test_fastmoe and test_predict decode for real).

The random TEST STAND-IN transcribes nothing, so every CER it gets is 1.0 and a test comparing CERs compares 1.0 with
1.0. Here each prediction is its reference without its first k characters, k = 1..4 chosen by the LoRA weights:
CERs are known exactly (k / length per line) and change as training moves the weights.

In-process: `install(monkeypatch)`. As a program, for subprocesses (and the processes DDP starts from it):
`python tests/fake_generation.py fit --config ...` runs `python -m dsocr_lightning fit --config ...` with it.
With `FAKE_NONFINITE=RANK:STEP` in the environment, every training loss of that rank at that global step is NaN
(a data-parallel rank that skips a whole optimizer step).
"""

from __future__ import annotations

import os
import runpy
from typing import Any


def dropped_chars(named_parameters: Any) -> int:
    """k in 1..4 from the LoRA B weights (float64 sums: the same k from a model or its saved adapter). Which k a
    run gets depends on its exact weights: test_resume needs the two validations of its run to differ, so a change
    of the numerics (e.g. grouped experts) may need another digit here."""
    total = sum(p.detach().double().abs().sum().item() for name, p in named_parameters if "lora_B" in name)
    return int(total * 1000) % 4 + 1


def fake_transcribe(model: Any, tokenizer: Any, batch: dict, settings: Any) -> tuple[list[str], list[bool]]:
    """Each reference without its first k characters, every line ended by the end token."""
    k = dropped_chars(model.named_parameters())
    return [text[k:] for text in batch["texts"]], [True] * len(batch["texts"])


def expected_cers(references: list[str], k: int) -> tuple[float, float]:
    """(corpus CER, mean per-line CER) of the references each cut by k leading characters."""
    lost = [min(k, len(r)) for r in references]
    return sum(lost) / sum(len(r) for r in references), sum(n / len(r) for n, r in zip(lost, references)) / len(lost)


def poison(rank: int, step: int) -> None:
    """NaN training losses on `rank` at global `step`."""
    from dsocr_lightning.training.module import DeepSeekOCRModule

    forward = DeepSeekOCRModule.forward

    def poisoned(self: Any, batch: dict, *args: Any) -> Any:
        out = forward(self, batch, *args)
        if self.training and (self.global_rank, self.global_step) == (rank, step):
            out.loss = out.loss * float("nan")
        return out

    DeepSeekOCRModule.forward = poisoned


def install(monkeypatch: Any = None) -> None:
    from dsocr_lightning.training import module

    if monkeypatch is None:
        module.transcribe = fake_transcribe
    else:
        monkeypatch.setattr(module, "transcribe", fake_transcribe)
    if os.environ.get("FAKE_NONFINITE"):
        poison(*map(int, os.environ["FAKE_NONFINITE"].split(":")))


if __name__ == "__main__":
    install()
    runpy.run_module("dsocr_lightning", run_name="__main__", alter_sys=False)
