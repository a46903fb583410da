"""The trainable tensors two ways: this run's (what the optimizer steps: one stacked tensor per MoE projection where
the grouped experts run) and the reference's (transformers' per-expert loop + peft: one tensor per expert). Checkpoints
name and order them as the reference does, whatever kernel wrote them, so a checkpoint of one path validates and
resumes on any other (optim.py converts the optimizer state the same way).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checks import ConfigError
from .fast.moe import PICKS, STACKED_NAME, expert_lora_views, is_picks, per_expert_state_dict
from .optim import ReferenceLayout


def reference_layout(module: nn.Module) -> tuple[list[str], ReferenceLayout, list[nn.Parameter]]:
    """(the reference's trainable names in its order, this run's trainable parameters (the optimizer's), where each
    of those sits among the reference's)."""
    views = expert_lora_views(module)
    named = [(n, p) for n, p in module.named_parameters() if not is_picks(n)]
    view_ids = {id(view) for stack in views.values() for view in stack}
    names = [n for n, p in named if (p.requires_grad and n not in views) or id(p) in view_ids]
    index, name_of = {n: i for i, n in enumerate(names)}, {id(p): n for n, p in named}
    units = [(n, p) for n, p in named if p.requires_grad]
    slots = [[index[name_of[id(v)]] for v in views[n]] if n in views else [index[n]] for n, _ in units]
    return names, ReferenceLayout(slots, len(names)), [p for _, p in units]


def reference_state_dict(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """A module's state_dict reduced to the reference's trainable weights (the per-expert views, not the stacks)."""
    return {name: state[name] for name in names}


def check_loadable(state: dict[str, torch.Tensor], names: list[str], where: str) -> dict[str, torch.Tensor]:
    """`state` with every weight this model trains, and nothing else: else a ConfigError naming what differs (a
    checkpoint of an older version, with stacked expert names, is read in the per-expert names)."""
    if any(STACKED_NAME.match(key) for key in state):
        state = per_expert_state_dict(state)
    missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or unexpected:
        raise ConfigError(
            f"{where} does not hold this model's LoRA weights ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} it does not train, e.g. {unexpected[:2]}): a checkpoint of another model, LoRA rank "
            "or target list"
        )
    return state


def active_experts(model: nn.Module, optimizer: Any) -> None:
    """Tell the optimizer which rows of each stacked LoRA tensor step now: the experts this optimizer step's tokens
    picked (the MoE layer's record, fast/moe.py: RecordPicks); the reference's others have no gradient."""
    stacks = named_stacks(model)
    if not stacks or not hasattr(optimizer, "active"):
        return
    picks = {name.removesuffix(f".{PICKS}"): p.grad for name, p in model.named_parameters() if is_picks(name)}
    layers = [layer for layer, grad in picks.items() if grad is not None]
    rows = torch.stack([picks[layer] for layer in layers]).gt(0).tolist() if layers else []  # one read back
    active = dict(zip(layers, rows))
    optimizer.active = {param: active[layer_of(name)] for name, param in stacks if layer_of(name) in active}


def zero_picks(model: nn.Module) -> None:
    """A new optimizer step records anew (the optimizer's own zero_grad does not know these)."""
    for name, param in model.named_parameters():
        if is_picks(name) and param.grad is not None:
            param.grad.zero_()


def layer_of(stacked_name: str) -> str:
    return stacked_name.rsplit(".", 1)[0]


def named_stacks(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every stacked LoRA tensor of `model`."""
    return [(n, p) for n, p in model.named_parameters() if STACKED_NAME.match(n) and p.requires_grad]
