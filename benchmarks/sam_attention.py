"""DeepSeek-OCR 2's SAM encoder (the full-size one, random weights): transformers' attention, which builds a
[B, heads, N, N] relative-position bias per call, against the folded one (families/v2/sam_attention.py), same process.

python benchmarks/sam_attention.py [--batch-sizes 1 8 64] [--json benchmarks/results/sam_attention.json]

Times one forward of the encoder over B views of 1024 px (what each line costs in training, validation and decoding's
prefill) in bf16 under no_grad, the median of 5 after 2 warm-ups, and the largest difference of the two outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import ROOT, commit, timed_call, write_json

from dsocr_lightning.families.v2.config import full_size_config
from dsocr_lightning.families.v2.sam_attention import folded_class, patch_sam_attention


def timed(encoder: torch.nn.Module, pixels: torch.Tensor) -> tuple[float, torch.Tensor]:
    return timed_call(lambda: encoder(pixels).last_hidden_state, runs=5, skip=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "sam_attention.json"))
    args = parser.parse_args()
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2SamVisionEncoder

    config = full_size_config().vision_config.sam_config
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    encoder = DeepseekOcr2SamVisionEncoder(config).to("cuda", torch.bfloat16).eval()
    for name, parameter in encoder.named_parameters():  # random weights of a useful size, tables included
        parameter.data.normal_(0, 0.5 if "rel_pos" in name else 0.02)
    rows = []
    print(
        "| views | transformers s | folded s | speed-up | max abs diff | output mean abs |\n|---|---|---|---|---|---|"
    )
    for size in args.batch_sizes:
        pixels = torch.randn(size, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            unpatch(encoder)
            plain, expected = timed(encoder, pixels)
            patch_sam_attention(encoder)
            folded, got = timed(encoder, pixels)
        diff, scale = (got - expected).abs().max().item(), expected.abs().mean().item()
        rows.append({"views": size, "transformers_s": plain, "folded_s": folded, "speedup": plain / folded,
                     "max_abs_diff": diff, "output_mean_abs": scale})  # fmt: skip
        print(f"| {size} | {plain:.4f} | {folded:.4f} | {plain / folded:.2f}x | {diff:.3g} | {scale:.3g} |")
    write_json(Path(args.json), {"device": torch.cuda.get_device_name(), "commit": commit(), "dtype": "bfloat16",
                                 "what": "DeepSeek-OCR 2 SAM encoder, full size, random weights, no_grad", "rows": rows})  # fmt: skip


def unpatch(encoder: torch.nn.Module) -> None:
    """transformers' own attention class back where `patch_sam_attention` swapped it."""
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2SamVisionSdpaAttention as base

    for module in encoder.modules():
        if type(module) is folded_class(base):
            module.__class__ = base


if __name__ == "__main__":
    main()
