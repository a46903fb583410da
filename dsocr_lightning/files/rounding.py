"""How much of an adapter's update a merged checkpoint keeps once its weights are rounded to the saved dtype."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

# Above this rounding error of the adapter's update the merged model drifts from the adapter's output. Measured on
# the real architecture (random weights, benchmarks/README.md): 17 % (bf16, a 60-step adapter) left the loss within
# bf16 noise; 59 % (bf16, an 8-step adapter) lost 0.19 of the 1.46 nats the adapter had gained (11 % in fp16: 0.0005).
ROUNDING_WARN = 0.3


def report_rounding(error: float, dtype: str) -> None:
    rank_zero_info(f"merging in {dtype} changes the adapter's weight update by {100 * error:.1f} % (rounding)")
    if error > ROUNDING_WARN:
        rank_zero_warn(
            f"{dtype} rounds away {100 * error:.0f} % of the adapter's update: the merged model will not give the "
            "adapter's output. Export with --dtype float16 (or float32), or serve the adapter unmerged."
        )
