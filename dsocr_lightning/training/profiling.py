"""How busy the GPU is during one training micro-batch: torch.profiler around it, logged as `perf/*`.

`--gpu_profile.batch N` profiles the N-th training micro-batch (forward + backward, and the optimizer step when it
falls in it) and logs `perf/gpu_busy` (GPU kernel time / wall time), `perf/kernel_launches`, `perf/profiled_wall_s`,
`perf/gpu_kernel_s` and `perf/expert_kernel_s` (the experts' grouped matmuls alone, torch's or Triton's: kernels
named "grouped"), and `perf/syncs`: the CPU-GPU synchronisations (torch's sync debug mode), each place that made them
logged with its count (a sync lets the GPU run dry while the CPU waits); off by default (profiling slows that batch).
"""

from __future__ import annotations

import collections
import logging
import os
import time
import traceback
import warnings
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # frames in torch's own code are not the place that synced


def gpu_kernels(events: Any) -> list[Any]:
    """The kernels among profiler events (not the ranges drawn on the GPU row, which do no work)."""
    from torch.autograd import DeviceType

    return [
        e
        for e in events
        if e.device_type == DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not e.name.startswith(("Optimizer.", "ProfilerStep"))
    ]


def expert_kernel_seconds(events: Any) -> float:
    """Summed time of the experts' grouped matmul kernels (CUTLASS's and this project's Triton kernels)."""
    return sum(e.time_range.end - e.time_range.start for e in gpu_kernels(events) if "grouped" in e.name.lower()) / 1e6


def kernel_time(events: Any) -> tuple[float, float, int]:
    """(seconds the GPU ran at least one kernel, summed kernel seconds, number of kernels) among profiler events."""
    kernels = gpu_kernels(events)
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, reach = 0.0, float("-inf")
    for start, end in spans:  # union of intervals: overlapping kernels count once
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return busy / 1e6, sum(end - start for start, end in spans) / 1e6, len(spans)


class GpuProfile(L.Callback):
    """Profiles one training micro-batch on a CUDA device and logs how much of its wall time the GPU worked."""

    def __init__(self, batch: int | None = None) -> None:
        """
        Args:
            batch: global index of the training micro-batch to profile (after warm-up, e.g. 12), or None for none.
        """
        self.batch, self.profiler, self.start, self.seen = batch, None, 0.0, 0
        self.recorder: SyncRecorder | None = None
        self.debug_mode = 0

    def stop_recording(self) -> SyncRecorder:
        torch.cuda.set_sync_debug_mode(self.debug_mode)
        recorder, self.recorder = self.recorder, None
        recorder.__exit__(None, None, None)
        return recorder

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if self.recorder is not None:  # the profiled micro-batch raised: torch's and Python's warning state back
            self.stop_recording()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        self.seen += 1
        if self.batch is None or self.seen - 1 != self.batch or not torch.cuda.is_available():
            return
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self.profiler.__enter__()
        self.recorder = SyncRecorder()
        self.recorder.__enter__()
        self.debug_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")  # a warning at every synchronising call, from where it was made
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.profiler is None:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.start
        syncs = self.stop_recording().places
        self.profiler.__exit__(None, None, None)
        seconds, summed, count = kernel_time(self.profiler.events())
        experts = expert_kernel_seconds(self.profiler.events())
        averages = self.profiler.key_averages()
        self.profiler = None
        metrics = {"perf/gpu_busy": seconds / wall, "perf/kernel_launches": float(count),
                   "perf/profiled_wall_s": wall, "perf/gpu_kernel_s": seconds, "perf/expert_kernel_s": experts,
                   "perf/syncs": float(sum(syncs.values()))}  # fmt: skip
        log.info("profiled micro-batch %d: %.3f s wall, GPU busy %.3f s (%.0f%%; kernels summed %.3f s, the experts' "
                 "grouped matmuls %.3f s), %d kernels", self.batch, wall, seconds, 100 * seconds / wall, summed,
                 experts, count)  # fmt: skip
        log.info("CPU-GPU syncs in it: %d, by place: %s", sum(syncs.values()), dict(syncs.most_common(20)))
        for key in ("self_cpu_time_total", "self_device_time_total"):
            log.info(
                "top operators by %s:\n%s", key, averages.table(sort_by=key, row_limit=25, max_name_column_width=60)
            )
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)


class SyncRecorder(warnings.catch_warnings):
    """Counts torch's sync-debug warnings by the first frame outside torch that made them (file:line function)."""

    def __init__(self) -> None:
        super().__init__()
        self.places: collections.Counter = collections.Counter()

    def __enter__(self) -> None:
        super().__enter__()
        self.shown = self._module._showwarnmsg_impl  # other warnings go where they went
        warnings.filterwarnings("always", message=".*synchronizing")
        self._module.showwarning = self._module._showwarning_orig  # as catch_warnings(record=True): to the impl below
        self._module._showwarnmsg_impl = self.note  # where warnings reach Python, C++ ones included

    def note(self, message: warnings.WarningMessage) -> None:
        if "synchronizing" not in str(message.message).lower():
            self.shown(message)
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if not f.filename.startswith(TORCH_DIR) and not f.filename.endswith("warnings.py")]  # fmt: skip
        where = frames[-1] if frames else None
        self.places[f"{where.filename}:{where.lineno} {where.name}" if where else "?"] += 1
