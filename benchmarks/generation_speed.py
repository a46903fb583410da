"""New tokens per second of batched greedy generation (the validation / predict path) for several batch sizes.

python benchmarks/generation_speed.py MODEL_DIR DATA_DIR --batch-sizes 1 8 32 --max-new-tokens 64
With random weights no line ends early, so every row generates batch x max-new-tokens tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from dsocr_lightning.data import OCRDataModule
from dsocr_lightning.fast import FastPaths
from dsocr_lightning.generation import GenerationSettings, generate_tokens
from dsocr_lightning.loading import LoadSettings, LoraSettings, load_model, set_inference


def timed_generate(model, tokenizer, batch, settings) -> tuple[float, int]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        new = generate_tokens(model, tokenizer, batch, settings)
    torch.cuda.synchronize()
    return time.perf_counter() - start, int((new != tokenizer.pad_token_id).sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("data_dir")
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--loop", action="store_true", help="transformers' expert loop instead of grouped experts")
    args = parser.parse_args()

    fast = FastPaths(grouped_experts=not args.loop)
    settings = LoadSettings(args.model_dir, args.backend, trust_remote_code=True, fast=fast)
    model, tokenizer, backend = load_model(settings, LoraSettings())
    model = model.cuda().eval()
    set_inference(model, backend, True)
    data = OCRDataModule(args.data_dir, "imagefolder", "train", None, image_column="image",
                         tokenizer_name_or_path=args.model_dir, trust_remote_code=True)  # fmt: skip
    data.setup("fit")
    collate, samples = data.collator(True), data.datasets["train"]
    rows = []
    for size in args.batch_sizes:
        batch = move_data_to_device(collate([samples[i] for i in range(size)]), "cuda")
        batch["images"] = [(c.bfloat16(), g.bfloat16()) for c, g in batch["images"]]
        timed_generate(model, tokenizer, batch, GenerationSettings(4))  # warm-up
        seconds, tokens = timed_generate(model, tokenizer, batch, GenerationSettings(args.max_new_tokens))
        how = "expert loop" if args.loop else "grouped experts"
        rows.append(f"| {backend}, {how} | {size} | {tokens} | {seconds:.2f} | {tokens / seconds:.1f} |")
    print(f"| backend | batch | new tokens | seconds | new tokens / s |  (max_new_tokens {args.max_new_tokens})")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
