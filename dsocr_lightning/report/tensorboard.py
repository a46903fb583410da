"""What a validation adds to TensorBoard beside its scalars: the per-line CER histogram and the worst lines, each as
its image with a table of reference, prediction and CER."""

from __future__ import annotations

from html import escape
from typing import Any

import numpy as np

from .lines import Line, worst_first
from .page import ImageOf
from .thumbnails import ThumbnailSize, as_array, thumbnail


def log_lines(writer: Any, prefix: str, lines: list[Line], step: int, worst: int, image_of: ImageOf,
              size: ThumbnailSize) -> None:  # fmt: skip
    """`<prefix>/cer_lines` (histogram of every line's CER), `<prefix>_worst/<rank>` (images) and `<prefix>_worst`
    (text), at `step`."""
    if not lines or not hasattr(writer, "add_histogram"):
        return
    writer.add_histogram(f"{prefix}/cer_lines", np.array([line.cer for line in lines]), step)
    if worst <= 0:
        return
    rows = ["| rank | line | CER | loop | reference | prediction |", "|---|---|---|---|---|---|"]
    for rank, line in enumerate(worst_first(lines)[:worst]):
        try:
            writer.add_image(f"{prefix}_worst/{rank}", as_array(thumbnail(image_of(line), size)), step,
                             dataformats="HWC")  # fmt: skip
        except (OSError, ValueError, SyntaxError) as error:
            rows.append(f"| {rank} | {line.index} | | | no image: {escape(str(error))} | |")
        loop = line.loop.describe() if line.loop else ""
        rows.append(f"| {rank} | {line.index} | {line.cer:.3f} | {cell(loop)} | {cell(line.reference)} | "
                    f"{cell(line.prediction)} |")  # fmt: skip
    writer.add_text(f"{prefix}_worst", "\n".join(rows), step)


def cell(text: str) -> str:
    """Text for a markdown table cell: no row or column breaks."""
    return escape(text).replace("|", "\\|").replace("\n", " ")
