"""Prediction inputs (files, folders, globs) and the JSONL writer: one line per image, as the model wrote it."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Dataset

from .metrics import sample_cer

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
    """Writes `{"path", "text"[, "reference", "cer"]}` per image to `output` (`.rankN` added under DDP)."""

    def __init__(self, output: str = "lightning_logs/predictions.jsonl") -> None:
        """
        Args:
            output: the JSONL file to write (one line per image; flushed after every batch).
        """
        super().__init__(write_interval="batch")
        self.output, self.file = output, None

    def path_for(self, trainer: Any) -> Path:
        path = Path(self.output)
        return path.with_suffix(f".rank{trainer.global_rank}.jsonl") if trainer.world_size > 1 else path

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        path = self.path_for(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", encoding="utf-8")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for record in prediction or []:
            line = {"path": record["path"], "text": record["text"]}
            if record.get("reference"):
                line |= {"reference": record["reference"], "cer": sample_cer(record["text"], record["reference"])}
            self.file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.file.flush()

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
