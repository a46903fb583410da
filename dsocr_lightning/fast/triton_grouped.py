"""Grouped matmuls for mixture-of-experts layers as Triton kernels: every NVIDIA GPU from Turing (sm_75) on, fp16,
bf16 (sm_80+) and float32, where torch's own `_grouped_mm` has a kernel only on Hopper in bf16.

Shapes: N rows of `x` sorted by expert, E experts, `offs` [E] int32 the cumulative row counts (group e is rows
offs[e-1]:offs[e]), as `torch._grouped_mm` takes them. Two kernels:
- `grouped_mm(x [N, K], w [E, ...], offs, trans_w)`: y[rows of e] = x[rows of e] @ w[e]^T (trans_w, w [E, Nout, K],
  nn.Linear's layout) or @ w[e] (w [E, K, Nout]). Row tiles never straddle two experts: each program finds its
  expert from the tile counts of all groups (a prefix sum over E, in registers), so nothing is read back to the host
  and the launch is the same whatever the routing (CUDA-graph safe).
- `grouped_wgrad(a [N, P], b [N, Q], offs)`: out[e] = a[rows of e]^T @ b[rows of e], [E, P, Q]: the weight gradient;
  an expert no row picked gets zeros.
Both accumulate in float32 and round once to the inputs' dtype. `grouped_mm` carries its autograd (dx by `grouped_mm`
with the other transpose, dw by `grouped_wgrad`).
The plain references are `grouped_mm_reference` / `grouped_wgrad_reference` below; tests/test_triton_grouped.py
compares outputs and gradients on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

On Turing, Triton 3.1-3.2 lower `tl.dot` in fp16 to tensor-core `mma.m16n8k8`; Triton 3.4 and newer lower it to
FMA on the CUDA cores there (checked by compiling for sm_75: tests/test_triton_grouped.py). Ampere and newer get
`mma.m16n8k16` (wgmma on Hopper) from every version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def expert_tile(offs_ptr, tile, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """(expert, first row, end row) of row tile `tile`: the groups' tiles laid end to end, expert-major."""
    e = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e, mask=e < E, other=0)
    starts = tl.load(offs_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
    tiles = tl.where(e < E, tl.cdiv(ends - starts, BLOCK_M), 0)
    expert = tl.sum((tl.cumsum(tiles, 0) <= tile).to(tl.int32), 0)  # == E past the last tile: no rows
    first_tile = tl.sum(tl.where(e < expert, tiles, 0), 0)
    start = tl.sum(tl.where(e == expert, starts, 0), 0)
    end = tl.sum(tl.where(e == expert, ends, 0), 0)
    return expert, start + (tile - first_tile) * BLOCK_M, end


@triton.jit
def grouped_mm_kernel(
    x_ptr, w_ptr, y_ptr, offs_ptr, E, K, N_OUT,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    expert, row0, row_end = expert_tile(offs_ptr, tl.program_id(0), E, BLOCK_M, E_POW2)
    if row0 >= row_end:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < row_end, cols < N_OUT
    x_tile = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
    w_tile = w_ptr + expert.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks + k0 < K
        a = tl.load(x_tile, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_tile, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_tile += BLOCK_K * stride_xk
        w_tile += BLOCK_K * stride_wk
    y_tile = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_wgrad_kernel(
    a_ptr, b_ptr, out_ptr, offs_ptr, P, Q,
    stride_am, stride_ap, stride_bm, stride_bq, stride_oe, stride_op, stride_oq,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    expert = tl.program_id(0)
    tiles_q = tl.cdiv(Q, BLOCK_Q)
    ps = (tl.program_id(1) // tiles_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = (tl.program_id(1) % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offs_ptr + expert)
    ks = tl.arange(0, BLOCK_K)
    p_ok, q_ok = ps < P, qs < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        rows = k0 + ks
        row_ok = rows < end
        a_t = tl.load(a_ptr + rows.to(tl.int64)[None, :] * stride_am + ps[:, None] * stride_ap,
                      mask=p_ok[:, None] & row_ok[None, :], other=0.0)  # [P, K]: a transposed  # fmt: skip
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * stride_bm + qs[None, :] * stride_bq,
                    mask=row_ok[:, None] & q_ok[None, :], other=0.0)  # fmt: skip
        if IEEE:
            acc = tl.dot(a_t, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a_t, b, acc)
    out = out_ptr + expert.to(tl.int64) * stride_oe + ps[:, None] * stride_op + qs[None, :] * stride_oq
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@dataclass(frozen=True)
class Tiles:
    """One launch's tile shape: rows x columns x reduction, warps, software-pipeline stages."""

    m: int
    n: int
    k: int
    warps: int = 4
    stages: int = 2


def block(size: int, smallest: int, largest: int) -> int:
    """The power of two in [smallest, largest] that covers `size` best (tl.dot needs 16 or more)."""
    return max(smallest, min(largest, triton.next_power_of_2(size)))


def mm_tiles(capability: tuple[int, int], rows_per_expert: int, n_out: int, k: int, itemsize: int) -> Tiles:
    """Tiles for `grouped_mm`: row tiles about as tall as an expert's mean rows (16 when decoding a token, 64 in
    training: compared with thresholds, as the row count is a symbolic size under torch.compile), the widest column
    and reduction tiles the target's shared memory holds over its stages: Turing (64 KB of shared memory a block) 2
    stages of 64 x 64 x 32, Ampere and newer 3 stages of up to 64 x 128 x 64."""
    turing = capability < (8, 0)
    m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64
    n = block(n_out, 16, 64 if turing else 128)
    kk = block(k, 16, 32 if turing or itemsize > 2 else 64)
    return Tiles(m, n, kk, warps=4, stages=2 if turing else 3)


def wgrad_tiles(capability: tuple[int, int], p: int, q: int, itemsize: int) -> Tiles:
    """Tiles for `grouped_wgrad`: LoRA's gradients are thin ([r, in] or [out, r]), so the small side is one tile."""
    turing = capability < (8, 0)
    wide = 64 if turing else 128
    return Tiles(block(p, 16, wide), block(q, 16, wide), 32 if turing or itemsize > 2 else 64,
                 stages=2 if turing else 3)  # fmt: skip


@torch.compiler.assume_constant_result  # a constant to dynamo (torch caches the device's properties itself)
def capability_of(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability; (8, 0) for the CPU interpreter (tests), whose tiles do not matter."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (8, 0)


def launch_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, trans_w: bool) -> torch.Tensor:
    experts = w.shape[0]
    k, n_out = (w.shape[2], w.shape[1]) if trans_w else (w.shape[1], w.shape[2])
    stride_we, stride_wk, stride_wn = (w.stride(0), w.stride(2), w.stride(1)) if trans_w else w.stride()
    y = x.new_empty(x.shape[0], n_out)
    if x.shape[0] == 0:
        return y
    t = mm_tiles(capability_of(x.device), -(-x.shape[0] // experts), n_out, k, x.element_size())
    grid = (triton.cdiv(x.shape[0], t.m) + experts, triton.cdiv(n_out, t.n))  # at most one partial tile per expert
    grouped_mm_kernel[grid](
        x, w, y, offs, experts, k, n_out, x.stride(0), x.stride(1), stride_we, stride_wk, stride_wn,
        y.stride(0), y.stride(1), BLOCK_M=t.m, BLOCK_N=t.n, BLOCK_K=t.k, E_POW2=triton.next_power_of_2(experts),
        IEEE=x.dtype == torch.float32, num_warps=t.warps, num_stages=t.stages,
    )  # fmt: skip
    return y


def launch_grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    experts, p, q = offs.shape[0], a.shape[1], b.shape[1]
    out = a.new_empty(experts, p, q)
    t = wgrad_tiles(capability_of(a.device), p, q, a.element_size())
    grid = (experts, triton.cdiv(p, t.m) * triton.cdiv(q, t.n))
    grouped_wgrad_kernel[grid](
        a, b, out, offs, p, q, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        out.stride(2), BLOCK_P=t.m, BLOCK_Q=t.n, BLOCK_K=t.k, IEEE=a.dtype == torch.float32, num_warps=t.warps,
        num_stages=t.stages,
    )  # fmt: skip
    return out


# ---- autograd -------------------------------------------------------------------------------------------------------
class GroupedMM(torch.autograd.Function):
    """`grouped_mm` with its backward: dx by `grouped_mm` with the other transpose, dw by `grouped_wgrad`. A plain
    Function with plain launches: eagerly a few microseconds of Python a call (a torch custom op cost ~0.1 ms more,
    hundreds of calls a micro-batch), and under torch.compile dynamo traces the Triton kernels, which inductor then
    launches from its own code."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, trans_w: bool) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        ctx.trans_w = trans_w
        return launch_grouped_mm(x, w, offs, trans_w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = launch_grouped_mm(grad, w, offs, not ctx.trans_w)
        if ctx.needs_input_grad[1]:
            dw = launch_grouped_wgrad(grad, x, offs) if ctx.trans_w else launch_grouped_wgrad(x, grad, offs)
        return dx, dw, None, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, trans_w: bool) -> torch.Tensor:
    """x [N, K] sorted by expert -> [N, Nout]: x_e @ w[e]^T (trans_w: w [E, Nout, K]) or x_e @ w[e] (w [E, K, Nout])."""
    return GroupedMM.apply(x, w, offs, trans_w)


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [N, P], b [N, Q] sorted by expert -> [E, P, Q]: a_e^T @ b_e (zeros for an expert without rows)."""
    return launch_grouped_wgrad(a, b, offs)


# ---- the references the kernels must equal -------------------------------------------------------------------------
def groups(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0, *ends[:-1]], ends))


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, trans_w: bool) -> torch.Tensor:
    """One matmul per expert."""
    mats = [w[e].T if trans_w else w[e] for e in range(w.shape[0])]
    return torch.cat([x[s:e] @ mat for (s, e), mat in zip(groups(offs), mats)])


def grouped_wgrad_reference(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch.stack([a[s:e].T @ b[s:e] for s, e in groups(offs)])
