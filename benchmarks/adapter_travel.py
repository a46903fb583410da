"""Does a saved adapter give the same output whoever loads it? (GPU machine, real architecture.)

python benchmarks/adapter_travel.py MODEL_DIR DATA_DIR ADAPTER_DIR [--merged MERGED_DIR] [--loaders ...] [--keep DIR]

Each loader runs in its own process (Unsloth must be imported before transformers, and must not patch the
others), on the same 8 lines: teacher-forced loss and logits on the label positions, then greedy decoding.
  base     the base model alone (shows how much the adapter changes)
  peft     AutoModel + peft.PeftModel.from_pretrained(base, ADAPTER_DIR)
  unsloth  unsloth.FastVisionModel.from_pretrained(ADAPTER_DIR, auto_model=AutoModel, ...) (the guide's last step)
  ours     dsocr_lightning's own path (`--model.adapter_path`, backend transformers)
  merged   AutoModel.from_pretrained(MERGED_DIR) of `python -m dsocr_lightning export` (no peft)
Each runs in bf16 (bf16 weights, bf16 autocast); a `_fp16` suffix (`merged_fp16`) runs in float16 the same way,
and `_fp32` (`peft_fp32`, `merged_fp32`) loads float32 weights and runs without autocast: `peft_fp32` is the
reference that tells 16-bit rounding from a real difference.
Prints one table row per loader as it finishes, compared with `peft` and, when measured, with `peft_fp32`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

LINES = 8  # samples compared (one batch)
NEW_TOKENS = 32  # greedy tokens per line
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run on the tiny stand-in


def load(loader: str, dtype: torch.dtype, args: argparse.Namespace):
    """(model in eval mode on DEVICE, its tokenizer's folder). Unsloth is imported here, before transformers."""
    if loader == "unsloth":
        import unsloth  # noqa: F401  (first: it patches transformers and peft)
        from transformers import AutoModel
        from unsloth import FastVisionModel

        model, _ = FastVisionModel.from_pretrained(
            args.adapter_dir, auto_model=AutoModel, trust_remote_code=True, load_in_4bit=False, dtype=dtype
        )
        FastVisionModel.for_inference(model)
        return model.to(DEVICE).eval(), args.adapter_dir
    if loader == "ours":
        from dsocr_lightning.training.loading import LoadSettings, LoraSettings, load_model

        settings = LoadSettings(args.model_dir, "transformers", trust_remote_code=True, adapter_path=args.adapter_dir,
                                dtype=str(dtype).removeprefix("torch."))  # fmt: skip
        model, *_ = load_model(settings, LoraSettings())
        return model.to(DEVICE).eval(), args.adapter_dir
    from transformers import AutoModel

    folder = args.merged if loader == "merged" else args.model_dir
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype, use_safetensors=True)
    if loader == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter_dir)
    return model.to(DEVICE).eval(), folder


def batches(tokenizer_dir: str, data_dir: str, dtype: torch.dtype) -> tuple[dict, dict]:
    """(training batch with labels, inference batch with left-padded prompts) of the first LINES test lines."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from dsocr_lightning.data.datamodule import OCRDataModule

    data = OCRDataModule(data_dir, "imagefolder", "test", None, image_column="image",
                         tokenizer_name_or_path=tokenizer_dir, trust_remote_code=True)  # fmt: skip
    data.setup("fit")
    samples = [data.datasets["test"][i] for i in range(LINES)]
    out = []
    for inference in (False, True):
        batch = move_data_to_device(data.collator(inference)(samples), DEVICE)
        batch["images"] = [(c.to(dtype), g.to(dtype)) for c, g in batch["images"]]
        out.append(batch)
    return out[0], out[1]


@torch.no_grad()
def measure(name: str, args: argparse.Namespace) -> dict:
    loader, _, suffix = name.partition("_")
    dtype = {"": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[suffix]
    model, tokenizer_dir = load(loader, dtype, args)  # before the imports below (they import transformers)
    from transformers import AutoTokenizer

    from dsocr_lightning.families import family
    from dsocr_lightning.training.generation import GenerationSettings, generate_tokens

    MODEL_KEYS = family("v1").forward_keys
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)
    train, infer = batches(tokenizer_dir, args.data_dir, dtype)
    with nullcontext() if dtype == torch.float32 else torch.autocast(DEVICE, dtype=dtype):
        out = model(**{k: train[k] for k in MODEL_KEYS})
        new = generate_tokens(model, tokenizer, infer, GenerationSettings(NEW_TOKENS))
    shifted = train["labels"][:, 1:] != -100  # logits at t predict label t+1
    return {"loss": float(out.loss), "logits": out.logits[:, :-1][shifted].float().cpu(), "tokens": new.cpu()}


def versus(got: dict, ref: dict | None) -> list[str]:
    """[max / mean |logit difference|, lines whose greedy tokens are all the same] (blank without a reference)."""
    if ref is None:
        return ["", ""]
    diff = (got["logits"] - ref["logits"]).abs()
    same = sum(torch.equal(a, b) for a, b in zip(got["tokens"], ref["tokens"]))
    return [f"{diff.max():.4f} / {diff.mean():.5f}", f"{same} of {len(ref['tokens'])}"]


def measured(name: str, keep: Path) -> dict:
    """This loader's measurements, from a child process (or from `keep` when a former call left them there)."""
    path = keep / f"{name}.pt"
    if not path.exists():
        subprocess.run([sys.executable, *sys.argv, "--one", name, "--save", str(path)], check=True)
    return torch.load(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("data_dir")
    parser.add_argument("adapter_dir")
    parser.add_argument("--merged", help="folder written by `python -m dsocr_lightning export`")
    parser.add_argument("--loaders", nargs="+", default=["peft", "peft_fp32", "base", "unsloth", "ours", "merged"])
    parser.add_argument("--keep", help="keep each loader's measurements here (reused when already there)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: measure this loader
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        torch.save(measure(args.one, args), args.save)
        return
    keep = Path(args.keep or tempfile.mkdtemp())
    keep.mkdir(parents=True, exist_ok=True)
    print(f"{LINES} lines, {NEW_TOKENS} greedy tokens each; logits on the label positions (max / mean |diff|)")
    print("| loader | loss | logits vs peft | same greedy lines vs peft | logits vs peft_fp32 | same vs peft_fp32 |")
    print("|---|---|---|---|---|---|", flush=True)
    peft = measured("peft", keep)
    with_fp32 = "peft_fp32" in args.loaders or (keep / "peft_fp32.pt").exists()
    fp32 = measured("peft_fp32", keep) if with_fp32 else None
    for name in args.loaders:
        got = measured(name, keep)
        cells = [name, f"{got['loss']:.4f}", *versus(got, peft), *versus(got, fp32)]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
