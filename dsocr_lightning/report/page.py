"""The report page: one self-contained HTML file (styles inline, images as data URIs, no script, nothing fetched).

A summary (the run's facts and every metric), the per-line CER histogram, the most frequent character substitutions,
insertions and deletions, then every line with its thumbnail, reference, marked prediction and CER: worst first for
one set of predictions; for two sets of the same lines ("before" and "after"), the change per line and overall,
lines that got worse first. Text is shown in its own direction (`dir="auto"`, each paragraph on its own).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from ..training.line_metrics import Loop
from .align import Op, align, confusions
from .histogram import COLOURS, histogram_svg
from .lines import Figures, Line, figures, worst_first
from .marks import char_cell, marked
from .thumbnails import ThumbnailSize, data_uri, thumbnail

log = logging.getLogger(__name__)
ImageOf = Callable[[Line], Any]  # the image of a line: a path or a PIL image; raises when there is none
STYLE = Path(__file__).with_name("report.css")
TOP_CONFUSIONS = 15  # rows per table of substitutions, insertions, deletions
MARKS_LEGEND = (
    '<p class="marks-legend">Marks in a prediction: <span class="sub">read instead</span>'
    '<span class="ins">extra</span><del class="del">missing</del> (hover for the characters; '
    "␣ space, ¦ zero-width non-joiner)</p>"
)
KINDS = {"s": "Substitutions (reference → read)", "i": "Insertions (extra in the prediction)",
         "d": "Deletions (missing from the prediction)"}  # fmt: skip


@dataclass
class Side:
    """One set of predictions of the lines: its name, its lines, and what the alignment found (filled here)."""

    name: str
    lines: list[Line]
    marks: dict[int, str] = field(default_factory=dict)  # line index -> marked prediction (HTML)
    counts: Counter[Op] = field(default_factory=Counter)  # every substitution, insertion, deletion


def aligned(side: Side) -> Side:
    """The side with each line's marked prediction and the confusion counts of all its lines."""
    for line in side.lines:
        ops = align(line.reference, line.prediction)
        side.marks[line.index] = marked(ops)
        side.counts.update(confusions(ops))
    return side


