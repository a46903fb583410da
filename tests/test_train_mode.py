"""Training runs as the reference trains: modules in train mode (LoRA dropout, gradient checkpointing), gradients
clipped by norm; evaluation in eval mode. Probed inside a real `fit` of the TEST STAND-IN through the CLI."""

from pathlib import Path

import lightning as L
import pytest
import torch

from dsocr_lightning.cli import main
from dsocr_lightning.fast.layout import decoder_layers

CONFIGS = Path(__file__).parents[1] / "configs"
CLIP = 0.05  # small enough that the demo's gradients exceed it: clipping must act


class Probe(L.Callback):
    """Records, per training micro-batch, the modes, decoder-layer calls and gradient norms it sees."""

    def __init__(self) -> None:
        self.modes, self.val_modes, self.layer_calls, self.dropout_pairs = [], [], [], []
        self.clipped_norms: list[float] = []
        self.calls = 0

    def on_fit_start(self, trainer, module) -> None:
        layer = decoder_layers(module.model)[1]  # counted through its forward: module hooks skip recomputation
        forward = layer.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        layer.forward = counted

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        layers = decoder_layers(module.model)
        dropouts = [m for n, m in module.model.named_modules() if n.endswith("lora_dropout.default")]
        self.modes.append((module.model.training, all(m.training for m in layers + dropouts)))
        if batch_idx == 4:  # LoRA B has left its zero init: dropout on the adapter input now shows in the loss
            with torch.no_grad():
                self.dropout_pairs.append((module(batch).loss.item(), module(batch).loss.item()))
        self.calls = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.layer_calls.append(self.calls)  # forward + backward of this micro-batch are done

    def on_before_zero_grad(self, trainer, module, optimizer) -> None:  # after the optimizer step: clipped grads
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.clipped_norms.append(torch.nn.utils.get_total_norm(grads).item())

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_modes.append(any(m.training for m in module.model.modules()))


def fit_with_probe(standin_dir, lines_dir, run_dir, *extra: str) -> tuple[Probe, object]:
    cli = main(
        [
            "--config", str(CONFIGS / "demo.yaml"),
            "--model.model_name_or_path", str(standin_dir), "--model.make_standin", "false",
            "--model.lora.dropout", "0.5", "--model.generation.max_new_tokens", "4",
            "--data.source", str(lines_dir), "--data.source_type", "imagefolder",
            "--data.batch_size", "2", "--data.num_workers", "0",
            "--trainer.max_steps", "3", "--trainer.val_check_interval", "6",
            "--trainer.gradient_clip_val", str(CLIP),
            "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            *extra,
        ],
        run=False,
    )  # fmt: skip
    probe = Probe()
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, cli.datamodule)
    return probe, cli


@pytest.fixture(scope="module")
def probed(standin_dir, lines_dir, tmp_path_factory):
    return fit_with_probe(standin_dir, lines_dir, tmp_path_factory.mktemp("train_mode"))


def test_training_runs_in_train_mode_and_validation_in_eval_mode(probed):
    probe, _ = probed
    assert probe.modes and all(model and layers for model, layers in probe.modes)
    assert probe.val_modes and not any(probe.val_modes)


def test_lora_dropout_acts_while_training(probed):
    ((first, second),) = probe_pairs = probed[0].dropout_pairs
    assert first != pytest.approx(second, abs=1e-6), probe_pairs


def test_gradient_checkpointing_recomputes_each_layer(probed, standin_dir, lines_dir, tmp_path):
    assert set(probed[0].layer_calls) == {2}  # forward, then again in backward
    plain, _ = fit_with_probe(standin_dir, lines_dir, tmp_path, "--model.gradient_checkpointing", "false",
                              "--trainer.max_steps", "1")  # fmt: skip
    assert set(plain.layer_calls) == {1}


def test_gradients_are_clipped_to_the_configured_norm(probed):
    probe, cli = probed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    before = [e.value for e in events.Scalars("train/grad_norm")]
    assert len(before) == 3 and max(before) > CLIP  # clipping had something to do
    assert probe.clipped_norms and max(probe.clipped_norms) <= CLIP * (1 + 1e-4)


def test_shipped_configs_clip_like_the_reference():
    import yaml

    for name in ("t4", "h100", "demo"):
        trainer = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["trainer"]
        assert trainer["gradient_clip_val"] == 1.0 and trainer["gradient_clip_algorithm"] == "norm", name
