"""Which DeepSeek-OCR a checkpoint is (v1 or v2), read from its config.json before any weight loads, and whether
this environment can run it. The two need different transformers (v1: 4.56.2 for the remote code; v2: >= 5.10 for
transformers' own `deepseek_ocr2`), so they live in separate environments.

The version is never a setting: it comes from the checkpoint (`model_type` / `architectures`), and an adapter's
version from its `adapter_config.json` (3-D expert targets are v2's; otherwise its base's config decides).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any, Literal, NamedTuple

ModelVersion = Literal["v1", "v2"]
V2_MODEL_TYPES = {"deepseek_ocr2"}
V2_ARCHITECTURES = {"DeepseekOcr2ForConditionalGeneration", "DeepseekOcr2Model"}
V1_MODEL_TYPES = {"deepseek_vl_v2", "DeepseekOCR", "dsocr_standin"}
INSTALL = {
    "v1": 'pip install -e ".[dev]" (or ".[unsloth]" on a GPU): transformers 4.56.2 for the remote code',
    "v2": 'pip install -e ".[v2,test]": transformers >= 5.10 with its deepseek_ocr2',
}
NATIVE_V2 = "deepseek-community/DeepSeek-OCR-2"


def read_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """The checkpoint's config.json: from the folder, or this one file from the hub (never weights)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
        if not path.is_file():
            raise ValueError(f"{name_or_path!r} is not a model checkpoint: it has no config.json")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(name_or_path, "config.json", revision=revision))
        except Exception as error:  # offline, unknown id, gated: one plain message
            raise OSError(
                f"could not read config.json of {name_or_path!r} ({type(error).__name__}: {error}). Offline? "
                "Download the checkpoint where there is a network (huggingface_hub.snapshot_download) and pass the "
                "folder."
            ) from error
    return json.loads(path.read_text())


def is_remote_code_v2(config: dict[str, Any]) -> bool:
    """DeepSeek's own (or Unsloth's) remote-code DeepSeek-OCR 2: v1's model_type, a Qwen2 vision encoder."""
    vision = json.dumps(config.get("vision_config", {}))
    return "qwen2" in vision.lower() or "deepencoderv2" in vision.lower()


def version_of_config(config: dict[str, Any], where: str) -> ModelVersion:
    """v1 or v2 from a config.json's `model_type` / `architectures`; anything else is refused with the reason."""
    model_type, architectures = config.get("model_type"), set(config.get("architectures") or [])
    if model_type in V2_MODEL_TYPES or architectures & V2_ARCHITECTURES:
        return "v2"
    if model_type in V1_MODEL_TYPES and is_remote_code_v2(config):
        raise ValueError(
            f"{where} is DeepSeek-OCR 2 in its remote-code form, which does not run a language-model forward on "
            f"transformers 4.56.2: use transformers' own port, {NATIVE_V2!r} (or convert this folder with "
            "transformers' convert_deepseek_ocr2_weights_to_hf.py), in the v2 environment: " + INSTALL["v2"]
        )
    if model_type in V1_MODEL_TYPES:
        return "v1"
    raise ValueError(
        f"{where} is not a DeepSeek-OCR checkpoint (model_type {model_type!r}, architectures {sorted(architectures)}):"
        f" expected unsloth/DeepSeek-OCR or deepseek-ai/DeepSeek-OCR (v1), or {NATIVE_V2} (v2)"
    )


def detect_version(name_or_path: str, revision: str | None = None) -> ModelVersion:
    return version_of_config(read_config(name_or_path, revision), repr(name_or_path))


