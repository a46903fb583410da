"""LightningCLI wiring: `python -m dsocr_lightning fit|validate|test --config configs/t4.yaml [--trainer.* ...]`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from .callbacks import BadSamples, SpeedMonitor
from .checkpoint_io import AtomicCheckpointIO
from .data import OCRDataModule
from .module import DeepSeekOCRModule
from .predict import JsonlPredictionWriter
from .summary import RunSummary

TRAINER_DEFAULTS = {
    # the data module shards by rank itself (resumable, no duplicated evaluation samples)
    "use_distributed_sampler": False,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": ".", "name": "lightning_logs"},
    },
}
CHECKPOINT_DEFAULTS = {
    "monitor": "val/cer",
    "mode": "min",
    "save_top_k": 1,
    "save_last": True,
    "filename": "step{step}-cer{val/cer:.4f}",
    "auto_insert_metric_name": False,
}


class OCRLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always-on callbacks, each configurable: --checkpoint.monitor, --lr_monitor.logging_interval, ...
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(SpeedMonitor, "speed_monitor")
        parser.add_lightning_class_args(BadSamples, "bad_samples")
        parser.add_lightning_class_args(JsonlPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(RunSummary, "run_summary")
        # The collator's tokenizer is the checkpoint's own: one setting, two users.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.link_arguments("model.revision", "data.revision")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Checkpoints are written atomically unless the config brings its own checkpoint plugin."""
        plugins = self.config_init[self.subcommand]["trainer"].get("plugins") if self.subcommand else None
        if not plugins:
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        """`--ckpt_path last` means the newest run's last.ckpt, continued in that run's log folder."""
        config = self.config.get(self.subcommand) if self.subcommand else None
        if not config or config.get("ckpt_path") != "last":
            return
        logger = config["trainer"]["logger"]
        root = Path(logger["init_args"]["save_dir"]) / logger["init_args"]["name"]
        found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"--ckpt_path last: no version_*/checkpoints/last.ckpt under {root}")
        config["ckpt_path"] = str(found[-1])
        logger["init_args"]["version"] = found[-1].parents[1].name
        rank_zero_info(f"resuming from {found[-1]}")


def main(args: list[str] | None = None, run: bool = True) -> OCRLightningCLI:
    """The CLI; `run=False` builds model, data and trainer from `args` (the first word is then no subcommand)
    without running, as tests do to add a probe callback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return OCRLightningCLI(
        DeepSeekOCRModule,
        OCRDataModule,
        seed_everything_default=3407,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
