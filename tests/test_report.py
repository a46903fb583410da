"""The error report: the character alignment behind its marks, the page that `validate`, `predict` (with references)
and `python -m dsocr_lightning report before.jsonl after.jsonl` write (figures equal to the logged metrics, every
line with its image, worst first; before/after per line), what a validation adds to TensorBoard, and the page as a
person sees it in a real headless browser (lines, marks, images, right-to-left text)."""

import hashlib
import json
import os
import random
import re
from collections import Counter
from html import escape
from pathlib import Path

import pytest
from browser import browser_checks, chromium, screenshot
from cli_run import Done, run_cli
from fake_generation import dropped_chars, install
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsocr_lightning.cli import main
from dsocr_lightning.data.render import render_line
from dsocr_lightning.report import align as align_module
from dsocr_lightning.report.align import align
from dsocr_lightning.report.callback import free_path
from dsocr_lightning.report.cli import report
from dsocr_lightning.report.histogram import BINS, bin_of
from dsocr_lightning.report.marks import marked
from dsocr_lightning.training.checks import ConfigError
from dsocr_lightning.training.line_metrics import Loop
from dsocr_lightning.training.metrics import sample_cer

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "configs"
METRIC_ROWS = {"CER": "cer", "mean CER": "cer_mean", "median CER": "cer_median", "WER": "wer",
               "exact lines": "exact_lines", "loop rate": "loop_rate", "length ratio": "length_ratio"}  # fmt: skip


# ---- the alignment and its marks -------------------------------------------------------------------------------------
def test_alignment_is_minimal_and_covers_both_texts(monkeypatch):
    rng = random.Random(0)
    pairs = [("".join(rng.choice("ابپ \u200c") for _ in range(rng.randint(0, 25))),
              "".join(rng.choice("ابپي ") for _ in range(rng.randint(0, 25)))) for _ in range(200)]  # fmt: skip
    for small_table in (False, True):  # the whole table, or split in halves first (the path of long pages)
        if small_table:
            monkeypatch.setattr(align_module, "FULL_TABLE_CELLS", 16)
        for reference, prediction in pairs:
            ops = align(reference, prediction)
            assert "".join(op.reference for op in ops) == reference
            assert "".join(op.prediction for op in ops) == prediction
            assert all((op.kind == "=") == (op.reference == op.prediction) for op in ops)
            if reference:  # as many edits as the CER counts
                edits = sum(op.kind != "=" for op in ops)
                assert edits / len(reference) == pytest.approx(sample_cer(prediction, reference), abs=1e-6)


def test_marks_name_the_characters_and_show_invisible_ones():
    html = marked(align("کتاب\u200cهای یک", "كتابهای یک"))  # Arabic kaf for keheh, the ZWNJ lost
    assert '<span class="sub" title="read U+0643 ARABIC LETTER KAF for U+06A9 ARABIC LETTER KEHEH">ك</span>' in html
    assert '<del class="del" title="missing U+200C ZERO WIDTH NON-JOINER">¦</del>' in html
    assert marked(align("یک", "یک  دو")).count('class="ins"') == 1  # one run, one element: "␣␣دو"
    assert "␣␣دو" in marked(align("یک", "یک  دو"))


def test_histogram_bins():
    cers = [0.0, 1e-9, 0.1, 0.3, 3 / 10, 0.30000001, 0.95, 1.0, 1.5]
    assert [BINS[bin_of(cer)] for cer in cers] == ["0", "≤0.1", "≤0.1", "≤0.3", "≤0.3", "≤0.4", "≤1.0", "≤1.0", ">1"]


