"""Shared fixtures: the tiny TEST STAND-IN checkpoint and rendered Persian lines, made once per session; every test
runs in its own empty working folder (what a run writes by default, lightning_logs/, never lands in the project)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dsocr_lightning.families import VERSIONS, family
from dsocr_lightning.families.detect import environment_version

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors through Triton's interpreter (numpy)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Model versions need different transformers, so each environment runs its own tests: those under tests/<version>/
# carry that version's marker, all others `v1` (they use v1's remote-code stand-in); the other versions' are skipped
# with the reason.
ENVIRONMENT = environment_version()
TESTS = Path(__file__).parent


def version_of(path: Path) -> str:
    return next((version for version in VERSIONS if TESTS / version in path.parents), "v1")


def pytest_collection_modifyitems(config, items):
    for item in items:
        version = version_of(item.path)
        item.add_marker(version)
        if version != ENVIRONMENT:
            reason = f"a {version} test: this environment runs {ENVIRONMENT or 'neither'} ({family(version).install})"
            item.add_marker(pytest.mark.skip(reason=reason))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory):
    from dsocr_lightning.families.v1.standin import write_standin_checkpoint

    # as the demo writes it: lm_head only where a label is learned (the same loss, a CPU step several times faster)
    return write_standin_checkpoint(tmp_path_factory.mktemp("standin") / "ckpt", labelled_logits_only=True)


@pytest.fixture(scope="session")
def real_routing_dir(tmp_path_factory):
    """The stand-in with DeepSeek-OCR's routing: 64 routed experts, 6 per token, 2 shared."""
    from dsocr_lightning.families.v1.standin import write_standin_checkpoint

    return write_standin_checkpoint(tmp_path_factory.mktemp("moe64") / "ckpt", n_routed_experts=64,
                                    num_experts_per_tok=6, n_shared_experts=2)  # fmt: skip


@pytest.fixture(scope="session")
def tokenizer(standin_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(standin_dir)


@pytest.fixture(scope="session")
def lines_dir(tmp_path_factory):
    from dsocr_lightning.data.render import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("lines") / "data", {"train": 16, "test": 4}, seed=1)


@pytest.fixture(autouse=True)
def in_empty_folder(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
