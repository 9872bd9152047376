"""Shared fixtures: tiny random models built offline, once per session."""

from pathlib import Path

import pytest
from tinymodels import make_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer trained on local text."""
    return make_model("llama", "bpe", tmp_path_factory.mktemp("tiny-llama"))
