"""Training speed on one GPU: the reference recipe and `python -m dsocr_lightning fit` at several settings, one table.

python benchmarks/train_speed.py MODEL_DIR LINES_DIR [--runs reference guide_loop guide h100 mb2 mb32 t4]
                                 [--steps 20] [--reference-steps 8] [--json benchmarks/results/train_speed.json]

MODEL_DIR: the random-weight full-size checkpoint (benchmarks/build_random_checkpoint.py); LINES_DIR: an imagefolder
of synthetic lines (`dsocr_lightning.render.write_imagefolder(LINES_DIR, {"train": 1000, "test": 64}, seed=7)`).
Every run trains on the same unshuffled lines in its own process; ours log `perf/*` each optimizer step and
profile one micro-batch after warm-up (`--gpu_profile.batch`). Medians leave out the first 3 optimizer steps.
Rows are appended to (or replace same-named rows of) the JSON, each with the device and the commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import ROOT, WARMUP, commit, scalars, write_json

GUIDE = ["--data.batch_size", "2", "--trainer.accumulate_grad_batches", "4", "--model.gradient_checkpointing", "true"]
EAGER = ["--model.fast.compile_layers", "false"]  # the decoder layers as the model code runs them
NO_GRAPHS = ["--model.fast.layer_graphs", "false"]  # compiled layers without CUDA graphs
LOOP = ["--model.fast.grouped_experts", "false", "--model.fast.batched_vision", "false"]
# name: (config, extra flags, micro-batch, accumulation, precision). configs/h100.yaml turns checkpointing off;
# GUIDE[:4] keeps it off, so that the compiled layers run as CUDA graphs
RUNS = {
    "guide_loop": ("h100", GUIDE + LOOP, 2, 4, "bf16-mixed"),  # the guide's settings, transformers' expert loop
    "guide_eager": ("h100", GUIDE + EAGER, 2, 4, "bf16-mixed"),  # the guide's settings, eager decoder layers
    "guide": ("h100", GUIDE, 2, 4, "bf16-mixed"),  # the same as shipped: compiled layers (checkpointing: no graphs)
    "guide_graphs": ("h100", GUIDE[:4], 2, 4, "bf16-mixed"),  # no recomputation (80 GB): layers as CUDA graphs
    "guide_no_graphs": ("h100", GUIDE[:4] + NO_GRAPHS, 2, 4, "bf16-mixed"),  # no recomputation, compiled only
    "h100": ("h100", [], 8, 1, "bf16-mixed"),  # configs/h100.yaml as shipped (layers as CUDA graphs)
    "h100_no_graphs": ("h100", NO_GRAPHS, 8, 1, "bf16-mixed"),
    "h100_eager": ("h100", EAGER, 8, 1, "bf16-mixed"),
    "mb2": ("h100", ["--data.batch_size", "2"], 2, 1, "bf16-mixed"),
    "mb32": ("h100", ["--data.batch_size", "32"], 32, 1, "bf16-mixed"),
    "mb32_no_graphs": ("h100", ["--data.batch_size", "32"] + NO_GRAPHS, 32, 1, "bf16-mixed"),
    "t4": ("t4", ["--model.dtype", "float16"], 2, 4, "16-mixed"),  # T4 settings (fp16 weights) on this GPU
}


def fit_command(name: str, model: str, lines: str, steps: int, logs: str) -> list[str]:
    config, extra, _, accumulation, _ = RUNS[name]
    return [
        sys.executable, "-m", "dsocr_lightning", "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
        "--model.model_name_or_path", model, "--model.adapter_dir", "null", "--data.source", lines,
        "--data.source_type", "imagefolder", "--data.train_split", "train", "--data.val_split", "null",
        "--data.image_column", "image", "--data.shuffle", "false", "--trainer.limit_val_batches", "0",
        "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", logs, "--gpu_profile.batch", str(accumulation * (WARMUP + 1)),
        *extra,
    ]  # fmt: skip


def our_row(name: str, log_dir: Path) -> dict:
    _, _, micro, accumulation, precision = RUNS[name]
    values = scalars(log_dir)
    step = statistics.median(values["perf/step_seconds"][WARMUP:])
    return {
        "run": name, "micro_batch": micro, "accumulation": accumulation, "precision": precision,
        "samples_per_s": micro * accumulation / step, "median_step_s": step,
        "first_step_s": values["perf/step_seconds"][0],
        "peak_allocated_gib": max(values.get("perf/peak_allocated_gib", [0])),
        "peak_reserved_gib": max(values.get("perf/peak_reserved_gib", [0])),
        "gpu_busy": (values.get("perf/gpu_busy") or [None])[0],
        "profiled_micro_batch_s": (values.get("perf/profiled_wall_s") or [None])[0],
        "gpu_kernel_s": (values.get("perf/gpu_kernel_s") or [None])[0],
        "kernel_launches": (values.get("perf/kernel_launches") or [None])[0],
        "losses": values["train/loss"], "step_seconds": values["perf/step_seconds"],
    }  # fmt: skip


def run(name: str, args: argparse.Namespace, work: Path) -> dict:
    if name == "reference":
        out = work / "reference.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks/reference_recipe.py"), args.model_dir, args.lines_dir,
                        "--steps", str(args.reference_steps), "--json", str(out)], check=True)  # fmt: skip
        return json.loads(out.read_text())
    logs = work / name
    subprocess.run(fit_command(name, args.model_dir, args.lines_dir, args.steps, str(logs)), check=True, cwd=ROOT)
    return our_row(name, logs / "lightning_logs" / "version_0")


def save(path: Path, rows: list[dict]) -> dict:
    """Merge `rows` into the JSON at `path` (same-named rows replaced), with ratios to the reference."""
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    names = {r["run"] for r in rows}
    data["rows"] = [r for r in data["rows"] if r["run"] not in names] + rows
    data["device"], data["commit"] = rows[-1]["device"], rows[-1]["commit"]
    reference = next((r for r in data["rows"] if r["run"] == "reference"), None)
    for row in data["rows"]:
        if reference is not None and row.get("device") == reference.get("device"):
            row["speedup_vs_reference"] = row["samples_per_s"] / reference["samples_per_s"]
    write_json(path, data)
    return data


def table(data: dict) -> str:
    header = (
        "| run | micro-batch × acc | precision | samples/s | × reference | s/step | peak alloc / reserved GiB "
        "| GPU busy (profiled micro-batch) | kernels | first losses |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        busy = f"{100 * r['gpu_busy']:.0f} %" if r.get("gpu_busy") else "—"
        lines.append(
            f"| {r['run']} | {r['micro_batch']} × {r['accumulation']} | {r['precision']} | {r['samples_per_s']:.2f} "
            f"| {r.get('speedup_vs_reference', float('nan')):.1f} | {r['median_step_s']:.3f} "
            f"| {r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f} | {busy} "
            f"| {int(r['kernel_launches']) if r.get('kernel_launches') else '—'} "
            f"| {', '.join(f'{v:.4f}' for v in r['losses'][:3])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("lines_dir")
    parser.add_argument("--runs", nargs="+", default=["reference", "guide_loop", "guide", "h100", "mb2", "mb32", "t4"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reference-steps", type=int, default=8)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/train_speed.json")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    stamp = {"device": device, "commit": commit()}  # once: saving each row rewrites the tracked JSON (+dirty)
    with tempfile.TemporaryDirectory() as work:
        for name in args.runs:
            row = run(name, args, Path(work)) | stamp
            data = save(args.json, [row])  # after every run: a later failure keeps what was measured
            print(table(data), flush=True)


if __name__ == "__main__":
    main()