def write_report(target: Path, facts: dict[str, str], sides: list[Side], image_of: ImageOf,
                 size: ThumbnailSize) -> Path:  # fmt: skip
    """Write the page to `target` (through a partial file: a failure leaves none); `sides`: one set of predictions,
    or "before" and "after" of the same lines (same indices and references)."""
    sides = [aligned(side) for side in sides]
    partial = target.with_name(f".{target.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as out:
            for chunk in page(facts, sides, image_of, size):
                out.write(chunk)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def page(facts: dict[str, str], sides: list[Side], image_of: ImageOf, size: ThumbnailSize) -> Iterator[str]:
    title = "OCR error report" if len(sides) == 1 else f"OCR before and after: {sides[0].name} → {sides[1].name}"
    yield (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
           f"<style>{STYLE.read_text(encoding='utf-8')}</style></head><body>\n<h1>{escape(title)}</h1>\n")  # fmt: skip
    yield summary(facts, sides)
    yield histogram(sides)
    yield confusion_tables(sides)
    yield from line_rows(sides, image_of, size)
    yield "</body></html>\n"


def table(head: list[str] | None, rows: list[list[str]], css: str) -> str:
    """An HTML table of already escaped cells (`head` None: no header row)."""
    header = "<thead><tr>" + "".join(f"<th>{cell}</th>" for cell in head) + "</tr></thead>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}">{header}<tbody>{body}</tbody></table>'


METRICS = [  # (Figures field, label, what it is)
    ("lines", "lines", "lines with a reference"),
    ("cer", "CER", "all character edits / all reference characters"),
    ("cer_mean", "mean CER", "mean of the per-line CER"),
    ("cer_median", "median CER", "lower middle per-line CER"),
    ("wer", "WER", "word edits / reference words (torchmetrics)"),
    ("exact_lines", "exact lines", "share of lines read character for character"),
    ("loop_rate", "loop rate", "share of lines that loop (README: Loop rate)"),
    ("length_ratio", "length ratio", "mean characters read per reference character"),
]


def value(figs: Figures, name: str) -> str:
    number = getattr(figs, name)
    if name == "lines":
        return str(number)
    return f"{number:.4f} ({figs.loops} of {figs.lines} lines)" if name == "loop_rate" else f"{number:.4f}"


def change(figs: list[Figures], name: str) -> str:
    difference = getattr(figs[1], name) - getattr(figs[0], name)
    return f"{difference:+d}" if name == "lines" else f"{difference:+.4f}"


def summary(facts: dict[str, str], sides: list[Side]) -> str:
    """The run's facts, then each metric per set of predictions (and the change, for two)."""
    fact_rows = [[escape(k), escape(v)] for k, v in facts.items()]
    figs = [figures(side.lines) for side in sides]
    names = [escape(side.name) for side in sides]
    rows = []
    for name, label, meaning in METRICS:
        cells = [value(f, name) for f in figs]
        rows.append([label, *cells, *([change(figs, name)] if len(figs) == 2 else []), escape(meaning)])
    head = ["metric", *names, "change", "what it is"] if len(sides) == 2 else ["metric", "value", "what it is"]
    parts = ['<section id="summary"><h2>Summary</h2>', table(None, fact_rows, "facts"),
             table(head, rows, "metrics")]  # fmt: skip
    if len(sides) == 2:
        parts.append(change_counts(sides))
    return "".join(parts) + "</section>\n"


def line_changes(sides: list[Side]) -> dict[int, float]:
    """Line index -> after CER minus before CER."""
    before = {line.index: line.cer for line in sides[0].lines}
    return {line.index: line.cer - before[line.index] for line in sides[1].lines}


def change_counts(sides: list[Side]) -> str:
    changes = list(line_changes(sides).values())
    improved, worsened = sum(c < 0 for c in changes), sum(c > 0 for c in changes)
    unchanged = len(changes) - improved - worsened
    return (f'<p class="changes">Per line, from {escape(sides[0].name)} to {escape(sides[1].name)}: '
            f'<b class="improved">{improved} improved</b>, <b class="worsened">{worsened} worsened</b>, '
            f'<b class="unchanged">{unchanged} unchanged</b> (CER of the line).</p>')  # fmt: skip


def histogram(sides: list[Side]) -> str:
    legend = "".join(f'<span class="key" style="background:{COLOURS[i - len(sides)]}"></span>{escape(s.name)} '
                     for i, s in enumerate(sides)) if len(sides) == 2 else ""  # fmt: skip
    svg = histogram_svg([[line.cer for line in side.lines] for side in sides])
    return f'<section id="histogram"><h2>Lines per CER</h2><p class="legend">{legend}</p>{svg}</section>\n'


def confusion_tables(sides: list[Side]) -> str:
    """The most frequent substitutions, insertions and deletions (by the largest count of any set)."""
    parts = []
    for kind, title in KINDS.items():
        ops = {op for side in sides for op in side.counts if op.kind == kind}
        top = sorted(ops, key=lambda op: (-max(s.counts[op] for s in sides), op))[:TOP_CONFUSIONS]
        rows = [[confusion_cell(op), *(str(s.counts[op]) for s in sides)] for op in top]
        body = table(["characters", *(escape(s.name) for s in sides)], rows, "confusions") if rows else "<p>none</p>"
        parts.append(f'<div class="confusion"><h3>{title}</h3>{body}</div>')
    return f'<section id="confusions"><h2>Most frequent character errors</h2>{"".join(parts)}</section>\n'


def confusion_cell(op: Op) -> str:
    if op.kind == "s":
        return f"{char_cell(op.reference)}<br>→ {char_cell(op.prediction)}"
    return char_cell(op.reference or op.prediction)


def image_cell(line: Line, image_of: ImageOf, size: ThumbnailSize, missing: list[str]) -> str:
    """The line's thumbnail, or why there is none (also appended to `missing`)."""
    try:
        uri = data_uri(thumbnail(image_of(line), size))
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises, and image_of for a line without image
        missing.append(f"line {line.index}: {error}")
        return f'<span class="noimage">no image: {escape(str(error))}</span>'
    return f'<img src="{uri}" alt="line {line.index}">'


def text_row(label: str, html: str, css: str) -> str:
    """A labelled text in its own direction (the label outside it, so that it does not set the direction)."""
    text = f'<div class="text {css}" dir="auto">{html}</div>'
    return f'<div class="row"><span class="label">{escape(label)}</span>{text}</div>'


def line_order(sides: list[Side]) -> list[int]:
    """Line indices: worst first for one set; for two, the largest CER increase first, then by the after CER."""
    if len(sides) == 1:
        return [line.index for line in worst_first(sides[0].lines)]
    changes, after = line_changes(sides), {line.index: line for line in sides[1].lines}
    return sorted(changes, key=lambda i: (-changes[i], -after[i].cer, i))


def cer_cell(lines: list[Line], names: list[str]) -> str:
    """The line's CER (before → after and the change, for two sets), and a mark per set where it loops."""
    cers = " → ".join(f"{line.cer:.3f}" for line in lines)
    if len(lines) == 2:
        cers += f'<br><span class="delta">{lines[1].cer - lines[0].cer:+.3f}</span>'
    loops = [loop_mark(line.loop, side) for line, side in zip(lines, names) if line.loop is not None]
    return cers + ("<br>" + " ".join(loops) if loops else "")


def loop_mark(loop: Loop, side: str) -> str:
    """A "loop" badge (naming the set when there are two) whose title says which rule found it."""
    label = f"loop: {escape(side)}" if side else "loop"
    return f'<span class="loop" title="{escape(loop.describe(), quote=True)}">{label}</span>'


def row_class(lines: list[Line]) -> str:
    if len(lines) == 1:
        return "line"
    change = lines[1].cer - lines[0].cer
    return "line " + ("worsened" if change > 0 else "improved" if change < 0 else "unchanged")


def line_rows(sides: list[Side], image_of: ImageOf, size: ThumbnailSize) -> Iterator[str]:
    """Every line, one table row each (written one at a time: one thumbnail in memory)."""
    by_index, missing = [{line.index: line for line in side.lines} for side in sides], []
    names = [side.name for side in sides] if len(sides) == 2 else [""]
    order = "worst first" if len(sides) == 1 else "largest CER increase first"
    yield (f'<section id="lines"><h2>Every line, {order}</h2>{MARKS_LEGEND}<table class="lines"><thead><tr>'
           "<th>#</th><th>CER</th><th>image</th><th>reference and prediction</th></tr></thead><tbody>\n")  # fmt: skip
    for index in line_order(sides):
        lines = [lines_of[index] for lines_of in by_index]
        texts = [text_row("reference", escape(lines[0].reference), "ref")]
        texts += [text_row(side.name if len(sides) > 1 else "read", side.marks[index], "pred") for side in sides]
        image = image_cell(lines[0], image_of, size, missing)
        yield (f'<tr class="{row_class(lines)}" id="line-{index}"><td class="index">{index}</td>'
               f'<td class="cer">{cer_cell(lines, names)}</td><td class="image">{image}</td>'
               f'<td class="texts">{"".join(texts)}</td></tr>\n')  # fmt: skip
    yield "</tbody></table></section>\n"
    if missing:
        log.warning("report: %d of %d lines shown without an image (%s)", len(missing), len(by_index[0]), missing[0])
