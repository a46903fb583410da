"""A prediction as HTML with its character differences from the reference marked, and characters named.

Runs of one kind of edit become one element, so that marks inside a word keep its letters joined:
`<span class="sub">` characters read instead of the reference's (its title names both), `<span class="ins">` extra
characters, `<del class="del">` reference characters the prediction lacks. A mark on an invisible character (space,
ZWNJ, other format characters) shows a sign instead, so that it can be seen.
"""

from __future__ import annotations

import unicodedata
from html import escape
from itertools import groupby

from .align import Op

SIGNS = {" ": "␣", "\u200c": "¦", "\u200d": "⁞", "\t": "⇥", "\n": "↵"}  # what a marked invisible character shows
CLASSES = {"s": "sub", "i": "ins", "d": "del"}


def char_name(char: str) -> str:
    """`U+06CC ARABIC LETTER FARSI YEH`."""
    return f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}"


def invisible(char: str) -> bool:
    return char.isspace() or unicodedata.category(char) in ("Cf", "Cc", "Zs")


def visible(text: str) -> str:
    """Escaped text with each invisible character as its sign (SIGNS, else `·`)."""
    return "".join(escape(SIGNS.get(c, "·")) if invisible(c) else escape(c) for c in text)


def run_title(kind: str, reference: str, prediction: str) -> str:
    names = {"s": f"read {', '.join(map(char_name, prediction))} for {', '.join(map(char_name, reference))}",
             "i": f"extra {', '.join(map(char_name, prediction))}",
             "d": f"missing {', '.join(map(char_name, reference))}"}  # fmt: skip
    return escape(names[kind], quote=True)


def marked(ops: list[Op]) -> str:
    """The prediction with its substitutions, insertions and the reference's missing characters marked."""
    parts = []
    for kind, run in groupby(ops, key=lambda op: op.kind):
        run = list(run)
        reference, prediction = "".join(op.reference for op in run), "".join(op.prediction for op in run)
        if kind == "=":
            parts.append(escape(prediction))
            continue
        tag = "del" if kind == "d" else "span"
        shown = visible(reference if kind == "d" else prediction)
        parts.append(f'<{tag} class="{CLASSES[kind]}" title="{run_title(kind, reference, prediction)}">{shown}</{tag}>')
    return "".join(parts)


def char_cell(char: str) -> str:
    """A table cell's view of one character: the glyph (or its sign) and its name."""
    return f'<span class="glyph">{visible(char)}</span> <span class="cname">{escape(char_name(char))}</span>'
