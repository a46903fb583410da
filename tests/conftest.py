"""Shared fixtures: the tiny TEST STAND-IN checkpoint and rendered Persian lines, made once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory):
    from dsocr_lightning.standin import write_standin_checkpoint

    # as the demo writes it: lm_head only where a label is learned (the same loss, a CPU step several times faster)
    return write_standin_checkpoint(tmp_path_factory.mktemp("standin") / "ckpt", labelled_logits_only=True)


@pytest.fixture(scope="session")
def tokenizer(standin_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(standin_dir)


@pytest.fixture(scope="session")
def lines_dir(tmp_path_factory):
    from dsocr_lightning.render import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("lines") / "data", {"train": 16, "test": 4}, seed=1)
