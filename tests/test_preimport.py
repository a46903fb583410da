"""The backend is read off the command line before lightning (and so transformers) is imported."""

from pathlib import Path

from dsocr_lightning.preimport import requested, runs_on_several_devices

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
    assert requested(["fit", "--config", str(CONFIGS / "h100.yaml")], "model", "fast.grouped_experts", None) is True
    argv = ["fit", "--config", str(CONFIGS / "h100.yaml"), "--model.fast.grouped_experts", "false"]
    assert requested(argv, "model", "fast.grouped_experts", None) == "false"
    assert requested(["fit"], "model", "fast.grouped_experts", True) is True
