"""Tiny random models of every supported family, and a byte-level tokenizer, for fast tests."""

from __future__ import annotations

import os

import pytest
import torch

from offsite.testing import FAMILY_NAMES, VOCAB, make_tokenizer, tiny_config, tiny_model  # noqa: F401  (the tests import them from here)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threads only add overhead, and tests may run side by side


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    """A tiny LLaMA saved as a local Hugging Face directory (what users pass as --model)."""
    model = tiny_model("llama", 6)
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session", autouse=True)
def _emulator_record(tmp_path_factory):
    """The owner's record of the emulators it wrote (offsite.bundle.record_emulator) goes to a
    temporary file, not the user's cache."""
    from offsite.bundle import RECORD_ENV

    old = os.environ.get(RECORD_ENV)
    os.environ[RECORD_ENV] = str(tmp_path_factory.mktemp("record") / "emulators.json")
    yield
    if old is None:
        os.environ.pop(RECORD_ENV, None)
    else:
        os.environ[RECORD_ENV] = old
