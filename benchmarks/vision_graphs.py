"""DeepSeek-OCR 2's vision tower (full size, random weights, bf16): transformers' forward against the frozen one replayed
as CUDA graphs (families/v2/frozen_vision.py), same process, same folded SAM attention.

python benchmarks/vision_graphs.py [--batch-sizes 2 8 64] [--json benchmarks/results/vision_graphs.json]

Times one forward of the tower (SAM, then the Qwen2 encoder) over B global views of 1024 px, in train mode as a
training micro-batch runs it (no parameter of the tower trains: no autograd either way), the median of 7 after the
capture; and the largest difference of the outputs (the same kernels: expected 0).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import ROOT, commit, timed_call, write_json

from dsocr_lightning.families.v2.config import full_size_config
from dsocr_lightning.families.v2.frozen_vision import patch_frozen_vision
from dsocr_lightning.families.v2.sam_attention import patch_sam_attention


def timed(tower: torch.nn.Module, pixels: torch.Tensor) -> tuple[float, torch.Tensor]:
    return timed_call(lambda: tower(pixels).last_hidden_state, runs=7, skip=3)


def tower() -> torch.nn.Module:
    from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2VisionModel

    config = full_size_config().vision_config
    config.sam_config._attn_implementation = config.encoder_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = DeepseekOcr2VisionModel(config).to("cuda", torch.bfloat16).train().requires_grad_(False)
    for name, parameter in model.named_parameters():  # random weights of a useful size
        parameter.data.normal_(0, 0.5 if "rel_pos" in name else 0.02)
    patch_sam_attention(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8, 64])
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "vision_graphs.json"))
    args = parser.parse_args()
    model, rows = tower(), []
    print("| views | transformers s | graphs s | speed-up | max abs diff | capture s |\n|---|---|---|---|---|---|")
    for size in args.batch_sizes:
        pixels = torch.randn(size, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            plain, expected = timed(model, pixels)
        patch_frozen_vision(model, None)
        start = time.perf_counter()
        model(pixels)  # the capture
        capture = time.perf_counter() - start
        graphs, got = timed(model, pixels)
        model._view_graphs = None  # next size: transformers' forward again (without autograd)
        diff = (got.float() - expected.float()).abs().max().item()
        rows.append({"views": size, "transformers_s": plain, "graphs_s": graphs, "speedup": plain / graphs,
                     "max_abs_diff": diff, "capture_s": capture})  # fmt: skip
        print(f"| {size} | {plain:.4f} | {graphs:.4f} | {plain / graphs:.2f}x | {diff:.3g} | {capture:.1f} |")
    write_json(Path(args.json), {"device": torch.cuda.get_device_name(), "commit": commit(), "dtype": "bfloat16",
                                 "what": "DeepSeek-OCR 2 vision tower (SAM folded + Qwen2 encoder), full size, random "
                                 "weights, train mode, no autograd", "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
