"""The trainable tensors two ways: this run's (what the optimizer steps: one stacked tensor per MoE projection where
the grouped experts run) and the reference's (transformers' per-expert loop + peft: one tensor per expert). Checkpoints
name and order them as the reference does, whatever kernel wrote them, so a checkpoint of one path validates and
resumes on any other (optim.py converts the optimizer state the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..fast.moe import PICKS, STACKED_NAME, expert_lora_views, is_picks, per_expert_state_dict
from .checks import ConfigError
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


@dataclass
class PickedExperts:
    """Each MoE layer's record of the experts a step's tokens picked (fast/moe.py: RecordPicks) and the stacked
    LoRA tensors it gates, found once (a walk over the model's ~26,000 modules costs tens of milliseconds)."""

    layers: list[tuple[nn.Parameter, list[nn.Parameter]]]  # (record, its layer's stacked A and B tensors)

    @classmethod
    def of(cls, model: nn.Module) -> PickedExperts:
        named = dict(model.named_parameters())
        stacks = [(name, param) for name, param in named.items() if STACKED_NAME.match(name) and param.requires_grad]
        records = {name.removesuffix(f".{PICKS}"): param for name, param in named.items() if is_picks(name)}
        return cls(
            [(record, [p for name, p in stacks if layer_of(name) == layer]) for layer, record in records.items()]
        )

    def tell(self, optimizer: Any) -> None:
        """Give the optimizer, for every stacked tensor, the rows that step now: the experts this optimizer step's
        tokens picked; the reference's others have no gradient (one read back for all layers)."""
        recorded = [(record.grad, stacks) for record, stacks in self.layers if record.grad is not None]
        if not recorded or not hasattr(optimizer, "active"):
            return
        rows = torch.stack([grad for grad, _ in recorded]).gt(0).tolist()
        optimizer.active = {param: picked for (_, stacks), picked in zip(recorded, rows) for param in stacks}

    def zero(self) -> None:
        """A new optimizer step records anew (the optimizer's own zero_grad does not know these)."""
        for record, _ in self.layers:
            if record.grad is not None:
                record.grad.zero_()


def layer_of(stacked_name: str) -> str:
    return stacked_name.rsplit(".", 1)[0]
