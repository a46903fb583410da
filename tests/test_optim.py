"""The optimizer and the linear warmup/decay schedule."""

import copy

import pytest
import torch

from dsocr_lightning.training.optim import ReferenceLayout, build_optimizer, linear_warmup_decay


def lrs_over(steps: int, warmup: int = 5, total: int = 60) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = build_optimizer([param], "adamw", lr=2e-4)
    scheduler = linear_warmup_decay(optimizer, warmup, total)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_schedule_at_steps_0_5_60():
    lrs = lrs_over(61)
    assert lrs[0] == 0.0  # the first update runs at lr 0, as HF's linear schedule
    assert lrs[1] == pytest.approx(2e-4 / 5)
    assert lrs[5] == pytest.approx(2e-4)
    assert lrs[30] == pytest.approx(2e-4 * 30 / 55)
    assert lrs[60] == 0.0


def test_adamw8bit_steps_on_cpu():
    param = torch.nn.Parameter(torch.ones(64, 64))
    optimizer = build_optimizer([param], "adamw8bit", lr=1e-2, weight_decay=0.0)
    assert isinstance(optimizer, __import__("bitsandbytes").optim.AdamW8bit)
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert (param < 1).all()


# A stacked tensor of E experts [E, *row] against the reference's E tensors: rows under bitsandbytes' 4,096-element
# threshold (32-bit state), rows of whole 256-element blocks (8-bit, one call), rows that straddle blocks (8-bit, row
# by row); in steps 2 and 3 an expert no token picked (no gradient in the reference) must not move.
SHAPES = {"32-bit rows": (16, 12), "8-bit aligned rows": (16, 512), "8-bit straddling rows": (41, 100)}
IDLE = {1: [], 2: [1], 3: [1, 3], 4: []}  # step -> experts without tokens


def experts_pair(name: str, shape: tuple[int, int], rows: int = 4, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(rows, *shape, generator=gen).to(device))
    other = torch.nn.Parameter(torch.randn(7, generator=gen).to(device))  # a plain (not stacked) tensor beside it
    reference = [torch.nn.Parameter(row.clone()) for row in stacked.detach()] + [torch.nn.Parameter(other.clone())]
    layout = ReferenceLayout([list(range(rows)), [rows]], rows + 1)
    fast = build_optimizer([stacked, other], name, lr=1e-2, weight_decay=0.01, layout=layout)
    slow = build_optimizer(reference, name, lr=1e-2, weight_decay=0.01)
    return (stacked, other, fast), (reference, slow)


def step_both(fast_side, slow_side, step: int, idle: list[int] | None = None) -> None:
    (stacked, other, fast), (reference, slow) = fast_side, slow_side
    idle = IDLE[step] if idle is None else idle
    gen = torch.Generator().manual_seed(step)
    grads = torch.randn(stacked.shape, generator=gen).to(stacked.device)
    grads[idle] = 0
    stacked.grad, other.grad = grads.clone(), torch.randn(7, generator=gen).to(stacked.device)
    for row, param in enumerate(reference[:-1]):
        param.grad = None if row in idle else grads[row].clone()
    reference[-1].grad = other.grad.clone()
    fast.active = {stacked: [row not in idle for row in range(stacked.shape[0])]}
    fast.step()
    slow.step()


def assert_same(fast_side, slow_side, atol: float = 1e-7) -> None:
    (stacked, other, _), (reference, _) = fast_side, slow_side
    for row, param in enumerate(reference[:-1]):
        torch.testing.assert_close(stacked[row], param, rtol=0, atol=atol)
    torch.testing.assert_close(other, reference[-1], rtol=0, atol=atol)


