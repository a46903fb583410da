"""LightningCLI wiring: `python -m dsocr_lightning fit|validate|test --config configs/t4.yaml [--trainer.* ...]`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO, Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from .callbacks import BadSamples, SpeedMonitor, StepProgressBar
from .checkpoint_io import AtomicCheckpointIO
from .checkpoints import LastCheckpoint
from .checks import (
    ConfigError,
    check_adapter,
    check_backend,
    check_checkpointing,
    check_ckpt_path,
    check_model_source,
    check_precision,
    check_trust,
)
from .data import OCRDataModule, check_data_settings
from .module import DeepSeekOCRModule
from .predict import JsonlPredictionWriter
from .profiling import GpuProfile
from .quiet import silence_known_noise
from .report.callback import LineReport
from .summary import RunSummary

TRAINER_DEFAULTS = {
    # the data module shards by rank itself (resumable, no duplicated evaluation samples)
    "use_distributed_sampler": False,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        # no hp_metric: the run's metric is val/cer, and an hp_metric that is never written shows up empty
        "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
    },
}
# The best checkpoint by val/cer (written after a validation that improved it); last.ckpt, for resuming, is the
# job of `last_checkpoint`, written every N steps whatever the monitor.
CHECKPOINT_DEFAULTS = {
    "monitor": "val/cer",
    "mode": "min",
    "save_top_k": 1,
    "save_last": False,
    "filename": "best-step{step}-cer{val/cer:.4f}",
    "auto_insert_metric_name": False,
}


class ShortUsageParser(LightningArgumentParser):
    """A wrong flag or value is answered with the error and the way to `--help`, not 150 lines of usage."""

    def print_usage(self, file: IO[str] | None = None) -> None:
        """jsonargparse prints the usage before its `tip: ... --help` and `error: ...` lines; those suffice."""


class OCRLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # Always-on callbacks, each configurable: --checkpoint.monitor, --last_checkpoint.every_n_train_steps, ...
        # (`checkpoint` before `last_checkpoint`: after a validation the best is saved first, then last.ckpt holds it.)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{k}": v for k, v in CHECKPOINT_DEFAULTS.items()})
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(SpeedMonitor, "speed_monitor")
        parser.add_lightning_class_args(BadSamples, "bad_samples")
        parser.add_lightning_class_args(GpuProfile, "gpu_profile")
        parser.add_lightning_class_args(JsonlPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(RunSummary, "run_summary")
        parser.add_lightning_class_args(LineReport, "line_report")  # report.html, TensorBoard's worst lines
        # The collator's tokenizer is the checkpoint's own: one setting, two users.
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        parser.link_arguments("model.revision", "data.revision")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Checkpoints are written atomically unless the config brings its own checkpoint plugin; the progress bar
        counts the micro-batches a run has left (Lightning's counts optimizer steps against micro-batches)."""
        trainer = (self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"]
        if not trainer.get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, StepProgressBar()])
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        """Every setting and path that can be checked without loading anything is checked now."""
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        if config.get("ckpt_path") == "last":
            resolve_last(config)
        preflight(self.subcommand or "fit", config)


def resolve_last(config: Any) -> None:
    """`--ckpt_path last` means the newest run's last.ckpt, continued in that run's log folder."""
    logger = config["trainer"]["logger"]
    root = Path(logger["init_args"]["save_dir"]) / logger["init_args"]["name"]
    found = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        every = config["last_checkpoint"]["every_n_train_steps"]
        raise ConfigError(
            f"--ckpt_path last: no version_*/checkpoints/last.ckpt under {root} yet (a run writes it every {every} "
            "optimizer steps, --last_checkpoint.every_n_train_steps, and after each validation): start without "
            "--ckpt_path, or give a checkpoint file"
        )
    config["ckpt_path"] = str(found[-1])
    logger["init_args"]["version"] = found[-1].parents[1].name
    rank_zero_info(f"resuming from {found[-1]}")


def model_version(model: Any) -> str:
    """v1 or v2 from the checkpoint (checked against this environment and the adapter), or, for a stand-in the run
    will write, this environment's."""
    from .versions import checkpoint_version, environment_version

    name = model["model_name_or_path"]
    if model["make_standin"] and not Path(name).exists():
        return environment_version() or "v1"
    check_model_source(name, model["revision"])
    try:
        return checkpoint_version(name, model["revision"], model["adapter_path"])
    except (OSError, ValueError) as error:
        raise ConfigError(str(error)) from None


def preflight(subcommand: str, config: Any) -> None:
    """Config and path errors before any tokenizer, data or weights load, each naming its fix."""
    model = config["model"]
    if model_version(model) == "v1":  # v2 runs transformers' own code and checks its adapters itself
        check_trust(model["trust_remote_code"], model["model_name_or_path"])
        check_backend(model, config["trainer"])
        if model["adapter_path"]:
            check_adapter(model["adapter_path"], model["lora"]["r"], list(model["lora"]["target_modules"]))
    check_data_settings(subcommand, config["data"])
    check_ckpt_path(config.get("ckpt_path"))
    check_precision(config["trainer"]["precision"])
    if subcommand == "fit":
        check_checkpointing(config["checkpoint"])


def main(args: list[str] | None = None, run: bool = True) -> OCRLightningCLI:
    """The CLI; `run=False` builds model, data and trainer from `args` (the first word is then no subcommand)
    without running, as tests do to add a probe callback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    silence_known_noise()
    return OCRLightningCLI(
        DeepSeekOCRModule,
        OCRDataModule,
        seed_everything_default=3407,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_class=ShortUsageParser,
        args=args,
        run=run,
    )
