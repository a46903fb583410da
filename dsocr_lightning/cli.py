"""LightningCLI wiring: `python -m dsocr_lightning fit|validate|test --config configs/t4.yaml [--trainer.* ...]`."""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .callbacks import SpeedMonitor
from .data import OCRDataModule
from .module import DeepSeekOCRModule

TRAINER_DEFAULTS = {
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
        # The collator's tokenizer is the checkpoint's own: one setting, two users.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.link_arguments("model.revision", "data.revision")


def main(args: list[str] | None = None) -> OCRLightningCLI:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return OCRLightningCLI(
        DeepSeekOCRModule,
        OCRDataModule,
        seed_everything_default=3407,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )
