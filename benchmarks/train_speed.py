"""Training speed on one GPU: the reference recipe and `python -m dsocr_lightning fit` at several settings, one table.

python benchmarks/train_speed.py MODEL_DIR LINES_DIR [--runs reference guide_loop guide h100 mb2 mb32 t4]
                                 [--steps 20] [--reference-steps 8] [--memory-cap-gib 14.75]
                                 [--json benchmarks/results/train_speed.json]

MODEL_DIR: the random-weight full-size checkpoint (benchmarks/build_random_checkpoint.py); LINES_DIR: an imagefolder
of synthetic lines (`dsocr_lightning.data.render.write_imagefolder(LINES_DIR, {"train": 1000, "test": 64}, seed=7)`).
Every run trains on the same unshuffled lines in its own process; ours log `perf/*` each optimizer step and
profile one micro-batch after warm-up (`--gpu_profile.batch`). Medians leave out the first 3 optimizer steps.
Rows are appended to (or replace same-named rows of) the JSON, each with the device, the commit, its precision and
the expert kernel (`native`: torch._grouped_mm, `triton`: fast/triton_grouped.py, `loop`: transformers' loop). The
T4 runs (`t4*`, `reference_fp16`) run with the process's GPU memory capped at `--memory-cap-gib` (a T4 has 15,109 MiB
to give: 14.75 GiB), through benchmarks/capped.py.
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
LOOP = ["--model.fast.grouped_experts", "loop", "--model.fast.batched_vision", "false"]
TRITON = ["--model.fast.grouped_experts", "triton"]
T4 = ["--model.dtype", "float16"]  # what `dtype: auto` gives on a T4 (no bf16 there)
BF16 = ["--trainer.precision", "bf16-mixed", "--model.dtype", "bfloat16"]
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
    "t4": ("t4", T4, 2, 4, "16-mixed"),  # configs/t4.yaml as shipped, fp16 weights as on a T4 (auto -> triton there)
    "t4_triton": ("t4", T4 + TRITON, 2, 4, "16-mixed"),  # ... with the kernel a T4 runs forced on this GPU
    "t4_triton_graphs": ("t4", T4 + TRITON + ["--model.gradient_checkpointing", "false"], 2, 4, "16-mixed"),
    "t4_triton_ckpt": ("t4", T4 + TRITON + ["--model.gradient_checkpointing", "true"], 2, 4, "16-mixed"),
    # the fp16 path's reference: transformers' per-expert loop (not Unsloth: the same pipeline, the loop alone)
    "t4_loop": ("t4", T4 + LOOP + ["--model.backend", "transformers"], 2, 4, "16-mixed"),
    "h100_triton": ("h100", TRITON, 8, 1, "bf16-mixed"),  # the Triton kernels against torch's at h100.yaml
    # configs/t4.yaml in bf16 (torch's kernel, then Triton's): what the T4 path costs beside precision and kernel
    "t4_bf16": ("t4", BF16, 2, 4, "bf16-mixed"),
    "t4_bf16_triton": ("t4", BF16 + TRITON, 2, 4, "bf16-mixed"),
}
KERNELS = {"t4_loop": "loop", "guide_loop": "loop"}  # every other run: triton where its name or T4 says so, else native


CAP = 0.0  # --memory-cap-gib


def kernel_of(name: str) -> str:
    return KERNELS.get(name) or ("triton" if "triton" in name or name == "t4" else "native")


def launcher(name: str, cap_gib: float) -> list[str]:
    """`python -m dsocr_lightning`, for T4 runs with the GPU memory of the process capped (benchmarks/capped.py)."""
    if name.startswith("t4") and cap_gib > 0:
        return [sys.executable, str(ROOT / "benchmarks/capped.py"), str(cap_gib)]
    return [sys.executable, "-m", "dsocr_lightning"]


def fit_command(name: str, model: str, lines: str, steps: int, logs: str, cap_gib: float = 0) -> list[str]:
    config, extra, _, accumulation, _ = RUNS[name]
    return [
        *launcher(name, cap_gib), "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
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
        "kernel": kernel_of(name), "memory_cap_gib": CAP if name.startswith("t4") and CAP > 0 else None,
        "expert_kernel_s": (values.get("perf/expert_kernel_s") or [None])[0],
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
    if name in ("reference", "reference_fp16"):
        out = work / f"{name}.json"
        fp16 = ["--fp16"] if name == "reference_fp16" else []
        cap = [str(ROOT / "benchmarks/capped.py"), str(args.memory_cap_gib), "--script"] if fp16 else []
        subprocess.run(
            [
                sys.executable,
                *cap,
                str(ROOT / "benchmarks/reference_recipe.py"),
                args.model_dir,
                args.lines_dir,
                "--steps",
                str(args.reference_steps),
                "--json",
                str(out),
                *fp16,
            ],
            check=True,
        )
        return json.loads(out.read_text())  # fmt: skip
    logs = work / name
    command = fit_command(name, args.model_dir, args.lines_dir, args.steps, str(logs), args.memory_cap_gib)
    subprocess.run(command, check=True, cwd=ROOT)
    return our_row(name, logs / "lightning_logs" / "version_0")


def save(path: Path, rows: list[dict]) -> dict:
    """Merge `rows` into the JSON at `path` (same-named rows replaced), with ratios to the reference."""
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    names = {r["run"] for r in rows}
    data["rows"] = [r for r in data["rows"] if r["run"] not in names] + rows
    data["device"], data["commit"] = rows[-1]["device"], rows[-1]["commit"]
    references = {r["run"]: r for r in data["rows"] if r["run"].startswith("reference")}
    for row in data["rows"]:  # T4 runs against the fp16 reference, others against the bf16 one, on one device
        reference = references.get("reference_fp16" if row["run"].startswith("t4") else "reference")
        if reference is not None and row.get("device") == reference.get("device"):
            row["speedup_vs_reference"] = row["samples_per_s"] / reference["samples_per_s"]
    write_json(path, data)
    return data


def table(data: dict) -> str:
    header = (
        "| run | micro-batch × acc | precision | kernel | samples/s | × reference | s/step | peak alloc / reserved GiB "
        "| GPU busy (profiled micro-batch) | kernels | first losses |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        busy = f"{100 * r['gpu_busy']:.0f} %" if r.get("gpu_busy") else "—"
        lines.append(
            f"| {r['run']} | {r['micro_batch']} × {r['accumulation']} | {r['precision']} | {r.get('kernel', '?')} "
            f"| {r['samples_per_s']:.2f} "
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
    parser.add_argument("--memory-cap-gib", type=float, default=14.75, help="GPU memory of T4 runs (0: no cap)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/train_speed.json")
    args = parser.parse_args()
    global CAP
    CAP = args.memory_cap_gib
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    stamp = {"device": device, "commit": commit()}  # once: saving each row rewrites the tracked JSON (+dirty)
    with tempfile.TemporaryDirectory() as work:
        for name in args.runs:
            row = run(name, args, Path(work)) | stamp
            data = save(args.json, [row])  # after every run: a later failure keeps what was measured
            print(table(data), flush=True)


if __name__ == "__main__":
    main()
