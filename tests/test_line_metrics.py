"""The line metrics beside CER against hand-computed values: WER, exact lines, mean length ratio, and the loop rule
(loops it must catch, near-misses it must not)."""

import pytest
import torch

from dsocr_lightning.training.line_metrics import LineMetrics, Loop, LoopSettings, find_loop, trailing_copies

RULE = LoopSettings(min_repeats=3, min_chars=10)
WORD = " دنیا"  # 5 characters: a space and a word


def test_trailing_copies():
    assert trailing_copies("سلام" + WORD * 4, WORD) == 4
    assert trailing_copies("ابابab", "ab") == 1 and trailing_copies("", "ab") == 0
    assert trailing_copies("۰۰۰۰", "۰۰") == 2  # whole copies only


@pytest.mark.parametrize(
    "prediction, reference, ended, loop",
    [
        # ran to max_new_tokens without the end token, whatever the text
        ("سلام", "سلام", False, Loop(True)),
        # a word repeated: 3 copies beyond the reference's one, 15 characters
        ("سلام" + WORD * 4, "سلام دنیا", True, Loop(False, WORD, 4)),
        # one character repeated: 11 beyond the reference's one
        ("۱۲" + "۳" * 12, "۱۲۳", True, Loop(False, "۳", 12)),
        # a long span three times, the reference has none of it
        ("x" + " the cat sat." * 3, "x", True, Loop(False, " the cat sat.", 3)),
        # the reference ends in a rule of 10 dashes, the prediction in 30: 20 extra
        ("خط" + "-" * 30, "خط" + "-" * 10, True, Loop(False, "-", 30)),
        # no reference (prediction of unlabelled images): the copies themselves count
        ("سلام" + WORD * 3, None, True, Loop(False, WORD, 3)),
    ],
    ids=["cap", "word", "char", "long-span", "beyond-the-reference", "no-reference"],
)
def test_loops_it_catches(prediction, reference, ended, loop):
    assert find_loop(prediction, reference, ended, RULE) == loop


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("۱۰۰۰۰۰", "۱۰۰۰۰۰"),  # the number has those zeros
        ("۱۰۰۰۰۰۰", "۱۰۰۰"),  # three zeros too many: 3 extra copies but 3 characters, an ordinary error
        ("فصل یک" + "." * 14, "فصل یک" + "." * 12),  # a dot leader two dots longer: 2 extra copies
        ("خط" + "-" * 20, "خط" + "-" * 20),  # the reference ends in the same 20 dashes
        ("سلام دنیا سلام دنیا", "سلام دنیا"),  # said twice: 2 copies
        ("آب" + " آب" * 3, "آب"),  # 3 extra copies of " آب", but 9 characters
        ("کتاب خوب است", "کتاب خوب است"),
        ("", "سلام"),
    ],
    ids=["zeros", "three-zeros-more", "dot-leader", "same-rule", "twice", "short", "plain", "empty"],
)
def test_near_misses_it_leaves(prediction, reference):
    assert find_loop(prediction, reference, True, RULE) is None


def test_loop_settings_move_the_threshold():
    assert find_loop("آب" + " آب" * 3, "آب", True, LoopSettings(min_repeats=3, min_chars=9)) == Loop(False, " آب", 3)
    assert find_loop("سلام" + WORD * 4, "سلام دنیا", True, LoopSettings(min_repeats=4, min_chars=10)) is None


def test_line_metrics_against_hand_computed_values():
    metrics = LineMetrics(RULE)
    # batch 1: read exactly; batch 2: a word read wrong and one missing, then decoding ran to the cap
    assert metrics.update(["سلام دنیا"], ["سلام دنیا"], [True]) == [None]
    assert metrics.update(["کتاب خوب"], ["کتاب بد است"], [False]) == [Loop(True)]
    values = {name: float(metric.compute()) for name, metric in metrics.metrics("val").items()}
    assert values == pytest.approx({
        "val/wer": (0 + 2) / (2 + 3),  # word edits over reference words, all lines
        "val/exact_lines": 1 / 2,
        "val/loop_rate": 1 / 2,
        "val/length_ratio": (9 / 9 + 8 / 11) / 2,  # characters: "کتاب خوب" 8, "کتاب بد است" 11
    })  # fmt: skip


def test_transcribe_says_which_lines_ran_to_the_cap(tokenizer, monkeypatch):
    from dsocr_lightning.training import generation

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    word = tokenizer.encode("سلام", add_special_tokens=False)
    cut = word * 3  # decoding stopped at max_new_tokens, no end token
    new = [word + [eos] + [pad] * (len(cut) - len(word) - 1), cut]  # ended with the end token, then padding
    monkeypatch.setattr(generation, "generate_tokens", lambda *args: torch.tensor(new))
    texts, ended = generation.transcribe(
        None, tokenizer, {"family": "v1"}, generation.GenerationSettings(max_new_tokens=len(cut))
    )
    assert texts[0] == "سلام" and ended == [True, False]
