"""DeepSeek-OCR 2: `python -m dsocr_lightning fit` against a plain HF `Trainer` + PEFT run on the same batches.

python benchmarks/v2_fit.py WORK_DIR [--steps 20] [--runs fast fast_checkpointing eager] [--json PATH]   # a GPU
python benchmarks/v2_fit.py WORK_DIR --tiny                                        # CPU dry run, tiny TEST STAND-IN

Needs the v2 environment (`pip install -e ".[v2,test]"`). Builds the model into WORK_DIR/model unless it is there:
the full-size DeepSeek-OCR 2 with **random weights** (transformers' own classes at the public checkpoint's sizes,
`dsocr_lightning/families/v2/config.py`; the stand-in character tokenizer with the real special-token ids), or with `--tiny`
the tiny stand-in. Renders unshuffled synthetic lines into WORK_DIR/lines. Then, each in its own process, on the same
batches (the package's collator, in order) at the guide's settings (2 x 4, bf16): our fit once per run of `--runs`
(`RUNS`: the fast path with checkpointing off and on, and the eager path: transformers' experts with PEFT's LoRA,
eager layers), and the reference (HF `Trainer` + PEFT `target_parameters` on the fused experts, the guide's
arguments, checkpointing on). Writes each run's losses, samples/s and settings, and the trainable counts of the
full-size model (meta device) to the JSON: benchmarks/results/v2_fit.json, or v2_fit_tiny.json with `--tiny` (whose
speeds are a CPU's on a tiny model: they say nothing about the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, WARMUP, commit, scalars


def build_model(folder: Path, tiny: bool) -> None:
    """The checkpoint folder: the tiny stand-in, or the random-weight full-size model (bf16, on the GPU)."""
    if (folder / "config.json").exists():
        return
    if tiny:
        from dsocr_lightning.families.v2.standin import write_v2_standin

        write_v2_standin(folder)
        return
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.deepseek_ocr2 import DeepseekOcr2ImageProcessorPil, DeepseekOcr2Processor

    from dsocr_lightning.families.standin_tokenizer import build_tokenizer
    from dsocr_lightning.families.v2.config import full_size_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(full_size_config(), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessorPil(), tokenizer=build_tokenizer()).save_pretrained(
        folder
    )


# our runs: their settings beyond t4_v2.yaml's (guide settings: 2 x 4, 8-bit AdamW, lr 2e-4, checkpointing on)
RUNS = {
    "fast": ["--model.gradient_checkpointing", "false"],  # grouped experts, compiled layers as CUDA graphs
    # grouped experts, compiled layers checkpointed inside their region, as CUDA graphs; and without the graphs
    "fast_checkpointing": ["--model.gradient_checkpointing", "true"],
    "fast_checkpointing_no_graphs": ["--model.gradient_checkpointing", "true", "--model.fast.layer_graphs", "false"],
    # transformers' experts with PEFT's LoRA, eager layers: the path before the fast one (its losses are the bar)
    "eager": ["--model.fast.grouped_experts", "loop", "--model.fast.compile_layers", "false"],
}


def fit_command(args: argparse.Namespace, model: Path, lines: Path, logs: Path, run: str) -> list[str]:
    cpu = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.dtype", "float32"]
    device = cpu if args.tiny else ["--trainer.precision", "bf16-mixed", "--model.dtype", "bfloat16"]
    return [
        sys.executable, "-m", "dsocr_lightning", "fit", "--config", str(ROOT / "configs" / "t4_v2.yaml"), *device,
        "--model.model_name_or_path", str(model), "--model.adapter_dir", "null", *RUNS[run],
        "--data.source", str(lines), "--data.source_type",
        "imagefolder", "--data.train_split", "train", "--data.val_split", "null", "--data.image_column", "image",
        "--data.shuffle", "false", "--data.num_workers", "0" if args.tiny else "2", "--trainer.limit_val_batches", "0",
        "--trainer.max_steps", str(args.steps), "--trainer.enable_progress_bar", "false",
        "--last_checkpoint.every_n_train_steps", "0", "--trainer.logger.init_args.save_dir", str(logs),
        *(["--gpu_profile.batch", str(4 * WARMUP + 4)] if args.profile else []),  # a step's last micro-batch
    ]  # fmt: skip


def our_fit(args: argparse.Namespace, model: Path, lines: Path, run: str) -> dict:
    logs = Path(args.work) / f"logs_{run}"
    code = subprocess.run(fit_command(args, model, lines, logs, run), check=False, cwd=ROOT).returncode
    if code != 0:  # the other runs and the reference still run; the JSON says this one failed (its log says why)
        return {"settings": " ".join(RUNS[run]), "error": f"fit exited with {code}"}
    version = max((logs / "lightning_logs").glob("version_*"), key=lambda p: p.stat().st_mtime)
    values = scalars(version)
    speeds = values["perf/samples_per_s"][WARMUP:] or values["perf/samples_per_s"]
    profiled = {key.removeprefix("perf/"): values[key][0] for key in PROFILED if key in values}
    return {"settings": " ".join(RUNS[run]), "first_loss": values["train/loss"][0], "losses": values["train/loss"],
            "samples_per_s": statistics.median(speeds), **peak(values), **profiled}  # fmt: skip


PROFILED = ("perf/gpu_busy", "perf/kernel_launches", "perf/profiled_wall_s", "perf/gpu_kernel_s", "perf/syncs")


def peak(values: dict[str, list[float]]) -> dict[str, float]:
    """The run's peak allocated / reserved GiB (a GPU run logs them every step)."""
    return {
        key.removeprefix("perf/"): max(values[key])
        for key in ("perf/peak_allocated_gib", "perf/peak_reserved_gib")
        if key in values
    }


