"""Synthetic Persian text lines, rendered right to left with joined letters (Pillow's raqm layout).

For the offline demo and the tests only: they stand in for Parsynth's ~255 x 48 px lines. Text is kept in
Unicode logical order; only the rendering is shaped and laid out right to left.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

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


def write_imagefolder(folder: str | Path, splits: dict[str, int], seed: int = 0) -> Path:
    """Render lines into the `imagefolder` layout: folder/<split>/NNNNN.png + metadata.jsonl (file_name, text)."""
    folder, rng, font = Path(folder), random.Random(seed), find_font()
    for split, count in splits.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(count):
            text = random_line(rng)
            render_line(text, font).save(folder / split / f"{i:05d}.png")
            rows.append({"file_name": f"{i:05d}.png", "text": text})
        lines = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
        (folder / split / "metadata.jsonl").write_text(lines, encoding="utf-8")
    log.info("rendered %s synthetic Persian lines into %s", splits, folder)
    return folder
