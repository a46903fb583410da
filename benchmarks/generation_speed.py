"""Decoding speed on the validation / predict path: new tokens/s per batch size and decoding path, greedy tokens
against plain `model.generate` of the model's own code, and `predict` end to end, into one JSON.

python benchmarks/generation_speed.py MODEL_DIR LINES_DIR [--batch-sizes 1 8 64] [--max-new-tokens 64] [--loop]
    [--paths graphs generate] [--long 1024] [--same-tokens 64] [--predict-lines 1000] [--adapter DIR]
    [--dtype float16 --kernel triton] [--json benchmarks/results/decode_speed.json]

MODEL_DIR: the random-weight full-size checkpoint (build_random_checkpoint.py; for DeepSeek-OCR 2, v2_fit.py's
WORK/model, in the v2 environment: its family comes from the checkpoint); LINES_DIR: an imagefolder of lines (its `train` folder feeds `predict`). Greedy, `no_repeat_ngram_size` 20, LoRA unmerged, bf16 autocast. With random
weights no line ends early, so every row generates batch x max-new-tokens tokens; times include the prefill with
the vision towers, not a graph's capture (a warm-up call of the same shape runs first). `--paths`: the
`decoding` settings to time (graphs: static KV cache + CUDA graphs, the default; generate: transformers'
generate). `--long N`: batch 8 with N new tokens on the first path. `--same-tokens N`: the first 32 greedy tokens
of N lines from the first path against plain `generate` with transformers' expert loop (the model's own code,
loaded in turn), and the fraction of lines whose 32 tokens are all equal; also the same split by cause (decoding vs
experts; `generate` with and without the flash attention kernel; graphs against the same steps run eagerly);
`--same-tokens-fp32`: also the static steps against `generate` in float32. `--predict-lines N`:
`python -m dsocr_lightning predict --config configs/h100.yaml` over N images of LINES_DIR/train, wall time of the
whole process (load included) and of its prediction loop (from the run's log). `--adapter DIR`: every model
(and `predict`) with that trained adapter: with random weights near-tied greedy choices flip under bf16 rounding, and
an adapter trained on the lines (the model then predicts with margins) tells decoding errors from those flips.
`--dtype float16 --kernel triton`: as a T4 decodes (fp16 weights and autocast, the Triton expert kernels). Rows carry
their precision and kernel; the JSON keeps the rows and checks of other precisions and kernels (checks of a
non-bf16 run are stored with their precision and kernel in front: `float16/triton: same_tokens_fraction`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, commit, write_json
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.nn.attention import SDPBackend

from dsocr_lightning.data.datamodule import OCRDataModule
from dsocr_lightning.families import family
from dsocr_lightning.families.detect import checkpoint_version
from dsocr_lightning.fast import FastPaths
from dsocr_lightning.training import generation
from dsocr_lightning.training.generation import GenerationSettings, generate_tokens
from dsocr_lightning.training.loading import LoadSettings, LoraSettings, load_model, set_inference

CUDA = torch.cuda.is_available()  # else a CPU dry run (e.g. on the test stand-in): its speeds say nothing
DEVICE = "cuda" if CUDA else "cpu"


KERNEL = "auto"  # --kernel: the grouped-expert kernel of the fast path (the loop where --loop or a reference)
FAMILY = None  # the checkpoint's model family (set in main): its pixel keys and its tokenizer's PAD


def load(model_dir: str, loop: bool, dtype: str = "auto", adapter: str | None = None) -> tuple:
    settings = LoadSettings(model_dir, "transformers", trust_remote_code=True, dtype=dtype, adapter_path=adapter,
                            fast=FastPaths(grouped_experts="loop" if loop else KERNEL, fold_rel_pos=not loop))  # fmt: skip
    model, tokenizer, backend, *_ = load_model(settings, LoraSettings())
    model = model.to(DEVICE).eval()
    set_inference(model, backend, True)
    return model, tokenizer


def line_batches(args: argparse.Namespace) -> tuple:
    """(collate, samples) of the training lines, as validation collates them."""
    data = OCRDataModule(args.data_dir, "imagefolder", "train", None, image_column="image",
                         tokenizer_name_or_path=args.model_dir, trust_remote_code=True)  # fmt: skip
    data.setup("fit")
    return data.collator(True), data.datasets["train"]


def batch_of(collate, samples, indices, dtype: torch.dtype | None = None) -> dict:
    batch = move_data_to_device(collate([samples[i] for i in indices]), DEVICE)
    return FAMILY.cast_pixels(batch, dtype or (torch.bfloat16 if CUDA else torch.float32))


def timed_generate(model, tokenizer, batch: dict, new_tokens: int, path: str) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize() if CUDA else None
    start = time.perf_counter()
    half = CUDA and model.dtype in (torch.bfloat16, torch.float16)  # float32 weights (--same-tokens-fp32): float32
    with torch.autocast(DEVICE, dtype=model.dtype, enabled=half):
        new = generate_tokens(model, tokenizer, batch, GenerationSettings(new_tokens, decoding=path))
    torch.cuda.synchronize() if CUDA else None
    return time.perf_counter() - start, new


def speed_row(model, tokenizer, lines: tuple, size: int, new_tokens: int, path: str, experts: str) -> dict:
    batch = batch_of(*lines, range(size), model.dtype if CUDA else None)
    timed_generate(model, tokenizer, batch, new_tokens, path)  # warm-up (and the graph's capture)
    torch.cuda.reset_peak_memory_stats() if CUDA else None
    seconds, new = timed_generate(model, tokenizer, batch, new_tokens, path)
    tokens = int((new != FAMILY.tokenizer(tokenizer).pad_token_id).sum())
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None
    row = {"batch": size, "new_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
           "path": f"{path} ({experts})", "max_new_tokens": new_tokens, "peak_allocated_gib": peak,
           "precision": str(model.dtype).removeprefix("torch."), "kernel": experts_kernel(model)}  # fmt: skip
    print(f"| {row['path']} | {size} | {new_tokens} | {tokens} | {seconds:.2f} | {tokens / seconds:.1f} "
          f"| {peak or 0:.2f} |", flush=True)  # fmt: skip
    return row


def experts_kernel(model) -> str:
    from dsocr_lightning.fast.layout import block_kernel, decoder_layers, expert_blocks

    return block_kernel(expert_blocks(decoder_layers(model))[0]) or "loop"


def speed_rows(model, tokenizer, lines: tuple, args: argparse.Namespace) -> list[dict]:
    experts = "expert loop" if args.loop else "grouped experts"
    runs = [(size, args.max_new_tokens, path) for path in args.paths for size in args.batch_sizes]
    runs += [(8, args.long, args.paths[0])] if args.long else []
    rows = [speed_row(model, tokenizer, lines, *run, experts) for run in runs]
    if args.merged:  # LoRA merged into the base weights (what predict may do): fewer kernels a step
        model.merge_adapter()
        rows += [speed_row(model, tokenizer, lines, size, args.max_new_tokens, args.paths[0], experts + ", LoRA merged")
                 for size in args.batch_sizes]  # fmt: skip
        model.unmerge_adapter()
    return rows


def first_tokens(model, tokenizer, lines: tuple, count: int, path: str, batch: int = 16) -> torch.Tensor:
    """The first 32 greedy tokens of `count` lines, `[count, 32]`, in the model's dtype."""
    parts = [timed_generate(model, tokenizer, batch_of(*lines, range(i, min(i + batch, count)), model.dtype), 32,
                            path)[1].cpu() for i in range(0, count, batch)]  # fmt: skip
    pad = FAMILY.tokenizer(tokenizer).pad_token_id  # a batch whose rows all ended early is narrower
    return torch.cat([torch.nn.functional.pad(part, (0, 32 - part.shape[1]), value=pad) for part in parts])


