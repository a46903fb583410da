"""One GPU against two of the same host: samples/s and scaling, validation CER, and kill -9 + resume, one JSON.

python benchmarks/multi_gpu.py MODEL_DIR LINES_DIR [--paths fast loop] [--steps 12]   # a host with 2 GPUs
python benchmarks/multi_gpu.py WORK_DIR --tiny                                      # CPU dry run (2 processes, gloo)

MODEL_DIR: the random-weight full-size checkpoint (benchmarks/build_random_checkpoint.py); LINES_DIR: an imagefolder
of synthetic lines (see train_speed.py). Each run is `python -m dsocr_lightning` in its own process(es), on unshuffled
lines, at the guide's settings per device (micro-batch 2 x accumulation 4, gradient checkpointing): the global batch
grows with the devices, as a user scales out. Paths: `fast` (grouped experts, plain `ddp`) and `loop` (transformers'
per-expert loop, `ddp_find_unused_parameters_true`: an idle expert gets no gradient there), the transformers backend,
the same strategy on 1 GPU as on 2 (so the scaling is that of the second GPU). Then, on the fast path:
`validate` of the 1-GPU run's adapter on 1 and on 2 GPUs (an odd number of lines: a padding sampler would count one
twice), a 2-GPU fit killed with SIGKILL after its step-4 checkpoint, resumed with `--ckpt_path last`, its losses
against the uninterrupted 2-GPU run's, and (`repeat`) that uninterrupted run again: how far two runs differ anyway.
`--tiny` does all of it on the CPU with the TEST STAND-IN (its speeds say nothing about GPUs) and writes
benchmarks/results/multi_gpu_tiny.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import ROOT, WARMUP, commit, scalars, write_json

MICRO, ACCUMULATION, KILL_AT = 2, 4, 4
STRATEGY = {"fast": "ddp", "loop": "ddp_find_unused_parameters_true"}
LOOP = ["--model.fast.grouped_experts", "loop", "--model.fast.batched_vision", "false"]


def common_flags(args: argparse.Namespace, devices: int, logs: Path) -> list[str]:
    """The shared part of every command: config, model, data and where the logs go."""
    config = "demo" if args.tiny else "h100"
    flags = [
        "--config", str(ROOT / "configs" / f"{config}.yaml"), "--model.model_name_or_path", args.model_dir,
        "--data.source", args.lines_dir, "--data.source_type", "imagefolder", "--data.image_column", "image",
        "--data.shuffle", "false", "--trainer.devices", str(devices), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(logs), "--model.generation.max_new_tokens", "16",
    ]  # fmt: skip
    if args.tiny:
        flags += ["--trainer.accelerator", "cpu", "--model.make_standin", "false", "--data.num_workers", "0"]
    return flags


def fit_command(args: argparse.Namespace, path: str, devices: int, logs: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "dsocr_lightning", "fit", *common_flags(args, devices, logs),
        "--model.adapter_dir", "null", "--data.train_split", "train", "--data.val_split", "null",
        "--trainer.limit_val_batches", "0", "--trainer.max_steps", str(args.steps),
        "--data.batch_size", str(MICRO), "--trainer.accumulate_grad_batches", str(ACCUMULATION),
        "--model.gradient_checkpointing", str(args.checkpointing and not args.tiny).lower(), "--trainer.strategy", STRATEGY[path], "--model.backend", "transformers",
        *(LOOP if path == "loop" else []), *extra,
    ]  # fmt: skip


def run(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{log.read_text()[-4000:]}")


def speed_row(args: argparse.Namespace, path: str, devices: int, work: Path) -> dict:
    logs = work / f"{path}{devices}"
    run(fit_command(args, path, devices, logs), logs / "run.log")
    values = scalars(logs / "lightning_logs/version_0")
    step = statistics.median(values["perf/step_seconds"][WARMUP:])
    return {"gpus": devices, "path": path, "samples_per_s": MICRO * ACCUMULATION * devices / step,
            "median_step_s": step, "losses": values["train/loss"]}  # fmt: skip


def validate_cer(args: argparse.Namespace, adapter: Path, devices: int, work: Path) -> float:
    logs = work / f"validate{devices}"
    command = [sys.executable, "-m", "dsocr_lightning", "validate", *common_flags(args, devices, logs),
               "--model.adapter_path", str(adapter), "--data.val_split", args.val_split,
               "--trainer.strategy", "ddp" if devices > 1 else "auto"]  # fmt: skip
    run(command, logs / "run.log")
    return scalars(logs / "lightning_logs/version_0")["val/cer"][-1]


def last_step(checkpoint: Path) -> int:
    try:
        return torch.load(checkpoint, weights_only=True, map_location="cpu")["global_step"]
    except (OSError, RuntimeError, EOFError):  # not written yet
        return -1


def killed_and_resumed(args: argparse.Namespace, work: Path) -> list[float]:
    """2-device fast fit, SIGKILLed (every rank) once its step-KILL_AT checkpoint exists, then resumed: its losses."""
    logs = work / "resume"
    command = fit_command(args, "fast", 2, logs, "--last_checkpoint.every_n_train_steps", str(KILL_AT))
    checkpoint = logs / "lightning_logs/version_0/checkpoints/last.ckpt"
    logs.mkdir(parents=True)
    with (logs / "killed.log").open("w") as out:
        child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while last_step(checkpoint) < KILL_AT and child.poll() is None:
            time.sleep(0.2)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    if last_step(checkpoint) != KILL_AT:
        raise RuntimeError(f"not killed at step {KILL_AT}:\n{(logs / 'killed.log').read_text()[-4000:]}")
    run([*command, "--ckpt_path", "last"], logs / "resumed.log")
    return scalars(logs / "lightning_logs/version_0")["train/loss"]


def scaling(rows: list[dict]) -> dict[str, float]:
    """Per path: 2-GPU samples/s over twice the 1-GPU figure."""
    speed = {(r["path"], r["gpus"]): r["samples_per_s"] for r in rows}
    return {p: speed[p, 2] / (2 * speed[p, 1]) for p, gpus in speed if gpus == 2 and (p, 1) in speed}


def measure(args: argparse.Namespace, work: Path, data: dict, save: Callable[[dict], None]) -> None:
    """The stages asked for, into `data` (same-named rows replaced), saved after each: a later failure keeps them."""
    device = "cpu (tiny TEST STAND-IN)" if args.tiny else torch.cuda.get_device_name()
    measured_at = commit()  # once, before this script rewrites its (tracked) JSON, which would read as +dirty
    for path in args.paths if "speed" in args.stages else []:
        for devices in (1, 2):
            row = speed_row(args, path, devices, work) | {"device": device, "commit": measured_at, "steps": args.steps}
            data["rows"] = [r for r in data["rows"] if (r["path"], r["gpus"]) != (path, devices)] + [row]
            data |= {"device": device, "commit": measured_at, "micro_batch": MICRO, "accumulation": ACCUMULATION}
            data["scaling_efficiency"] = scaling(data["rows"])
            save(data)
    if "cer" in args.stages:
        adapter = work / "fast1/lightning_logs/version_0/lora_model"
        data |= {"val_split": args.val_split, "val_cer_1gpu": validate_cer(args, adapter, 1, work),
                 "val_cer_2gpu": validate_cer(args, adapter, 2, work)}  # fmt: skip
        save(data)
    if "resume" in args.stages:
        straight, resumed = straight_losses(data), killed_and_resumed(args, work)
        data |= {"resume_killed_at_step": KILL_AT, "resume_losses": resumed,
                 "resume_max_loss_diff": max(abs(a - b) for a, b in zip(resumed, straight)),
                 "resume_losses_equal": resumed == straight}  # fmt: skip
        save(data)
    if "repeat" in args.stages:  # the noise floor of the resume comparison: an uninterrupted run again
        logs = work / "repeat"
        run(fit_command(args, "fast", 2, logs), logs / "run.log")
        again = scalars(logs / "lightning_logs/version_0")["train/loss"]
        data["repeat_max_loss_diff"] = max(abs(a - b) for a, b in zip(again, straight_losses(data)))
        save(data)


def straight_losses(data: dict) -> list[float]:
    """The uninterrupted 2-GPU fast run's losses (its speed row)."""
    return next(r["losses"] for r in data["rows"] if (r["path"], r["gpus"]) == ("fast", 2))


