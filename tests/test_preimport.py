"""The backend is read off the command line before lightning (and so transformers) is imported."""

import importlib.util
from pathlib import Path

from dsocr_lightning.preimport import backend_from_argv, requested, runs_on_several_devices

CONFIGS = Path(__file__).parents[1] / "configs"


def test_flags_override_config_files():
    assert requested(["fit", "--config", str(CONFIGS / "t4.yaml")], "model", "backend", "auto") == "auto"
    assert requested(["fit", "--config", str(CONFIGS / "demo.yaml")], "model", "backend", "auto") == "transformers"
    argv = ["fit", "--config", str(CONFIGS / "demo.yaml"), "--model.backend", "unsloth"]
    assert requested(argv, "model", "backend", "auto") == "unsloth"
    assert requested(["fit", "--model.backend=transformers"], "model", "backend", "auto") == "transformers"


def test_several_devices():
    assert not runs_on_several_devices(["fit", "--config", str(CONFIGS / "t4.yaml")])
    assert runs_on_several_devices(["fit", "--trainer.devices", "2"])
    assert runs_on_several_devices(["fit", "--trainer.strategy=ddp_find_unused_parameters_true"])
    assert runs_on_several_devices(["fit", "--trainer.devices", "0,1"])
    assert runs_on_several_devices(["fit", "--trainer.devices", "[0, 1]"])
    assert runs_on_several_devices(["fit", "--trainer.num_nodes", "2"])
    assert not runs_on_several_devices(["fit", "--trainer.devices", "1", "--trainer.num_nodes", "1"])
    assert not runs_on_several_devices(["fit", "--trainer.accelerator", "cpu", "--trainer.devices", "auto"])


def test_nested_keys_and_the_fast_path_choice():
    assert requested(["fit", "--config", str(CONFIGS / "h100.yaml")], "model", "fast.grouped_experts", None) == "auto"
    argv = ["fit", "--config", str(CONFIGS / "h100.yaml"), "--model.fast.grouped_experts", "loop"]
    assert requested(argv, "model", "fast.grouped_experts", None) == "loop"
    assert requested(["fit"], "model", "fast.grouped_experts", "auto") == "auto"


def test_the_import_order_follows_the_backend_rule(monkeypatch):
    """Unsloth is imported first exactly where loading's rule will pick it: T4-class GPUs with the Triton kernels
    take transformers; 4-bit weights take Unsloth; the loop (no fused kernel) takes Unsloth."""
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    t4 = ["fit", "--config", str(CONFIGS / "t4.yaml")]
    kernel = "transformers" if importlib.util.find_spec("triton") else "unsloth"
    assert backend_from_argv(t4) == kernel
    assert backend_from_argv([*t4, "--model.load_in_4bit", "true"]) == "unsloth"
    assert backend_from_argv([*t4, "--model.fast.grouped_experts", "loop"]) == "unsloth"
    assert backend_from_argv([*t4, "--trainer.devices", "2"]) == "transformers"