def same_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """The fraction of rows of two [lines, 32] token tensors that are equal throughout."""
    return (a == b).all(dim=1).float().mean().item()


def same_tokens(args: argparse.Namespace, lines: tuple, ours: torch.Tensor, grouped: torch.Tensor) -> dict:
    """Fractions of lines whose first 32 tokens agree: ours against plain `generate` with transformers' expert loop
    (the issue's figure), and, to tell decoding from the experts apart, ours against `generate` with the grouped
    experts and that against the loop."""
    model, tokenizer = load(args.model_dir, loop=True, adapter=args.adapter)
    loop = first_tokens(model, tokenizer, lines, len(ours), "generate")
    efficient = generate_without_flash(model, tokenizer, lines, len(ours))
    del model
    pairs = {"same_tokens_fraction": (ours, loop), "same_tokens_vs_generate_grouped": (ours, grouped),
             "same_tokens_generate_grouped_vs_loop": (grouped, loop),
             "same_tokens_generate_vs_generate_without_flash": (loop, efficient),
             "same_tokens_vs_generate_without_flash": (ours, efficient)}  # fmt: skip
    return {name: same_fraction(*pair) for name, pair in pairs.items()}


def same_tokens_float32(args: argparse.Namespace, lines: tuple) -> dict:
    """The same comparison in float32 weights and arithmetic, where rounding no longer flips near-tied greedy
    choices: the static-cache steps (run eagerly: no native grouped matmul in float32, so transformers' expert loop,
    which a CUDA graph cannot hold) against `generate`, both with the expert loop."""
    model, tokenizer = load(args.model_dir, loop=True, dtype="float32", adapter=args.adapter)
    ours = first_tokens(model, tokenizer, lines, args.same_tokens, "static")
    theirs = first_tokens(model, tokenizer, lines, args.same_tokens, "generate")
    del model
    torch.cuda.empty_cache() if CUDA else None
    return {"same_tokens_float32_static_vs_generate": same_fraction(ours, theirs)}


