"""Where a command will write, checked before anything loads: each location writable and of the right kind, and
nothing there that the command would replace without being asked (see folders.py for what a folder may hold)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..training.checks import ConfigError
from .folders import check_replaceable, check_writable_location, within


def logger_folder(trainer: Any) -> Path | None:
    """The folder a file logger (TensorBoard's, CSV's) writes its runs into, if the config names one."""
    try:  # a dict or jsonargparse Namespace of class_path and init_args; not False, None or a list of loggers
        init = trainer["logger"]["init_args"]
        save_dir = init["save_dir"]
    except (KeyError, TypeError, IndexError):
        return None
    return None if save_dir is None else Path(save_dir) / str(init.get("name") or "")


def check_folder(path: Path, what: str) -> None:
    """A folder to write into (made if missing)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a file, not a folder: give a folder path")
    check_writable_location(path, what)


def check_adapter_dir(adapter_dir: str) -> None:
    """`model.adapter_dir` and `<adapter_dir>_best`: new, empty, or an earlier adapter of this tool; writable."""
    for path, what in ((Path(adapter_dir), "model.adapter_dir"), (Path(f"{adapter_dir}_best"), "its best adapter")):
        check_replaceable(path, "adapter", what)
        check_writable_location(path, what)


def prediction_files(output: str, devices_several: bool) -> list[Path]:
    """The JSONL file(s) `predict` writes: `output`, or one per rank (`.rankN.jsonl`) under DDP (rank 0's named)."""
    path = Path(output)
    return [path.with_suffix(".rank0.jsonl")] if devices_several else [path]


def check_prediction_output(writer: Any, devices_several: bool) -> None:
    """`prediction_writer.output`: a file, new unless `overwrite`, in a writable folder."""
    for path in prediction_files(writer["output"], devices_several):
        if path.is_dir():
            raise ConfigError(f"prediction_writer.output {str(path)!r} is a folder: give a file path such as "
                              f"{str(path / 'predictions.jsonl')!r}")  # fmt: skip
        if path.exists() and not writer["overwrite"]:
            raise ConfigError(f"prediction_writer.output {str(path)!r} exists: give a new file, or "
                              "--prediction_writer.overwrite true to replace it")  # fmt: skip
        check_writable_location(path, "prediction_writer.output")


def checkpoint_folders(config: Any) -> list[tuple[Path, str]]:
    """Where `fit` writes checkpoints: the dirpaths given, or without a logger folder `<default_root_dir>/checkpoints`
    (a run folder's own `checkpoints/` is new, or the resumed run's)."""
    given = [(Path(config[key]["dirpath"]), f"{key}.dirpath") for key in ("checkpoint", "last_checkpoint")
             if config[key]["dirpath"]]  # fmt: skip
    if given or logger_folder(config["trainer"]) is not None:
        return given
    return [(Path(config["trainer"]["default_root_dir"] or ".") / "checkpoints", "checkpoints folder (no logger)")]


def check_checkpoint_folder(folder: Path, what: str, ckpt_path: str | None) -> None:
    """A folder for this run's checkpoints: one holding other checkpoints would see them overwritten (`last.ckpt`)
    or deleted (the best one's top-k), unless this run resumes from one of them."""
    check_folder(folder, what)
    found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
    resumed = ckpt_path not in (None, "last", "best") and within(Path(ckpt_path), folder)
    if found and not resumed:
        raise ConfigError(f"{what} {str(folder)!r} holds checkpoints of another run ({', '.join(found[:3])}): give "
                          "a new folder, or resume that run with --ckpt_path <its checkpoint>")  # fmt: skip


def check_outputs(subcommand: str, config: Any, devices_several: bool) -> None:
    """Every location the subcommand writes to, before anything loads."""
    folder = logger_folder(config["trainer"]) if subcommand != "predict" else None  # predict keeps no run folder
    if folder is not None:
        check_folder(folder, "trainer.logger save_dir/name")
    if subcommand == "fit":
        for path, what in checkpoint_folders(config):
            check_checkpoint_folder(path, what, config.get("ckpt_path"))
        if folder is None:  # the adapters land in the working (root) folder itself
            check_adapter_dir(str(Path(config["trainer"]["default_root_dir"] or ".") / "lora_model"))
        if config["model"]["adapter_dir"]:
            check_adapter_dir(config["model"]["adapter_dir"])
    if subcommand == "predict":
        check_prediction_output(config["prediction_writer"], devices_several)
    for made, key in ((config["model"]["make_standin"], "model.model_name_or_path"),
                      (config["data"]["source_type"] == "synthetic", "data.source")):  # fmt: skip
        target = Path(config[key.split(".")[0]][key.split(".")[1]])
        if made and not target.exists():
            check_writable_location(target, f"{key} (written there first)")
