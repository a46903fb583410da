"""The experts' grouped matmuls alone: one DeepSeek-OCR MoE layer's experts with LoRA (gate, up, down: base + A + B),
forward and backward, per kernel and dtype, at training and decoding token counts; one table, one JSON.

python benchmarks/grouped_kernels.py [--tokens 8 64 600 2400] [--json benchmarks/results/grouped_kernels.json]

Kernels: `native` (torch._grouped_mm: one CUTLASS kernel on Hopper in bf16), `triton` (fast/triton_grouped.py), and
`loop` (one matmul per expert, as transformers' loop runs them, without its host syncs: a lower bound for it). Routing
is uniform random (64 experts, 6 a token; DeepSeek-OCR's widths 1280 / 896, LoRA r16). The FLOPs and bytes of each
row are what the T4 estimate in benchmarks/README.md scales. On a machine without a GPU: a dry run (correctness
only, on Triton's interpreter where TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import ROOT, commit, write_json
from torch import nn

from dsocr_lightning.fast.grouped_mm import LoraStack, grouped_linear, grouped_mm_reference, kernel_matmul, route

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HIDDEN, INTER, EXPERTS, TOP, RANK = 1280, 896, 64, 6, 16


def layer(dtype: torch.dtype, tokens: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=0.02: (torch.randn(*shape, generator=gen) * scale).to(DEVICE)
    weights = {name: make(EXPERTS, o, i).to(dtype) for name, (o, i) in
               {"gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}.items()}  # fmt: skip
    loras = {name: LoraStack(make(EXPERTS, RANK, w.shape[2]).requires_grad_(), make(EXPERTS, w.shape[1], RANK)
                             .requires_grad_(), 1.0, nn.Identity()) for name, w in weights.items()}  # fmt: skip
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP] for _ in range(tokens)]).to(DEVICE)
    return {"weights": weights, "loras": loras, "routing": route(ids, EXPERTS),
            "x": make(tokens * TOP, HIDDEN, scale=1.0).to(dtype).requires_grad_()}  # fmt: skip


def experts(state: dict, mm) -> torch.Tensor:
    """gate/up/down with LoRA over the sorted rows, as fast/moe.py runs them (no router, no combine)."""
    w, lora, offs = state["weights"], state["loras"], state["routing"].offs
    with torch.autocast(DEVICE, dtype=w["gate"].dtype, enabled=CUDA):
        gate, up = (grouped_linear(state["x"], w[n], offs, lora[n], mm) for n in ("gate", "up"))
        return grouped_linear(torch.nn.functional.silu(gate) * up, w["down"], offs, lora["down"], mm)


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize() if CUDA else None
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize() if CUDA else None
    return (time.perf_counter() - start) / repeats


def gpu_seconds(fn) -> float:
    """Seconds the GPU worked during one call (the union of its kernels' spans: no launch gaps)."""
    from torch.profiler import ProfilerActivity, profile

    from dsocr_lightning.training.profiling import kernel_time

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return kernel_time(prof.events())[0]


def work(tokens: int, itemsize: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one layer's expert matmuls, forward + backward (dx; LoRA's dA and dB), base frozen."""
    rows = tokens * TOP
    flops = bytes_ = 0.0
    for k, n in ((HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)):
        flops += 2 * rows * (k * n * 2 + RANK * (k + n) * 3)  # base fwd + dx; LoRA A, B fwd, dx, dw
        bytes_ += itemsize * (EXPERTS * k * n * 2 + rows * (k + n) * 4)
    return flops, bytes_


def row(kernel: str, dtype: torch.dtype, tokens: int, repeats: int) -> dict:
    state = layer(dtype, tokens)
    mm = grouped_mm_reference if kernel == "loop" else kernel_matmul(kernel)
    grad = torch.ones(tokens * TOP, HIDDEN, device=DEVICE, dtype=dtype)
    forward = timed(lambda: experts(state, mm), repeats)
    both = timed(lambda: experts(state, mm).backward(grad), repeats)
    busy = gpu_seconds(lambda: experts(state, mm).backward(grad))  # the kernels alone, without launch gaps
    flops, bytes_ = work(tokens, dtype.itemsize)
    return {"kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "rows": tokens * TOP,
            "forward_ms": forward * 1e3, "forward_backward_ms": both * 1e3, "gpu_busy_ms": busy * 1e3,
            "flops": flops, "bytes": bytes_, "tflops_per_s_on_gpu": flops / busy / 1e12}  # fmt: skip


def same_output(dtype: torch.dtype, tokens: int) -> float:
    """Largest difference of the Triton path from the per-expert loop, relative to the output's largest value."""
    state = layer(dtype, tokens)
    got, expected = (experts(state, mm).float() for mm in (kernel_matmul("triton"), grouped_mm_reference))
    return ((got - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 600, 2400])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/grouped_kernels.json"))
    args = parser.parse_args()
    hopper = CUDA and torch.cuda.get_device_capability()[0] >= 9
    plans = [("native", torch.bfloat16)] * hopper + [("triton", torch.bfloat16), ("triton", torch.float16),
                                                     ("loop", torch.float16)]  # fmt: skip
    if not CUDA:
        plans = []  # a dry run: the output check alone (the interpreter runs a layer in minutes)
    print("| kernel | dtype | tokens | fwd ms | fwd+bwd ms | GPU busy ms | TFLOP/s on the GPU |\n|---|---|---|---|---|---|---|",
          flush=True)  # fmt: skip
    rows = []
    for kernel, dtype in plans:
        for tokens in args.tokens:
            rows.append(row(kernel, dtype, tokens, args.repeats if kernel != "loop" else 3))
            r = rows[-1]
            print(f"| {kernel} | {r['dtype']} | {tokens} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} "
                  f"| {r['gpu_busy_ms']:.3f} | {r['tflops_per_s_on_gpu']:.1f} |", flush=True)  # fmt: skip
    checks = {f"triton_vs_loop_{d}": same_output(getattr(torch, d), 600 if CUDA else 1)
              for d in (("bfloat16", "float16") if CUDA else ("float32",))}  # fmt: skip
    print(checks)
    write_json(Path(args.json), {"device": torch.cuda.get_device_name() if CUDA else "cpu (dry run)", "commit": commit(),
                "rows": rows, "max_relative_difference": checks})  # fmt: skip


if __name__ == "__main__":
    main()
