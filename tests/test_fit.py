"""End to end on the tiny TEST STAND-IN: fit through the CLI, what it logs, checkpoints and the saved adapters."""

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from fake_generation import dropped_chars, expected_cers, install
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsocr_lightning.cli import main
from dsocr_lightning.data.datamodule import OCRDataModule
from dsocr_lightning.families.v1.standin import expected_lora_params
from dsocr_lightning.training.loading import count_parameters
from dsocr_lightning.training.summary import RunSummary
from dsocr_lightning.training.trainables import reference_layout

CONFIGS = Path(__file__).parents[1] / "configs"
UMASK = os.umask(0o022)
os.umask(UMASK)


@pytest.fixture(scope="module")
def fitted(standin_dir, lines_dir, tmp_path_factory):
    """Four optimizer steps of the demo recipe (2 micro-batches each), validation after each."""
    run_dir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        install(patch)
        cli = main(
            [
                "fit", "--config", str(CONFIGS / "demo.yaml"),
                "--model.model_name_or_path", str(standin_dir), "--model.make_standin", "false",
                "--model.adapter_dir", str(run_dir / "adapter"),
                "--data.source", str(lines_dir), "--data.source_type", "imagefolder",
                "--data.batch_size", "2", "--data.num_workers", "0",
                "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                "--trainer.logger.init_args.save_dir", str(run_dir),
                "--trainer.enable_progress_bar", "false",
            ]
        )  # fmt: skip
    return cli


def scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(log_dir)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_loss_every_step_and_val_metrics(fitted, lines_dir):
    log_dir = fitted.trainer.log_dir
    losses = scalars(log_dir, "train/loss")
    assert [s for s, _ in losses] == [0, 1, 2, 3]  # one value per optimizer step
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    lrs = [v for _, v in scalars(log_dir, "train/lr")]
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())["model"]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(demo["lr"] / demo["warmup_steps"])  # the demo's warmup
    for tag in ("val/cer", "val/cer_mean", "val/loss"):
        assert len(scalars(log_dir, tag)) == 4
    # the last validation's CER is exactly what its predictions give (each reference cut by k characters)
    references = [json.loads(line)["text"] for line in (lines_dir / "test/metadata.jsonl").read_text().splitlines()]
    corpus, mean = expected_cers(references, dropped_chars(fitted.model.named_parameters()))
    assert scalars(log_dir, "val/cer")[-1][1] == pytest.approx(corpus, abs=1e-6)
    assert scalars(log_dir, "val/cer_mean")[-1][1] == pytest.approx(mean, abs=1e-6)


def test_the_line_metrics_are_logged_beside_val_cer(fitted, lines_dir):
    references = [json.loads(line)["text"] for line in (lines_dir / "test/metadata.jsonl").read_text().splitlines()]
    k = dropped_chars(fitted.model.named_parameters())  # every prediction: its reference less k characters, ended
    last = {tag: scalars(fitted.trainer.log_dir, f"val/{tag}") for tag in ("exact_lines", "loop_rate", "length_ratio")}
    assert all(len(values) == 4 for values in last.values())  # at each validation
    assert last["exact_lines"][-1][1] == 0.0 and last["loop_rate"][-1][1] == 0.0
    assert last["length_ratio"][-1][1] == pytest.approx(sum((len(r) - k) / len(r) for r in references) / 4, abs=1e-6)
    assert len(scalars(fitted.trainer.log_dir, "val/wer")) == 4


def test_fit_ends_by_naming_the_report_of_its_last_validation(fitted, caplog):
    page = Path(fitted.trainer.log_dir) / "report.html"
    html = page.read_text(encoding="utf-8")
    assert "fit (the validation at step 4)" in html and html.count('<tr class="line"') == 4
    summary = next(c for c in fitted.trainer.callbacks if isinstance(c, RunSummary))
    with caplog.at_level(logging.INFO):
        summary.teardown(fitted.trainer, fitted.model, "fit")  # what the run logged at its end, once more
    assert caplog.records[-1].getMessage() == f"error report of the last validation: {page}"


def test_tensorboard_shows_each_thing_once(fitted):
    events = EventAccumulator(fitted.trainer.log_dir)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert [t for t in tags if "lr" in t.lower()] == ["train/lr"] and "hp_metric" not in tags


