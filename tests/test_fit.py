"""End to end on the tiny TEST STAND-IN: fit through the CLI, what it logs, checkpoints and the saved adapter."""

from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsocr_lightning.cli import main
from dsocr_lightning.data import OCRDataModule
from dsocr_lightning.loading import count_parameters
from dsocr_lightning.standin import expected_lora_params

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def fitted(standin_dir, lines_dir, tmp_path_factory):
    """Four optimizer steps of the demo recipe (2 micro-batches each), validation at the end."""
    run_dir = tmp_path_factory.mktemp("run")
    cli = main(
        [
            "fit", "--config", str(CONFIGS / "demo.yaml"),
            "--model.model_name_or_path", str(standin_dir), "--model.make_standin", "false",
            "--model.generation.max_new_tokens", "6", "--model.adapter_dir", str(run_dir / "adapter"),
            "--data.source", str(lines_dir), "--data.source_type", "imagefolder",
            "--data.batch_size", "2", "--data.num_workers", "0",
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "8",
            "--trainer.logger.init_args.save_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false",
        ]
    )  # fmt: skip
    return cli


def scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(log_dir)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_loss_every_step_and_val_metrics(fitted):
    log_dir = fitted.trainer.log_dir
    losses = scalars(log_dir, "train/loss")
    assert [s for s, _ in losses] == [0, 1, 2, 3]  # one value per optimizer step
    assert all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    lrs = [v for _, v in scalars(log_dir, "train/lr")]
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())["model"]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(demo["lr"] / demo["warmup_steps"])  # the demo's warmup
    for tag in ("val/cer", "val/cer_mean", "val/loss"):
        assert len(scalars(log_dir, tag)) == 1
    assert scalars(log_dir, "val/cer")[0][1] >= 0


def test_lora_count_matches_the_formula(fitted, standin_dir):
    config = fitted.model.model.get_base_model().config
    trainable, _ = count_parameters(fitted.model.model)
    assert trainable == expected_lora_params(
        hidden=config.hidden_size, layers=config.num_hidden_layers, intermediate=config.intermediate_size,
        moe_intermediate=config.moe_intermediate_size, n_routed=config.n_routed_experts,
        n_shared=config.n_shared_experts, first_dense=config.first_k_dense_replace, r=16,
    )  # fmt: skip
    assert all(p.dtype == torch.float32 for p in fitted.model.parameters() if p.requires_grad)


def test_checkpoint_holds_only_trainable_weights(fitted):
    ckpt = torch.load(Path(fitted.trainer.checkpoint_callback.last_model_path), weights_only=False)
    trainable = {n for n, p in fitted.model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable
    assert all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"] and ckpt["global_step"] == 4


def test_saved_adapter_reloads_with_peft(fitted, standin_dir, lines_dir):
    from peft import PeftModel
    from transformers import AutoModel

    adapter = Path(fitted.trainer.log_dir) / "lora_model"
    assert (adapter / "adapter_config.json").exists() and (adapter / "tokenizer_config.json").exists()
    assert (Path(fitted.model.hparams.adapter_dir) / "adapter_model.safetensors").exists()
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
