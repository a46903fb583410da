"""The optimizer and the linear warmup/decay schedule."""

import pytest
import torch

from dsocr_lightning.optim import build_optimizer, linear_warmup_decay


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
    assert type(optimizer).__name__ == "AdamW8bit"
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert (param < 1).all()
