"""`python -m dsocr_lightning report predictions.jsonl [after.jsonl] [--output report.html]`: the error report of one
prediction file, or the before/after report of two prediction files of the same lines (`predict` with
`--data.predict_split`, which writes each line's reference), without loading any model.

Lines are matched by position: the two files must list the same images with the same references in the same order.
Lines with an `error` (unusable images) in either file are left out and counted. Images come from the files' `path`
(relative paths from the current folder).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..training.checks import ConfigError
from ..training.line_metrics import LoopSettings, find_loop
from ..training.metrics import sample_cer
from .lines import Line, figures
from .page import Side, write_report
from .provenance import code_commit
from .thumbnails import ThumbnailSize

log = logging.getLogger(__name__)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a prediction file, each checked for what a report needs."""
    if not path.is_file():
        raise ConfigError(f"no prediction file {path}: give the JSONL that predict wrote (--prediction_writer.output)")
    rows = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} line {number} is not JSON ({error}): give a file that predict wrote") from None
        if "error" not in rows[-1] and not rows[-1].get("reference"):
            raise ConfigError(f"{path} line {number} has no reference: predict a split with references "
                              "(--data.predict_split) to compare with them")  # fmt: skip
    if not rows:
        raise ConfigError(f"{path} is empty: give a file that predict wrote")
    return rows


def line_of(number: int, row: dict[str, Any], loop: LoopSettings) -> Line:
    ended = not row.get("reached_max_new_tokens", False)
    return Line(number, row["path"], row["reference"], row["text"], sample_cer(row["text"], row["reference"]),
                find_loop(row["text"], row["reference"], ended, loop))  # fmt: skip


def check_same_lines(files: list[Path], tables: list[list[dict[str, Any]]]) -> None:
    """Two files of the same lines: same count, and per line the same image and (where both read it) reference."""
    if len(tables[0]) != len(tables[1]):
        raise ConfigError(f"{files[0]} has {len(tables[0])} lines, {files[1]} {len(tables[1])}: compare prediction "
                          "files of the same lines (the same inputs or split, in the same order)")  # fmt: skip
    for number, (a, b) in enumerate(zip(*tables), 1):
        read = "error" not in a and "error" not in b  # an unusable image has no reference in its line
        if a["path"] != b["path"] or (read and a["reference"] != b["reference"]):
            raise ConfigError(f"line {number} differs: {files[0]} has {a['path']!r} ({a.get('reference')!r}), "
                              f"{files[1]} has {b['path']!r} ({b.get('reference')!r}): compare prediction files of "
                              "the same lines in the same order")  # fmt: skip


def sides_of(files: list[Path], names: list[str], loop: LoopSettings) -> tuple[list[Side], int]:
    """One Side per file, of the lines usable in every file; and how many lines were left out for an error."""
    tables = [read_rows(path) for path in files]
    for path, table in zip(files, tables):
        if any("error" not in row and "reached_max_new_tokens" not in row for row in table):
            log.warning("%s does not say which lines reached max_new_tokens (written before that field): its loop "
                        "rate counts repeated endings only", path)  # fmt: skip
    if len(tables) == 2:
        check_same_lines(files, tables)
    usable = [n for n in range(len(tables[0])) if not any("error" in table[n] for table in tables)]
    sides = [Side(name, [line_of(n, table[n], loop) for n in usable]) for name, table in zip(names, tables)]
    if not usable:
        raise ConfigError(f"every line of {', '.join(map(str, files))} is an unusable image: nothing to report")
    return sides, len(tables[0]) - len(usable)


def image_file(line: Line) -> Path:
    if not line.path:
        raise ValueError("no image file (the dataset held the image in memory)")
    return Path(line.path)


def report(predictions: list[str], output: str = "report.html", names: list[str] | None = None,
           loop: LoopSettings | None = None, thumbnail: ThumbnailSize | None = None) -> Path:  # fmt: skip
    """Write the report of one prediction file, or of two of the same lines (before, after).

    Args:
        predictions: one or two JSONL files that `predict` wrote with references.
        output: the HTML file to write; refused if it exists (nothing is overwritten).
        names: what to call each file in the report (default: the file names).
        loop: when a line counts as a loop (as `--model.loop` of the run).
        thumbnail: the box line images are shrunk into.
    """
    files = [Path(p) for p in predictions]
    if not 1 <= len(files) <= 2:
        raise ConfigError(f"report takes one prediction file or two (before after), got {len(files)}")
    names = names or [str(path) for path in files]
    if len(names) != len(files):
        raise ConfigError(f"--names gives {len(names)} names for {len(files)} files: one name per file")
    target = Path(output)
    if target.exists():
        raise ConfigError(f"{target} exists: pass --output with a new file name (nothing was written)")
    sides, left_out = sides_of(files, names, loop or LoopSettings())
    facts = {
        f"predictions ({name})" if len(files) == 2 else "predictions": str(path) for name, path in zip(names, files)
    }
    facts |= {"lines left out (unusable image in a file)": str(left_out), "report by code": code_commit(),
              "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    write_report(target, facts, sides, image_file, thumbnail or ThumbnailSize())
    for side in sides:
        figs = figures(side.lines)
        log.info("%s: %d lines, CER %.4f, loop rate %.4f", side.name, figs.lines, figs.cer, figs.loop_rate)
    log.info("report: %s", target)
    return target


def dataclass_options(parser: argparse.ArgumentParser, prefix: str, settings: Any) -> None:
    """`--prefix.field` options with the dataclass's types and defaults."""
    for item in fields(settings):
        parser.add_argument(f"--{prefix}.{item.name}", type=type(getattr(settings, item.name)),
                            default=getattr(settings, item.name), dest=f"{prefix}.{item.name}",
                            help=f"(default: {getattr(settings, item.name)})")  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m dsocr_lightning report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("predictions", nargs="+", help="one prediction file, or two of the same lines: before after")
    parser.add_argument("--output", default="report.html", help="the HTML file to write (never overwritten)")
    parser.add_argument("--names", nargs="+", help="a name per prediction file (default: the file names)")
    dataclass_options(parser, "loop", LoopSettings())
    dataclass_options(parser, "thumbnail", ThumbnailSize())
    args = vars(parser.parse_args(argv))
    loop = LoopSettings(**{f.name: args[f"loop.{f.name}"] for f in fields(LoopSettings)})
    thumbnail = ThumbnailSize(**{f.name: args[f"thumbnail.{f.name}"] for f in fields(ThumbnailSize)})
    return report(args["predictions"], args["output"], args["names"], loop, thumbnail)
