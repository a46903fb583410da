"""The per-line CER histogram as inline SVG (no script, no network): a bar per bin and per set of predictions."""

from __future__ import annotations

import math
from html import escape

BIN_WIDTH = 0.1  # CER bins: exactly 0, then (0, 0.1], (0.1, 0.2], ..., (0.9, 1], then above 1
BINS = ["0"] + [f"≤{(k + 1) * BIN_WIDTH:.1f}" for k in range(10)] + [">1"]
COLOURS = ["#8a8f98", "#1f6fd1"]  # one per set: the "before" grey, the latest blue
PLOT_HEIGHT, BAR, GROUP, LEFT, BOTTOM = 160, 14, 44, 20, 36  # px; GROUP: one bin's width


def bin_of(cer: float) -> int:
    """Index into BINS: 0 for an exact line, 1..10 for the tenths up to 1, 11 above 1."""
    if cer <= 0:
        return 0
    return math.ceil(round(cer / BIN_WIDTH, 9)) if cer <= 1 else 11  # rounded: 0.3 / 0.1 is 2.9999999999999996


def counts(cers: list[float]) -> list[int]:
    out = [0] * len(BINS)
    for cer in cers:
        out[bin_of(cer)] += 1
    return out


def bars(series: list[list[int]], top: int) -> list[str]:
    """The rectangles and their count labels, bins left to right, sets side by side within a bin."""
    shapes, start = [], (GROUP - BAR * len(series)) / 2  # the bars of a bin, centred in it
    for b in range(len(BINS)):
        for s, values in enumerate(series):
            height = PLOT_HEIGHT * values[b] / top
            x, y = LEFT + b * GROUP + start + s * BAR, PLOT_HEIGHT - height + 16
            shapes.append(f'<rect class="bar" x="{x}" y="{y:.1f}" width="{BAR - 2}" height="{height:.1f}" '
                          f'fill="{COLOURS[s - len(series)]}"><title>{values[b]} lines</title></rect>')  # fmt: skip
            if values[b]:
                shapes.append(f'<text x="{x + BAR / 2 - 1}" y="{y - 3:.1f}" class="count">{values[b]}</text>')
        shapes.append(
            f'<text x="{LEFT + b * GROUP + GROUP / 2}" y="{PLOT_HEIGHT + 32}" class="bin">{escape(BINS[b])}</text>'
        )
    return shapes


def histogram_svg(cers_by_set: list[list[float]]) -> str:
    """One SVG: per-line CER counts of each set of predictions (the last in blue)."""
    series = [counts(cers) for cers in cers_by_set]
    top = max(1, *(max(values) for values in series))
    width = LEFT + len(BINS) * GROUP + 10
    height = PLOT_HEIGHT + BOTTOM + 16
    axis = f'<line x1="{LEFT - 4}" y1="{PLOT_HEIGHT + 16}" x2="{width}" y2="{PLOT_HEIGHT + 16}" stroke="#444"/>'
    return (f'<svg class="histogram" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<title>lines per CER bin</title>{axis}{"".join(bars(series, top))}'
            "</svg>")  # fmt: skip
