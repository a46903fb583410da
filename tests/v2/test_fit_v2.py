"""DeepSeek-OCR 2 through the same CLI, LightningModule and DataModule: fit on the tiny TEST STAND-IN (loss every
step, CER, trainable-only checkpoint, adapter + processor), then the adapter back through adapter_path, validate,
predict and export."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsocr_lightning.cli import main

pytestmark = pytest.mark.v2
CONFIGS = Path(__file__).parents[2] / "configs"


def cli_args(v2_dir, lines_dir, save_dir, *extra):
    return [
        "--config", str(CONFIGS / "demo.yaml"), "--model.model_name_or_path", str(v2_dir),
        "--model.make_standin", "false", "--model.trust_remote_code", "false", "--model.generation.max_new_tokens", "4",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder", "--data.mode", "gundam",
        "--data.batch_size", "2", "--data.eval_batch_size", "4", "--data.num_workers", "0",
        "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(v2_dir, lines_dir, tmp_path_factory):
    """Two optimizer steps (2 micro-batches each), validation at the end."""
    run = tmp_path_factory.mktemp("run_v2")
    return main(["fit", *cli_args(v2_dir, lines_dir, run, "--trainer.max_steps", "2", "--trainer.val_check_interval",
                                  "4", "--data.val_split", "test[:4]")])  # fmt: skip


def printed(capsys, path: Path) -> dict:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses_here_too(capsys, path):
    assert printed(capsys, path)["data"]["instruction"].count("<image>") == 1  # nothing loads: no version needed


def test_t4_v2_is_the_recipe_on_v2(capsys):
    config, recipe = printed(capsys, CONFIGS / "t4_v2.yaml"), printed(capsys, CONFIGS / "t4.yaml")
    assert config["model"]["model_name_or_path"] == "deepseek-community/DeepSeek-OCR-2"
    assert config["model"]["lora"]["experts"] == "split" and config["model"]["lora"]["encoder"] is False
    for section, keys in {"trainer": ("precision", "max_steps", "accumulate_grad_batches", "gradient_clip_val"),
                          "model": ("lr", "weight_decay", "warmup_steps", "optimizer"),
                          "data": ("batch_size", "train_split", "instruction")}.items():  # fmt: skip
        assert {k: config[section][k] for k in keys} == {k: recipe[section][k] for k in keys}


def test_loss_every_step_and_cer(fitted):
    events = EventAccumulator(fitted.trainer.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1]
    assert all(torch.isfinite(torch.tensor(e.value)) for e in events.Scalars("train/loss"))
    assert len(events.Scalars("val/cer")) == 1 and len(events.Scalars("val/loss")) == 1


def test_line_metrics_and_the_error_report(fitted):
    events = EventAccumulator(fitted.trainer.log_dir)
    events.Reload()
    assert all(len(events.Scalars(f"val/{tag}")) == 1 for tag in ("wer", "exact_lines", "loop_rate", "length_ratio"))
    html = (Path(fitted.trainer.log_dir) / "report.html").read_text(encoding="utf-8")
    assert html.count('<tr class="line"') == 4 and html.count('<img src="data:image/png;base64,') == 4


def test_checkpoint_and_adapter(fitted):
    ckpt = torch.load(Path(fitted.trainer.log_dir) / "checkpoints/last.ckpt", weights_only=True)
    trainable = {n for n, p in fitted.model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable and all("lora_" in k for k in trainable)
    adapter = Path(fitted.trainer.log_dir) / "lora_model"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == ["experts.down_proj", "experts.gate_proj", "experts.up_proj"]
    assert (adapter / "processor_config.json").exists() and (adapter / "tokenizer.json").exists()


def test_adapter_path_restores_the_trained_model(fitted, v2_dir, lines_dir, tmp_path):
    adapter = Path(fitted.trainer.log_dir) / "lora_model"
    cli = main(cli_args(v2_dir, lines_dir, tmp_path, "--model.adapter_path", str(adapter), "--data.val_split",
                        "test[:2]"), run=False)  # fmt: skip
    cli.datamodule.setup("validate")
    cli.model.trainer = cli.trainer
    cli.model.configure_model()
    batch = cli.datamodule.collator(False, "test")([cli.datamodule.datasets["test[:2]"][i] for i in range(2)])
    trained, reloaded = fitted.model.eval(), cli.model.eval()
    with torch.no_grad():
        assert torch.allclose(trained(batch).logits, reloaded(batch).logits, atol=1e-5)


def test_batched_generation_matches_one_at_a_time(fitted, lines_dir):
    from dsocr_lightning.training.generation import GenerationSettings, generate_tokens

    data = fitted.datamodule
    samples = [data.datasets["test[:4]"][i] for i in range(3)]
    settings, model = GenerationSettings(max_new_tokens=4), fitted.model.model.eval()
    together = generate_tokens(model, fitted.model.tokenizer, data.collator(True, "test")(samples), settings)
    for row, sample in enumerate(samples):
        alone = generate_tokens(model, fitted.model.tokenizer, data.collator(True, "test")([sample]), settings)
        assert torch.equal(together[row, : alone.shape[1]], alone[0])


def test_export_merges_into_a_plain_native_checkpoint(fitted, tmp_path):
    from transformers import AutoModelForImageTextToText

    from dsocr_lightning.files.export import export

    adapter = Path(fitted.trainer.log_dir) / "lora_model"
    out = export(str(adapter), str(tmp_path / "merged"), dtype="float32")
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    data = fitted.datamodule
    batch = data.collator(False, "test")([data.datasets["test[:4]"][i] for i in range(2)])
    keys = ("input_ids", "attention_mask", "pixel_values", "pixel_values_local", "num_local_patches")
    real = batch["attention_mask"].bool()  # the module leaves a right-padded batch's mask out: padding differs
    assert batch["right_padded"] and not real.all()
    with torch.no_grad():
        expected = merged(**{k: batch[k] for k in keys}).logits[real]
        assert torch.allclose(expected, fitted.model.eval()(batch).logits[real], atol=1e-4)


@pytest.mark.parametrize("ngram", [0, 3])
def test_static_cache_decoding_equals_generate(fitted, ngram, caplog):
    """families/v2/decode.py: the static-cache decoder (fast/decode.py) over v2's own layers gives generate's greedy
    tokens, token for token in float32 on the CPU, with a left-padded row and the n-gram block; and on the CPU
    `auto` takes it (on a GPU `auto` keeps generate until it is measured there)."""
    import logging

    from dsocr_lightning.training.generation import GenerationSettings, generate_tokens

    data, model = fitted.datamodule, fitted.model.model.eval()
    batch = data.collator(True, "test")([data.datasets["test[:4]"][i] for i in range(3)])
    batch["prompt_input_ids"][0, 0] = fitted.model.tokenizer.tokenizer.pad_token_id  # the first BOS becomes padding
    batch["prompt_attention_mask"][0, 0] = 0
    tokens = {}
    for path in ("generate", "static", "auto"):
        settings = GenerationSettings(max_new_tokens=24, no_repeat_ngram_size=ngram, decoding=path)
        with caplog.at_level(logging.INFO, logger="dsocr_lightning.training.generation"):
            tokens[path] = generate_tokens(model, fitted.model.tokenizer, batch, settings)
    assert tokens["generate"].shape[0] == 3 and tokens["generate"].shape[1] > 1
    assert torch.equal(tokens["static"], tokens["generate"]) and torch.equal(tokens["auto"], tokens["generate"])
    assert "decoding: static KV cache, steps run eagerly" in caplog.text
