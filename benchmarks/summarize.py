"""Print one table row from a run's TensorBoard events: first losses, median s/step, samples/s, peak memory.

python benchmarks/summarize.py NAME LOG_DIR [--skip 2]
"""

from __future__ import annotations

import argparse
import statistics

from common import scalars


def row(name: str, log_dir: str, skip: int) -> str:
    values = scalars(log_dir)
    losses = values.get("train/loss", [])
    steps = values.get("perf/step_seconds", [])[skip:]
    speed = values.get("perf/samples_per_s", [])[skip:]
    alloc, reserved = values.get("perf/peak_allocated_gib", []), values.get("perf/peak_reserved_gib", [])
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
    print("losses:", " ".join(f"{v:.4f}" for v in scalars(args.log_dir).get("train/loss", [])))
