"""The reference notebook recipe for comparison: HF `Trainer` + Unsloth `FastVisionModel`, with the guide's
arguments, on the same model folder and the same (unshuffled) batches as `python -m dsocr_lightning fit`.

python benchmarks/reference_recipe.py MODEL_DIR DATA_DIR --steps 20 [--fp16] [--json row.json]
Prints the trainable count, the first three losses, median s/step, samples/s and peak memory; `--json` also writes
them as one row of benchmarks/results/train_speed.json (HF Trainer defaults: train mode, max_grad_norm 1.0).
`--fp16`: as the notebook runs on a T4 (no bf16 there): fp16 weights, HF Trainer's fp16 loss scaling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import unsloth  # noqa: F401  (before transformers)
from torch.utils.data import SequentialSampler
from transformers import AutoModel, Trainer, TrainerCallback, TrainingArguments
from unsloth import FastVisionModel

from dsocr_lightning.data.datamodule import OCRDataModule
from dsocr_lightning.families import family
from dsocr_lightning.training.loading import TARGET_MODULES, count_parameters

MODEL_KEYS = family("v1").forward_keys


class Timer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []

    def on_step_begin(self, *args, **kwargs):
        torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


class InOrderTrainer(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("data_dir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="/tmp/reference_outputs")
    parser.add_argument("--json", default=None, help="write the result row here")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights and loss scaling, as on a T4")
    args = parser.parse_args()
    dtype = torch.float16 if args.fp16 else torch.bfloat16

    model, _ = FastVisionModel.from_pretrained(
        args.model_dir, load_in_4bit=False, auto_model=AutoModel, trust_remote_code=True,
        unsloth_force_compile=True, use_gradient_checkpointing="unsloth", dtype=dtype,
    )  # fmt: skip
    model = FastVisionModel.get_peft_model(
        model, target_modules=TARGET_MODULES, r=16, lora_alpha=16, lora_dropout=0, bias="none",
        random_state=3407, use_rslora=False, loftq_config=None,
    )  # fmt: skip
    FastVisionModel.for_training(model)
    trainable, total = count_parameters(model)

    data = OCRDataModule(args.data_dir, "imagefolder", "train", None, image_column="image",
                         tokenizer_name_or_path=args.model_dir, trust_remote_code=True)  # fmt: skip
    data.setup("fit")
    collate = data.collator(False)

    def collate_half(samples):
        batch = {k: v for k, v in collate(samples).items() if k in MODEL_KEYS}
        batch["images"] = [(c.to(dtype), g.to(dtype)) for c, g in batch["images"]]
        return batch

    timer = Timer()
    trainer = InOrderTrainer(
        model=model,
        data_collator=collate_half,
        train_dataset=data.datasets["train"],
        callbacks=[timer],
        args=TrainingArguments(
            per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5, max_steps=args.steps,
            learning_rate=2e-4, logging_steps=1, optim="adamw_8bit", weight_decay=0.001,
            lr_scheduler_type="linear", seed=3407, bf16=not args.fp16, fp16=args.fp16, output_dir=args.out,
            report_to="none", dataloader_num_workers=2, remove_unused_columns=False, save_strategy="no",
        ),
    )  # fmt: skip
    trainer.train()
    steady = timer.times[2:]
    if args.json:
        write_row(args.json, timer, steady, args.fp16)
    print(f"trainable params: {trainable:,} of {total:,}")
    print(
        "| run | steps | first three losses | median s / step | median samples / s | peak allocated | peak reserved |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| reference (HF Trainer + Unsloth) | {len(timer.losses)} | {', '.join(f'{v:.4f}' for v in timer.losses[:3])} "
        f"| {statistics.median(steady):.3f} | {8 / statistics.median(steady):.2f} "
        f"| {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB | {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB |"
    )


def write_row(path: str, timer: Timer, steady: list[float], fp16: bool) -> None:
    step = statistics.median(steady)
    precision = "fp16 (HF Trainer fp16=True)" if fp16 else "bf16 (HF Trainer bf16=True)"
    row = {
        "run": "reference_fp16" if fp16 else "reference", "micro_batch": 2, "accumulation": 4, "precision": precision,
        "kernel": "loop (Unsloth, transformers' per-expert loop)",
        "samples_per_s": 8 / step, "median_step_s": step, "first_step_s": timer.times[0],
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "gpu_busy": None, "losses": timer.losses,
    }  # fmt: skip
    with open(path, "w") as f:
        json.dump(row, f)


if __name__ == "__main__":
    main()