def scattered_idle(step: int, rows: int) -> list[int]:
    """Experts without tokens in `step`: a different handful each step, so the rows' step counts scatter."""
    never = [rows - 1]  # an expert no token ever picks: its count stays 0
    return never + torch.randperm(rows - 1, generator=torch.Generator().manual_seed(100 + step))[: step % 5].tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rows_at_scattered_step_counts_step_as_the_references_tensors(device):
    """16 experts idle in changing handfuls for 8 steps: their counts scatter, and the 8-bit stack then steps in
    one pass (optim.py: update_stack) where each run of rows was a call. On the CPU it is bitsandbytes' own CPU
    update, so equal; on a GPU the reference runs bitsandbytes' fused kernel, whose rounding of the same formula
    rounds a few elements' 8-bit state to the adjacent code (measured on an H200: 3 of 8,192 elements 6.4e-5 apart
    after 8 steps; the bound is 1 % of one update at lr 1e-2)."""
    fast_side, slow_side = experts_pair("adamw8bit", SHAPES["8-bit aligned rows"], rows=16, device=device)
    for step in range(1, 9):
        step_both(fast_side, slow_side, step, scattered_idle(step, 16))
        assert_same(fast_side, slow_side, atol=1e-7 if device == "cpu" else 1e-4)
    counts = fast_side[2].state[fast_side[0]]["row_steps"]
    assert len(set(counts)) > 2, counts  # the counts did scatter


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_a_stacked_tensor_steps_as_the_references_tensors(name, shape):
    fast_side, slow_side = experts_pair(name, shape)
    for step in IDLE:
        step_both(fast_side, slow_side, step)
        assert_same(fast_side, slow_side)
    start = experts_pair(name, shape)[0][0]
    assert (fast_side[0] - start).abs().amin(dim=tuple(range(1, start.dim()))).gt(0).all()  # every expert moved


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_optimizer_state_travels_between_stacked_and_per_expert(name, shape):
    """The stacked optimizer's state_dict is the reference's: each side resumes from the other's and both go on
    as one run would."""
    fast_side, slow_side = experts_pair(name, shape)
    for step in (1, 2):
        step_both(fast_side, slow_side, step)
    fresh_fast, fresh_slow = experts_pair(name, shape)
    for (params, optimizer), (source_params, source) in [
        ((fresh_fast[:2], fresh_fast[2]), (fast_side[:2], slow_side[1])),
        ((fresh_slow[0], fresh_slow[1]), (slow_side[0], fast_side[2])),
    ]:
        with torch.no_grad():
            for param, value in zip(params, source_params):
                param.copy_(value)
        optimizer.load_state_dict(copy.deepcopy(source.state_dict()))  # fast from slow, slow from fast (as saved)
    for step in (3, 4):
        step_both(fast_side, slow_side, step)
        step_both(fresh_fast, fresh_slow, step)
    assert_same(fresh_fast, slow_side)
    assert_same(fast_side, fresh_slow)


def test_a_non_finite_gradient_element_leaves_its_weight_alone_as_bitsandbytes_cuda_kernel_does():
    """In the one-pass update an inf or NaN gradient element zeroes that element's state and skips its weight (the
    CUDA kernel's rule), instead of spreading NaN over the block's 256 weights at the next step."""
    fast_side, slow_side = experts_pair("adamw8bit", SHAPES["8-bit aligned rows"], rows=4)
    step_both(fast_side, slow_side, 1, idle=[1])  # the counts now differ: the next step is one pass
    stacked, optimizer = fast_side[0], fast_side[2]
    before = stacked.detach().clone()
    stacked.grad = torch.randn(stacked.shape, generator=torch.Generator().manual_seed(7))
    stacked.grad[0, 0, :2] = torch.tensor([float("inf"), float("nan")])
    optimizer.active = {stacked: [True] * 4}
    optimizer.step()
    assert torch.equal(stacked[0, 0, :2], before[0, 0, :2])
    assert (stacked[0, 0, 2:] != before[0, 0, 2:]).all()
    stacked.grad = torch.randn(stacked.shape, generator=torch.Generator().manual_seed(8))
    optimizer.step()
    assert stacked.isfinite().all()
