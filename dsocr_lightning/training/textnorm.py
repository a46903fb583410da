"""Persian normalisation for scoring (never applied to training data): forms that read the same count as equal.

Arabic yeh/kaf (and alef maksura) become Persian yeh/keheh, tatweel goes, zero-width variants become one ZWNJ
(none beside a space), Arabic-Indic and Persian digits become Latin, whitespace runs become one space.
The text stays in logical order: no reshaping, no bidi reordering.
"""

from __future__ import annotations

import re

ZWNJ = "\u200c"
LETTERS = {"\u064a": "\u06cc", "\u0649": "\u06cc", "\u0643": "\u06a9", "\u0640": None}  # ي ى → ی, ك → ک, ـ → ∅
ZERO_WIDTH = {"\u200b": ZWNJ, "\u00ad": ZWNJ, "\ufeff": ZWNJ}  # zero-width space, soft hyphen, BOM
DIGITS = {0x0660 + d: str(d) for d in range(10)} | {0x06F0 + d: str(d) for d in range(10)}
TABLE = str.maketrans({**LETTERS, **ZERO_WIDTH}) | DIGITS
ZWNJ_RUNS = re.compile(f"{ZWNJ}+")
ZWNJ_BY_SPACE = re.compile(rf"\s*{ZWNJ}\s+|\s+{ZWNJ}\s*|^{ZWNJ}|{ZWNJ}$")
SPACES = re.compile(r"\s+")


def normalize_persian(text: str) -> str:
    """The scoring form of `text`: idempotent, Latin-only text is unchanged but for whitespace."""
    text = ZWNJ_RUNS.sub(ZWNJ, text.translate(TABLE))
    text = ZWNJ_BY_SPACE.sub(lambda m: " " if m.group().strip(ZWNJ) else "", text)
    return SPACES.sub(" ", text).strip()
