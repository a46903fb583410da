"""Synthetic Persian text lines: words rendered right to left with joined letters (Pillow's raqm layout), or
numbers of Persian digits in fixed cells.

For the offline demo and the tests only: they stand in for Parsynth's ~255 x 48 px lines. Text is kept in
Unicode logical order; only the rendering is shaped and laid out right to left.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from PIL import Image, ImageDraw, ImageFont, features

log = logging.getLogger(__name__)

# Common Persian words (with ZWNJ in the compounds) and Persian digits.
WORDS = (
    "سلام دنیا کتاب خانه مدرسه دانشگاه ایران تهران شیراز اصفهان زبان فارسی نوشتن خواندن "
    "آب نان گل درخت آسمان ستاره ماه خورشید دریا کوه باران برف شب روز امروز فردا "
    "می‌روم می‌خوانم کتاب‌ها خانه‌ها دوست مهربان بزرگ کوچک زیبا خوب بد سفید سیاه "
    "پدر مادر برادر خواهر بچه‌ها معلم دانش‌آموز شهر روستا خیابان بازار ژاله گچ چای"
).split()
DIGITS = "۰۱۲۳۴۵۶۷۸۹"
# Digit strips: the tiny mode stretches a line to its 512 px view, 8 vision patches (64 px) across; a strip of 8
# equal cells puts each digit in one patch column, wherever the number ends.
STRIP_CELLS = 8
STRIP_CELL = (32, 40)  # px per cell: a 256 x 40 strip, about Parsynth's line size
# Bold 44 px: a 25 x 33 px digit in its cell. The zero is a dot: at regular weight and 36 px, the tiny stand-in's
# random 64-px patch filter sees it barely apart from a blank cell and learns to read it as the line's end.
STRIP_FONT_SIZE = 44
STRIP_FONT_WEIGHT = "Bold"
LineKind = Literal["words", "digits"]


def find_font() -> Path:
    """A font with Persian glyphs: the `fontpkg-noto-sans-arabic` package (dev extra), else DejaVu Sans."""
    try:
        import fontpkg_noto_sans_arabic as noto

        found = sorted((noto.ROOT / "files").glob("*.ttf"))
        if found:
            return found[0]
    except ImportError:
        pass
    for path in (Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),):
        if path.exists():
            return path
    raise FileNotFoundError("no Persian font: `pip install fontpkg-noto-sans-arabic` (the dev extra has it)")


def check_shaping() -> None:
    """Refuse to render unshaped Persian (isolated letters, left to right) if raqm is missing."""
    if not features.check("raqm"):
        raise RuntimeError("Pillow lacks the raqm layout engine (libraqm + fribidi): Persian would be unshaped")


def random_line(rng: random.Random, min_words: int = 2, max_words: int = 5) -> str:
    """A short Persian line, sometimes with a number."""
    words = rng.sample(WORDS, rng.randint(min_words, max_words))
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words) + 1), "".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 4))))
    return " ".join(words)


def render_line(text: str, font_path: Path | None = None, size: int = 28, pad: int = 10) -> Image.Image:
    """Black Persian text on white, right to left, tight box plus `pad` pixels."""
    check_shaping()
    font = ImageFont.truetype(str(font_path or find_font()), size, layout_engine=ImageFont.Layout.RAQM)
    left, top, right, bottom = font.getbbox(text, direction="rtl", language="fa")
    image = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), "white")
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill="black", direction="rtl", language="fa")
    return image


def random_number(rng: random.Random, min_digits: int = 4, max_digits: int = STRIP_CELLS) -> str:
    """A number of Persian digits, any digit anywhere (leading zeros too)."""
    return "".join(rng.choice(DIGITS) for _ in range(rng.randint(min_digits, max_digits)))


@functools.lru_cache(maxsize=4)
def strip_font(font_path: Path) -> ImageFont.FreeTypeFont:
    """The digit strips' font: its Bold instance (Noto Sans Arabic is a variable font), else as it is."""
    font = ImageFont.truetype(str(font_path), STRIP_FONT_SIZE)
    try:
        font.set_variation_by_name(STRIP_FONT_WEIGHT)
    except OSError:  # not a variable font (the DejaVu Sans fallback)
        log.warning("%s has no %s instance: digit strips in its regular weight", font_path, STRIP_FONT_WEIGHT)
    return font


def render_digit_strip(text: str, font_path: Path | None = None) -> Image.Image:
    """Black digits on a white 256 x 40 strip, left to right (numbers read so in Persian text too), each centred
    in its own 32 px cell from the left edge, on one baseline: a digit's place depends only on its index."""
    if len(text) > STRIP_CELLS or any(c not in DIGITS for c in text):
        raise ValueError(f"a digit strip holds up to {STRIP_CELLS} Persian digits, got {text!r}")
    font = strip_font(font_path or find_font())
    (width, height), (_, top, _, bottom) = STRIP_CELL, font.getbbox(DIGITS)
    image = Image.new("RGB", (width * STRIP_CELLS, height), "white")
    draw = ImageDraw.Draw(image)
    y = (height - (bottom - top)) / 2 - top  # the ink of all ten digits centred vertically
    for k, digit in enumerate(text):
        draw.text((k * width + (width - font.getlength(digit)) / 2, y), digit, font=font, fill="black")
    return image


LINES: dict[str, tuple[Callable[[random.Random], str], Callable[[str, Path], Image.Image]]] = {
    "words": (random_line, render_line),
    "digits": (random_number, render_digit_strip),
}


def write_imagefolder(folder: str | Path, splits: dict[str, int], seed: int = 0, kind: LineKind = "words") -> Path:
    """Render lines into the `imagefolder` layout: folder/<split>/NNNNN.png + metadata.jsonl (file_name, text).
    No text is in two splits: a validation line is one the model never trained on."""
    folder, rng, font = Path(folder), random.Random(seed), find_font()
    make_text, render = LINES[kind]
    seen: set[str] = set()
    for split, count in splits.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(count):
            text = unseen_text(make_text, rng, seen)
            render(text, font).save(folder / split / f"{i:05d}.png")
            rows.append({"file_name": f"{i:05d}.png", "text": text})
        lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
        (folder / split / "metadata.jsonl").write_text(lines, encoding="utf-8")
    log.info("rendered %s synthetic Persian %s lines into %s", splits, kind, folder)
    return folder


def unseen_text(make_text: Callable[[random.Random], str], rng: random.Random, seen: set[str]) -> str:
    """A new text from `make_text`, added to `seen` (a repeat is drawn again)."""
    text = make_text(rng)
    while text in seen:
        text = make_text(rng)
    seen.add(text)
    return text
