"""The backend is read off the command line before lightning (and so transformers) is imported."""

import importlib.util
from dataclasses import asdict
from pathlib import Path

import pytest

from dsocr_lightning.training.preimport import backend_from_argv, requested, runs_on_several_devices

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


def test_the_run_plan_is_decided_once_and_handed_to_model_and_data(standin_dir, lines_dir, caplog, monkeypatch):
    """The CLI decides version, backend, expert kernel and compute dtype before anything loads, logs them in one
    line, and the module and the data module follow that plan instead of deciding again."""
    from test_errors import fit_args

    from dsocr_lightning.cli import main
    from dsocr_lightning.data import datamodule
    from dsocr_lightning.families import detect

    cli = main(fit_args(standin_dir, lines_dir)[1:], run=False)
    plan = cli.model.plan
    assert (plan.version, plan.backend, plan.experts, plan.compute_dtype) == ("v1", "transformers", "native", "float32")
    assert dict(cli.datamodule.hparams.plan) == asdict(plan)  # (a plain mapping in the data module's hparams)
    calls = []
    for module in (detect, datamodule):  # the version is not read from config.json again
        monkeypatch.setattr(module, "checkpoint_version", lambda *args, **kwargs: calls.append(args))
    cli.datamodule.setup("fit")
    cli.model.trainer = cli.trainer
    cli.model.configure_model()
    assert calls == [] and cli.model.version == cli.datamodule.version == "v1"  # nobody decided again
    assert "run plan: DeepSeek-OCR v1, transformers, experts: native kernel, computing in float32" in caplog.text
    assert {grouped for grouped in (getattr(m, "_grouped_kernel", None) for m in cli.model.model.modules())} >= {
        "native"}  # fmt: skip


def test_a_setting_the_family_does_not_use_is_named(standin_dir, lines_dir, caplog):
    """v2's LoRA options given to a v1 run: each named as ignored before anything loads, the rest silent."""
    from test_errors import fit_args

    from dsocr_lightning.cli import main

    args = fit_args(standin_dir, lines_dir, "--model.lora.encoder", "true", "--model.lora.experts", "fused")
    with pytest.warns(UserWarning) as warned:
        main(args[1:], run=False)
    named = [str(w.message) for w in warned if "is ignored" in str(w.message)]
    assert named == ["--model.lora.experts fused is ignored: DeepSeek-OCR v1 has no use for it",
                     "--model.lora.encoder True is ignored: DeepSeek-OCR v1 has no use for it"]  # fmt: skip
