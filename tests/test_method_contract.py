"""The contract every registered emulator method keeps, tested for each one without its writing a test.

emulate -> save the bundle -> load it -> tune the adapter 2 steps -> plug it into the full model ->
the plugged model saves and loads in plain ``transformers`` and gives finite logits; on a tiny model
of each supported family. The test is parametrized over the method registry, so a method that
registers itself is tested here too; it runs with the method's default options, except for the
small settings below that keep a case to seconds (a new method that trains or reads text at
build time adds its own small settings here).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILY_NAMES, tiny_model

import offsite.data.text as text
import offsite.emulator.gradmatch as gradmatch
from offsite.adapters import LoraOptions
from offsite.bundle import load_emulator, save_emulator
from offsite.emulator import all_methods, build_emulator
from offsite.models import get_blocks
from offsite.plug import plug
from offsite.train import TrainConfig
from offsite.tune import TrainingData, TuneSettings, tune_adapter, untuned_adapter

N_LAYERS = 8
ADAPTER_LAYERS = "2,2"
DOCS = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog, and the cat sleeps. " * 6
        for i in range(24)]
PAIRS = [(f"Question: what is {i} plus {i}?\nAnswer:", f" {2 * i}") for i in range(16)]
X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))

# small settings of the methods that train or read text while they build (defaults otherwise)
SMALL = {
    "kd": dict(kd_steps=2, kd_batch_size=2, kd_block_size=32, kd_val_docs=2),
    "gradot": dict(ratio=0.5, support_seqs=4, support_len=32, support_batch_size=2),
    "scaleot": dict(stage1_steps=2, stage1_batch_size=2, stage1_block_size=32, rl_batch_size=2, harmonizer_rank=4),
    "gradmatch": dict(gm_steps=2, gm_batch_size=2, gm_examples=8, gm_val_examples=2),
}

METHOD_NAMES = sorted(all_methods())


def logits(model, x=X):
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits


@pytest.fixture
def quiet_world(tmp_path, monkeypatch):
    """Public text from memory and a cache of its own, so no case reads or writes the user's cache."""
    monkeypatch.setenv("OFFSITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(text, "public_text", lambda part: list(DOCS[:20] if part == "train" else DOCS[20:]))
    monkeypatch.setattr(gradmatch, "source_pairs", lambda src: list(PAIRS))  # the public QA pairs
    return tmp_path


def test_every_built_in_method_is_under_contract():
    assert {"uniform", "kd", "gradot", "scaleot", "gradmatch"} <= set(METHOD_NAMES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_contract(method, family, tokenizer, quiet_world):
    tmp = quiet_world
    model = tiny_model(family, N_LAYERS)
    full_logits = logits(model)

    emu = build_emulator(method, model, tokenizer, "tiny", ADAPTER_LAYERS, **SMALL.get(method, {}))
    assert torch.equal(logits(model), full_logits), f"{method} changed the owner's model while emulating it"
    save_emulator(emu, tmp / "emu")
    loaded = load_emulator(tmp / "emu")
    assert loaded.manifest["method"] == method
    torch.testing.assert_close(logits(loaded.model), logits(emu.model), rtol=0, atol=0)

    start = untuned_adapter(loaded).state
    settings = TuneSettings(adapter="full", lora=LoraOptions(r=4, alpha=8),
                            train=TrainConfig(lr=1e-2, max_steps=2, batch_size=4, micro_batch_size=4,
                                              progress=False, checkpoint_every=None))
    bundle, _ = tune_adapter(loaded, TrainingData("qa", PAIRS), settings)
    assert bundle.state.keys() == start.keys()
    assert any(not torch.equal(bundle.state[k], start[k]) for k in start), "two steps of tuning moved nothing"

    plugged = plug(copy.deepcopy(model), bundle, loaded.manifest)
    plugged.save_pretrained(tmp / "plugged")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp / "plugged")
    back.eval()
    for key, t in bundle.state.items():  # the tuned adapter blocks, at their original positions
        _, src, name = key.split(".", 2)
        assert torch.equal(get_blocks(back)[int(src)].get_parameter(name), t)
    out = logits(back)
    assert out.shape == full_logits.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, logits(plugged), rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, full_logits)
