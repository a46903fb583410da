"""Where a decode step's time goes: torch.profiler over greedy generation of one batch, top operators.

python benchmarks/profile_decode.py MODEL_DIR DATA_DIR --batch 8 --max-new-tokens 16
"""

from __future__ import annotations

import argparse

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.profiler import ProfilerActivity, profile

from dsocr_lightning.data.datamodule import OCRDataModule
from dsocr_lightning.training.generation import GenerationSettings, generate_tokens
from dsocr_lightning.training.loading import LoadSettings, LoraSettings, load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("data_dir")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    model, tokenizer, *_ = load_model(
        LoadSettings(args.model_dir, "transformers", trust_remote_code=True), LoraSettings()
    )
    model = model.cuda().eval()
    data = OCRDataModule(args.data_dir, "imagefolder", "train", None, image_column="image",
                         tokenizer_name_or_path=args.model_dir, trust_remote_code=True)  # fmt: skip
    data.setup("fit")
    batch = move_data_to_device(data.collator(True)([data.datasets["train"][i] for i in range(args.batch)]), "cuda")
    batch["images"] = [(c.bfloat16(), g.bfloat16()) for c, g in batch["images"]]
    settings = GenerationSettings(args.max_new_tokens)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        generate_tokens(model, tokenizer, batch, GenerationSettings(2))  # warm-up
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate_tokens(model, tokenizer, batch, settings)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
