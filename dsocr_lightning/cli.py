"""LightningCLI wiring: `python -m dsocr_lightning fit|validate|test --config configs/t4.yaml [--trainer.* ...]`."""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .data.datamodule import OCRDataModule, check_data_settings
from .families import family
from .fast import FastPaths
from .files.checkpoint_io import AtomicCheckpointIO
from .files.checkpoints import LastCheckpoint
from .files.outputs import check_outputs, logger_folder
from .files.predict import JsonlPredictionWriter
from .files.runs import RunRecord, announce, best_of, check_resumed_file, find_last, run_record
from .report.callback import LineReport
from .training.callbacks import BadSamples, SpeedMonitor, StepProgressBar, UnstartedRunCleanup
from .training.checks import (
    ConfigError,
    check_accelerator,
    check_checkpointing,
    check_ckpt_path,
    check_model_source,
    check_precision,
    check_ranges,
)
from .training.loading import LoraSettings
from .training.module import DeepSeekOCRModule
from .training.plan import RunPlan, decide
from .training.preimport import TRAINER_KEYS, several_devices
from .training.profiling import GpuProfile
from .training.quiet import silence_known_noise
from .training.summary import RunSummary

PROG = "python -m dsocr_lightning"
DESCRIPTION = (
    "Fine-tune DeepSeek-OCR with LoRA: fit, validate, test and predict (below, each with --help), and export, which "
    f"merges an adapter into its base ({PROG} export --help)."
)

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

    def _parse_ckpt_path(self) -> None:
        """Not Lightning's: given a checkpoint file, it replaces the config's model settings by the checkpoint's,
        command-line flags included and silently, and not for `last` (a name, no file). Here every setting is the
        command's, for a file and for `last` alike (`resolve_ckpt_path` compares them with the checkpoint's
        record)."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Checkpoints are written atomically unless the config brings its own checkpoint plugin; the progress bar
        counts optimizer steps; each checkpoint of `fit` records its run (`runs.RunRecord`); `predict` writes its
        JSONL and nothing else (no run folder); a run that fails before its first step leaves no new run folder."""
        subcommand = self.subcommand or "fit"
        trainer = (self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"]
        if not trainer.get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        if subcommand == "fit":
            callbacks.append(RunRecord(self.record))
        if subcommand == "predict":
            kwargs["logger"], self.save_config_callback = False, None
        elif self.new_run_folder:
            callbacks.append(UnstartedRunCleanup(None if self.log_folder.exists() else self.log_folder))
        if self.log_folder is None and self.save_config_callback is not None:
            self.save_config_callback = None  # it would write config.yaml into the working folder, over any there
            rank_zero_info("no logger folder: the run's config.yaml is not saved")
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        """Every setting and path that can be checked without loading anything is checked now."""
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        subcommand = self.subcommand or "fit"
        preflight(subcommand, config)
        self.record = run_record(config, subcommand)
        resolve_ckpt_path(subcommand, config, self.record)
        self.log_folder = logger_folder(config["trainer"])  # None: no file logger, no run folder
        self.new_run_folder = (
            self.log_folder is not None and config["trainer"]["logger"]["init_args"].get("version") is None
        )


def resolve_ckpt_path(subcommand: str, config: Any, record: dict[str, Any]) -> None:
    """`last`: the newest run whose record is this command's, continued (by `fit`) in its log folder; `best`: that
    run's best checkpoint; a file: readable, and its LoRA weights of this command's model set-up."""
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path or ckpt_path in ("hpc", "registry"):
        return
    if ckpt_path in ("last", "best"):
        root = logger_folder(config["trainer"])
        if root is None:
            raise ConfigError(f"--ckpt_path {ckpt_path} looks for runs in the logger's folder and this config has none: "
                              "give a checkpoint file")  # fmt: skip
        last = find_last(root, record, config["last_checkpoint"]["every_n_train_steps"])
        path = last if ckpt_path == "last" else best_of(last)
        config["ckpt_path"] = str(path)
        if subcommand == "fit":
            config["trainer"]["logger"]["init_args"]["version"] = last.parents[1].name
        rank_zero_info(f"--ckpt_path {ckpt_path}: {path}, of the newest run whose settings are this command's")
    else:
        check_resumed_file(ckpt_path, record)
    announce(Path(config["ckpt_path"]), subcommand)


def model_version(model: Any) -> str:
    """v1 or v2 from the checkpoint (checked against this environment and the adapter), or, for a stand-in the run
    will write, this environment's."""
    from .families.detect import checkpoint_version, standin_version

    name = model["model_name_or_path"]
    if model["make_standin"] and not Path(name).exists():
        return standin_version()
    check_model_source(name, model["revision"])
    try:
        return checkpoint_version(name, model["revision"], model["adapter_path"])
    except (OSError, ValueError) as error:
        raise ConfigError(str(error)) from None


def hand_plan(config: Any, version: str) -> RunPlan:
    """The run's plan (plan.py), decided once and set on the module and the data module (which logs it as the model
    loads: after every check)."""
    try:
        plan = decide(version, config["model"], config["trainer"])
    except ValueError as error:  # an explicit choice that cannot run here
        raise ConfigError(str(error)) from None
    config["model"]["plan"] = Namespace(**asdict(plan))
    config["data"]["plan"] = Namespace(**asdict(plan))
    return plan


def warn_ignored(model: Any, version: str) -> None:
    """A setting given that this model family has no use for is named, not dropped without a word."""
    defaults = {"lora": asdict(LoraSettings()), "fast": asdict(FastPaths())}
    own = inspect.signature(DeepSeekOCRModule.__init__).parameters
    for name in family(version).ignores:
        group, _, key = name.rpartition(".")
        value = model[group][key] if group else model[key]
        if value != (defaults[group][key] if group else own[key].default):
            rank_zero_warn(f"--model.{name} {value} is ignored: DeepSeek-OCR {version} has no use for it")


def preflight(subcommand: str, config: Any) -> None:
    """Config and path errors before any tokenizer, data or weights load, each naming its fix."""
    trainer, model = config["trainer"], config["model"]
    check_accelerator(trainer)
    check_ranges(config)
    version = model_version(model)
    hand_plan(config, version)
    family(version).preflight(model)
    warn_ignored(model, version)
    check_data_settings(subcommand, config["data"])
    check_ckpt_path(config.get("ckpt_path"), subcommand)
    check_precision(trainer["precision"])
    if subcommand == "fit":
        check_checkpointing(config["checkpoint"])
    check_outputs(subcommand, config, several_devices(*(trainer.get(key, default) for key, default in TRAINER_KEYS)))


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
        parser_kwargs={"prog": PROG, "description": DESCRIPTION},
        args=args,
        run=run,
    )
