"""`predict` writes one JSON line per image: from files, folders and globs, or from a split with its CER."""

import json
from pathlib import Path

import pytest

from dsocr_lightning.cli import main
from dsocr_lightning.predict import expand_inputs
from dsocr_lightning.render import render_line

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
    main([
        "predict", "--config", str(CONFIGS / "demo.yaml"), "--model.model_name_or_path", str(standin_dir),
        "--model.make_standin", "false", "--model.generation.max_new_tokens", "5",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder", "--data.num_workers", "0",
        "--prediction_writer.output", str(out), "--trainer.enable_progress_bar", "false", *extra,
    ])  # fmt: skip
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_predict_folder_and_split(standin_dir, lines_dir, tmp_path):
    rows = predict(standin_dir, lines_dir, tmp_path / "p.jsonl", "--data.predict_inputs", f"[{lines_dir / 'test'}]")
    assert [r["path"] for r in rows] == [str(p) for p in sorted((lines_dir / "test").glob("*.png"))]
    assert all(set(r) == {"path", "text"} and isinstance(r["text"], str) for r in rows)

    rows = predict(standin_dir, lines_dir, tmp_path / "s.jsonl", "--data.predict_split", "test")
    metadata = [json.loads(x) for x in (lines_dir / "test/metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["reference"] for r in rows] == [m["text"] for m in metadata]
    assert all(r["cer"] >= 0 for r in rows)
