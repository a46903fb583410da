"""A minimal character alignment of a prediction to its reference: the edit operations its Levenshtein distance (the
CER's numerator) counts, for marking differences and counting confusions.

Rows of the distance table are numpy vectors: a row's insertions are a running minimum (`d[j] = j + min_k<=j (b[k] -
k)`), so a row costs a few vector operations. Short pairs keep the whole table and trace back through it; long ones
(pages) are split in two at an optimal point first (Hirschberg), so memory stays linear in the text's length.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import numpy as np

FULL_TABLE_CELLS = 1 << 20  # at most this many table cells (4 MB of int32) are kept for a trace-back


class Op(NamedTuple):
    """One step of the alignment: `kind` "=" (same character), "s" (substituted), "i" (inserted: in the prediction
    only, `reference` empty) or "d" (deleted: in the reference only, `prediction` empty)."""

    kind: str
    reference: str
    prediction: str


def codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def next_row(row: np.ndarray, char: int, prediction: np.ndarray, first: int) -> np.ndarray:
    """Distances of one more reference character (`first`: its distance to the empty prediction) from the last row."""
    best = np.empty_like(row)
    best[0] = first
    best[1:] = np.minimum(row[1:] + 1, row[:-1] + (prediction != char))
    columns = np.arange(len(row), dtype=row.dtype)
    return np.minimum.accumulate(best - columns) + columns


def last_row(reference: str, prediction: str) -> np.ndarray:
    """Distances of the whole reference to every prefix of the prediction."""
    pred, row = codes(prediction), np.arange(len(prediction) + 1, dtype=np.int64)
    for i, char in enumerate(codes(reference), 1):
        row = next_row(row, int(char), pred, i)
    return row


def traced(reference: str, prediction: str) -> list[Op]:
    """The alignment of a short pair, traced back through its whole table (substitution or match first)."""
    pred = codes(prediction)
    table = np.empty((len(reference) + 1, len(prediction) + 1), dtype=np.int64)
    table[0] = np.arange(len(prediction) + 1)
    for i, char in enumerate(codes(reference), 1):
        table[i] = next_row(table[i - 1], int(char), pred, i)
    ops, i, j = [], len(reference), len(prediction)
    while i or j:
        same = i and j and reference[i - 1] == prediction[j - 1]
        if i and j and table[i, j] == table[i - 1, j - 1] + (not same):
            ops.append(Op("=" if same else "s", reference[i - 1], prediction[j - 1]))
            i, j = i - 1, j - 1
        elif i and table[i, j] == table[i - 1, j] + 1:
            ops.append(Op("d", reference[i - 1], ""))
            i -= 1
        else:
            ops.append(Op("i", "", prediction[j - 1]))
            j -= 1
    return ops[::-1]


def align(reference: str, prediction: str) -> list[Op]:
    """A minimal alignment: as many non-"=" steps as the Levenshtein distance."""
    if (len(reference) + 1) * (len(prediction) + 1) <= FULL_TABLE_CELLS or len(reference) < 2:
        return traced(reference, prediction)
    middle = len(reference) // 2
    left = last_row(reference[:middle], prediction)
    right = last_row(reference[middle:][::-1], prediction[::-1])[::-1]
    split = int(np.argmin(left + right))
    return align(reference[:middle], prediction[:split]) + align(reference[middle:], prediction[split:])


def confusions(ops: list[Op]) -> Counter[Op]:
    """How often each substitution, insertion and deletion occurs."""
    return Counter(op for op in ops if op.kind != "=")
