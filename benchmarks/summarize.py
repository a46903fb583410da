"""Print one table row from a run's TensorBoard events: first losses, median s/step, samples/s, peak memory.

python benchmarks/summarize.py NAME LOG_DIR [--skip 2]
"""

from __future__ import annotations

import argparse
import statistics

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def series(events: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def row(name: str, log_dir: str, skip: int) -> str:
    events = EventAccumulator(log_dir)
    events.Reload()
    losses = series(events, "train/loss")
    steps = series(events, "perf/step_seconds")[skip:]
    speed = series(events, "perf/samples_per_s")[skip:]
    alloc, reserved = series(events, "perf/peak_allocated_gib"), series(events, "perf/peak_reserved_gib")
    first = ", ".join(f"{v:.4f}" for v in losses[:3])
    return (
        f"| {name} | {len(losses)} | {first} | {statistics.median(steps):.3f} | {statistics.median(speed):.2f} "
        f"| {max(alloc, default=0):.2f} GiB | {max(reserved, default=0):.2f} GiB |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("log_dir")
    parser.add_argument("--skip", type=int, default=2, help="warm-up optimizer steps left out of the medians")
    args = parser.parse_args()
    print(
        "| run | steps | first three losses | median s / step | median samples / s | peak allocated | peak reserved |"
    )
    print("|---|---|---|---|---|---|---|")
    print(row(args.name, args.log_dir, args.skip))
    events = EventAccumulator(args.log_dir)
    events.Reload()
    print("losses:", " ".join(f"{v:.4f}" for v in series(events, "train/loss")))