def environment_version() -> ModelVersion | None:
    """Which version this environment runs, from the installed transformers (not imported): None if neither."""
    try:
        major, minor = (int(part) for part in importlib.metadata.version("transformers").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    if major == 4 and minor == 56:
        return "v1"
    if (major, minor) >= (5, 10) and importlib.util.find_spec("transformers.models.deepseek_ocr2") is not None:
        return "v2"
    return None


def require_environment(version: ModelVersion, where: str) -> None:
    """Fail now, before any weight loads, when this environment cannot run a `version` checkpoint."""
    here = environment_version()
    if here == version:
        return
    try:
        installed = f"transformers {importlib.metadata.version('transformers')}"
    except importlib.metadata.PackageNotFoundError:
        installed = "no transformers"
    raise RuntimeError(
        f"{where} is a DeepSeek-OCR {version} checkpoint but this environment has {installed}. "
        f"Install `.[{version}]` in its own environment: {INSTALL[version]}. v1 and v2 need different transformers "
        "and cannot share one environment."
    )


def adapter_version(adapter_path: str, revision: str | None = None) -> ModelVersion:
    """A saved adapter's model version: LoRA on 3-D expert parameters is v2's; otherwise its base decides (v1 when
    the base cannot be read: v1 adapters name Linears only)."""
    path = Path(adapter_path) / "adapter_config.json"
    if not path.is_file():
        missing = "not found" if not Path(adapter_path).exists() else "has no adapter_config.json"
        raise FileNotFoundError(f"adapter {adapter_path!r} {missing}: expected a PEFT adapter folder (lora_model)")
    saved = json.loads(path.read_text())
    if saved.get("target_parameters"):
        return "v2"
    base = saved.get("base_model_name_or_path")
    try:
        return detect_version(base, revision) if base else "v1"
    except (OSError, ValueError):
        return "v1"


def checkpoint_version(name_or_path: str, revision: str | None = None, adapter_path: str | None = None) -> ModelVersion:
    """The checkpoint's version, checked against this environment and against the adapter's, before weights load."""
    version = detect_version(name_or_path, revision)
    require_environment(version, repr(name_or_path))
    if adapter_path and (adapter := adapter_version(adapter_path)) != version:
        raise ValueError(
            f"adapter {adapter_path!r} was trained on a DeepSeek-OCR {adapter} base but {name_or_path!r} is "
            f"{version}: an adapter only fits the model version it was trained on"
        )
    return version


# ---- dispatch: the few places where the two versions part --------------------------------------------------------
class LoadedModel(NamedTuple):
    """What a family's loader gives the LightningModule, and what the family decides about its loss."""

    model: Any  # the peft model
    text_side: Any  # tokenizer (v1) or processor (v2)
    backend: str
    step_token_loss: bool  # the forward takes HF's loss keyword arguments (`num_items_in_batch`), so HF Trainer
    # normalises each optimizer step's loss by the label tokens of all its micro-batches, and so does this project
    version: ModelVersion


def load_model(
    settings: Any, lora: Any, data_parallel: bool = False, device: Any = None, compute_dtype: Any = None,
    plan: Any = None,
) -> LoadedModel:  # fmt: skip
    """The loaded model of the plan's version, else the checkpoint's (see loading.load_model, v2's load_model)."""
    version = plan.version if plan and plan.version else checkpoint_version(
        settings.model_name_or_path, settings.revision, settings.adapter_path)  # fmt: skip
    if version == "v2":
        from .v2.loading import TAKES_LOSS_KWARGS
        from .v2.loading import load_model as load_v2

        return LoadedModel(*load_v2(settings, lora, device, compute_dtype), TAKES_LOSS_KWARGS, version)
    from .loading import TAKES_LOSS_KWARGS
    from .loading import load_model as load_v1

    loaded = load_v1(settings, lora, data_parallel, device, compute_dtype, plan)
    return LoadedModel(*loaded, TAKES_LOSS_KWARGS, version)


def load_text_side(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None,
                   version: str = "") -> Any:  # fmt: skip
    """What the collator needs (no weights): v1's tokenizer, or v2's processor (tokenizer + image processor), of the
    given version, else the checkpoint's."""
    if (version or checkpoint_version(name_or_path, revision)) == "v2":
        from .v2.loading import load_processor

        return load_processor(name_or_path, revision)
    from .loading import load_tokenizer

    return load_tokenizer(name_or_path, trust_remote_code, revision)


def make_collator(version: str, text_side: Any, **settings: Any) -> Any:
    """v1's collator (hand-written geometry from the contract) or v2's (transformers' processor)."""
    if version == "v2":
        from .v2.collate import ProcessorCollator

        return ProcessorCollator(text_side, **settings)
    from .collate import OCRCollator

    return OCRCollator(text_side, **settings)


def write_standin(folder: str) -> None:
    """TEST ONLY: the tiny random stand-in of the version this environment runs (v2's under transformers 5)."""
    if environment_version() == "v2":
        from .v2.standin import write_v2_standin

        write_v2_standin(folder)
    else:
        from .standin import write_standin_checkpoint

        # lm_head only where labels are learned: the same loss, most of a CPU training step saved
        write_standin_checkpoint(folder, labelled_logits_only=True)
