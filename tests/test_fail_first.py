"""Every mistake is one line before the expensive part (issue 23), through `python -m dsocr_lightning`: bad samples
found before the model loads, unreadable checkpoints and weights named with their reason, numeric ranges, the
accelerator, the hub with no network, a mistyped data folder; each exits 1 with its `error:` line and changes no file.
Also the usage line, and Ctrl-C's hint."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_run import ROOT, demo_args, error_line, read_only, run_cli, snapshot
from PIL import Image

from dsocr_lightning.data.render import render_line


def refused(args: list[str], cwd: Path, watched: list[Path], pattern: str, env: dict | None = None,
            loads: bool = False) -> str:  # fmt: skip
    """The command's one `error:` line matches `pattern`; the model never loaded (unless `loads`); no file changed."""
    before = snapshot(cwd, *watched)
    done = run_cli(args, cwd, env)
    line = error_line(done)
    assert re.search(pattern, line), line
    assert ("trainable params" in done.output) is loads
    assert snapshot(cwd, *watched) == before
    return line


@pytest.fixture
def bad_lines(tmp_path):
    """A manifest of 2 good lines and every kind of bad one: empty text, truncated, 0-byte, missing and 20000 x 20000
    images, and a text over max_length (200 tokens)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    render_line("سلام دنیا").save(folder / "good.png")
    buffer = io.BytesIO()
    render_line("کتاب").save(buffer, "PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    Image.new("1", (20000, 20000), 1).save(folder / "huge.png")  # 90 kB on disk, 400 megapixels decoded
    rows = [("good.png", "سلام دنیا"), ("good.png", "  "), ("truncated.png", "کتاب"), ("empty.png", "دریا"),
            ("missing.png", "ماه"), ("huge.png", "شب"), ("good.png", "ا" * 400), ("good.png", "کتاب")]  # fmt: skip
    lines = [json.dumps({"image": image, "text": text}, ensure_ascii=False) for image, text in rows]
    (folder / "train.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return folder / "train.jsonl"


def bad_args(standin_dir, lines_dir, manifest, *extra: str) -> list[str]:
    return [*demo_args(standin_dir, lines_dir), "--data.source", str(manifest), "--data.source_type", "jsonl",
            "--data.image_column", "image", "--data.val_split", "null", "--data.max_length", "200", *extra]  # fmt: skip


def test_the_scan_lists_every_bad_sample_before_the_model_loads(bad_lines, standin_dir, lines_dir, tmp_path):
    """On by default: one line each with split, index, path and reason, then the fix; nothing loaded or left."""
    before = snapshot(tmp_path)
    done = run_cli(bad_args(standin_dir, lines_dir, bad_lines), tmp_path / "cwd")
    assert done.returncode == 1 and "Traceback" not in done.output and "trainable params" not in done.output
    listing = done.stderr[done.stderr.index("error: ") :].splitlines()
    assert listing[0] == "error: 6 of 8 samples of split 'train' are unusable:", listing
    reasons = {1: "empty or whitespace-only text", 2: "truncated", 3: "cannot identify image file",
               4: "No such file or directory", 5: "exceeds limit", 6: "tokens exceed max_length 200"}  # fmt: skip
    for line, (index, reason) in zip(listing[1:7], reasons.items()):
        path = re.escape(str(bad_lines.parent))
        assert re.fullmatch(rf"  split 'train' index {index} \({path}/\w+\.png\): .*{reason}.*", line), line
    assert listing[7:] == ["Fix or remove them, or set data.bad_sample_policy skip to leave them out."]
    assert snapshot(tmp_path) == before  # no run folder left behind either


def test_without_the_scan_a_bad_sample_stops_the_run_in_one_line(bad_lines, standin_dir, lines_dir, tmp_path):
    """From a DataLoader worker, where it was a worker traceback of ~100 lines; the line names the scan."""
    only_bad = bad_lines.with_name("only_bad.jsonl")
    only_bad.write_text("\n".join(bad_lines.read_text(encoding="utf-8").splitlines()[1:7]), encoding="utf-8")
    refused(bad_args(standin_dir, lines_dir, only_bad, "--data.scan", "false", "--data.num_workers", "1"),
            tmp_path / "cwd", [tmp_path], r"^error: bad sample in split 'train' at index \d \(.*\): .*data\.scan true "
            r"lists every unusable sample before the model loads$", loads=True)  # fmt: skip


def test_a_missing_column_is_one_line(standin_dir, lines_dir, tmp_path):
    refused([*demo_args(standin_dir, lines_dir), "--data.text_column", "caption"], tmp_path, [],
            r"has no column\(s\) \['caption'\]; its columns are \['image', 'text'\]: set data.image_column / data.text_"
            )  # fmt: skip


def write_checkpoints(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, folder / "whole.ckpt")
    whole = (folder / "whole.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.ckpt").write_text("not a checkpoint\n")
    torch.save({"state_dict": {}, "where": Path("x")}, folder / "objects.ckpt")  # unpickling it would build objects
    return {name: folder / f"{name}.ckpt" for name in ("truncated", "notes", "objects")}


@pytest.mark.parametrize(
    ("name", "reason"),
    [("truncated", "not a torch.save archive: empty, truncated or another kind of file"),
     ("notes", "not a torch.save archive"),
     ("objects", (r"holds Python objects besides tensors and plain values \(Unsupported global: GLOBAL pathlib\.\w+ "
                  r"was not an allowed global by default\), which are never unpickled here"))],
)  # fmt: skip
def test_a_checkpoint_that_cannot_be_read_is_named_with_its_reason(name, reason, standin_dir, lines_dir, tmp_path):
    path = write_checkpoints(tmp_path / "ckpts")[name]
    line = refused([*demo_args(standin_dir, lines_dir), "--ckpt_path", str(path)], tmp_path / "cwd", [tmp_path],
                   rf"checkpoint '{re.escape(str(path))}' .*{reason}")  # fmt: skip
    assert "weights_only" not in line


def test_truncated_model_weights_are_named(standin_dir, lines_dir, tmp_path):
    model = shutil.copytree(standin_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    refused(demo_args(model, lines_dir), tmp_path / "cwd", [tmp_path],
            rf"model.safetensors of '{re.escape(str(model))}' cannot be read \(.*\): an unfinished download")  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--model.lr", "-1"], r"--model.lr -1.0: must be a number > 0"),
     (["--model.lr", "0"], r"--model.lr 0.0: must be a number > 0"),
     (["--data.batch_size", "0"], r"--data.batch_size 0: must be an integer >= 1"),
     (["--trainer.max_steps", "0"], r"--trainer.max_steps 0: must be an integer >= 1"),
     (["--ckpt_path", "best"], r"--ckpt_path best: fit resumes a run from its last checkpoint: --ckpt_path last")],
    ids=["negative lr", "zero lr", "no batch", "no steps", "best for fit"],
)  # fmt: skip
def test_settings_out_of_range_are_one_line(flags, message, standin_dir, lines_dir, tmp_path):
    refused([*demo_args(standin_dir, lines_dir), *flags], tmp_path, [], message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_the_t4_recipe_on_a_machine_without_a_gpu(tmp_path):
    refused(["fit", "--config", str(ROOT / "configs/t4.yaml")], tmp_path, [],
            r"trainer.accelerator gpu: this machine has no CUDA GPU .*--trainer.accelerator cpu")  # fmt: skip


@pytest.mark.parametrize("flag", ["--model.model_name_or_path", "--data.source"])
def test_a_hub_id_with_no_network_names_hf_hub_offline(flag, standin_dir, lines_dir, tmp_path):
    """A hub that does not answer (a closed local port stands in for no network), HF_HUB_OFFLINE unset."""
    env = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    args = [*demo_args(standin_dir, lines_dir), flag, "someone/something", "--data.source_type", "auto"]
    refused(args, tmp_path, [], r"is a hub id but the hub \(http://127.0.0.1:9\) cannot be reached \(connection "
                                r"refused\): with no network set HF_HUB_OFFLINE=1", env)  # fmt: skip


def test_a_mistyped_data_folder_is_a_missing_folder(standin_dir, lines_dir, tmp_path):
    refused([*demo_args(standin_dir, lines_dir), "--data.source", "mydata", "--data.source_type", "auto"], tmp_path,
            [], rf"data source 'mydata' not found \(looked for {re.escape(str(tmp_path))}/mydata\)")  # fmt: skip


def test_a_read_only_log_folder_is_refused_before_anything_loads(standin_dir, lines_dir, tmp_path):
    with read_only(tmp_path / "ro"):
        refused([*demo_args(standin_dir, lines_dir), "--trainer.logger.init_args.save_dir", "ro"], tmp_path, [],
                r"trainer.logger save_dir/name 'ro/lightning_logs' cannot be written: .*ro' is read-only")  # fmt: skip


def test_usage_names_the_command_and_export(tmp_path):
    done = run_cli(["--help"], tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m dsocr_lightning "), done.output[:500]
    assert "export" in done.stdout and "python -m dsocr_lightning export --help" in done.stdout.replace("\n", " ")
    done = run_cli(["export", "--help"], tmp_path)
    assert done.stdout.startswith("usage: python -m dsocr_lightning export ") and "--overwrite" in done.stdout
    done = run_cli(["export", "lora_model"], tmp_path)  # the error and the way to --help, not the usage
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "tip: For details of accepted options run: python -m dsocr_lightning export --help",
        "error: the following arguments are required: out_dir",
    ], done.output


def test_ctrl_c_says_how_to_resume(standin_dir, lines_dir, tmp_path):
    """SIGINT once a resume checkpoint exists: the log says which step it holds and the command that continues."""
    args = [*demo_args(standin_dir, lines_dir), "--trainer.max_steps", "400", "--last_checkpoint.every_n_train_steps",
            "1"]  # fmt: skip
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-m", "dsocr_lightning", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.time() + 240
    while not last.is_file() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    output = child.communicate(timeout=120)[0]
    assert child.returncode == 1, output[-3000:]
    assert re.search(r"interrupted at step \d+; .*last\.ckpt holds step \d+: to continue, run the same command with "
                     r"--ckpt_path last", output), output[-3000:]  # fmt: skip
