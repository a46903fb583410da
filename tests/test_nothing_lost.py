"""Nothing the user made is deleted or overwritten without being asked (issue 23), through `python -m
dsocr_lightning`: each refused command exits 1 with one `error:` line naming the fix, and every file that existed
before still exists unchanged (nothing added either). What the commands may replace, they replace (the positive
cases)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from cli_run import demo_args, error_line, read_only, run_cli, snapshot

from dsocr_lightning.cli import main
from dsocr_lightning.files.folders import MANIFEST, write_manifest
from dsocr_lightning.files.runs import RECORD_KEY

RUN = Path("lightning_logs/version_0")


@pytest.fixture(scope="module")
def trained(standin_dir, lines_dir, tmp_path_factory):
    """A project folder after one quick fit: lightning_logs/version_0 with its checkpoints and both adapters."""
    folder = tmp_path_factory.mktemp("trained")
    main([*demo_args(standin_dir, lines_dir), "--trainer.logger.init_args.save_dir", str(folder)])
    assert (folder / RUN / "lora_model_best").is_dir() and (folder / RUN / "checkpoints/last.ckpt").is_file()
    return folder


@pytest.fixture
def project(trained, tmp_path):
    """A copy of the trained project, with a folder of the user's own (`mine`: a results file and a subfolder)."""
    folder = shutil.copytree(trained, tmp_path / "project")
    (folder / "mine/sub").mkdir(parents=True)
    (folder / "mine/results.csv").write_text("step,cer\n10,0.5\n")
    (folder / "mine/sub/notes.txt").write_text("mine")
    return folder


def refused(args: list[str], cwd: Path, watched: list[Path], pattern: str, env: dict | None = None) -> str:
    """Runs the command, asserts its one `error:` line matches `pattern` and that `watched` did not change."""
    before = snapshot(*watched)
    line = error_line(run_cli(args, cwd, env))
    assert re.search(pattern, line), line
    assert snapshot(*watched) == before
    return line


