"""Interrupted runs with the shipped checkpoint settings: kill -9 or a crash at any point after the first
`last_checkpoint.every_n_train_steps` steps, then `--ckpt_path last`, gives the uninterrupted run's adapters (last and
best), metrics and best checkpoint. NaN losses stop (or skip) without overwriting a good adapter; checkpoints and
adapters are written atomically."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from fake_generation import install
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsocr_lightning.cli import main
from dsocr_lightning.files.checkpoint_io import AtomicCheckpointIO
from dsocr_lightning.files.folders import write_manifest
from dsocr_lightning.training.module import DeepSeekOCRModule, save_adapter

ROOT = Path(__file__).parents[1]
STEPS = 12
EVERY = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())["last_checkpoint"]["every_n_train_steps"]
NOISE = ("on_after_batch_transfer", "Downloading data", "Generating train split", "litlogger", "LeafSpec",
         "gemm_4bit", "Traceback")  # fmt: skip


def fit_args(standin_dir, lines_dir, save_dir, *extra: str) -> list[str]:
    """The demo config with its checkpoint settings as shipped (best by val/cer; last.ckpt every 10 steps and after
    each validation) on 16 lines: 12 optimizer steps of 2 micro-batches (4 steps an epoch), validation after steps
    6 and 12."""
    return [
        "fit", "--config", str(ROOT / "configs/demo.yaml"),
        "--model.model_name_or_path", str(standin_dir), "--model.make_standin", "false",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder",
        "--data.batch_size", "2", "--data.num_workers", "0",
        "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(STEPS),
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir), *extra,
    ]  # fmt: skip


def outcome(save_dir) -> dict:
    """What a run leaves: both adapters, the metrics per step (a resumed run's values win) and its checkpoints."""
    run = Path(save_dir) / "lightning_logs/version_0"
    events = EventAccumulator(str(run))
    events.Reload()
    metrics = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in ("train/loss", "train/lr", "val/cer")}
    adapters = {name: load_file(run / name / "adapter_model.safetensors") for name in ("lora_model", "lora_model_best")}
    return {
        "metrics": metrics,
        "adapters": adapters,
        "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()),
    }


def assert_same_run(got: dict, expected: dict) -> None:
    assert got["checkpoints"] == expected["checkpoints"]
    for tag, values in expected["metrics"].items():
        assert got["metrics"][tag] == pytest.approx(values, abs=1e-6), tag
    for name, weights in expected["adapters"].items():
        assert weights.keys() == got["adapters"][name].keys()
        assert max((weights[k] - got["adapters"][name][k]).abs().max().item() for k in weights) < 1e-6, name


