"""Run `python -m dsocr_lightning ARGS` (or `--script FILE ARGS`) with this process's GPU memory capped, as on a
smaller card: `torch.cuda.set_per_process_memory_fraction`, so an allocation past GIB fails as it would there.

python benchmarks/capped.py 14.75 fit --config configs/t4.yaml ...      # a T4 has 15,109 MiB to give
"""

import os
import runpy
import sys

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as dsocr_lightning/__main__.py

import torch

gib, rest = float(sys.argv[1]), sys.argv[2:]
if torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
if rest[:1] == ["--script"]:
    sys.argv = rest[1:]
    runpy.run_path(rest[1], run_name="__main__")
else:
    sys.argv = ["dsocr_lightning", *rest]
    runpy.run_module("dsocr_lightning", run_name="__main__")
