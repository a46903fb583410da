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


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """0 -> lr over `warmup_steps`, then lr -> 0 at `total_steps`, stepped once per optimizer step; step 0 (the first
    update) runs at lr 0. It is HF Trainer's own "linear" schedule, the reference's, hence transformers' function."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
