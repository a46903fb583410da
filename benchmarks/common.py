"""What the benchmarks share: the commit a result was measured at (with +dirty for uncommitted changes), the
scalars a run logged to TensorBoard, how a result JSON is written, and how one GPU call is timed."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3  # optimizer steps left out of speed medians (kernel selection, compilation, allocator warm-up)


def commit() -> str:
    """BENCH_COMMIT when set (a copy of the tree without its git history), else git's HEAD."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_json(path: Path, data: dict) -> None:
    """A result file, its folder made if needed (indent 1, newline-terminated, as committed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def scalars(log_dir: str | Path) -> dict[str, list[float]]:
    """Every scalar tag of a run's TensorBoard events -> its values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def timed_call(call: Callable[[], Any], runs: int, skip: int) -> tuple[float, Any]:
    """(median seconds of `call` over `runs` calls after `skip` warm-ups, each waited for on the GPU; its last result)."""
    import torch

    times = []
    for _ in range(skip + runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[skip:]), out
