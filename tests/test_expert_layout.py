"""One checkpoint layout whatever kernel ran, and an optimizer that sees what the reference's sees.

The grouped experts train each MoE projection's LoRA as one stacked tensor; the reference (transformers' per-expert
loop) trains one tensor per expert. Through `fit` on the stand-in with DeepSeek-OCR's routing (64 experts, 6 a token:
experts no token picks in a step happen here), at the recipe's optimizer settings (8-bit AdamW, lr 2e-4, 5 warmup
steps, 2 x 4) in float32 on the CPU:
- the grouped run ends with the loop's LoRA weights (bitsandbytes' per-tensor rules applied per expert);
- a checkpoint written by one path resumes on the other and ends as the uninterrupted run;
- a checkpoint that lacks weights the model trains, or holds others, is refused with what differs.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from dsocr_lightning.cli import main
from dsocr_lightning.training.checks import ConfigError

ROOT = Path(__file__).parents[1]
STEPS = 4


def fit_args(model_dir, lines_dir, save_dir, kernel: str, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--model.model_name_or_path", str(model_dir), "--model.make_standin", "false",
        "--model.fast.grouped_experts", kernel, "--model.lr", "2e-4", "--model.warmup_steps", "5",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder", "--data.val_split", "null",
        "--data.batch_size", "2", "--data.num_workers", "0", "--trainer.accumulate_grad_batches", "4",
        "--trainer.max_steps", str(STEPS), "--last_checkpoint.every_n_train_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir), *extra,
    ]  # fmt: skip


def adapter(save_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(save_dir) / "lightning_logs/version_0/lora_model/adapter_model.safetensors")


def expert_keys(weights: dict[str, torch.Tensor], side: str) -> list[str]:
    return [k for k in weights if ".experts." in k and f".lora_{side}." in k]


def fit(args: list[str], ckpt_path: str | None = None, callbacks: tuple = ()) -> None:
    cli = main(args, run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def straight(real_routing_dir, lines_dir, tmp_path_factory):
    """Uninterrupted runs of 4 steps: the grouped experts (torch's kernel on the CPU) and the loop."""
    runs = {}
    for kernel in ("native", "loop"):
        save_dir = tmp_path_factory.mktemp(kernel)
        fit(fit_args(real_routing_dir, lines_dir, save_dir, kernel))
        runs[kernel] = adapter(save_dir)
    return runs


def test_grouped_experts_end_with_the_loops_weights(straight):
    """LoRA B starts at zero, so B is the update itself: the grouped run's expert B weights within 0.5 % of the
    loop's update (8-bit AdamW state on stacked tensors without the per-expert rules: 50 % at these sizes)."""
    grouped, loop = straight["native"], straight["loop"]
    assert grouped.keys() == loop.keys()
    keys = expert_keys(loop, "B")
    update = torch.cat([loop[k].flatten() for k in keys])
    diff = torch.cat([(grouped[k] - loop[k]).flatten() for k in keys])
    assert update.norm() > 0
    assert diff.norm() <= 5e-3 * update.norm(), f"{diff.norm() / update.norm():.3%} of the update"
    for key in expert_keys(loop, "A"):
        torch.testing.assert_close(grouped[key], loop[key], rtol=1e-4, atol=1e-6)


class StopAt(L.Callback):
    """Ends a run as the batch of a global step starts (last.ckpt of step 2 is on disk by then)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize(("first", "then"), [("native", "loop"), ("loop", "native")])
def test_a_checkpoint_resumes_on_the_other_path(straight, real_routing_dir, lines_dir, tmp_path, first, then):
    """Steps 1-2 on one path, killed, steps 3-4 on the other from last.ckpt: the weights of the uninterrupted run
    of the second path (within float32 rounding of the two paths)."""
    with pytest.raises(SystemExit):  # Lightning's own exit after an interrupt
        fit(fit_args(real_routing_dir, lines_dir, tmp_path, first), callbacks=(StopAt(2),))
    checkpoint = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == 2 and not any("stacked_" in key for key in saved["state_dict"])
    fit(fit_args(real_routing_dir, lines_dir, tmp_path, then, "--trainer.logger.init_args.version", "version_0"),
        ckpt_path=str(checkpoint))  # fmt: skip
    got, expected = adapter(tmp_path), straight[then]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-7)


def test_a_checkpoint_of_other_weights_is_refused(straight, real_routing_dir, lines_dir, tmp_path):
    """Lightning loads checkpoints with strict=False (the frozen base is not in them): the module checks the keys
    itself, where a silent partial load used to move val/loss."""
    with pytest.raises(SystemExit):
        fit(fit_args(real_routing_dir, lines_dir, tmp_path, "native"), callbacks=(StopAt(2),))
    checkpoint = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    dropped = next(key for key in saved["state_dict"] if ".experts.3." in key)
    del saved["state_dict"][dropped]
    torch.save(saved, tmp_path / "partial.ckpt")
    with pytest.raises(ConfigError, match=re.escape(f"1 missing, e.g. ['{dropped}']")):
        fit(fit_args(real_routing_dir, lines_dir, tmp_path / "again", "loop"), ckpt_path=str(tmp_path / "partial.ckpt"))