@pytest.fixture(scope="module")
def straight(standin_dir, lines_dir, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as patch:
        install(patch)
        main(fit_args(standin_dir, lines_dir, save_dir))
    done = outcome(save_dir)
    assert len(done["metrics"]["val/cer"]) == 2 and len(set(done["metrics"]["val/cer"].values())) == 2  # best matters
    return done


def last_step(checkpoint: Path) -> int:
    try:
        return torch.load(checkpoint, weights_only=True)["global_step"]
    except (OSError, RuntimeError, EOFError):  # not written yet
        return -1


def kill_after(args: list[str], checkpoint: Path, at_step: int, log: Path) -> None:
    """Run fit in a child process and SIGKILL it once a checkpoint of `at_step` or later exists."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, str(ROOT / "tests/fake_generation.py"), *args], env=env,
                                 cwd=checkpoint.parents[3], stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 180
        while last_step(checkpoint) < at_step and child.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert 0 < last_step(checkpoint) < STEPS, f"the child must die mid-run:\n{log.read_text()[-3000:]}"


def test_kill_9_keeps_the_work_and_resumes_exactly(straight, standin_dir, lines_dir, tmp_path, monkeypatch):
    checkpoint = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    kill_after(fit_args(standin_dir, lines_dir, tmp_path), checkpoint, EVERY, tmp_path / "child.log")
    assert last_step(checkpoint) == EVERY  # not step 6, the last validation that improved val/cer
    child_log = (tmp_path / "child.log").read_text()
    assert not [noise for noise in NOISE if noise in child_log], child_log  # and its log is free of known noise

    install(monkeypatch)
    cli = main([*fit_args(standin_dir, lines_dir, tmp_path), "--ckpt_path", "last"])
    assert cli.trainer.logger.version == "version_0" and cli.trainer.global_step == STEPS
    assert_same_run(outcome(tmp_path), straight)


class Crash(Exception):
    pass


class CrashAt(L.Callback):
    """Raises as a training (or validation) batch of a given global step starts."""

    def __init__(self, loop: str, step: int) -> None:
        self.loop, self.step = loop, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.loop == "train" and trainer.global_step == self.step:
            raise Crash(f"at training step {self.step}")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.loop == "validation" and trainer.global_step == self.step:
            raise Crash(f"in the validation of step {self.step}")


def test_crashes_at_each_kind_of_resume_point_resume_exactly(straight, standin_dir, lines_dir, tmp_path, monkeypatch):
    """With a checkpoint every 2 steps, one run crashes three times, each time resumed with `--ckpt_path last`, from
    the resume points a cadence meets: an epoch's last batch (step 4), the same again when killed in a validation
    that the resumed run must then repeat (step 6, its save waits for the validation's end), and the end of that
    validation (6). It ends as the uninterrupted run did."""
    install(monkeypatch)
    args = fit_args(standin_dir, lines_dir, tmp_path, "--last_checkpoint.every_n_train_steps", "2")
    checkpoint = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    resume: list[str] = []
    for loop, step, resumes_at in (("train", 5, 4), ("validation", 6, 4), ("train", 7, 6)):
        cli = main([*args[1:], *resume], run=False)
        cli.trainer.callbacks.append(CrashAt(loop, step))
        with pytest.raises(Crash):
            cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(checkpoint) if resume else None)
        assert last_step(checkpoint) == resumes_at
        resume = ["--trainer.logger.init_args.version", "version_0"]
    main([*args, "--ckpt_path", "last"])
    assert_same_run(outcome(tmp_path), straight)


def test_resume_before_any_checkpoint_names_the_cadence(standin_dir, lines_dir, tmp_path):
    from dsocr_lightning.training.checks import ConfigError

    with pytest.raises(ConfigError, match=r"no version_\*/checkpoints/last.ckpt .* every 10 optimizer steps"):
        main([*fit_args(standin_dir, lines_dir, tmp_path), "--ckpt_path", "last"])


def test_nonfinite_loss_stops_and_keeps_the_good_adapter(standin_dir, lines_dir, tmp_path, monkeypatch):
    good = tmp_path / "adapter"  # an earlier adapter of this tool: adapter_dir may replace it, once a run ends well
    good.mkdir()
    (good / "adapter_model.safetensors").write_bytes(b"the good one")
    write_manifest(good, "adapter")
    forward = DeepSeekOCRModule.forward

    def poisoned(self, batch, *args):
        out = forward(self, batch, *args)
        if self.global_step >= 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DeepSeekOCRModule, "forward", poisoned)
    args = fit_args(standin_dir, lines_dir, tmp_path / "run", "--trainer.max_steps", "4", "--data.val_split", "null",
                    "--model.adapter_dir", str(good))  # fmt: skip
    with pytest.raises(FloatingPointError, match="non-finite loss nan at global step 2"):
        main(args)
    assert (good / "adapter_model.safetensors").read_bytes() == b"the good one"
    assert not list((tmp_path / "run").glob("lightning_logs/version_*/lora_model"))

    cli = main([*args, "--model.nonfinite_loss", "skip", "--trainer.logger.init_args.save_dir", str(tmp_path / "s")])
    assert cli.trainer.global_step == 4  # skipped micro-batches, the run went on
    assert (good / "adapter_config.json").exists()
    run = Path(cli.trainer.log_dir)  # no validation: no best checkpoint (never one named cer0.0000), no best adapter
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"] and not (run / "lora_model_best").exists()


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
    target = tmp_path / "lora_model"  # an earlier adapter of this tool, which a new save replaces whole or not at all
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes(b"good")
    write_manifest(target, "adapter")

    class Crashes:
        def save_pretrained(self, folder):
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError("killed while saving")

    with pytest.raises(OSError):
        save_adapter(Crashes(), Crashes(), target)
    assert (target / "adapter_model.safetensors").read_bytes() == b"good"
    assert sorted(tmp_path.iterdir()) == [tmp_path / "cwd", target]  # no temporary folder left behind
    assert (target / "adapter_model.safetensors").read_bytes() == b"good"


def test_a_nonfinite_loss_in_a_window_cut_short_still_stops():
    """`stop` reads the losses back once per optimizer step; a window that never reaches one (should_stop in the
    middle of an accumulation) is read at the end of training."""
    import types

    fake = types.SimpleNamespace(hparams=types.SimpleNamespace(nonfinite_loss="stop"), global_step=3,
                                 unchecked_losses=[(8, torch.tensor(1.0)), (9, torch.tensor(float("inf")))])  # fmt: skip
    fake.stop_on_nonfinite = types.MethodType(DeepSeekOCRModule.stop_on_nonfinite, fake)
    fake.on_nonfinite = types.MethodType(DeepSeekOCRModule.on_nonfinite, fake)
    with pytest.raises(FloatingPointError, match=r"non-finite loss inf at global step 3 \(batch 9\)"):
        DeepSeekOCRModule.on_train_end(fake)
    assert fake.unchecked_losses == []
    DeepSeekOCRModule.on_train_end(fake)  # nothing left: nothing raised
