"""8-bit AdamW (bitsandbytes; it runs on CPU too) or torch AdamW, and the linear warmup/decay schedule."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

OptimizerName = Literal["adamw8bit", "adamw"]


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: OptimizerName = "adamw8bit",
    lr: float = 2e-4,
    weight_decay: float = 0.001,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over `params`, weight decay on all of them (LoRA has no biases or norms)."""
    params = list(params)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def linear_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """0 -> 1 over `warmup_steps`, then 1 -> 0 at `total_steps` (the HF "linear" schedule)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Scheduler stepped once per optimizer step; step 0 (the first update) runs at lr 0, as in HF Trainer."""
    return LambdaLR(optimizer, lambda step: linear_factor(step, warmup_steps, total_steps))
