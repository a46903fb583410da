"""The error report of a run: each evaluated line collected on its rank, gathered on rank 0 when the loop ends, shown
in TensorBoard at every validation (CER histogram, worst lines) and written as `report.html` into the run folder
after `validate`, `test`, `predict` of a split with references, and at the end of `fit` (its last validation)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ..training.line_metrics import LoopSettings, find_loop
from ..training.metrics import sample_cer
from .lines import Line, figures, gather_lines
from .page import ImageOf, Side, write_report
from .provenance import code_commit
from .tensorboard import log_lines
from .thumbnails import ThumbnailSize

SPLIT_SETTINGS = {"val": "val_split", "test": "test_split", "predict": "predict_split"}  # OCRDataModule's


@dataclass
class Evaluation:
    """The lines of one validation (all ranks) and the optimizer step it ran at."""

    step: int
    lines: list[Line]


def evaluated_lines(batch: dict[str, Any], outputs: dict[str, list]) -> list[Line]:
    """The lines of one validation or test batch (`DeepSeekOCRModule.evaluate`'s outputs)."""
    columns = (batch["indices"], batch["paths"], batch["texts"], outputs["predictions"], outputs["cers"],
               outputs["loops"])  # fmt: skip
    return [Line(*values) for values in zip(*columns)]


def predicted_lines(records: list[dict[str, Any]], loop: LoopSettings) -> list[Line]:
    """The lines of one predict batch that have a reference (`DeepSeekOCRModule.predict_step`'s records)."""
    return [
        Line(r["index"], r["path"], r["reference"], r["text"], sample_cer(r["text"], r["reference"]),
             find_loop(r["text"], r["reference"], r["ended"], loop))
        for r in records if r.get("reference")
    ]  # fmt: skip


def dataset_images(loaders: Any) -> ImageOf:
    """A line's image from the dataset the loop read (by its index), as the collator got it."""
    dataset = (loaders[0] if isinstance(loaders, list) else loaders).dataset

    def image_of(line: Line) -> Any:
        sample = dataset[line.index]
        if sample.get("error"):
            raise ValueError(sample["error"])
        return sample["image"]

    return image_of


def free_path(path: Path) -> Path:
    """`path`, or `report-2.html`, `-3`, ... beside it: a report never replaces a file already there."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


class LineReport(L.Callback):
    def __init__(self, html: bool = True, worst_lines: int = 4, thumbnail: ThumbnailSize = ThumbnailSize()) -> None:
        """
        Args:
            html: write `report.html` into the run folder after validate, test, predict with references, and at
                the end of fit (its last validation).
            worst_lines: lines of highest CER each validation shows in TensorBoard (image, reference, prediction),
                beside the histogram of every line's CER.
            thumbnail: the box line images are shrunk into (report and TensorBoard).
        """
        self.html, self.worst_lines = html, worst_lines
        self.thumbnail = thumbnail if isinstance(thumbnail, ThumbnailSize) else ThumbnailSize(**thumbnail)
        self.lines: list[Line] = []  # this rank's lines of the running loop
        self.last: Evaluation | None = None  # fit: the last validation (rank 0's copy holds every rank's lines)
        self.written: Path | None = None  # the last report written

    def start(self, *args: Any) -> None:
        self.lines = []

    on_validation_epoch_start = on_test_epoch_start = on_predict_epoch_start = start

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if outputs and not trainer.sanity_checking:
            self.lines += evaluated_lines(batch, outputs)

    on_test_batch_end = on_validation_batch_end

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self.lines += predicted_lines(outputs or [], pl_module.val_lines.loop)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.evaluated(trainer, pl_module, "val", trainer.val_dataloaders)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluated(trainer, pl_module, "test", trainer.test_dataloaders)

    def evaluated(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str, loaders: Any) -> None:
        """Every rank's lines to rank 0; TensorBoard there; the report now, or at the end of fit."""
        lines, log_dir = gather_lines(self.lines), trainer.log_dir  # collectives: every rank calls them
        self.lines = []
        if not trainer.is_global_zero or not lines:
            return
        images = dataset_images(loaders)
        writer = getattr(trainer.logger, "experiment", None)
        log_lines(writer, prefix, lines, trainer.global_step, self.worst_lines, images, self.thumbnail)
        if trainer.state.fn == "fit":
            self.last = Evaluation(trainer.global_step, lines)
        else:
            self.write(trainer, pl_module, prefix, Evaluation(trainer.global_step, lines), images, log_dir)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """predict makes no run folder: its report goes beside its predictions (`preds.jsonl` -> `preds.report.html`)."""
        lines = gather_lines(self.lines)
        self.lines = []
        if trainer.is_global_zero and lines:
            evaluation, images = Evaluation(trainer.global_step, lines), dataset_images(trainer.predict_dataloaders)
            self.write(trainer, pl_module, "predict", evaluation, images, None, predictions_report(trainer))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP
        if trainer.is_global_zero and self.last is not None:
            self.write(trainer, pl_module, "val", self.last, dataset_images(trainer.val_dataloaders), log_dir)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str, evaluation: Evaluation,
              images: ImageOf, log_dir: str | None, where: Path | None = None) -> None:  # fmt: skip
        if not self.html:
            return
        target = free_path(where or Path(log_dir or ".") / "report.html")
        facts = run_facts(trainer, pl_module, prefix, evaluation.step, log_dir)
        self.written = write_report(target, facts, [Side("prediction", evaluation.lines)], images, self.thumbnail)
        figs = figures(evaluation.lines)
        rank_zero_info(f"error report ({figs.lines} lines, CER {figs.cer:.4f}, loop rate {figs.loop_rate:.4f}): "
                       f"{self.written}")  # fmt: skip


def predictions_report(trainer: L.Trainer) -> Path:
    """`<predictions file>.report.html` beside the JSONL predict writes (`report.html` in the working folder when no
    writer runs)."""
    writer = next((c for c in trainer.callbacks if hasattr(c, "path_for")), None)
    return Path("report.html") if writer is None else writer.path_for(trainer).with_suffix(".report.html")


def run_facts(trainer: L.Trainer, pl_module: L.LightningModule, prefix: str, step: int,
              log_dir: str | None) -> dict[str, str]:  # fmt: skip
    """What a report says about its run: what ran, on which data, model, adapter, code."""
    hp, fn = pl_module.hparams, str(trainer.state.fn.value)
    data = getattr(trainer, "datamodule", None)
    split = data.hparams.get(SPLIT_SETTINGS[prefix]) if data is not None else None
    adapter = hp.get("adapter_path") or "none (the base model)"
    if fn == "fit":
        adapter = f"trained in this run, at step {step}" + (f" (from {hp.adapter_path})" if hp.adapter_path else "")
    return {
        "run": f"{fn} (the validation at step {step})" if fn == "fit" else fn,
        "data": f"{data.hparams.source}, split {split}" if data is not None else "?",
        "model": str(hp.get("model_name_or_path")),
        "adapter": str(adapter),
        "code commit": code_commit(),
        "run folder": str(log_dir),
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
