"""`predict` writes one JSON line per image: from files, folders and globs, or from a split with its CER; an
unusable image gets a line with an `error` (policy `skip`) or stops the run leaving no file (policy `error`)."""

import json
import logging
import re
from pathlib import Path

import pytest
from fake_generation import dropped_chars, install

from dsocr_lightning.cli import main
from dsocr_lightning.data.batching import BadSampleError
from dsocr_lightning.data.render import render_line
from dsocr_lightning.files.predict import JsonlPredictionWriter, expand_inputs

LINE = "می\u200cخواهم ۱۲"
CONFIGS = Path(__file__).parents[1] / "configs"


def test_expand_inputs(tmp_path):
    for name in ("b.png", "a.png", "c.jpg"):
        render_line(LINE).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    folder = expand_inputs([str(tmp_path)])
    assert [p.name for p in folder] == ["a.png", "b.png", "c.jpg"]
    mixed = expand_inputs([str(tmp_path / "c.jpg"), str(tmp_path / "*.png"), str(tmp_path / "a.png")])
    assert [p.name for p in mixed] == ["c.jpg", "a.png", "b.png"]  # each once, in first-seen order
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_inputs([str(tmp_path / "nothing-here/*.png")])


def predict(standin_dir, lines_dir, out, *extra):
    cli = main([
        "predict", "--config", str(CONFIGS / "demo.yaml"), "--model.model_name_or_path", str(standin_dir),
        "--model.make_standin", "false", "--model.generation.max_new_tokens", "5",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder", "--data.num_workers", "0",
        "--data.eval_batch_size", "2", "--prediction_writer.output", str(out), "--trainer.enable_progress_bar", "false",
        *extra,
    ])  # fmt: skip
    return cli, [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_predict_folder_and_split(standin_dir, lines_dir, tmp_path, monkeypatch):
    cli, rows = predict(
        standin_dir, lines_dir, tmp_path / "p.jsonl", "--data.predict_inputs", f"[{lines_dir / 'test'}]"
    )
    assert all(layer.merged for layer in cli.model.model.modules() if hasattr(layer, "lora_A"))  # merge_lora_in_predict
    assert [r["path"] for r in rows] == [str(p) for p in sorted((lines_dir / "test").glob("*.png"))]
    assert all(set(r) == {"path", "text", "reached_max_new_tokens"} and isinstance(r["text"], str) for r in rows)
    assert all(r["reached_max_new_tokens"] for r in rows)  # the random stand-in never says the end token in 5

    install(monkeypatch)  # predictions with known CERs: each reference without its first k characters
    cli, rows = predict(standin_dir, lines_dir, tmp_path / "s.jsonl", "--data.predict_split", "test")
    metadata = [json.loads(x) for x in (lines_dir / "test/metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["reference"] for r in rows] == [m["text"] for m in metadata]
    k = dropped_chars(cli.model.named_parameters())
    assert [r["cer"] for r in rows] == pytest.approx([k / len(m["text"]) for m in metadata])


@pytest.fixture
def inputs_with_a_broken_image(lines_dir, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i, image in enumerate(sorted((lines_dir / "test").glob("*.png"))):
        (folder / f"{i}.png").write_bytes(image.read_bytes())
    (folder / "2.png").write_bytes(b"\x89PNG cut short")  # in the second batch of two: the first is written by then
    return folder


def test_skipped_images_get_an_error_line_and_a_log_line(standin_dir, lines_dir, inputs_with_a_broken_image,
                                                         tmp_path, caplog):  # fmt: skip
    out = tmp_path / "p.jsonl"
    with caplog.at_level(logging.INFO):
        _, rows = predict(standin_dir, lines_dir, out, "--data.predict_inputs", f"[{inputs_with_a_broken_image}]",
                          "--data.bad_sample_policy", "skip")  # fmt: skip
    assert [Path(r["path"]).name for r in rows] == ["0.png", "1.png", "2.png", "3.png"]  # input order, all of them
    assert "unreadable image" in rows[2]["error"] and "text" not in rows[2]
    assert all("text" in r and "error" not in r for i, r in enumerate(rows) if i != 2)
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped bad sample 1: split 'predict' index 2" in messages
    said = rf"predictions: 4 lines written to {re.escape(str(out))} in [\d.]+ s \([\d.]+ lines/s; [\d.]+ s of it waiting between batches for images\), 1 of them unusable"
    assert re.search(said, messages), messages


def test_error_policy_stops_and_leaves_no_partial_file(standin_dir, lines_dir, inputs_with_a_broken_image, tmp_path):
    """Without the scan (which finds the image before the model loads), the image stops the run when reached."""
    out = tmp_path / "p.jsonl"
    with pytest.raises(BadSampleError, match=r"index 2 \(.*2.png\): unreadable image"):
        predict(standin_dir, lines_dir, out, "--data.predict_inputs", f"[{inputs_with_a_broken_image}]",
                "--data.scan", "false")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "scans"]  # neither p.jsonl nor a partial one


def test_writer_counts_the_wait_between_batches_but_not_before_the_first(tmp_path, monkeypatch):
    from dsocr_lightning.files import predict

    clock = iter([0.0, 10.0, 10.5, 12.0, 13.0])  # start, batch 0 end, batch 1 start, batch 1 end, batch 2 start
    monkeypatch.setattr(predict.time, "perf_counter", lambda: next(clock))
    loop = type("Loop", (), {"current_batch_indices": []})()
    trainer = type("T", (), {"global_rank": 0, "world_size": 1, "predict_loop": loop})()
    writer = JsonlPredictionWriter(str(tmp_path / "out.jsonl"))
    writer.on_predict_start(trainer, None)
    writer.on_predict_batch_start(trainer, None, None, 0)  # workers starting: not counted
    writer.write_on_batch_end = lambda *args: None
    for index in (0, 1):
        writer.on_predict_batch_end(trainer, None, [], None, index)
        writer.on_predict_batch_start(trainer, None, None, index + 1)
    writer.file.close()
    assert writer.waited == pytest.approx(0.5 + 1.0)
