"""Data-parallel fit on CPU (2 processes, gloo) on the tiny stand-in: the same adapter as one process with the
same global batch, the validation CER of every line counted once (predictions with known CERs, see
fake_generation.py), and only rank 0 writing logs, checkpoints and the adapter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_generation import dropped_chars, expected_cers
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).parents[1]


def fit(standin_dir, lines_dir, save_dir, devices: int) -> None:
    """4 optimizer steps of global batch 4 (batch 1 x accumulation 4/devices x devices), validation at the end."""
    args = [
        "fit", "--config", str(ROOT / "configs/demo.yaml"),
        "--model.model_name_or_path", str(standin_dir), "--model.make_standin", "false",
        "--model.optimizer", "adamw", "--model.generation.max_new_tokens", "6",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder",
        "--data.batch_size", "1", "--data.eval_batch_size", "1", "--data.num_workers", "0",
        "--trainer.devices", str(devices), "--trainer.accumulate_grad_batches", str(4 // devices),
        "--trainer.max_steps", "4", "--trainer.val_check_interval", str(16 // devices),
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
    ]  # fmt: skip
    if devices > 1:
        args += ["--trainer.strategy", "ddp_find_unused_parameters_true"]  # idle MoE experts get no gradient
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    save_dir.mkdir(parents=True)
    done = subprocess.run([sys.executable, str(ROOT / "tests/fake_generation.py"), *args], check=False, env=env,
                          cwd=save_dir, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def scalar(run: Path, tag: str) -> float:
    events = EventAccumulator(str(run))
    events.Reload()
    return events.Scalars(tag)[-1].value


def test_two_processes_match_one(standin_dir, lines_dir, tmp_path):
    fit(standin_dir, lines_dir, tmp_path / "one", devices=1)
    fit(standin_dir, lines_dir, tmp_path / "two", devices=2)
    one, two = tmp_path / "one/lightning_logs/version_0", tmp_path / "two/lightning_logs/version_0"
    assert sorted(p.name for p in (tmp_path / "two/lightning_logs").iterdir()) == ["version_0"]  # rank 0 only
    a, b = (
        load_file(one / "lora_model/adapter_model.safetensors"),
        load_file(two / "lora_model/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 0  # trained, not the zero init
    references = [json.loads(line)["text"] for line in (lines_dir / "test/metadata.jsonl").read_text().splitlines()]
    corpus, mean = expected_cers(references, dropped_chars(a.items()))
    for run in (one, two):
        assert (scalar(run, "val/cer"), scalar(run, "val/cer_mean")) == pytest.approx((corpus, mean), abs=1e-6)
    assert scalar(one, "val/loss") == pytest.approx(scalar(two, "val/loss"), abs=1e-5)
    assert len(list((two / "checkpoints").glob("*.ckpt"))) == len(list((one / "checkpoints").glob("*.ckpt")))
