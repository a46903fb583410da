"""Every subcommand on DeepSeek-OCR 2, end to end through `python -m dsocr_lightning` (a subprocess, as a user runs it)
on the tiny TEST STAND-IN: fit with the pre-scan, kill -9 then `--ckpt_path last`, validate and predict (from files
and from a split) with the trained adapter, export, a pre-scan that stops on bad samples, `nonfinite_loss: skip`."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_run import run_cli
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.v2
ROOT = Path(__file__).parents[2]
STEPS = 6  # optimizer steps of 2 micro-batches of 2 lines: 4 a 16-line epoch, so the run crosses into a second


def command(subcommand: str, v2_dir: Path, lines_dir: Path, *extra: str) -> list[str]:
    return [
        subcommand, "--config", str(ROOT / "configs/demo.yaml"), "--model.model_name_or_path", str(v2_dir),
        "--model.make_standin", "false", "--model.trust_remote_code", "false", "--model.generation.max_new_tokens", "4",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder", "--data.mode", "gundam",
        "--data.batch_size", "2", "--data.eval_batch_size", "4", "--data.num_workers", "0",
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


def fit_command(v2_dir: Path, lines_dir: Path, *extra: str) -> list[str]:
    """6 steps, validation after the last (and last.ckpt after every step), the splits pre-scanned."""
    return command("fit", v2_dir, lines_dir, "--trainer.max_steps", str(STEPS), "--data.val_split", "test",
                   "--trainer.val_check_interval", str(2 * STEPS), "--last_checkpoint.every_n_train_steps", "1",
                   "--data.scan", "true", *extra)  # fmt: skip


def launch(args: list[str], cwd: Path, runner: str = "module", **env: str) -> subprocess.Popen:
    """`python -m dsocr_lightning ARGS` in `cwd`; runner `fake`: the same through tests/fake_generation.py, which
    can make chosen training losses NaN (FAKE_NONFINITE=RANK:STEP)."""
    program = ["-m", "dsocr_lightning"] if runner == "module" else [str(ROOT / "tests/fake_generation.py")]
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, *program, *args], cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def run(args: list[str], cwd: Path, runner: str = "module", **env: str) -> tuple[int, str]:
    if runner == "module" and not env:  # a fork of a warm process: the same command, its imports done (cli_run.py)
        cwd.mkdir(parents=True, exist_ok=True)
        done = run_cli(args, cwd)
        return done.returncode, done.output
    child = launch(args, cwd, runner, **env)
    output, _ = child.communicate(timeout=300)
    return child.returncode, output


def succeeds(args: list[str], cwd: Path, runner: str = "module", **env: str) -> str:
    code, output = run(args, cwd, runner, **env)
    assert code == 0 and "Traceback" not in output, output[-4000:]
    return output


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def hashes(*folders: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(v2_dir, lines_dir, tmp_path_factory) -> tuple[Path, str]:
    """(the run's log folder, its output) of an uninterrupted fit."""
    cwd = tmp_path_factory.mktemp("straight")
    return cwd / "lightning_logs/version_0", succeeds(fit_command(v2_dir, lines_dir), cwd)


def test_fit(straight):
    run_dir, output = straight
    assert re.search(r"scanned 16 samples of split 'train' in [\d.]+ s: all usable", output)
    assert re.search(r"scanned 4 samples of split 'test' in [\d.]+ s: all usable", output)
    assert "loss: each micro-batch's summed token loss over the label tokens of its whole optimizer step" in output
    assert f"fit done: {STEPS} optimizer steps" in output
    assert sorted(scalars(run_dir, "train/loss")) == list(range(STEPS)) and len(scalars(run_dir, "val/cer")) == 1
    for name in ("lora_model", "lora_model_best"):
        saved = json.loads((run_dir / name / "adapter_config.json").read_text())
        assert sorted(saved["target_parameters"]) == ["experts.down_proj", "experts.gate_proj", "experts.up_proj"]
        assert (run_dir / name / "processor_config.json").exists()


def last_step(checkpoint: Path) -> int:
    try:
        return torch.load(checkpoint, weights_only=True)["global_step"]
    except (OSError, RuntimeError, EOFError):  # not written yet, or being written
        return -1


def test_kill_9_then_ckpt_path_last_resumes_exactly(straight, v2_dir, lines_dir, tmp_path):
    checkpoint = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    child, deadline = launch(fit_command(v2_dir, lines_dir), tmp_path), time.time() + 240
    while last_step(checkpoint) < 2 and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert 2 <= last_step(checkpoint) < STEPS, "the run must die mid-way"

    output = succeeds([*fit_command(v2_dir, lines_dir), "--ckpt_path", "last"], tmp_path)
    assert "--ckpt_path last: lightning_logs/version_0/checkpoints/last.ckpt, of the newest run" in output
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # resumed in place
    run_dir, _ = straight
    resumed = tmp_path / "lightning_logs/version_0"
    for tag in ("train/loss", "val/cer"):
        assert scalars(resumed, tag) == pytest.approx(scalars(run_dir, tag), abs=1e-6), tag
    for name in ("lora_model", "lora_model_best"):
        a, b = (load_file(folder / name / "adapter_model.safetensors") for folder in (run_dir, resumed))
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, name


def test_validate_with_the_trained_adapter(straight, v2_dir, lines_dir, tmp_path):
    run_dir, _ = straight
    output = succeeds(command("validate", v2_dir, lines_dir, "--data.val_split", "test",
                              "--model.adapter_path", str(run_dir / "lora_model")), tmp_path)  # fmt: skip
    assert f"loaded LoRA adapter weights from {run_dir / 'lora_model'}" in output
    assert "val/cer" in output and "val/loss" in output  # Lightning's table of the validation metrics


@pytest.mark.parametrize("source", ["files", "split"])
def test_predict_with_the_trained_adapter(straight, v2_dir, lines_dir, tmp_path, source):
    run_dir, _ = straight
    from_files = ["--data.predict_inputs", f"[{lines_dir / 'test'}]"]
    inputs = from_files if source == "files" else ["--data.predict_split", "test"]
    out = tmp_path / "predictions.jsonl"
    succeeds(command("predict", v2_dir, lines_dir, *inputs, "--model.adapter_path", str(run_dir / "lora_model"),
                     "--prediction_writer.output", str(out)), tmp_path)  # fmt: skip
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in sorted((lines_dir / "test").glob("*.png"))]  # input order
    if source == "files":
        assert all(set(r) == {"path", "text", "reached_max_new_tokens"} for r in rows)
    else:
        references = [json.loads(x)["text"] for x in (lines_dir / "test/metadata.jsonl").read_text().splitlines()]
        assert [r["reference"] for r in rows] == references and all(0 <= r["cer"] for r in rows)


