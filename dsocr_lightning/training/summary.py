"""The end-of-fit summary in the log: steps done, `val/cer` first -> last (and best), where the adapter, the logs
and TensorBoard are. A new line is a new field of `RunFacts` and its line in `summary_lines`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ..report.callback import LineReport


@dataclass
class RunFacts:
    """What a finished `fit` reports."""

    steps: int  # optimizer steps done
    cers: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, val/cer) per validation
    adapters: list[str] = field(default_factory=list)  # folders the last step's LoRA adapter was saved to
    best_adapters: list[str] = field(default_factory=list)  # folders of the best checkpoint's adapter
    log_dir: str | None = None  # this run's folder: events, checkpoints, config
    logger_root: str | None = None  # the logger's root (all runs): what TensorBoard opens
    report: str | None = None  # the error report of the last validation (report.html)


def summary_lines(facts: RunFacts) -> list[str]:
    """The summary, one string per line."""
    lines = [f"fit done: {facts.steps} optimizer steps"]
    if facts.cers:
        (first_step, first), (last_step, last) = facts.cers[0], facts.cers[-1]
        best_step, best = min(facts.cers, key=lambda step_cer: step_cer[1])  # the earliest of equal bests
        lines.append(
            f"val/cer {first:.3f} at step {first_step} (first validation) -> {last:.3f} at step {last_step} "
            f"(last); best {best:.3f} at step {best_step}"
        )
    lines += [f"LoRA adapter + tokenizer, last step: {adapter}" for adapter in facts.adapters]
    lines += [f"LoRA adapter + tokenizer, best val/cer: {adapter}" for adapter in facts.best_adapters]
    if facts.log_dir:
        lines.append(f"logs and checkpoints: {facts.log_dir}")
    if facts.logger_root:
        lines.append(f"TensorBoard: tensorboard --logdir {facts.logger_root}")
    if facts.report:
        lines.append(f"error report of the last validation: {facts.report}")
    return lines


class RunSummary(L.Callback):
    """Records `val/cer` at every validation of `fit` and logs `summary_lines` once the adapter is saved (the
    `teardown` hook runs after the module's `on_fit_end`, and only when `fit` finished)."""

    def __init__(self) -> None:
        self.cers: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cer = trainer.callback_metrics.get("val/cer")
        if trainer.sanity_checking or trainer.state.fn != "fit" or cer is None:
            return
        self.cers.append((trainer.global_step, float(cer)))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        facts = RunFacts(
            steps=trainer.global_step,
            cers=list(self.cers),
            adapters=[str(path) for path in getattr(pl_module, "saved_adapters", {}).get("last", [])],
            best_adapters=[str(path) for path in getattr(pl_module, "saved_adapters", {}).get("best", [])],
            log_dir=trainer.log_dir,  # a collective under DDP: every rank asks
            logger_root=getattr(trainer.logger, "root_dir", None),
            report=next((str(c.written) for c in trainer.callbacks if isinstance(c, LineReport) and c.written), None),
        )
        for line in summary_lines(facts):
            rank_zero_info(line)

    def state_dict(self) -> dict[str, Any]:
        return {"cers": [list(step_cer) for step_cer in self.cers]}  # a resumed run reports its whole history

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cers = [(int(step), float(cer)) for step, cer in state["cers"]]
