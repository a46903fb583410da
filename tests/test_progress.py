"""The progress bar counts what a run is counted in: optimizer steps of `max_steps`, not micro-batches."""

from pathlib import Path

from dsocr_lightning.cli import main
from dsocr_lightning.training.callbacks import StepProgressBar

ROOT = Path(__file__).parents[1]


def test_bar_counts_optimizer_steps(standin_dir, lines_dir):
    """4 steps of 2 micro-batches: the bar ends at 4/4 (Lightning's own read 8 micro-batches against 4 steps)."""
    cli = main([
        "--config", str(ROOT / "configs/demo.yaml"), "--model.model_name_or_path", str(standin_dir),
        "--model.make_standin", "false", "--data.source", str(lines_dir), "--data.source_type", "imagefolder",
        "--data.num_workers", "0", "--data.batch_size", "2", "--data.val_split", "null",
        "--trainer.max_steps", "4", "--trainer.accumulate_grad_batches", "2", "--trainer.enable_progress_bar", "true",
    ], run=False)  # fmt: skip
    cli.trainer.fit(cli.model, cli.datamodule)
    bar = next(c for c in cli.trainer.callbacks if isinstance(c, StepProgressBar)).train_progress_bar
    assert (bar.n, bar.total) == (4, 4) and cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 8