def run_reference(args: argparse.Namespace) -> None:
    """HF Trainer + PEFT (plain fused `target_parameters`; B = 0 at the start, so the first loss is the base model's
    whatever the layout) with the guide's arguments and Trainer's defaults (the model takes `num_items_in_batch`: each
    step's loss over the label tokens of all its micro-batches, as ours), on the package collator's batches in order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForImageTextToText, Trainer, TrainerCallback, TrainingArguments

    from dsocr_lightning.data.datamodule import OCRDataModule
    from dsocr_lightning.families import family
    from dsocr_lightning.families.v2.lora import LINEAR_NAMES, target_module_pattern

    V2_MODEL_KEYS = family("v2").forward_keys

    work, dtype = Path(args.work), torch.float32 if args.tiny else torch.bfloat16
    model = AutoModelForImageTextToText.from_pretrained(work / "model", dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3407)
    model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules=target_module_pattern(LINEAR_NAMES, False),
        target_parameters=["experts.gate_up_proj", "experts.down_proj"]))  # fmt: skip
    data = OCRDataModule(str(work / "lines"), "imagefolder", "train", None, image_column="image",
                         tokenizer_name_or_path=str(work / "model"))  # fmt: skip
    data.setup("fit")
    collate = data.collator(False)

    def collate_model(samples: list) -> dict:
        batch = {k: v for k, v in collate(samples).items() if k in V2_MODEL_KEYS}
        for key in ("pixel_values", "pixel_values_local"):
            batch[key] = batch[key].to(dtype) if batch.get(key) is not None else None
        if args.reference_patches == "tensor":  # as the processor returns it: Trainer moves it to the GPU
            batch["num_local_patches"] = torch.tensor(batch["num_local_patches"], dtype=torch.long)
        return batch

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    class Timer(TrainerCallback):
        times, losses = [], []

        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    training = TrainingArguments(
        output_dir=str(work / "reference"), per_device_train_batch_size=2, gradient_accumulation_steps=4,
        max_steps=args.steps, learning_rate=2e-4, warmup_steps=5, lr_scheduler_type="linear", optim="adamw_8bit",
        weight_decay=0.001, seed=3407, logging_steps=1, bf16=not args.tiny, use_cpu=args.tiny, report_to="none",
        remove_unused_columns=False, save_strategy="no", dataloader_num_workers=0,
    )  # fmt: skip
    timer = Timer()
    trainer = InOrder(model=model, args=training, train_dataset=data.datasets["train"], data_collator=collate_model,
                      callbacks=[timer])  # fmt: skip
    trainer.train()
    steps = timer.times[WARMUP:] or timer.times
    row = {"first_loss": timer.losses[0], "losses": timer.losses, "samples_per_s": 8 / statistics.median(steps)}
    if torch.cuda.is_available() and not args.tiny:
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    (work / "reference.json").write_text(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", help="folder for the model, the lines and the runs' logs")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny TEST STAND-IN")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20, 3 with --tiny)")
    parser.add_argument("--lines", type=int, default=None, help="training lines to render (default: 8 per step)")
    parser.add_argument("--lines-from", help="an imagefolder of lines to copy instead of rendering them")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=None, help="our runs (default: all; --tiny: fast)")
    parser.add_argument("--profile", action="store_true", help="our runs profile one micro-batch (perf/gpu_busy, ...)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--reference-patches", choices=["list", "tensor"], default="list",
                        help="the reference's num_local_patches: the collator's CPU list, or a tensor (read back on "
                        "the GPU by transformers, a sync per micro-batch)")  # fmt: skip
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)  # the reference's process
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.tiny else 20)
    if args.reference_only:
        return run_reference(args)
    work = Path(args.work)
    build_model(work / "model", args.tiny)
    if args.lines_from and not (work / "lines").exists():  # e.g. lines rendered where there is a Persian font
        shutil.copytree(args.lines_from, work / "lines")
    if not (work / "lines").exists():
        from dsocr_lightning.data.render import write_imagefolder

        write_imagefolder(work / "lines", {"train": args.lines or 8 * args.steps}, seed=7)
    runs = args.runs or (["fast"] if args.tiny else list(RUNS))
    # the reference first, then ours, the JSON rewritten as each run finishes: a command cut short keeps the reference
    # and the finished runs. One GPU: on a host with several, HF Trainer would wrap the model in DataParallel (PEFT's
    # parametrized experts fail)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--reference-only"], check=True, cwd=ROOT, env=env)
    reference = json.loads((work / "reference.json").read_text())
    ours = {}
    for name in runs:
        ours[name] = our_fit(args, work / "model", work / "lines", name)
        write_result(args, ours, reference)
    if any("error" in run for run in ours.values()):
        sys.exit(f"runs that failed: {[name for name, run in ours.items() if 'error' in run]} (their logs above)")


def write_result(args: argparse.Namespace, ours: dict, reference: dict) -> None:
    import torch

    from dsocr_lightning.families.v2.config import full_size_config
    from dsocr_lightning.families.v2.lora import count_on_meta

    default, _ = count_on_meta(full_size_config())
    with_encoder, _ = count_on_meta(full_size_config(), encoder=True)
    main_run = next((run for run in ours.values() if "error" not in run), {})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"
    for run in (run for run in ours.values() if "error" not in run):
        run["x_reference"] = run["samples_per_s"] / reference["samples_per_s"]
        if "losses" in ours.get("eager", {}) and run is not ours["eager"]:
            run["max_loss_diff_vs_eager"] = max(
                abs(a - b) for a, b in zip(run["losses"], ours["eager"]["losses"], strict=True)
            )
    result = {
        "device": device
        + (" (tiny TEST STAND-IN: a dry run, not a measurement of DeepSeek-OCR 2)" if args.tiny else ""),
        "commit": commit(),
        "model": "tiny TEST STAND-IN" if args.tiny else "DeepSeek-OCR 2 architecture, random weights",
        "version": "v2",
        "settings": "micro-batch 2 x accumulation 4, "
        + ("float32 (CPU)" if args.tiny else "bf16-mixed, bf16 weights")
        + ", LoRA r16 (experts: split), 8-bit AdamW; reference: HF Trainer + PEFT, gradient checkpointing on",
        "trainable_default": default,  # full size, counted on the meta device
        "trainable_with_encoder": with_encoder,
        "first_loss": main_run.get("first_loss"),
        "reference_first_loss": reference["first_loss"],
        "first_loss_rel_diff": abs(main_run["first_loss"] - reference["first_loss"]) / abs(reference["first_loss"])
        if "first_loss" in main_run
        else None,
        "reference_samples_per_s": reference["samples_per_s"],
        "reference_peak_allocated_gib": reference.get("peak_allocated_gib"),
        "reference_losses": reference["losses"],
        "runs": ours,
        "steps": args.steps,
    }
    path = Path(args.json or ROOT / "benchmarks" / "results" / ("v2_fit_tiny.json" if args.tiny else "v2_fit.json"))
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
