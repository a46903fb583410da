"""Sample order that survives a crash: the same order for a seed and epoch, sharded by rank, resumable mid-epoch.

Lightning saves a DataLoader's `state_dict()` in every checkpoint when it has one; ours records how many batches
the fit loop had processed in the current epoch, and on restore skips exactly those. So `fit --ckpt_path ...`
after a kill sees the same batches, in the same order, as a run that was never interrupted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..training.step_tokens import with_step_tokens


class ShardedEpochSampler(Sampler[int]):
    """Indices of one rank: a seeded permutation per epoch (or the natural order), every `world`-th from `rank`.

    Training shards are padded by wrapping around so every rank runs the same number of batches (DDP needs
    that); evaluation shards are not, so no sample is counted twice.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1, pad: bool = True) -> None:
        self.size, self.shuffle, self.seed, self.rank, self.world, self.pad = size, shuffle, seed, rank, world, pad
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def shard(self) -> list[int]:
        order = self.order()
        if self.pad and self.size:
            total = math.ceil(self.size / self.world) * self.world
            order = (order * math.ceil(total / self.size))[:total]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        indices, self.skip = self.shard()[self.skip :], 0  # a restored skip applies to one pass only
        return iter(indices)

    def __len__(self) -> int:
        return len(self.shard())


class ResumableLoader(DataLoader):
    """A DataLoader whose position Lightning checkpoints: (epoch, batches processed this epoch).

    Not torchdata's `StatefulDataLoader`: its state counts the batches its iterator has handed out, and Lightning
    (which saves a loader's state as it is) has always fetched one batch more than the loop processed, to see the
    epoch's end coming, so a resumed run would skip that batch; torchdata would also be one more dependency. This
    one reads the fit loop's own count of processed batches.
    """

    def __init__(self, *args: Any, progress: Callable[[], int] = lambda: 0, step_batches: int = 0,
                 **kwargs: Any) -> None:  # fmt: skip
        """`step_batches` > 0: batches come in optimizer steps of that many micro-batches, each carrying the label
        tokens of its step (`step_tokens.with_step_tokens`: what a loss normalised over the step needs)."""
        super().__init__(*args, **kwargs)
        self.progress, self.step_batches = progress, step_batches

    def __iter__(self) -> Iterator[Any]:
        if not self.step_batches:
            return super().__iter__()
        done = self.sampler.skip // (self.batch_size or 1)  # read before the sampler's pass resets it
        return with_step_tokens(super().__iter__(), self.step_batches, done)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": int(self.progress())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Skip what the epoch had processed; a checkpoint of an epoch's last batch resumes at the next epoch's
        first batch (Lightning moves on to that epoch itself; skipping a whole epoch there would empty it)."""
        self.sampler.set_epoch(state["epoch"])
        finished = state["batches"] >= len(self)
        self.sampler.skip = 0 if finished else state["batches"] * (self.batch_size or 1)
