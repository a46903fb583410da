import os
import sys

# Before torch is imported: the allocator grows segments instead of keeping one per odd size (micro-batches of
# varying length fragmented 58 GiB reserved for 24 GiB allocated at micro-batch 16 on an H100).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from .training.preimport import import_unsloth_first


def run() -> None:
    if sys.argv[1:2] == ["export"]:  # merge an adapter: its own small CLI, no Lightning loop
        from .files.export import main as export_main

        export_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["report"]:  # an error report from prediction files: its own small CLI, no model
        from .report.cli import main as report_main

        report_main(sys.argv[2:])
        return
    import_unsloth_first(sys.argv[1:])  # before the CLI imports lightning, which imports transformers
    from .cli import main

    main()
    close_process_group()


def close_process_group() -> None:
    """End a DDP run's process group before the interpreter exits: once (tests/test_ddp.py, gloo), a finished run
    died at exit with "terminate called without an active exception", gloo's threads racing the teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


try:
    run()
except Exception as error:
    from .training.checks import ConfigError

    if not isinstance(error, ConfigError):
        raise
    sys.exit(f"error: {error}")  # a setting or path to fix: its message, not a traceback