def generate_without_flash(model, tokenizer, lines: tuple, count: int) -> torch.Tensor:
    """`generate`'s tokens with attention kept off the flash kernel (the static decoder's masked attention runs the
    memory-efficient one): how much the attention kernel alone moves greedy bf16 tokens."""
    saved = generation.DECODE_ATTENTION
    generation.DECODE_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return first_tokens(model, tokenizer, lines, count, "generate")
    finally:
        generation.DECODE_ATTENTION = saved


CPU_FLAGS = (
    [] if CUDA else ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.num_workers", "0"]
)


def predict_speed(args: argparse.Namespace) -> dict:
    """`python -m dsocr_lightning predict` over `args.predict_lines` images: lines/s end to end and in its loop."""
    with tempfile.TemporaryDirectory() as work:
        inputs = Path(work) / "images"
        inputs.mkdir()
        for image in sorted((Path(args.data_dir) / "train").glob("*.png"))[: args.predict_lines]:
            (inputs / image.name).symlink_to(image.resolve())
        command = [sys.executable, "-m", "dsocr_lightning", "predict", "--config", str(ROOT / "configs/h100.yaml"),
                   "--model.model_name_or_path", args.model_dir, "--model.backend", "transformers", *CPU_FLAGS,
                   "--model.generation.max_new_tokens", str(args.max_new_tokens), "--data.predict_inputs",
                   f"[{inputs}/]", "--prediction_writer.output", f"{work}/out.jsonl", "--trainer.enable_progress_bar",
                   "false", "--trainer.logger.init_args.save_dir", work,
                   *(["--model.adapter_path", args.adapter] if args.adapter else [])]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            print(done.stdout[-3000:], done.stderr[-6000:], flush=True)
            return {"predict_error": done.stderr[-2000:]}
        lines = len(Path(f"{work}/out.jsonl").read_text().splitlines())
    loop = re.search(r"predictions: (\d+) lines written to .* in ([\d.]+) s .*; ([\d.]+) s of it waiting",
                     done.stdout + done.stderr)  # fmt: skip
    return {"predict_lines": lines, "predict_wall_s": wall, "predict_lines_per_s": lines / wall,
            "predict_loop_lines_per_s": int(loop[1]) / float(loop[2]) if loop else None,
            "predict_loop_s": float(loop[2]) if loop else None,
            "predict_waiting_for_images_s": float(loop[3]) if loop else None}  # fmt: skip


