"""Sources for the bad-input battery, built once per session and copied per test."""

from __future__ import annotations

import shutil

import pytest

from tests.safety.sources import Source, peft_lora, saved_composition


@pytest.fixture(scope="session")
def _pristine(tmp_path_factory, registry):
    root = tmp_path_factory.mktemp("sources")
    return saved_composition(root, registry), peft_lora(root)


def _copy(src: Source, tmp_path) -> Source:
    target = tmp_path / src.path.name
    shutil.copytree(src.path, target, symlinks=True)
    return Source(target, src.reference, src.batch)


@pytest.fixture
def composition(_pristine, tmp_path) -> Source:
    """A fresh copy of a saved composition (two LoRAs under a learnable sum)."""
    return _copy(_pristine[0], tmp_path)


@pytest.fixture
def peft_dir(_pristine, tmp_path) -> Source:
    """A fresh copy of a LoRA directory written by HF PEFT."""
    return _copy(_pristine[1], tmp_path)
