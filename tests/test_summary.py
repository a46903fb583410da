"""The end-of-fit summary: steps, val/cer first -> last and best, adapter folders, logs, TensorBoard command."""

from dsocr_lightning.training.summary import RunFacts, RunSummary, summary_lines


def test_summary_lines():
    facts = RunFacts(
        steps=300, cers=[(50, 0.95), (100, 0.2), (150, 0.0), (300, 0.01)],
        adapters=["runs/version_3/lora_model", "/tmp/adapter"], best_adapters=["runs/version_3/lora_model_best"],
        log_dir="runs/version_3", logger_root="runs", report="runs/version_3/report.html",
    )  # fmt: skip
    assert summary_lines(facts) == [
        "fit done: 300 optimizer steps",
        "val/cer 0.950 at step 50 (first validation) -> 0.010 at step 300 (last); best 0.000 at step 150",
        "LoRA adapter + tokenizer, last step: runs/version_3/lora_model",
        "LoRA adapter + tokenizer, last step: /tmp/adapter",
        "LoRA adapter + tokenizer, best val/cer: runs/version_3/lora_model_best",
        "logs and checkpoints: runs/version_3",
        "TensorBoard: tensorboard --logdir runs",
        "error report of the last validation: runs/version_3/report.html",
    ]
    assert summary_lines(RunFacts(steps=4)) == ["fit done: 4 optimizer steps"]  # no validation, no logger


def test_history_survives_a_resume():
    summary = RunSummary()
    summary.cers = [(50, 0.9), (100, 0.3)]
    resumed = RunSummary()
    resumed.load_state_dict(summary.state_dict())
    assert resumed.cers == summary.cers
