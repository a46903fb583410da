"""The Triton grouped matmuls (fast/triton_grouped.py) equal their per-expert references, forward and backward, and
compile for the GPUs they will meet: Turing (sm_75, the T4) and Ampere (sm_80) with the tiles they pick there.

On the CPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1): the same kernel code,
tile for tile, with numpy doing the arithmetic. Compiling for a GPU target needs no GPU (a subprocess without the
interpreter).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COUNTS = [0, 13, 5, 0, 20, 1, 11, 0, 37]  # uneven, with experts no row picked (first and last included)


def routed(k: int, n_out: int, dtype: torch.dtype, counts: list[int] = COUNTS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(len(counts), n_out, k, generator=gen).div(k**0.5).to(DEVICE, dtype)
    return x, w, offs.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("trans_w", [True, False])
@pytest.mark.parametrize(("k", "n_out"), [(24, 40), (64, 16), (16, 96)])
def test_grouped_mm_equals_one_matmul_per_expert(dtype, trans_w, k, n_out):
    from dsocr_lightning.fast.triton_grouped import grouped_mm, grouped_mm_reference

    x, w, offs = routed(k, n_out, dtype)
    w = w if trans_w else w.transpose(1, 2).contiguous()  # [E, K, Nout]
    got = grouped_mm(x, w, offs, trans_w).float()
    expected = grouped_mm_reference(x.float(), w.float(), offs, trans_w)
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16 rounds the output once (accumulation is float32)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_wgrad_equals_per_expert_outer_products(dtype):
    from dsocr_lightning.fast.triton_grouped import grouped_wgrad, grouped_wgrad_reference

    a, _, offs = routed(16, 8, dtype)
    b, _, _ = routed(40, 8, dtype, seed=1)
    got = grouped_wgrad(a, b, offs).float()
    expected = grouped_wgrad_reference(a.float(), b.float(), offs)
    assert got.shape == (len(COUNTS), 16, 40) and not got[0].any() and not got[-2].any()  # no rows: zeros
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_gradients_equal_the_references():
    """Autograd through the custom op: dx by the other transpose, dw by the grouped outer products."""
    from dsocr_lightning.fast.triton_grouped import grouped_mm, grouped_mm_reference

    x, w, offs = routed(24, 40, torch.float32)
    grad = torch.randn(x.shape[0], 40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = []
    for fn in (grouped_mm, grouped_mm_reference):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(xx, ww, offs, True).backward(grad)
        results.append((xx.grad, ww.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_tile_reads_no_other_experts_rows():
    """Row tiles stop at their expert's end: a tile of 16 over groups of 1, 2 and 17 rows."""
    from dsocr_lightning.fast.triton_grouped import grouped_mm, grouped_mm_reference

    x, w, offs = routed(16, 16, torch.float32, counts=[1, 2, 17])
    torch.testing.assert_close(grouped_mm(x, w, offs, True), grouped_mm_reference(x, w, offs, True))


COMPILE = """
import json, re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsocr_lightning.fast import triton_grouped as tg

def build(fn, signature, constants, tiles, capability):
    sig = dict(signature) | {name: "constexpr" for name in constants}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants),
                            target=GPUTarget("cuda", capability[0] * 10 + capability[1], 32),
                            options={"num_warps": tiles.warps, "num_stages": tiles.stages})
    ptx = kernel.asm["ptx"]
    return {"shared": kernel.metadata.shared, "mma": sorted(set(re.findall(r"mma\\.sync\\.aligned\\.m\\d+n\\d+k\\d+", ptx))),
            "tiles": [tiles.m, tiles.n, tiles.k, tiles.warps, tiles.stages]}

mm_sig = {"x_ptr": "*fp16", "w_ptr": "*fp16", "y_ptr": "*fp16", "offs_ptr": "*i32", **{n: "i32" for n in (
    "E", "K", "N_OUT", "stride_xm", "stride_xk", "stride_we", "stride_wk", "stride_wn", "stride_ym", "stride_yn")}}
wg_sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "out_ptr": "*fp16", "offs_ptr": "*i32", **{n: "i32" for n in (
    "P", "Q", "stride_am", "stride_ap", "stride_bm", "stride_bq", "stride_oe", "stride_op", "stride_oq")}}
out = {}
for capability in [(7, 5), (8, 0)]:
    # DeepSeek-OCR's expert shapes: training (56 rows an expert), decoding one token (rows 1), LoRA (K or N = 16)
    for name, rows, n_out, k in [("train_up", 56, 896, 1280), ("train_down", 56, 1280, 896), ("decode", 1, 896, 1280),
                                 ("lora_a", 56, 16, 1280), ("lora_b", 56, 896, 16)]:
        t = tg.mm_tiles(capability, rows, n_out, k, 2)
        out[f"sm{capability[0]}{capability[1]}/mm/{name}"] = build(tg.grouped_mm_kernel, mm_sig, {
            "BLOCK_M": t.m, "BLOCK_N": t.n, "BLOCK_K": t.k, "E_POW2": 64, "IEEE": False}, t, capability)
    for name, p, q in [("lora_a", 16, 1280), ("lora_b", 896, 16)]:
        t = tg.wgrad_tiles(capability, p, q, 2)
        out[f"sm{capability[0]}{capability[1]}/wgrad/{name}"] = build(tg.grouped_wgrad_kernel, wg_sig, {
            "BLOCK_P": t.m, "BLOCK_Q": t.n, "BLOCK_K": t.k, "IEEE": False}, t, capability)
out["triton"] = triton.__version__
print(json.dumps(out))
"""
SHARED_LIMIT = {"sm75": 64 * 1024, "sm80": 163 * 1024}  # bytes of shared memory a block may use (T4, A100)


def test_kernels_compile_for_turing_and_ampere_with_their_tiles():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", COMPILE]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    built = json.loads(result.stdout.strip().splitlines()[-1])
    version = tuple(int(part) for part in built.pop("triton").split(".")[:2])
    for name, kernel in built.items():
        target = name.split("/")[0]
        assert kernel["shared"] <= SHARED_LIMIT[target], (name, kernel)
        if target == "sm80":
            assert kernel["mma"] == ["mma.sync.aligned.m16n8k16"], (name, kernel)  # tensor cores
        elif version <= (3, 2):
            assert kernel["mma"] == ["mma.sync.aligned.m16n8k8"], (name, kernel)
        else:  # Triton 3.4+ lowers tl.dot on Turing to FMA on the CUDA cores (benchmarks/README.md: what it costs)
            assert kernel["mma"] == [], (name, kernel)


def test_the_tile_choice_traces_under_torch_compile_without_a_warning():
    """The launches look up the GPU's capability; dynamo must take it as a constant (a cached function made it
    warn of "silent incorrectness" in every fit log)."""
    import warnings

    from dsocr_lightning.fast.triton_grouped import capability_of

    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * capability_of(x.device)[0]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(scale, backend="eager", fullgraph=True)(torch.ones(2))
    assert out.tolist() == [8.0, 8.0]
    assert not [w for w in caught if "Dynamo" in str(w.message)], [str(w.message) for w in caught]
