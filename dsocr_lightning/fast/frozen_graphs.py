"""A frozen module's forward (no parameter trains, no autograd) replayed as CUDA graphs, one graph per input shape.

A vision tower is hundreds of small kernels launched from Python per call; at a micro-batch of two lines the GPU
waits on the CPU. Its input shape repeats (a batch's views: [views, 3, size, size]), so each shape is captured once
(two warm-up calls on a side stream, then the capture) and replayed: one CPU call instead of the kernels. The input
is copied into the graph's own buffer, the output out of it (a later replay overwrites the graph's). All graphs share
one memory pool: they never run at once, and each one's output buffer stays allocated, so no capture reuses
another's output. At most `limit` shapes get a graph; any other runs eagerly (logged once). The pool stays allocated
(the largest captured call's activations): memory the rest of the run cannot use.

The reference is the function itself (`fn`): on a CPU, or where graphs are off, it is what runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch

log = logging.getLogger(__name__)


class ShapeGraphs:
    """`fn(x) -> tensor` under `torch.no_grad`, as CUDA graphs keyed by x's shape and dtype (CUDA inputs only). `fn`
    comes with every call (a module's own method: this object holds no reference to the module) and must be the same
    computation each time."""

    def __init__(self, name: str, limit: int = 8) -> None:
        self.name, self.limit = name, limit
        self.graphs: dict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor] | None] = {}  # None: eager
        self.pool: Any = None
        self.said_full = False

    @torch.no_grad()
    def __call__(
        self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tag: Hashable = None
    ) -> torch.Tensor:
        """fn(x), replayed where a graph for x's shape and `tag` (what else the captured kernels depend on: a module's
        train/eval mode, inference mode, autocast) was captured."""
        if not x.is_cuda:
            return fn(x)
        key = (tuple(x.shape), x.dtype, x.device, tag)
        entry = self.graphs[key] if key in self.graphs else self.capture(fn, x, key)
        if entry is None:
            return fn(x)
        buffer, graph, out = entry
        buffer.copy_(x)
        graph.replay()
        return out.clone()

    def capture(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, key: tuple) -> tuple | None:
        if sum(entry is not None for entry in self.graphs.values()) >= self.limit:
            if not self.said_full:
                log.info("%s: %d input shapes have CUDA graphs; %s and later new shapes run eagerly", self.name,
                         self.limit, list(x.shape))  # fmt: skip
                self.said_full = True
            return None
        buffer = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # kernels pick their algorithms and workspaces outside the capture
                fn(buffer)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:  # thread_local: a DataLoader's pin-memory thread may allocate while this thread captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = fn(buffer)
        except RuntimeError as error:  # e.g. a copy from the CPU inside fn: this shape runs eagerly, said once
            log.warning("%s: input %s cannot run as a CUDA graph, it runs eagerly: %s", self.name, list(x.shape),
                        str(error).splitlines()[0])  # fmt: skip
            self.graphs[key] = None
            return None
        self.pool = graph.pool()
        self.graphs[key] = (buffer, graph, out)
        log.info("%s: captured a CUDA graph for input %s", self.name, list(x.shape))
        return self.graphs[key]

    def clear(self) -> None:
        """Forget every graph (they read the weights where they were: after a move or a cast they are stale)."""
        self.graphs, self.pool, self.said_full = {}, None, False

    def __getstate__(self) -> dict[str, Any]:
        """A copy (deepcopy, pickle) starts without graphs: they belong to this process and these buffers."""
        return {"name": self.name, "limit": self.limit, "graphs": {}, "pool": None, "said_full": False}
