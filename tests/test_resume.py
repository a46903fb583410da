"""Interrupted runs: kill -9 mid-fit, resume with `--ckpt_path last`, same adapter as an uninterrupted run;
NaN losses stop (or skip) without overwriting a good adapter; checkpoints and adapters are written atomically."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsocr_lightning.checkpoint_io import AtomicCheckpointIO
from dsocr_lightning.cli import main
from dsocr_lightning.module import DeepSeekOCRModule, save_adapter

ROOT = Path(__file__).parents[1]
STEPS = 10


def fit_args(standin_dir, lines_dir, save_dir, steps=STEPS) -> list[str]:
    """The demo recipe, 10 steps over 3 shuffled epochs (16 lines, batch 2, accumulation 2), a checkpoint a step."""
    return [
        "fit", "--config", str(ROOT / "configs/demo.yaml"),
        "--model.model_name_or_path", str(standin_dir), "--model.make_standin", "false",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder",
        "--data.batch_size", "2", "--data.num_workers", "0", "--data.val_split", "null",
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--checkpoint.monitor", "null", "--checkpoint.every_n_train_steps", "1",
    ]  # fmt: skip


def adapter(save_dir) -> dict[str, torch.Tensor]:
    (path,) = Path(save_dir).glob("lightning_logs/version_*/lora_model/adapter_model.safetensors")
    return load_file(path)


def last_step(checkpoint: Path) -> int:
    try:
        return torch.load(checkpoint, weights_only=True)["global_step"]
    except (OSError, RuntimeError, EOFError):  # not written yet
        return -1


def kill_mid_fit(args: list[str], checkpoint: Path, at_step: int) -> None:
    """Run fit in a child process and SIGKILL it once a checkpoint of `at_step` or later exists."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-m", "dsocr_lightning", *args], env=env, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 180
    while last_step(checkpoint) < at_step and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert 0 < last_step(checkpoint) < STEPS, "the child must die mid-run"


def test_kill_and_resume_gives_the_uninterrupted_adapter(standin_dir, lines_dir, tmp_path):
    main(fit_args(standin_dir, lines_dir, tmp_path / "straight"))
    expected = adapter(tmp_path / "straight")

    checkpoint = tmp_path / "killed/lightning_logs/version_0/checkpoints/last.ckpt"
    kill_mid_fit(fit_args(standin_dir, lines_dir, tmp_path / "killed"), checkpoint, at_step=5)
    resumed_from = last_step(checkpoint)
    cli = main([*fit_args(standin_dir, lines_dir, tmp_path / "killed"), "--ckpt_path", "last"])

    assert cli.trainer.logger.version == "version_0" and cli.trainer.global_step == STEPS
    got = adapter(tmp_path / "killed")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-6
    events = EventAccumulator(str(tmp_path / "killed/lightning_logs/version_0"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/lr")]
    assert steps[-(STEPS - resumed_from) :] == list(range(resumed_from, STEPS))  # continued, not restarted


def test_nonfinite_loss_stops_and_keeps_the_good_adapter(standin_dir, lines_dir, tmp_path, monkeypatch):
    good = tmp_path / "adapter"
    good.mkdir()
    (good / "adapter_model.safetensors").write_bytes(b"the good one")
    forward = DeepSeekOCRModule.forward

    def poisoned(self, batch):
        out = forward(self, batch)
        if self.global_step >= 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DeepSeekOCRModule, "forward", poisoned)
    args = fit_args(standin_dir, lines_dir, tmp_path / "run", steps=4) + ["--model.adapter_dir", str(good)]
    with pytest.raises(FloatingPointError, match="non-finite loss nan at global step 2"):
        main(args)
    assert (good / "adapter_model.safetensors").read_bytes() == b"the good one"
    assert not list((tmp_path / "run").glob("lightning_logs/version_*/lora_model"))

    cli = main([*args, "--model.nonfinite_loss", "skip", "--trainer.logger.init_args.save_dir", str(tmp_path / "s")])
    assert cli.trainer.global_step == 4  # skipped micro-batches, the run went on
    assert (good / "adapter_config.json").exists()


def test_checkpoint_write_is_atomic_and_load_is_weights_only(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    assert io.load_checkpoint(path)["global_step"] == 3

    def dies_halfway(self, checkpoint, target, storage_options=None):
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 4}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 3 and sorted(tmp_path.iterdir()) == [tmp_path / "cwd", path]

    torch.save({"code": Path("x")}, tmp_path / "evil.ckpt")  # an arbitrary object: refused when read
    with pytest.raises(Exception, match="[Ww]eights only"):
        io.load_checkpoint(tmp_path / "evil.ckpt")


def test_adapter_write_is_atomic(tmp_path):
    target = tmp_path / "lora_model"
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes(b"good")

    class Crashes:
        def save_pretrained(self, folder):
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError("killed while saving")

    with pytest.raises(OSError):
        save_adapter(Crashes(), Crashes(), target)
    assert (target / "adapter_model.safetensors").read_bytes() == b"good"