def table(data: dict) -> str:
    lines = ["| path | GPUs | steps | samples/s | s/step | scaling |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        efficiency = data.get("scaling_efficiency", {}).get(r["path"])
        scaling = f"{100 * efficiency:.0f} %" if r["gpus"] == 2 and efficiency else ""
        lines.append(f"| {r['path']} | {r['gpus']} | {r['steps']} | {r['samples_per_s']:.2f} | {r['median_step_s']:.3f} "
                     f"| {scaling} |")  # fmt: skip
    if "val_cer_2gpu" in data:
        lines.append(f"\nval/cer on {data['val_split']}: 1 GPU {data['val_cer_1gpu']:.6f}, "
                     f"2 GPUs {data['val_cer_2gpu']:.6f}")  # fmt: skip
    if "repeat_max_loss_diff" in data:
        lines.append(f"an uninterrupted 2-GPU run again: max loss diff {data['repeat_max_loss_diff']:.2e}")
    if "resume_losses_equal" in data:
        lines.append(f"kill -9 after step {data['resume_killed_at_step']}, resume: losses equal the uninterrupted "
                     f"run's: {data['resume_losses_equal']} (max diff {data['resume_max_loss_diff']:.2e})")  # fmt: skip
    return "\n".join(lines)


def tiny_inputs(args: argparse.Namespace) -> None:
    """The TEST STAND-IN and 21 lines into WORK_DIR (the first positional argument)."""
    from dsocr_lightning.data.render import write_imagefolder
    from dsocr_lightning.families.v1.standin import write_standin_checkpoint

    work = Path(args.model_dir)
    args.model_dir, args.lines_dir = str(work / "standin"), str(work / "lines")
    if not (work / "standin/config.json").exists():
        write_standin_checkpoint(work / "standin", labelled_logits_only=True)
    if not (work / "lines").exists():
        write_imagefolder(work / "lines", {"train": 64, "test": 5}, seed=1)
    args.steps, args.val_split = min(args.steps, 6), "test"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="MODEL_DIR, or WORK_DIR with --tiny")
    parser.add_argument("lines_dir", nargs="?")
    parser.add_argument("--paths", nargs="+", default=["fast", "loop"], choices=list(STRATEGY))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--val-split", default="test[:31]")
    parser.add_argument("--stages", nargs="+", default=["speed", "cer", "resume", "repeat"],
                        choices=["speed", "cer", "resume", "repeat"])  # fmt: skip
    parser.add_argument("--checkpointing", type=lambda v: v == "true", default=True, help="gradient checkpointing")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.tiny:
        tiny_inputs(args)
    json_path = args.json or ROOT / "benchmarks/results" / ("multi_gpu_tiny.json" if args.tiny else "multi_gpu.json")
    work = Path(args.model_dir).parent / "multi_gpu_runs" if args.tiny else Path(f"/tmp/multi_gpu_{os.getpid()}")
    data = json.loads(json_path.read_text()) if json_path.exists() else {"rows": []}

    def save(data: dict) -> None:
        write_json(json_path, data)
        print(table(data), flush=True)

    measure(args, work, data, save)


if __name__ == "__main__":
    main()