def test_export_merges_the_trained_adapter(straight, v2_dir, processor, pages, tmp_path):
    """A plain checkpoint (no peft needed) whose logits are the base's with the trained adapter."""
    from transformers import AutoModelForImageTextToText

    from dsocr_lightning.families.v2.collate import ProcessorCollator
    from dsocr_lightning.families.v2.loading import peft_model_from_adapter
    from dsocr_lightning.families.v2.lora import split_experts

    run_dir, _ = straight
    out = tmp_path / "merged"
    succeeds(["export", str(run_dir / "lora_model"), str(out), "--dtype", "float32"], tmp_path)
    assert not (out / "adapter_config.json").exists() and (out / "processor_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    base = AutoModelForImageTextToText.from_pretrained(v2_dir)
    split_experts(base)  # the trained adapter's layout (lora.experts: split)
    adapted = peft_model_from_adapter(base, str(run_dir / "lora_model")).eval()
    batch = ProcessorCollator(processor)([{"image": pages["line"], "text": "x"}])
    keys = ("input_ids", "attention_mask", "pixel_values", "pixel_values_local", "num_local_patches")
    inputs = {k: batch[k] for k in keys}
    with torch.no_grad():
        plain, with_adapter = merged(**inputs).logits, adapted(**inputs).logits
        with adapted.disable_adapter():
            untrained = adapted(**inputs).logits
    assert torch.allclose(plain, with_adapter, atol=1e-4) and not torch.allclose(plain, untrained, atol=1e-4)


def test_the_scan_stops_on_bad_samples_and_lists_them(v2_dir, lines_dir, tmp_path):
    """Two bad rows of a manifest: both named in one `error:` line's message before the model loads; nothing that
    was there is changed."""
    images = sorted((lines_dir / "train").glob("*.png"))[:3]
    rows = [{"image": str(images[0]), "text": "یک"}, {"image": str(tmp_path / "missing.png"), "text": "دو"},
            {"image": str(images[1]), "text": " "}, {"image": str(images[2]), "text": "سه"}]  # fmt: skip
    manifest = tmp_path / "data/train.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    before = hashes(tmp_path, lines_dir, v2_dir)
    code, output = run(command("fit", v2_dir, lines_dir, "--data.source", str(tmp_path / "data/{split}.jsonl"),
                               "--data.source_type", "jsonl", "--data.train_split", "train", "--data.val_split", "null",
                               "--data.scan", "true"), tmp_path)  # fmt: skip
    assert code != 0 and "Traceback" not in output, output[-4000:]
    assert "error: 2 of 4 samples of split 'train' are unusable:" in output
    assert "index 1 (" in output and "index 2 (" in output and "data.bad_sample_policy skip" in output
    assert "trainable params" not in output  # stopped before the model loaded
    after = hashes(tmp_path, lines_dir, v2_dir)
    assert {p: h for p, h in after.items() if p in before} == before


def test_nonfinite_loss_skip_skips_the_micro_batches_and_goes_on(v2_dir, lines_dir, tmp_path):
    output = succeeds(command("fit", v2_dir, lines_dir, "--trainer.max_steps", "3", "--data.val_split", "null",
                              "--model.nonfinite_loss", "skip"), tmp_path, runner="fake", FAKE_NONFINITE="0:1")  # fmt: skip
    assert output.count("non-finite loss nan at global step 1") == 2  # both micro-batches of step 1
    run_dir = tmp_path / "lightning_logs/version_0"
    assert scalars(run_dir, "train/nonfinite_skipped") == {0: 0.0, 1: 2.0, 2: 0.0}
    losses = scalars(run_dir, "train/loss")
    assert torch.isfinite(torch.tensor([losses[0], losses[2]])).all() and (run_dir / "lora_model").is_dir()


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--model.backend", "unsloth"], "--model.backend unsloth"), (["--model.load_in_4bit", "true"],
     "--model.load_in_4bit True"), (["--model.lora.loftq_config", "{}"], "--model.lora.loftq_config")],
)  # fmt: skip
def test_v1_only_settings_are_one_line_before_anything_loads(v2_dir, lines_dir, tmp_path, flags, named):
    from cli_run import error_line

    done = run_cli(command("fit", v2_dir, lines_dir, *flags), tmp_path)
    line = error_line(done)
    assert line.startswith(f"error: {named}") and "trainable params" not in done.output, line


def test_a_v1_setting_given_to_v2_is_named(v2_dir, lines_dir):
    from dsocr_lightning.cli import main

    args = command("fit", v2_dir, lines_dir, "--model.trust_remote_code", "true", "--model.fast.vision_chunk", "4")
    with pytest.warns(UserWarning) as warned:
        main(args[1:], run=False)
    assert sorted(str(w.message) for w in warned if "is ignored" in str(w.message)) == [
        "--model.fast.vision_chunk 4 is ignored: DeepSeek-OCR v2 has no use for it",
        "--model.trust_remote_code True is ignored: DeepSeek-OCR v2 has no use for it",
    ]