# ---- validate and predict write it -----------------------------------------------------------------------------------
def run(subcommand, standin_dir, lines_dir, save_dir, *extra):
    return main([
        subcommand, "--config", str(CONFIGS / "demo.yaml"), "--model.model_name_or_path", str(standin_dir),
        "--model.make_standin", "false", "--model.generation.max_new_tokens", "5",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder", "--data.num_workers", "0",
        "--data.eval_batch_size", "3", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_progress_bar", "false", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def validated(standin_dir, lines_dir, tmp_path_factory):
    """`validate` on the 4 test lines (batches of 3 and 1), predictions with known CERs (fake_generation.py)."""
    with pytest.MonkeyPatch.context() as patch:
        install(patch)
        return run("validate", standin_dir, lines_dir, tmp_path_factory.mktemp("validate"))


def references(lines_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (lines_dir / "test/metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def shown_metrics(html: str) -> dict[str, float]:
    """The summary's metric values, as the page shows them."""
    rows = re.findall(r"<tr><td>([^<]+)</td><td>([0-9.]+)", html.split('class="metrics"')[1].split("</table>")[0])
    return {METRIC_ROWS[label]: float(value) for label, value in rows if label in METRIC_ROWS}


def test_validate_writes_the_report_with_the_logged_figures(validated, lines_dir):
    page = Path(validated.trainer.log_dir) / "report.html"
    html = page.read_text(encoding="utf-8")
    logged = {k.removeprefix("val/"): float(v) for k, v in validated.trainer.callback_metrics.items()}
    assert shown_metrics(html) == pytest.approx({k: logged[k] for k in METRIC_ROWS.values()}, abs=5e-5)
    k = dropped_chars(validated.model.named_parameters())
    lines = references(lines_dir)
    cers = {i: k / len(m["text"]) for i, m in enumerate(lines)}
    rows = re.findall(r'<tr class="line" id="line-(\d+)"><td class="index">\d+</td><td class="cer">([0-9.]+)', html)
    assert [int(i) for i, _ in rows] == sorted(cers, key=lambda i: (-cers[i], i))  # every line once, worst first
    assert [float(c) for _, c in rows] == pytest.approx([cers[int(i)] for i, _ in rows], abs=5e-4)
    images = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="line (\d+)">', html)
    assert sorted(map(int, images)) == list(cers)  # each line's thumbnail, inlined
    assert all(m["text"] in html for m in lines)
    assert "model</td><td>" + str(validated.model.hparams.model_name_or_path) in html
    assert not re.search(r"(src|href)=\"(?!data:)|<link|<script|url\(", html)  # nothing fetched from anywhere


def test_validation_adds_the_cer_histogram_and_the_worst_lines_to_tensorboard(validated, lines_dir):
    events = EventAccumulator(validated.trainer.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    k = dropped_chars(validated.model.named_parameters())
    cers = [k / len(m["text"]) for m in references(lines_dir)]
    (histogram,) = events.Histograms("val/cer_lines")
    assert histogram.histogram_value.num == len(cers)
    assert histogram.histogram_value.sum == pytest.approx(sum(cers), abs=1e-5)
    worst = sorted(range(len(cers)), key=lambda i: (-cers[i], i))
    for rank in range(4):  # line_report.worst_lines: 4, each its own image, as the report's thumbnail
        (image,) = events.Images(f"val_worst/{rank}")
        source = Image.open(lines_dir / "test" / references(lines_dir)[worst[rank]]["file_name"])
        assert (image.width, image.height) == source.size  # a 40 px line fits the 800 x 96 box unshrunk
    text = events.Tensors("val_worst/text_summary")[0].tensor_proto.string_val[0].decode()
    assert all(references(lines_dir)[i]["text"] in text for i in worst)


def test_predict_with_references_writes_a_report(standin_dir, lines_dir, tmp_path, monkeypatch):
    install(monkeypatch)
    out = tmp_path / "p.jsonl"
    run("predict", standin_dir, lines_dir, tmp_path, "--data.predict_split", "test",
              "--prediction_writer.output", str(out))  # fmt: skip
    html = (tmp_path / "p.report.html").read_text(encoding="utf-8")  # beside the predictions: predict has no run folder
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    corpus = sum(r["cer"] * len(r["reference"]) for r in rows) / sum(len(r["reference"]) for r in rows)
    assert shown_metrics(html)["cer"] == pytest.approx(corpus, abs=5e-5)
    assert html.count('<tr class="line"') == len(rows) == 4 and html.count("<img src=") == 4


# ---- before and after, from prediction files -------------------------------------------------------------------------
LINES = [  # reference, before (a base model's confusions), after
    ("می\u200cخواهم کتاب بخوانم ۱۲", "میخواهم كتاب بخوانم 12", "می\u200cخواهم کتاب بخوانم ۱۲"),
    ("سلام دنیا", "سلام دنيا دنيا دنيا دنيا دنيا", "سلام دنیا"),
    ("کتاب\u200cهای کوچک زیبا", "کتابهای کوچک زیبا", "کتاب\u200cهای کوچک زیبا"),
    ("خانه بزرگ ۳۴۵", "خانه بزرگ ۳۴۵", "خانه بزرگ"),
    ("دریا و آسمان", "دریا و آسمان", "دریا و آسمان"),
]


@pytest.fixture
def prediction_files(tmp_path):
    """Two prediction files of the same 5 rendered lines, as predict writes them; and the images."""
    for i, (reference, *_) in enumerate(LINES):
        render_line(reference).save(tmp_path / f"{i}.png")
    files = []
    for side, name in ((1, "before"), (2, "after")):
        rows = [{"path": str(tmp_path / f"{i}.png"), "text": line[side], "reached_max_new_tokens": False,
                 "reference": line[0], "cer": sample_cer(line[side], line[0])}
                for i, line in enumerate(LINES)]  # fmt: skip
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return files


def python_m(*args, cwd) -> Done:
    return run_cli(list(args), cwd, timeout=120)


def test_report_of_two_prediction_files_shows_the_change(prediction_files, tmp_path):
    done = python_m("report", *map(str, prediction_files), "--names", "base", "tuned", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    changes = [sample_cer(after, ref) - sample_cer(before, ref) for ref, before, after in LINES]
    said = re.search(r"(\d+) improved</b>, .*?(\d+) worsened</b>, .*?(\d+) unchanged</b>", html).groups()
    assert [int(n) for n in said] == [sum(c < 0 for c in changes), sum(c > 0 for c in changes), changes.count(0)]
    cer_row = re.search(r"<tr><td>CER</td><td>([0-9.]+)</td><td>([0-9.]+)</td><td>([-+0-9.]+)</td>", html).groups()
    for shown, side in zip(cer_row, (1, 2)):
        edits = sum(sample_cer(line[side], line[0]) * len(line[0]) for line in LINES)
        assert float(shown) == pytest.approx(edits / sum(len(line[0]) for line in LINES), abs=5e-5)
    rows = re.findall(r'<tr class="line (\w+)" id="line-(\d+)">', html)
    after = [sample_cer(line[2], line[0]) for line in LINES]
    assert [int(i) for _, i in rows] == sorted(range(5), key=lambda i: (-changes[i], -after[i], i))  # worse first
    assert {int(i): kind for kind, i in rows} == {0: "improved", 1: "improved", 2: "improved", 3: "worsened",
                                                  4: "unchanged"}  # fmt: skip
    loop = Loop(False, " دنيا", 5).describe()  # only the before side of line 1 loops (Arabic yeh: not the reference's)
    assert html.count('class="loop"') == 1 and f'title="{escape(loop, quote=True)}"' in html
    assert "ARABIC LETTER KAF" in html and "ZERO WIDTH NON-JOINER" in html  # the confusions, named


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` and the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


@pytest.mark.parametrize(
    "case, message",
    [
        ("exists", "error: report.html exists: pass --output with a new file name (nothing was written)"),
        ("other-lines", "error: line 2 differs: "),
        ("no-reference", "has no reference: predict a split with references (--data.predict_split)"),
        ("loop-settings", "error: loop.min_repeats (0) and loop.min_chars (10) count copies and characters: give each"),
        ("thumbnail", "error: thumbnail 0 x 96 px: give a width and height of 1 px or more"),
    ],
)
def test_report_errors_say_what_to_do_and_touch_nothing(case, message, prediction_files, tmp_path):
    before, after = prediction_files
    if case == "exists":
        (tmp_path / "report.html").write_text("the user's own page")
    elif case == "other-lines":
        rows = after.read_text(encoding="utf-8").splitlines()
        after.write_text("\n".join([rows[0], rows[2], rows[1], *rows[3:]]) + "\n", encoding="utf-8")
    elif case == "no-reference":
        rows = [json.loads(line) for line in after.read_text(encoding="utf-8").splitlines()]
        after.write_text("".join(json.dumps({"path": r["path"], "text": r["text"]}) + "\n" for r in rows))
    files = digest(tmp_path)
    flags = {"loop-settings": ["--loop.min_repeats", "0"], "thumbnail": ["--thumbnail.width", "0"]}.get(case, [])
    done = python_m("report", str(before), str(after), *flags, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert digest(tmp_path) == files  # every file as it was, none added


def test_unusable_images_are_left_out_and_counted(prediction_files, tmp_path):
    before, after = prediction_files
    rows = before.read_text(encoding="utf-8").splitlines()
    rows[2] = json.dumps({"path": json.loads(rows[2])["path"], "error": "unreadable image: truncated"})
    before.write_text("\n".join(rows) + "\n", encoding="utf-8")
    html = report([str(before), str(after)], str(tmp_path / "r.html")).read_text(encoding="utf-8")
    assert "<tr><td>lines left out (unusable image in a file)</td><td>1</td></tr>" in html
    assert sorted(map(int, re.findall(r'id="line-(\d+)"', html))) == [0, 1, 3, 4]


def test_a_run_folder_report_never_replaces_a_file(tmp_path):
    (tmp_path / "report.html").write_text("kept")
    (tmp_path / "report-2.html").write_text("kept too")
    assert free_path(tmp_path / "report.html") == tmp_path / "report-3.html"


def test_report_takes_one_or_two_files(prediction_files, tmp_path):
    with pytest.raises(ConfigError, match="one prediction file or two"):
        report([str(p) for p in prediction_files * 2], str(tmp_path / "x.html"))
    with pytest.raises(ConfigError, match="one name per file"):
        report([str(prediction_files[0])], str(tmp_path / "x.html"), names=["a", "b"])
    single = report([str(prediction_files[0])], str(tmp_path / "one.html"))
    assert single.read_text(encoding="utf-8").count('<tr class="line"') == len(LINES)


# ---- in a real browser ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    found = chromium()
    if found is None:
        if os.environ.get("DSOCR_REQUIRE_BROWSER"):
            pytest.fail("DSOCR_REQUIRE_BROWSER is set but no Chromium was found (apt-get install -y chromium)")
        pytest.skip("no Chromium here (apt-get install -y chromium): the browser test needs one")
    return found


def test_a_person_sees_lines_marks_images_and_right_to_left_text(browser, prediction_files, tmp_path):
    files = [os.path.relpath(p) for p in prediction_files]  # as a user types them (../before.jsonl)
    page = report(files, str(tmp_path / "report.html"), names=["base", "fine-tuned"])
    seen = browser_checks(browser, page, tmp_path / "profile")
    assert seen["lines"] == len(LINES)
    assert seen["images"] == {"count": len(LINES), "decoded": len(LINES), "shown": len(LINES)}
    rows = page.read_text(encoding="utf-8").split('<table class="lines">')[1]
    marks = {kind: rows.count(f'class="{kind}"') for kind in ("sub", "ins", "del")}
    assert min(marks.values()) > 0 and seen["marks"] == marks | {"coloured": sum(marks.values())}  # each seen, coloured
    assert seen["rtl"] == {"texts": 3 * len(LINES), "right_to_left": 3 * len(LINES)}  # reference, base, fine-tuned
    shot = screenshot(browser, page, tmp_path / "report.png", tmp_path / "profile")
    colours = Counter(Image.open(shot).convert("RGB").getdata())
    for colour in ((0xFF, 0xD0, 0x7A), (0xFF, 0xB3, 0xB8), (0xCF, 0xE1, 0xFF)):  # read instead, extra, missing
        assert colours[colour] > 50, colour
    if os.environ.get("DSOCR_UPDATE_DOCS"):  # the README's picture
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs/report.png").write_bytes(shot.read_bytes())
