"""The whole chain teaches a model to read: a few digit lines trained through the real `fit` path until the TEST
STAND-IN reproduces them, decoded by the generate/decode path validation uses. Labels shifted by one token, a
generation prompt unlike the training prompt, or a decode that does not invert the encode must break it: each is
checked to fail that same check."""

from pathlib import Path

import pytest
from torchmetrics.functional.text import char_error_rate

from dsocr_lightning.cli import main
from dsocr_lightning.data.batching import IGNORE_INDEX
from dsocr_lightning.data.render import write_imagefolder
from dsocr_lightning.families.v1.collate import OCRCollator
from dsocr_lightning.training.generation import generate_texts
from dsocr_lightning.training.summary import RunSummary

CONFIGS = Path(__file__).parents[1] / "configs"
LINES = 8  # one batch: every optimizer step sees every line
STEPS = 100  # measured: these lines are read without error from step 50 on
READS = 0.05  # CER at or below which the model reproduces its lines


@pytest.fixture(scope="module")
def digit_lines(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("digits") / "data", {"train": LINES}, seed=1, kind="digits")


def fit_lines(standin: Path, lines: Path, run_dir: Path):
    """`fit` with the demo config on `lines`, validated on those same lines at the last step."""
    return main(
        [
            "fit", "--config", str(CONFIGS / "demo.yaml"),
            "--model.model_name_or_path", str(standin), "--model.make_standin", "false",
            "--data.source", str(lines), "--data.source_type", "imagefolder",
            "--data.train_split", "train", "--data.val_split", "train",
            "--data.batch_size", str(LINES), "--data.eval_batch_size", str(LINES), "--data.num_workers", "0",
            "--trainer.accumulate_grad_batches", "1", "--trainer.max_steps", str(STEPS),
            "--trainer.val_check_interval", str(STEPS),
            "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
        ]
    )  # fmt: skip


def transcribe(cli, instruction: str | None = None) -> tuple[list[str], list[str]]:
    """(references, greedy transcriptions) of the training lines, prompts built as validation builds them
    (or with another instruction)."""
    data, module = cli.datamodule, cli.model
    collate = data.collator(with_prompts=True, split="train")
    if instruction is not None:
        collate = OCRCollator(data.tokenizer, data.mode, instruction, with_prompts=True)
    batch = collate([data.datasets["train"][i] for i in range(LINES)])
    module.model.eval()
    return batch["texts"], generate_texts(module.model, module.tokenizer, batch, module.generation)


def check_reads(cli, instruction: str | None = None) -> None:
    """The model reproduces its lines, through validation's metric and through a direct decode."""
    references, predictions = transcribe(cli, instruction)
    cer = float(char_error_rate(predictions, references))
    assert cer <= READS, f"CER {cer:.3f}: {list(zip(references, predictions))}"
    if instruction is None:
        assert float(cli.trainer.callback_metrics["val/cer"]) <= READS


@pytest.fixture(scope="module")
def trained(standin_dir, digit_lines, tmp_path_factory):
    return fit_lines(standin_dir, digit_lines, tmp_path_factory.mktemp("learns"))


def test_fit_teaches_the_standin_to_read_its_lines(trained):
    check_reads(trained)


def test_a_generation_prompt_unlike_training_fails(trained):
    with pytest.raises(AssertionError, match="CER"):
        check_reads(trained, instruction="<image>\nFree OCR.")  # the trailing space of the training prompt lost


def test_a_tokenizer_that_does_not_round_trip_fails(trained, monkeypatch):
    tokenizer = trained.model.tokenizer
    decode = tokenizer.batch_decode
    monkeypatch.setattr(tokenizer, "batch_decode", lambda rows, **kw: [" ".join(t) for t in decode(rows, **kw)])
    with pytest.raises(AssertionError, match="CER"):
        check_reads(trained)  # decoding that spaces out the tokens no longer gives back what was encoded


def test_the_run_summary_saw_the_validation_and_the_adapter(trained):
    summary = next(c for c in trained.trainer.callbacks if isinstance(c, RunSummary))
    assert [step for step, _ in summary.cers] == [STEPS]
    assert trained.model.saved_adapters["last"] == [Path(trained.trainer.log_dir) / "lora_model"]


def test_labels_shifted_by_one_token_fail(standin_dir, digit_lines, tmp_path, monkeypatch):
    labels_for = OCRCollator.labels_for
    monkeypatch.setattr(OCRCollator, "labels_for", lambda self, enc: labels_for(self, enc)[1:] + [IGNORE_INDEX])
    with pytest.raises(AssertionError, match="CER"):
        check_reads(fit_lines(standin_dir, digit_lines, tmp_path))
