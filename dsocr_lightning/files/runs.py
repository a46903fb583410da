"""Which run a checkpoint belongs to: each checkpoint records what defines its run (base model, data source and
splits, LoRA, optimizer and schedule), and `--ckpt_path last` resumes the newest run whose record is this command's.

A record is flat: `{"model.lora.r": 16, "data.train_split": "train[:1000]", ...}`, each key the command-line flag
that sets it, so that a difference reads as the flag to change.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from ..training.checks import ConfigError
from .checkpoint_io import read_checkpoint

log = logging.getLogger(__name__)
RECORD_KEY = "run_record"  # where a checkpoint holds its run's record
WEIGHT_KEYS = (  # what the LoRA weights of a checkpoint fit: every subcommand compares these
    "model.model_name_or_path", "model.revision", "model.adapter_path", "model.lora.r", "model.lora.alpha",
    "model.lora.dropout", "model.lora.target_modules", "model.lora.use_rslora", "model.lora.random_state",
    "model.lora.experts", "model.lora.encoder",
)  # fmt: skip
TRAINING_KEYS = (  # ... and what else defines a training run: its data, their order, the optimizer and schedule
    "data.source", "data.dataset_revision", "data.train_split", "data.val_split", "data.seed", "data.shuffle",
    "data.batch_size", "trainer.accumulate_grad_batches", "trainer.max_steps", "model.optimizer", "model.lr",
    "model.weight_decay", "model.warmup_steps",
)  # fmt: skip


def local_or_id(name: str | None) -> str | None:
    """A path that exists, made absolute (the same folder from any working folder); anything else as given."""
    return str(Path(name).expanduser().resolve()) if name and Path(name).expanduser().exists() else name


def lookup(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return list(config) if isinstance(config, (list, tuple)) else config


def run_record(config: Any, subcommand: str) -> dict[str, Any]:
    """This command's record, from its parsed config: the weight keys, and for `fit` the training keys too."""
    keys = WEIGHT_KEYS + (TRAINING_KEYS if subcommand == "fit" else ())
    record = {key: lookup(config, key) for key in keys}
    for key in ("model.model_name_or_path", "model.adapter_path", "data.source"):
        if key in record:
            record[key] = local_or_id(record[key])
    return record


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """`key: there -> here` for each recorded value this command sets otherwise (only the keys it sets)."""
    return [f"{key} {saved.get(key)!r} there, {value!r} here" for key, value in wanted.items()
            if saved.get(key) != value]  # fmt: skip


class RunRecord(L.Callback):
    """Writes the run's record into every checkpoint (plain values: read back with `weights_only=True`)."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RECORD_KEY] = dict(self.record)


def record_of(path: Path) -> dict[str, Any] | None:
    """The record a checkpoint holds; None for a checkpoint written before records were."""
    return read_checkpoint(path).get(RECORD_KEY)


def mismatch(path: Path, wanted: dict[str, Any]) -> str | None:
    """Why the checkpoint at `path` is not of this command's run, or None when it is."""
    try:
        saved = record_of(path)
    except ConfigError as error:
        return f"unreadable ({error})"
    if saved is None:
        return "no run record (written before checkpoints recorded their run)"
    found = differences(saved, wanted)
    return "; ".join(found) if found else None


def find_last(root: Path, wanted: dict[str, Any], every: int) -> Path:
    """The newest `version_*/checkpoints/last.ckpt` under `root` whose run is this command's; else a `ConfigError`
    saying which runs there are and how each differs."""
    found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not found:
        raise ConfigError(
            f"--ckpt_path last: no version_*/checkpoints/last.ckpt under {root} yet (a run writes it every {every} "
            "optimizer steps, --last_checkpoint.every_n_train_steps, and after each validation): start without "
            "--ckpt_path, or give a checkpoint file"
        )
    skipped = []
    for path in found:
        why = mismatch(path, wanted)
        if why is None:
            for run, reason in skipped:
                rank_zero_info(f"--ckpt_path last: {run} is newer but another run ({reason})")
            return path
        skipped.append((path.parents[1].name, why))
    runs = " | ".join(f"{run}: {why}" for run, why in skipped)
    raise ConfigError(
        f"--ckpt_path last: no run under {root} is this command's ({runs}); resume one with its settings or "
        "--ckpt_path <its last.ckpt>, or start a new run without --ckpt_path"
    )


def best_of(last: Path) -> Path:
    """The best checkpoint of `last`'s run, as its monitored checkpoint callback recorded it (looked up in that
    run's checkpoints folder, wherever the run was started from)."""
    for key, state in read_checkpoint(last).get("callbacks", {}).items():
        name = Path(str(state.get("best_model_path") or "")).name if key.startswith("ModelCheckpoint") else ""
        if name and (last.parent / name).is_file():
            return last.parent / name
    raise ConfigError(f"--ckpt_path best: the run {last.parents[1]} has no best checkpoint yet (no validation has "
                      "scored it): give --ckpt_path last or a checkpoint file")  # fmt: skip


def check_resumed_file(path: str, wanted: dict[str, Any]) -> None:
    """`--ckpt_path FILE`: the file must be a readable checkpoint whose LoRA weights fit this command's model set-up;
    other recorded values that differ are listed (this command's values are used, as for `last`)."""
    saved = record_of(Path(path))
    if saved is None:
        log.warning("--ckpt_path %s has no run record (written before checkpoints recorded their run): its settings "
                    "cannot be compared with this command's", path)  # fmt: skip
        return
    weights = differences(saved, {k: v for k, v in wanted.items() if k in WEIGHT_KEYS})
    if weights:
        raise ConfigError(f"--ckpt_path {path}: its LoRA weights belong to another model set-up ({'; '.join(weights)})"
                          ": set those flags to the checkpoint's values, or start without --ckpt_path")  # fmt: skip
    others = differences(saved, wanted)
    if others:
        log.warning("--ckpt_path %s: this command differs from the checkpoint's run in %s; this command's values are "
                    "used", path, "; ".join(others))  # fmt: skip


def announce(path: Path, subcommand: str) -> None:
    """What the checkpoint decides (and that no setting is among it)."""
    step = read_checkpoint(path).get("global_step")
    gives = "LoRA weights, optimizer and schedule state, data position and best score" if subcommand == "fit" else \
        "LoRA weights"  # fmt: skip
    rank_zero_info(f"--ckpt_path: {path} (step {step}) gives its {gives}; every setting is this command's")
