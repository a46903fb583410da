"""Every shipped config parses (no weights loaded), and command-line flags override the file."""

from pathlib import Path

import pytest
import yaml

from dsocr_lightning.cli import main

CONFIG_DIR = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def printed_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as stop:
        main(["fit", *args, "--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses(capsys, path):
    config = printed_config(capsys, "--config", str(path))
    assert config["model"]["trust_remote_code"] is ("v2" not in path.stem)  # v2 runs transformers' own code
    assert config["data"]["instruction"].count("<image>") == 1
    # resumable as shipped: last.ckpt on its own cadence, the monitored checkpoint keeps the best only
    assert config["last_checkpoint"]["every_n_train_steps"] == (20 if path.stem == "h100" else 10)
    assert config["checkpoint"]["monitor"] == "val/cer" and config["checkpoint"]["save_last"] is False


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_print_config_of_each_subcommand_loads_nothing(capsys, subcommand):
    with pytest.raises(SystemExit):
        main([subcommand, "--config", str(CONFIG_DIR / "t4.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["model_name_or_path"] == "unsloth/DeepSeek-OCR"


def test_the_mode_names_are_the_modes():
    from typing import get_args

    from dsocr_lightning.data.datamodule import ModeName
    from dsocr_lightning.data.images import MODES

    assert set(get_args(ModeName)) == set(MODES)


def test_configs_present():
    assert {p.name for p in CONFIGS} >= {"t4.yaml", "h100.yaml", "demo.yaml"}


def test_t4_is_the_reference_recipe(capsys):
    config = printed_config(capsys, "--config", str(CONFIG_DIR / "t4.yaml"))
    trainer, model, data = config["trainer"], config["model"], config["data"]
    assert (trainer["precision"], trainer["max_steps"], trainer["accumulate_grad_batches"]) == ("16-mixed", 60, 4)
    assert trainer["log_every_n_steps"] == 1 and config["seed_everything"] == 3407
    assert (model["lr"], model["weight_decay"], model["warmup_steps"], model["optimizer"]) == (
        2e-4,
        0.001,
        5,
        "adamw8bit",
    )
    assert model["lora"]["r"] == 16 and model["lora"]["alpha"] == 16 and model["lora"]["random_state"] == 3407
    assert (data["batch_size"], data["train_split"], data["image_column"]) == (2, "train[:1000]", "image_path")
    assert data["instruction"] == "<image>\nFree OCR. "


def test_command_line_overrides_the_file(capsys):
    config = printed_config(
        capsys,
        "--config", str(CONFIG_DIR / "t4.yaml"),
        "--trainer.precision", "bf16-mixed",
        "--trainer.accumulate_grad_batches", "8",
    )  # fmt: skip
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["trainer"]["accumulate_grad_batches"] == 8
    assert config["checkpoint"]["monitor"] == "val/cer"
    assert config["trainer"]["logger"]["init_args"]["name"] == "lightning_logs"
