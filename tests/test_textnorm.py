"""Persian normalisation used for `*/cer_norm*`."""

import pytest

from dsocr_lightning.training.metrics import CERMetrics
from dsocr_lightning.training.textnorm import normalize_persian

ZWNJ = "\u200c"


@pytest.mark.parametrize(
    ("arabic", "persian"),
    [("\u064a", "\u06cc"), ("\u0649", "\u06cc"), ("\u0643", "\u06a9")],
    ids=["yeh", "maksura", "kaf"],
)
def test_letter_pairs(arabic, persian):
    assert normalize_persian(f"{arabic}ا{arabic}") == f"{persian}ا{persian}"
    assert normalize_persian(persian) == persian


def test_tatweel_removed():
    assert normalize_persian("کـــتاب") == "کتاب"


@pytest.mark.parametrize("variant", ["\u200b", "\u00ad", "\ufeff", ZWNJ + ZWNJ, ZWNJ + "\u200b"])
def test_zwnj_variants_become_one_zwnj(variant):
    assert normalize_persian(f"می{variant}روم") == f"می{ZWNJ}روم"


def test_zwnj_beside_spaces_or_at_the_ends_is_dropped():
    assert normalize_persian(f"{ZWNJ}کتاب{ZWNJ} ها {ZWNJ}خوب{ZWNJ}") == "کتاب ها خوب"


def test_digits_unified():
    assert normalize_persian("۱۲۳ ٤٥٦ 789") == "123 456 789"


def test_whitespace_collapsed_and_idempotent():
    text = "  سلام\t\n  دنيا  ۲۰۲۴ "
    once = normalize_persian(text)
    assert once == "سلام دنیا 2024" and normalize_persian(once) == once


def test_latin_unchanged():
    assert normalize_persian("Free OCR. v2 (test)") == "Free OCR. v2 (test)"


def test_normalised_cer_forgives_arabic_forms():
    metrics = CERMetrics(normalize_persian)
    metrics.update(["كتاب يك"], ["کتاب یک"])
    out = metrics.compute("val")
    assert out["val/cer"] > 0.4 and out["val/cer_norm"] == 0
    assert set(out) == {
        f"val/{k}" for k in ("cer", "cer_mean", "cer_median", "cer_norm", "cer_norm_mean", "cer_norm_median")
    }
