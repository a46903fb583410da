"""Merge a saved LoRA adapter into its base model and write a plain 16-bit checkpoint (no peft needed to load).

python -m dsocr_lightning export lora_model deepseek_ocr_persian --trust_remote_code true [--dtype bfloat16]

The output folder must be new or empty (`--overwrite true` replaces an earlier export of this tool, nothing else),
and apart from the adapter, the base, the working folder and every run folder: all checked before anything loads.

The adapter may be `lora_model` (last step), `lora_model_best` (best val/cer), or a fit checkpoint (`.ckpt`).
Memory stays near the size of the base checkpoint as stored (16-bit for DeepSeek-OCR): the base loads in its own
dtype, each LoRA layer is merged on its own (its update computed in float32 and added in float32, the sum rounded
once to the saved dtype), and the weights are written in shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info

from ..families import family
from ..families.detect import adapter_version, checkpoint_version, require_environment
from ..training.checks import ConfigError, check_model_source, check_safetensors, looks_like_path, read_json
from .checkpoint_io import read_checkpoint
from .folders import check_replaceable, check_writable_location, within


def export(
    adapter: str,
    out_dir: str,
    base_model: str | None = None,
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16",
    trust_remote_code: bool = False,
    revision: str | None = None,
    max_shard_size: str = "1GB",
    overwrite: bool = False,
) -> Path:
    """Merge `adapter` into its base and save weights (safetensors), config, remote code and tokenizer.

    Args:
        adapter: a PEFT adapter folder as `fit` saves it (`lora_model`, `lora_model_best`) or a fit checkpoint (.ckpt).
        out_dir: a new or empty folder for the merged checkpoint (written beside it and moved in whole).
        base_model: hub id or folder of the base; default: the one the adapter or checkpoint was trained from.
        dtype: dtype of the saved weights.
        trust_remote_code: run the base checkpoint's model code (DeepSeek-OCR v1 cannot load without it; v2 needs
            none).
        revision: hub revision of the base.
        max_shard_size: largest safetensors file written (saving holds about one shard in memory at a time).
        overwrite: replace `out_dir` when it holds an earlier export of this tool, and nothing else.
    """
    source = AdapterSource.open(adapter, base_model)
    version = source.version(revision)  # first: the environment the adapter needs
    source.check_ready(revision)
    check_export_target(Path(out_dir), overwrite, source)
    family(version).export(source, out_dir, dtype, trust_remote_code, revision, max_shard_size)
    rank_zero_info(f"merged {adapter} into {source.base}: {out_dir} ({dtype}, DeepSeek-OCR {version})")
    return Path(out_dir)


def is_run_folder(folder: Path) -> bool:
    """A training run's log folder (or one like it): checkpoints, hparams or TensorBoard events."""
    return (folder / "checkpoints").is_dir() or (folder / "hparams.yaml").is_file() or \
        any(folder.glob("events.out.tfevents.*"))  # fmt: skip


def check_export_target(out_dir: Path, overwrite: bool, source: AdapterSource) -> None:
    """The merged checkpoint's folder, before anything loads: new or empty, or with `overwrite` an earlier export
    of this tool (none inside a run folder); never the working folder or one above it; never the adapter or the base
    folder, nor one inside or above them; and writable."""
    where = f"export folder {str(out_dir)!r}"
    if within(Path.cwd(), out_dir):
        place = "the working folder" if within(out_dir, Path.cwd()) else "above the working folder"
        raise ConfigError(f"{where} is {place}: give a new folder for the merged checkpoint, e.g. merged_model")
    base = [("base model", Path(source.base))] if Path(source.base).is_dir() else []
    for name, folder in [("adapter", source.path), *base]:
        if within(out_dir, folder) or within(folder, out_dir):
            place = "is" if within(folder, out_dir) and within(out_dir, folder) else \
                "lies inside" if within(out_dir, folder) else "holds"  # fmt: skip
            raise ConfigError(f"{where} {place} the {name} {str(folder)!r}: give a folder apart from it")
    check_replaceable(out_dir, "export", "export folder")  # a file, or anything export did not write: refused
    if out_dir.is_dir() and any(out_dir.iterdir()):
        run = next((p for p in [out_dir, *out_dir.absolute().parents] if is_run_folder(p)), None)
        if run is not None:
            raise ConfigError(f"{where} is an earlier export inside the run folder {str(run)!r}, which export never "
                              "replaces: give a new folder")  # fmt: skip
        if not overwrite:
            raise ConfigError(f"{where} holds an earlier export: give a new folder, or --overwrite true to replace it")
    check_writable_location(out_dir, "export folder")


class AdapterSource:
    """Where the LoRA weights, their configuration and the base come from: an adapter folder or a `.ckpt`."""

    def __init__(self, path: Path, base: str, checkpoint: dict[str, Any] | None) -> None:
        self.path, self.base, self.checkpoint = path, base, checkpoint

    @classmethod
    def open(cls, adapter: str, base_model: str | None) -> AdapterSource:
        """The adapter folder or fit checkpoint `adapter`, checked readable (a `.ckpt` is read once, its tensors
        memory-mapped); its base is `base_model` or the one it records."""
        path = Path(adapter)
        if path.is_file():
            checkpoint = read_checkpoint(path, "adapter checkpoint")
            settings = checkpoint.get("hyper_parameters") or {}
            if "lora" not in settings or "model_name_or_path" not in settings:
                raise ConfigError(f"{adapter!r} is a checkpoint but not one of fit (it records no LoRA settings)")
            return cls(path, base_model or settings["model_name_or_path"], checkpoint)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"{adapter!r} is neither an adapter folder (with adapter_config.json, as lora_model "
                              "and lora_model_best) nor a fit checkpoint (.ckpt)")  # fmt: skip
        saved = read_json(path / "adapter_config.json", f"adapter {adapter!r}")
        return cls(path, base_model or saved.get("base_model_name_or_path") or "", None)

    def version(self, revision: str | None) -> str:
        """v1 or v2, checked against this environment before any weights: an adapter folder's from its own config
        (3-D expert targets are v2's, else its base's config decides), a fit checkpoint's from its base."""
        try:
            if self.checkpoint is not None:
                self.check_base(revision)
                return checkpoint_version(self.base, revision)
            version = adapter_version(str(self.path), revision)
            require_environment(version, f"adapter {str(self.path)!r}")
            return version
        except (OSError, ValueError, RuntimeError) as error:
            raise ConfigError(str(error)) from None

    def check_ready(self, revision: str | None) -> None:
        """The adapter's weights readable and its base there and complete, before anything loads."""
        if self.checkpoint is None:
            check_safetensors(self.path / "adapter_model.safetensors", f"adapter {str(self.path)!r}")
        self.check_base(revision)

    def check_base(self, revision: str | None) -> None:
        if not self.base:
            raise ConfigError(f"adapter {str(self.path)!r} does not name its base model: pass --base_model")
        if looks_like_path(self.base) and not Path(self.base).expanduser().is_dir():
            raise ConfigError(f"base model folder {self.base!r} not found: pass --base_model, a folder or hub id of the "
                              "model the adapter was trained on")  # fmt: skip
        check_model_source(self.base, revision)


def main(argv: list[str] | None = None) -> Path:
    from jsonargparse import CLI, ArgumentParser

    from ..training.quiet import silence_known_noise

    class ShortUsageParser(ArgumentParser):
        def print_usage(self, file: Any = None) -> None:
            """A wrong or missing argument: the error and the way to `--help` suffice (as for fit)."""

    silence_known_noise()
    return CLI(export, args=argv, prog="python -m dsocr_lightning export", parser_class=ShortUsageParser)
