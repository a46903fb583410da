"""8-bit AdamW (bitsandbytes; it runs on CPU too) or torch AdamW, and the linear warmup/decay schedule.

The grouped experts (fast/moe.py) train each MoE projection's LoRA as one stacked tensor [E, ...] where the reference
(transformers' per-expert loop + peft) trains E tensors. Both optimizers here update a stacked tensor exactly as the
reference updates its E tensors: bitsandbytes' per-tensor rules (32-bit state under `min_8bit_size` elements, 8-bit
blocks of 256 that never straddle two tensors) apply per expert, and an expert that no token picked in a step (its
LoRA B gradient all zeros: no gradient at all in the reference) is not updated and keeps its own step count. Where
every expert is alike (the common case) the stack is one call. Their `state_dict` is in the reference's layout (one
entry per expert tensor, in its order: `ReferenceLayout`), so a checkpoint resumes whichever kernel runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.optim.adam import adam as adam_update
from torch.optim.lr_scheduler import LambdaLR

OptimizerName = Literal["adamw8bit", "adamw"]
BLOCK = 256  # bitsandbytes' quantisation block of 8-bit optimizer state


@dataclass
class ReferenceLayout:
    """Where each optimizer tensor sits among the reference's: tensor i covers reference slots `slots[i]` (one, or one
    per expert of a stacked tensor, in expert order); `size` reference tensors in all."""

    slots: list[list[int]]
    size: int

    @classmethod
    def identity(cls, count: int) -> ReferenceLayout:
        return cls([[i] for i in range(count)], count)


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: OptimizerName = "adamw8bit",
    lr: float = 2e-4,
    weight_decay: float = 0.001,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    layout: ReferenceLayout | None = None,
) -> torch.optim.Optimizer:
    """AdamW over `params`, weight decay on all of them (LoRA has no biases or norms); `layout` says which of them
    stack several of the reference's tensors (none by default)."""
    params = list(params)
    layout = layout or ReferenceLayout.identity(len(params))
    if name == "adamw8bit":
        return stacked_adamw8bit()(params, layout, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return StackedAdamW(params, layout, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """0 -> lr over `warmup_steps`, then lr -> 0 at `total_steps`, stepped once per optimizer step; step 0 (the first
    update) runs at lr 0. It is HF Trainer's own "linear" schedule, the reference's, hence transformers' function."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)


class Stacks:
    """What both optimizers share: which parameters stack rows, which rows may step now, and the conversion of
    their state to and from the reference's layout. Per-row state is split or joined by `split_row` /
    `join_rows`, which each optimizer defines for its state."""

    def setup_stacks(self, params: list[torch.nn.Parameter], layout: ReferenceLayout) -> None:
        if len(layout.slots) != len(params):
            raise ValueError(f"layout has {len(layout.slots)} entries for {len(params)} parameters")
        self.layout = layout
        self.rows = {p: len(slots) for p, slots in zip(params, layout.slots) if len(slots) > 1}
        self.active: dict[torch.nn.Parameter, list[bool]] = {}  # stacked param -> rows that step now

    def live_rows(self, p: torch.nn.Parameter) -> list[int]:
        return [r for r, on in enumerate(self.active.get(p) or [True] * self.rows[p]) if on]

    def runs(self, p: torch.nn.Parameter, steps: list[int], joinable: bool) -> list[tuple[int, int]]:
        """[start, end) runs of consecutive rows that step now at the same count: one update call each (`joinable`:
        rows may share a call at all), so a stack with every expert alike is one call, and an expert that no token
        picked costs two more, not one per row."""
        runs: list[tuple[int, int]] = []
        for row in self.live_rows(p):
            if joinable and runs and runs[-1][1] == row and steps[runs[-1][0]] == steps[row]:
                runs[-1] = (runs[-1][0], row + 1)
            else:
                runs.append((row, row + 1))
        return runs

    def to_reference(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """This optimizer's state_dict (one param group) in the reference's layout."""
        (group,) = state_dict["param_groups"]
        state = {}
        for index, slots in enumerate(self.layout.slots):
            entry = state_dict["state"].get(group["params"][index])
            if entry is None:
                continue
            rows = [entry] if len(slots) == 1 else [self.split_row(entry, r, len(slots)) for r in range(len(slots))]
            state.update({slot: row for slot, row in zip(slots, rows) if row is not None})
        return {"state": state, "param_groups": [group | {"params": list(range(self.layout.size))}]}

    def from_reference(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        (group,) = state_dict["param_groups"]
        if len(group["params"]) != self.layout.size:
            raise ValueError(
                f"the checkpoint's optimizer holds {len(group['params'])} tensors where this model trains "
                f"{self.layout.size} (the reference's per-expert count): a checkpoint of another LoRA setup"
            )  # fmt: skip
        saved = [state_dict["state"].get(slot) for slot in group["params"]]
        state = {}
        for index, (slots, param) in enumerate(zip(self.layout.slots, self.param_groups[0]["params"])):
            rows = [saved[slot] for slot in slots]
            entry = rows[0] if len(slots) == 1 else self.join_rows(rows, param)
            if entry is not None:
                state[index] = entry
        return {"state": state, "param_groups": [group | {"params": list(range(len(self.layout.slots)))}]}


class StackedAdamW(Stacks, torch.optim.AdamW):
    """torch's AdamW (its functional update, its defaults) with stacked parameters updated row by row where rows
    differ, as one tensor where they do not."""

    def __init__(self, params: list[torch.nn.Parameter], layout: ReferenceLayout, **kwargs: Any) -> None:
        torch.optim.AdamW.__init__(self, params, **kwargs)
        self.setup_stacks(params, layout)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lists: dict[str, list[torch.Tensor]] = {k: [] for k in ("params", "grads", "m", "v", "steps")}
        self.write_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        group = self.param_groups[0]
        for p in group["params"]:
            if p.grad is not None:
                self.add_rows(p, lists)
        if lists["params"]:
            beta1, beta2 = group["betas"]
            adam_update(
                lists["params"], lists["grads"], lists["m"], lists["v"], [], lists["steps"], foreach=group["foreach"],
                decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
            )  # fmt: skip
        for rows, count in self.write_back:
            rows.fill_(count.item())
        return loss

    def add_rows(self, p: torch.nn.Parameter, lists: dict[str, list[torch.Tensor]]) -> None:
        state = self.state[p]
        if not state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            state["step"] = torch.zeros(self.rows.get(p, 1)) if p in self.rows else torch.tensor(0.0)
        if p not in self.rows:
            tensors = [(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"])]
        else:  # a run's step as a 0-d tensor of its own, counted up by the update, then written back to its rows
            runs = self.runs(p, state["step"].tolist(), joinable=True)
            counts = [state["step"][a].clone() for a, _ in runs]
            self.write_back += [(state["step"][a:b], count) for (a, b), count in zip(runs, counts)]
            tensors = [(p[a:b], p.grad[a:b], state["exp_avg"][a:b], state["exp_avg_sq"][a:b], count)
                       for (a, b), count in zip(runs, counts)]  # fmt: skip
        for key, values in zip(("params", "grads", "m", "v", "steps"), zip(*tensors)):
            lists[key].extend(values)

    def split_row(self, entry: dict[str, Any], row: int, rows: int) -> dict[str, Any] | None:
        if entry["step"][row] == 0:
            return None  # this expert never stepped: the reference has no state for it
        return {"step": entry["step"][row].clone(), "exp_avg": entry["exp_avg"][row].clone(),
                "exp_avg_sq": entry["exp_avg_sq"][row].clone()}  # fmt: skip

    def join_rows(self, rows: list[dict[str, Any] | None], param: torch.nn.Parameter) -> dict[str, Any] | None:
        if all(row is None for row in rows):
            return None
        zeros = torch.zeros_like(param[0])
        pick = lambda key: torch.stack([row[key].to(zeros) if row else zeros for row in rows])
        steps = torch.stack([row["step"].float() if row else torch.tensor(0.0) for row in rows])
        return {"step": steps, "exp_avg": pick("exp_avg"), "exp_avg_sq": pick("exp_avg_sq")}

    def state_dict(self) -> dict[str, Any]:
        return self.to_reference(super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(self.from_reference(state_dict))


def stacked_adamw8bit() -> type:
    """The class below, built on first use: bitsandbytes is imported only when its optimizer is asked for."""
    global StackedAdamW8bit
    if StackedAdamW8bit is None:
        import bitsandbytes as bnb

        StackedAdamW8bit = type("StackedAdamW8bit", (Stacks8bit, bnb.optim.AdamW8bit), {})
    return StackedAdamW8bit


StackedAdamW8bit: type | None = None


class Stacks8bit(Stacks):
    """bitsandbytes' AdamW8bit with stacked parameters: each row gets the state the reference's tensor would (32-bit
    under `min_8bit_size` elements, else 8-bit with its own blocks) and its own step count. One call updates each run
    of rows that step now at the same count, where the rows' blocks do not straddle (32-bit state, or rows of a
    multiple of 256 elements: always at DeepSeek-OCR's sizes with an even LoRA rank); else one call a row."""

    def __init__(self, params: list[torch.nn.Parameter], layout: ReferenceLayout, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.setup_stacks(params, layout)

    def row_bits(self, config: dict[str, Any], p: torch.Tensor) -> int:
        return 8 if config["optim_bits"] == 8 and p[0].numel() >= config["min_8bit_size"] else 32

    @torch.no_grad()
    def init_state(self, group: dict, p: torch.nn.Parameter, gindex: int, pindex: int) -> None:
        if p not in self.rows:
            return super().init_state(group, p, gindex, pindex)
        config = self.get_config(gindex, pindex, group)
        if config["max_unorm"] > 0.0:
            raise ValueError("max_unorm is not supported for stacked expert tensors")
        state = self.state[p]
        state["step"], state["row_steps"] = 0, [0] * self.rows[p]
        dtype = torch.uint8 if self.row_bits(config, p) == 8 else torch.float32
        state["state1"], state["state2"] = (torch.zeros_like(p, dtype=dtype) for _ in range(2))
        if dtype == torch.uint8:
            if "dynamic" not in self.name2qmap:
                self.fill_qmap()
            state["qmap1"] = self.name2qmap["dynamic"] = self.name2qmap["dynamic"].to(p.device)
            state["qmap2"] = self.name2qmap["udynamic"] = self.name2qmap["udynamic"].to(p.device)
            blocks = self.rows[p] * math.ceil(p[0].numel() / BLOCK)
            state["absmax1"], state["absmax2"] = (
                torch.zeros(blocks, dtype=torch.float32, device=p.device) for _ in range(2)
            )

    @torch.no_grad()
    def update_step(self, group: dict, p: torch.nn.Parameter, gindex: int, pindex: int) -> None:
        if p not in self.rows:
            return super().update_step(group, p, gindex, pindex)
        state, config = self.state[p], self.get_config(gindex, pindex, group)
        p.grad = p.grad.contiguous()  # (the same tensor when it is: gradient buffers stay in place)
        steps = state["row_steps"]
        # rows share a call where their blocks do not straddle: 32-bit state, or rows of whole 256-element blocks
        aligned = p[0].numel() % BLOCK == 0
        runs = self.runs(p, steps, joinable=state["state1"].dtype == torch.float32 or aligned)
        if len(runs) > 1 and aligned and state["state1"].dtype == torch.uint8:
            live = [row for start, end in runs for row in range(start, end)]  # one pass, not a call per run
            for row in live:
                steps[row] += 1
            self.update_stack(config, p, live, steps)
        else:
            for start, end in runs:
                steps[start:end] = [steps[start] + 1] * (end - start)
                self.update_rows(config, p, start, end, steps[start])
        state["step"] = max(steps)

    def update_rows(self, config: dict[str, Any], p: torch.nn.Parameter, start: int, end: int, step: int) -> None:
        """bitsandbytes' update of rows start:end (one call), with their slices of the stack's state."""
        from bitsandbytes import functional as F

        state, (beta1, beta2) = self.state[p], config["betas"][:2]
        rows = slice(start, end)
        grad, param, s1, s2 = p.grad[rows], p.data[rows], state["state1"][rows], state["state2"][rows]
        if s1.dtype == torch.float32:
            F.optimizer_update_32bit(self.optimizer_name, grad, param, s1, beta1, config["eps"], step, config["lr"],
                                     s2, beta2, 0.0, 0.0, config["weight_decay"], 1.0, None, max_unorm=0.0,
                                     skip_zeros=config["skip_zeros"])  # fmt: skip
            return
        blocks = slice(start * (n := math.ceil(p[0].numel() / BLOCK)), end * n)
        F.optimizer_update_8bit_blockwise(self.optimizer_name, grad, param, s1, s2, beta1, beta2, 0.0, 0.0,
                                          config["eps"], step, config["lr"], state["qmap1"], state["qmap2"],
                                          state["absmax1"][blocks], state["absmax2"][blocks], config["weight_decay"],
                                          gnorm_scale=1.0, skip_zeros=config["skip_zeros"])  # fmt: skip

    def update_stack(self, config: dict[str, Any], p: torch.nn.Parameter, live: list[int], steps: list[int]) -> None:
        """The live rows of an 8-bit stack of whole blocks, each at its own step count, in one pass: bitsandbytes'
        own composition of its update (dequantize, Adam, requantize: its CPU kernel's order of operations) with
        per-row bias corrections; the other rows keep their bytes. As its CUDA kernel does, a non-finite gradient
        element zeroes that element's state and leaves its weight alone. ~25 launches whatever the rows' counts."""
        ops, state, (beta1, beta2) = torch.ops.bitsandbytes, self.state[p], config["betas"][:2]
        lr, eps, decay = config["lr"], config["eps"], config["weight_decay"]
        correction2, scale, on = row_factors(p, live, steps, beta1, beta2, lr)
        m = ops.dequantize_blockwise(state["state1"], state["absmax1"], state["qmap1"], BLOCK, torch.float32)
        v = ops.dequantize_blockwise(state["state2"], state["absmax2"], state["qmap2"], BLOCK, torch.float32)
        grad = p.grad.float()
        finite = grad.isfinite()
        m = torch.where(finite, m.mul_(beta1).add_(grad, alpha=1.0 - beta1), 0.0)
        v = torch.where(finite, v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2), 0.0)
        denom = (v.sqrt() / correction2).add_(eps)
        new = p.detach().float().mul(1.0 - lr * decay) if decay > 0.0 else p.detach().float().clone()
        new.add_(scale * m / denom)
        p.data.copy_(torch.where(on & finite, new, p.detach()))
        blocks = on.view(-1, 1).expand(-1, p[0].numel() // BLOCK).flatten()
        for key, value in (("1", m), ("2", v)):
            codes, absmax = ops.quantize_blockwise(value, state[f"qmap{key}"], BLOCK)
            state[f"state{key}"].copy_(torch.where(on, codes.view_as(p), state[f"state{key}"]))
            state[f"absmax{key}"].copy_(torch.where(blocks, absmax, state[f"absmax{key}"]))

    def split_row(self, entry: dict[str, Any], row: int, rows: int) -> dict[str, Any] | None:
        quant = entry[self._FSDP_WRAPPED_QUANT_STATE_KEY]
        if entry["row_steps"][row] == 0:
            return None  # never stepped: the reference has no state for this expert
        out = {"state1": quant["state1"][row].clone(), "state2": quant["state2"][row].clone()}
        if "absmax1" in quant:
            out |= {key: quant[key].view(rows, -1)[row].clone() for key in ("absmax1", "absmax2")}
            out |= {key: quant[key] for key in ("qmap1", "qmap2")}
        return {"step": entry["row_steps"][row], self._FSDP_WRAPPED_QUANT_STATE_KEY: out}

    def join_rows(self, rows: list[dict[str, Any] | None], param: torch.nn.Parameter) -> dict[str, Any] | None:
        given = [row for row in rows if row is not None]
        if not given:
            return None
        quants = [row[self._FSDP_WRAPPED_QUANT_STATE_KEY] if row else None for row in rows]
        first = next(q for q in quants if q is not None)

        def stack(key: str) -> torch.Tensor:
            zeros = torch.zeros_like(first[key])
            return torch.stack([q[key] if q is not None else zeros for q in quants])

        quant = {key: stack(key) for key in ("state1", "state2")}
        if "absmax1" in first:
            quant |= {key: stack(key).flatten() for key in ("absmax1", "absmax2")}
            quant |= {key: first[key] for key in ("qmap1", "qmap2")}
        steps = [row["step"] if row else 0 for row in rows]
        return {"step": max(steps), "row_steps": steps, self._FSDP_WRAPPED_QUANT_STATE_KEY: quant}

    def state_dict(self) -> dict[str, Any]:
        return self.to_reference(super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
        super().load_state_dict(self.from_reference(state_dict), move_to_device)


def row_factors(p: torch.Tensor, live: list[int], steps: list[int], beta1: float, beta2: float, lr: float) -> tuple:
    """Per row of a stack, shaped to broadcast over it: Adam's sqrt(1 - beta2^t), -lr / (1 - beta1^t) (in float64
    on the host, as bitsandbytes computes them, then float32) and whether the row steps now. On a GPU they travel
    from pinned memory without waiting: a plain copy would sync the stream once per stack and step."""
    counts, live = [max(n, 1) for n in steps], set(live)  # (a row that never stepped is not live: any count serves)
    rows = torch.tensor([[math.sqrt(1.0 - beta2**n), -lr / (1.0 - beta1**n), r in live] for r, n in enumerate(counts)])
    rows = rows.pin_memory().to(p.device, non_blocking=True) if p.is_cuda else rows
    correction2, scale, on = rows.T.reshape(3, -1, *[1] * (p.dim() - 1))
    return correction2, scale, on.bool()
