"""Prediction inputs (files, folders, globs) and the JSONL writer: one line per image, as the model wrote it, or
the reason it could not be read."""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Dataset

from ..training.metrics import sample_cer

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Image files, the images of folders (sorted, not recursive) and glob matches (sorted), each once."""
    found: dict[Path, None] = {}
    for entry in inputs:
        path = Path(entry).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"no image found for {entry!r}")
        found.update(dict.fromkeys(matches))
    return list(found)


class ImageFiles(Dataset):
    """Image paths as samples (no reference text); the image is opened by the collator's loader."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "path": str(self.paths[index]), "image": str(self.paths[index]), "text": None}


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes `{"path", "text", "reached_max_new_tokens"[, "reference", "cer"]}` per image, or `{"path", "error"}`
    for an image that could not be used, to `output` (`.rankN` added under DDP). The file appears whole when
    prediction ends; a failed run leaves none. An existing file is replaced only when asked (`overwrite`; the CLI
    refuses it before anything loads)."""

    def __init__(self, output: str = "lightning_logs/predictions.jsonl", overwrite: bool = False) -> None:
        """
        Args:
            output: the JSONL file to write (one line per image, in input order).
            overwrite: replace `output` if it exists (otherwise the command stops before anything loads).
        """
        super().__init__(write_interval="batch")
        self.output, self.overwrite, self.file, self.lines, self.errors = output, overwrite, None, 0, 0
        self.start = 0.0
        self.waited, self.last_end = 0.0, None  # seconds between batches: the device waits for the next batch

    def path_for(self, trainer: Any) -> Path:
        path = Path(self.output)
        return path.with_suffix(f".rank{trainer.global_rank}.jsonl") if trainer.world_size > 1 else path

    def free_path(self, trainer: Any) -> Path:
        """Where the finished file goes: `path_for`, unless a file appeared there since the start and may not be
        replaced; then the first free `<name>.N.jsonl` beside it (said in the log)."""
        path = self.path_for(trainer)
        if self.overwrite or not path.exists():
            return path
        free = next(p for n in range(1, 10**6) if not (p := path.with_suffix(f".{n}{path.suffix}")).exists())
        log.warning("%s appeared during the prediction and is kept; the predictions go to %s", path, free)
        return free

    def partial_path(self, trainer: Any) -> Path:
        path = self.path_for(trainer)
        return path.with_name(f".{path.name}.partial")

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        path = self.partial_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file, self.lines, self.errors = path.open("w", encoding="utf-8"), 0, 0
        self.start, self.waited, self.last_end = time.perf_counter(), 0.0, None

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:  # fmt: skip
        """Count the gap since the previous batch ended (its tokens already read back): the next batch's images being
        read, collated and copied to the device while the device has nothing to do. The first batch's wait (workers
        starting) is left out."""
        if self.last_end is not None:
            self.waited += time.perf_counter() - self.last_end

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self.last_end = time.perf_counter()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for record in prediction or []:
            self.file.write(json.dumps(jsonl_line(record), ensure_ascii=False) + "\n")
            self.lines, self.errors = self.lines + 1, self.errors + ("error" in record)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self.file.close()
        self.file = None
        target = self.free_path(trainer)
        os.replace(self.partial_path(trainer), target)
        errors = f', {self.errors} of them unusable images (lines with an "error" field)' if self.errors else ""
        seconds = time.perf_counter() - self.start
        log.info("predictions: %d lines written to %s in %.1f s (%.1f lines/s; %.2f s of it waiting between batches "
                 "for images)%s", self.lines, target, seconds, self.lines / max(seconds, 1e-9), self.waited, errors)  # fmt: skip

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            self.partial_path(trainer).unlink(missing_ok=True)


def jsonl_line(record: dict[str, Any]) -> dict[str, Any]:
    """The line of one prediction record: its error, or its text, whether decoding stopped at max_new_tokens without
    the end token, and the reference and CER when there is one."""
    if "error" in record:
        return {"path": record["path"], "error": record["error"]}
    line = {"path": record["path"], "text": record["text"], "reached_max_new_tokens": not record["ended"]}
    if record.get("reference"):
        line |= {"reference": record["reference"], "cer": sample_cer(record["text"], record["reference"])}
    return line