def test_lora_count_matches_the_formula(fitted, standin_dir):
    config = fitted.model.model.get_base_model().config
    trainable, _ = count_parameters(fitted.model.model)
    assert trainable == expected_lora_params(
        hidden=config.hidden_size, layers=config.num_hidden_layers, intermediate=config.intermediate_size,
        moe_intermediate=config.moe_intermediate_size, n_routed=config.n_routed_experts,
        n_shared=config.n_shared_experts, first_dense=config.first_k_dense_replace, r=16,
    )  # fmt: skip
    assert all(p.dtype == torch.float32 for p in fitted.model.parameters() if p.requires_grad)


def test_checkpoints_last_and_best_hold_only_trainable_weights(fitted):
    folder = Path(fitted.trainer.log_dir) / "checkpoints"
    cers = [v for _, v in scalars(fitted.trainer.log_dir, "val/cer")]  # after steps 1, 2, 3, 4
    best_step = 1 + cers.index(min(cers))
    assert best_step < 4  # so that the best adapter is not the last one
    assert sorted(p.name for p in folder.iterdir()) == [f"best-step{best_step}-cer{min(cers):.4f}.ckpt", "last.ckpt"]
    names, _, _ = reference_layout(fitted.model)  # PEFT's per-expert names, whatever kernel ran
    for path, step in ((folder / "last.ckpt", 4), (next(folder.glob("best-*.ckpt")), best_step)):
        ckpt = torch.load(path, weights_only=True)
        assert list(ckpt["state_dict"]) == names
        assert all("lora_" in k and ".stacked_" not in k for k in ckpt["state_dict"])
        assert ckpt["optimizer_states"] and ckpt["global_step"] == step
        assert len(ckpt["optimizer_states"][0]["param_groups"][0]["params"]) == len(names)


def test_last_and_best_adapters_are_saved_readable(fitted):
    from safetensors.torch import load_file

    run = Path(fitted.trainer.log_dir)
    best = torch.load(next((run / "checkpoints").glob("best-*.ckpt")), weights_only=True)["state_dict"]
    last = {n: p for n, p in fitted.model.named_parameters() if p.requires_grad}
    for folder, expected in ((run / "lora_model", last), (run / "lora_model_best", best),
                             (Path(fitted.model.hparams.adapter_dir), last)):  # fmt: skip
        saved = load_file(folder / "adapter_model.safetensors")
        assert sum(v.double().abs().sum().item() for v in saved.values()) == pytest.approx(
            sum(
                v.detach().double().abs().sum().item() for k, v in expected.items() if "lora_" in k or ".stacked_" in k
            ),
            rel=1e-12,
        )
        assert folder.stat().st_mode & 0o777 == 0o777 & ~UMASK  # not mkdtemp's 0700
        assert {f.stat().st_mode & 0o777 for f in folder.iterdir()} == {0o666 & ~UMASK}  # nor safetensors' 0600
    assert Path(str(fitted.model.hparams.adapter_dir) + "_best").is_dir()
    assert fitted.model.saved_adapters["best"][0] == run / "lora_model_best"


def test_saved_adapter_reloads_with_peft(fitted, standin_dir, lines_dir):
    from peft import PeftModel
    from transformers import AutoModel

    adapter = Path(fitted.trainer.log_dir) / "lora_model"
    assert (adapter / "adapter_config.json").exists() and (adapter / "tokenizer_config.json").exists()
    base = AutoModel.from_pretrained(standin_dir, trust_remote_code=True, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, adapter).eval()
    data = OCRDataModule(str(lines_dir), "imagefolder", "train", None, image_column="image", mode="tiny",
                         tokenizer_name_or_path=str(standin_dir))  # fmt: skip
    data.setup("fit")
    batch = data.collator(False)([data.datasets["train"][i] for i in range(2)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")}
    trained = fitted.model.model.eval()
    with torch.no_grad():
        expected, got = trained(**inputs).logits, reloaded(**inputs).logits
    assert torch.allclose(expected, got, atol=1e-5)
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # training moved the adapter off its zero init


def test_export_takes_either_adapter_or_a_checkpoint(fitted, tmp_path):
    from safetensors.torch import load_file

    from dsocr_lightning.files.export import main as export_main

    run = Path(fitted.trainer.log_dir)
    best_ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    merged = {}
    for name, source in (("best", run / "lora_model_best"), ("best_ckpt", best_ckpt), ("last", run / "lora_model")):
        export_main([str(source), str(tmp_path / name), "--trust_remote_code", "true"])
        merged[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(torch.equal(merged["best"][k], merged["best_ckpt"][k]) for k in merged["best"])
    assert not all(torch.equal(merged["best"][k], merged["last"][k]) for k in merged["best"])