class Saved:
    """What the JSON already holds of other precisions and kernels: rows (theirs kept beside this run's) and checks
    (this run's stored under "<precision>/<kernel>: " unless it is the bf16 default). Each row names its device and
    commit: the file's own are those of its latest bf16 run."""

    def __init__(self, path: Path, precision: str, kernel: str) -> None:
        self.old = json.loads(path.read_text()) if path.exists() else {}
        self.precision, self.kernel = precision, kernel

    def merge(self, result: dict) -> dict:
        mine = lambda row: (
            (row.get("precision", "bfloat16"), row.get("kernel", "native")) == (self.precision, self.kernel)
        )
        if self.precision == "bfloat16":
            return (
                result
                | {"rows": [r for r in self.old.get("rows", []) if not mine(r)] + result["rows"]}
                | {k: v for k, v in self.old.items() if "/" in k}
            )
        prefix = f"{self.precision}/{self.kernel}: "
        checks = {prefix + k: v for k, v in result.items() if k not in ("rows", "device", "commit")}
        rows = [r for r in self.old.get("rows", []) if not mine(r)] + result["rows"]
        return self.old | checks | {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("data_dir")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--loop", action="store_true", help="transformers' expert loop instead of grouped experts")
    parser.add_argument("--paths", nargs="+", default=["graphs", "generate"], help="GenerationSettings.decoding values")
    parser.add_argument("--merged", action="store_true", help="rows of the first path with the LoRA merged too")
    parser.add_argument("--long", type=int, default=0, help="new tokens of a batch-8 long-output row (0: none)")
    parser.add_argument("--same-tokens", type=int, default=0, help="lines to compare with the loop (0: skip)")
    parser.add_argument("--same-tokens-fp32", action="store_true", help="the same-token check in float32 too")
    parser.add_argument("--predict-lines", type=int, default=0, help="images to run `predict` over (0: skip)")
    parser.add_argument("--adapter", help="a trained LoRA adapter folder (default: a fresh adapter, B = 0)")
    parser.add_argument("--dtype", default="auto", help="the weights' dtype (float16: as on a T4)")
    parser.add_argument("--kernel", default="auto", help="fast.grouped_experts of the fast path")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/decode_speed.json")
    args = parser.parse_args()
    global KERNEL, FAMILY
    KERNEL = args.kernel
    FAMILY = family(checkpoint_version(args.model_dir, None, args.adapter))
    lines = line_batches(args)
    model, tokenizer = load(args.model_dir, args.loop, dtype=args.dtype, adapter=args.adapter)
    print("| path | batch | max new tokens | new tokens | seconds | new tokens / s | peak allocated GiB |")
    print("|---|---|---|---|---|---|---|")
    kept = Saved(args.json, str(model.dtype).removeprefix("torch."), experts_kernel(model))
    stamp = {"device": torch.cuda.get_device_name() if CUDA else "cpu (dry run)", "commit": commit()}
    rows = [row | stamp for row in speed_rows(model, tokenizer, lines, args)]
    result = stamp | {"adapter": args.adapter, "rows": rows}
    write_json(args.json, kept.merge(result))  # after each part: a later failure keeps what was measured
    if args.same_tokens:
        ours = first_tokens(model, tokenizer, lines, args.same_tokens, args.paths[0])
        grouped = first_tokens(model, tokenizer, lines, args.same_tokens, "generate")
        if CUDA and args.paths[0] == "graphs":  # a replayed graph runs the kernels the eager steps run
            static = first_tokens(model, tokenizer, lines, args.same_tokens, "static")
            result["same_tokens_graphs_vs_static"] = same_fraction(ours, static)
        del model
        torch.cuda.empty_cache() if CUDA else None
        result |= same_tokens(args, lines, ours, grouped)
        result["same_tokens_paths"] = f"{args.paths[0]} vs generate with transformers' expert loop"
        result["same_tokens_lines"] = args.same_tokens
        write_json(args.json, kept.merge(result))
        if args.same_tokens_fp32:
            result |= same_tokens_float32(args, lines)
            write_json(args.json, kept.merge(result))
    if args.predict_lines:
        result |= predict_speed(args)
    write_json(args.json, kept.merge(result))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