def earlier_export(folder: Path) -> Path:
    """A folder as an earlier `export` left it (its manifest lists what it wrote)."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"an earlier merge")
    write_manifest(folder, "export")
    return folder


EXPORTS = {  # case: (export arguments, what its error line says)
    "into a folder of the user's": (["{run}/lora_model", "mine"],
                                    r"export folder 'mine' holds files this tool did not write there \(results.csv"),
    "onto its own adapter": (["{run}/lora_model", "{run}/lora_model"], r"is the adapter"),
    "onto the base checkpoint": (["{run}/lora_model_best", "{base}", "--base_model", "{base}"],
                                 r"is the base model"),
    "into the project folder": (["{run}/lora_model", "."], r"export folder '\.' is the working folder"),
    "above the project folder": (["{run}/lora_model", ".."], r"is above the working folder"),
    "over every run": (["{run}/lora_model", "lightning_logs"], r"holds the adapter"),
    "into a run's checkpoints": (["{run}/lora_model_best", "{run}/checkpoints"], r"did not write there \(best-"),
    "over an earlier export, unasked": (["{run}/lora_model", "merged"], r"holds an earlier export: .*--overwrite true"),
    "over an earlier export in a run folder": (["{run}/lora_model", "{run}/merged", "--overwrite", "true"],
                                               r"an earlier export inside the run folder"),
    "from no adapter": (["lora_mode", "merged2"], r"'lora_mode' is neither an adapter folder"),
    "from a truncated adapter": (["{cut}", "merged2"], r"adapter_model.safetensors of adapter .* cannot be read"),
    "from a file that is no checkpoint": (["mine/results.csv", "merged2"], r"is no checkpoint that fit wrote"),
    "onto a base that is not there": (["{run}/lora_model", "merged2", "--base_model", "gone"],
                                      r"base model folder 'gone' not found: pass --base_model"),
}  # fmt: skip


@pytest.mark.parametrize("case", EXPORTS)
def test_export_refuses_before_loading_and_changes_nothing(case, project, standin_dir):
    earlier_export(project / "merged")
    earlier_export(project / RUN / "merged")
    cut = shutil.copytree(project / RUN / "lora_model", project / "cut")
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    names = {"{run}": str(RUN), "{base}": str(standin_dir), "{cut}": "cut"}
    args = [names.get(arg, arg).replace("{run}", str(RUN)) for arg in EXPORTS[case][0]]
    refused(["export", *args, "--trust_remote_code", "true"], project, [project, standin_dir], EXPORTS[case][1])


def test_export_into_a_read_only_folder_fails_before_merging(project, standin_dir):
    with read_only(project / "ro"):
        refused(["export", str(RUN / "lora_model"), "ro/merged", "--trust_remote_code", "true"], project,
                [project, standin_dir], r"export folder 'ro/merged' cannot be written: .*ro' is read-only")  # fmt: skip


def test_overwrite_replaces_an_earlier_export_and_nothing_else(project, standin_dir):
    earlier_export(project / "merged")
    before = snapshot(project, standin_dir)
    done = run_cli(["export", str(RUN / "lora_model"), "merged", "--trust_remote_code", "true", "--overwrite", "true"],
                   project)  # fmt: skip
    assert done.returncode == 0, done.output[-3000:]
    after = snapshot(project, standin_dir)
    kept = {path: digest for path, digest in before.items() if "/merged" not in path.removeprefix(str(project))}
    assert {path: after[path] for path in kept} == kept  # every other file as it was
    assert (project / "merged/model.safetensors").read_bytes() != b"an earlier merge"
    assert (project / "merged/config.json").is_file() and (project / "merged" / MANIFEST).is_file()
    assert not [path for path in after if path not in before and "/merged/" not in path]  # nothing else added


def test_adapter_dir_with_files_of_the_user_is_refused(project, standin_dir, lines_dir):
    refused([*demo_args(standin_dir, lines_dir), "--model.adapter_dir", "mine"], project, [project],
            r"model.adapter_dir 'mine' holds files this tool did not write there \(results.csv, sub/")  # fmt: skip


def test_read_only_adapter_dir_is_refused_before_the_run(project, standin_dir, lines_dir):
    with read_only(project / "ro"):
        refused([*demo_args(standin_dir, lines_dir), "--model.adapter_dir", "ro/lora_model"], project, [project],
                r"model.adapter_dir 'ro/lora_model' cannot be written: .*ro' is read-only")  # fmt: skip


def test_adapter_dir_keeps_files_that_appeared_during_the_run(tmp_path):
    """Checked again when the run ends: a file that appeared there meanwhile keeps the folder as it is (warned)."""
    from dsocr_lightning.training.module import DeepSeekOCRModule

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "results.csv").write_text("mine")
    module = DeepSeekOCRModule()
    assert module.save_adapter_to(target, "the adapter") is False
    assert [p.name for p in target.iterdir()] == ["results.csv"]
    assert sorted(tmp_path.iterdir()) == [target, tmp_path / "cwd"]  # no temporary folder left either


def unrelated_run(project: Path) -> Path:
    """version_1: a copy of version_0 whose checkpoints record another training split, and newer."""
    other = shutil.copytree(project / RUN, project / "lightning_logs/version_1")
    for path in (other / "checkpoints").glob("*.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        checkpoint[RECORD_KEY]["data.train_split"] = "train[:8]"
        torch.save(checkpoint, path)
    os.utime(other / "checkpoints/last.ckpt")
    return other


def test_ckpt_path_last_resumes_this_commands_run_not_the_newest(project, standin_dir, lines_dir):
    """version_1 is newer but trained on other lines: `last` takes version_0 (said in the log), version_1 unchanged."""
    other = unrelated_run(project)
    before = snapshot(other)
    done = run_cli([*demo_args(standin_dir, lines_dir), "--ckpt_path", "last"], project)
    assert done.returncode == 0, done.output[-3000:]
    assert "version_1 is newer but another run (data.train_split 'train[:8]' there, 'train' here)" in done.output
    assert f"--ckpt_path last: {RUN}/checkpoints/last.ckpt, of the newest run" in done.output
    assert snapshot(other) == before and not (project / "lightning_logs/version_2").exists()


def test_ckpt_path_last_with_no_run_of_this_command_says_how_each_differs(project, standin_dir, lines_dir):
    unrelated_run(project)
    refused([*demo_args(standin_dir, lines_dir), "--ckpt_path", "last", "--model.lr", "0.02"], project, [project],
            r"--ckpt_path last: no run under lightning_logs is this command's \(version_1: data.train_split "
            r"'train\[:8\]' there, 'train' here; model.lr 0.01 there, 0.02 here \| version_0: model.lr ")  # fmt: skip


def test_ckpt_path_file_of_another_lora_set_up_is_refused(project, standin_dir, lines_dir):
    refused([*demo_args(standin_dir, lines_dir), "--ckpt_path", str(RUN / "checkpoints/last.ckpt"),
             "--model.lora.r", "8"], project, [project],
            r"its LoRA weights belong to another model set-up \(model.lora.r 16 there, 8 here\)")  # fmt: skip


def test_ckpt_path_file_takes_the_flags_of_the_command_as_last_does(project, standin_dir, lines_dir, caplog,
                                                                    monkeypatch):  # fmt: skip
    """Lightning replaced three flags given with a checkpoint file by the checkpoint's values; here the command's
    win, for a file as for `last`, and the log lists where the command differs from the checkpoint's run."""
    monkeypatch.chdir(project)
    flags = ["--model.lr", "0.02", "--model.warmup_steps", "3", "--model.weight_decay", "0.1"]
    cli = main([*demo_args(standin_dir, lines_dir), "--ckpt_path", str(RUN / "checkpoints/last.ckpt"), *flags])
    assert (cli.model.hparams.lr, cli.model.hparams.warmup_steps, cli.model.hparams.weight_decay) == (0.02, 3, 0.1)
    assert "model.lr 0.01 there, 0.02 here; model.weight_decay 0.001 there, 0.1 here; model.warmup_steps 10 there, " \
           "3 here; this command's values are used" in caplog.text  # fmt: skip


def test_predict_keeps_an_existing_output_unless_told(project, standin_dir, lines_dir):
    (project / "preds.jsonl").write_text('{"path": "earlier", "text": "kept"}\n')
    args = [*demo_args(standin_dir, lines_dir, subcommand="predict"), "--data.predict_split", "test",
            "--model.generation.max_new_tokens", "3", "--prediction_writer.output", "preds.jsonl"]  # fmt: skip
    refused(args, project, [project], r"prediction_writer.output 'preds.jsonl' exists: give a new file, or "
                                      r"--prediction_writer.overwrite true")  # fmt: skip
    refused([*args[:-1], "mine"], project, [project], r"prediction_writer.output 'mine' is a folder")
    before = snapshot(project)
    done = run_cli([*args, "--prediction_writer.overwrite", "true"], project)
    assert done.returncode == 0, done.output[-3000:]
    after = snapshot(project)
    made = ("preds.jsonl", "preds.report.html")  # the predictions and, with references, their error report
    assert {k: v for k, v in after.items() if not k.endswith(made)} == \
        {k: v for k, v in before.items() if not k.endswith(made)}  # no run folder either  # fmt: skip
    assert (project / "preds.report.html").is_file()
    assert len((project / "preds.jsonl").read_text().splitlines()) == 4
