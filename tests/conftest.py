"""Shared fixtures: the tiny TEST STAND-IN checkpoint and rendered Persian lines, made once per session; every test
runs in its own empty working folder (what a run writes by default, lightning_logs/, never lands in the project)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory):
    from dsocr_lightning.standin import write_standin_checkpoint

    return write_standin_checkpoint(tmp_path_factory.mktemp("standin") / "ckpt")


@pytest.fixture(scope="session")
def tokenizer(standin_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(standin_dir)


@pytest.fixture(scope="session")
def lines_dir(tmp_path_factory):
    from dsocr_lightning.render import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("lines") / "data", {"train": 16, "test": 4}, seed=1)


@pytest.fixture(autouse=True)
def in_empty_folder(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
