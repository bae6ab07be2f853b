"""The distilled Plug-in (offsite.distilled_plugin) and `offsite plug --distill-*`, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tokenizer, tiny_model

import offsite.data.text as text
from offsite.adapters import LoraOptions
from offsite.bundle import AdapterBundle, load_adapter, load_emulator, save_adapter, save_emulator
from offsite.cli import main
from offsite.distilled_plugin import (DistillSpec, content_spec, distill_plugin, public_sentences, settings_of,
                                      surrogate_inputs, teacher_labels)
from offsite.emulator import build_emulator
from offsite.errors import OffsiteError
from offsite.models.families import get_blocks
from offsite.plug import plug
from offsite.train import TrainConfig
from offsite.tune import TrainingData, TuneSettings, tune_adapter

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
PAIRS = [(f"Headline: {WORDS[i % 11]} {WORDS[(3 * i) % 11]}\nSarcastic:", " yes" if i % 2 else " no")
         for i in range(16)]


def settings(steps=4):
    return TuneSettings(train=TrainConfig(lr=1e-2, max_steps=steps, batch_size=4, micro_batch_size=4,
                                          progress=False, checkpoint_every=None))


@pytest.fixture
def small_text(monkeypatch):
    """A public text of known sentences: 'Sentence n has five words.' and some that the filter drops."""
    docs = [" ".join(f"Sentence {n} has five words. too short. lower case sentences are never kept here. "
                     + "Far " + "long " * 30 + "sentence." for n in range(i, i + 10)) for i in range(0, 200, 10)]
    monkeypatch.setattr(text, "public_text", lambda part: docs)
    return docs


def test_the_content_tasks_templates_are_the_reference_ones():
    assert content_spec("sarcasm") == DistillSpec("Headline: {text}\nSarcastic:", ("no", "yes"))
    assert content_spec("sentiment") == DistillSpec("Review: {text}\nSentiment:", ("negative", "positive"))
    assert content_spec("party") == DistillSpec("Speech: {text}\nParty:", ("democrat", "republican"), sentences=2)
    assert content_spec("spam") == DistillSpec("Subject: {text}\n{text}\nSpam:", ("no", "yes"))
    with pytest.raises(OffsiteError, match="no single prompt"):
        content_spec("facts")


def test_surrogate_inputs_are_deterministic_and_fill_every_slot(small_text):
    kept = public_sentences()
    assert len(kept) == 200 and all(s.startswith("Sentence ") for s in kept)  # bounds and upper case
    spec = DistillSpec("Subject: {text}\n{text}\nSpam:", ("no", "yes"), examples=20, seed=3, sentences=2)
    got = surrogate_inputs(spec)
    assert got == surrogate_inputs(spec) and got != surrogate_inputs(DistillSpec(**{**spec.record(), "seed": 4}))
    assert len(got) == 20 and len(set(got)) == 20
    used = []
    for p in got:
        head, body, tail = p.split("\n")
        assert head.startswith("Subject: ") and tail == "Spam:" and "{text}" not in p
        for slot in (head[len("Subject: "):], body):
            parts = slot.split(". ")
            assert len(parts) == 2 and all(s.rstrip(".") + "." in kept for s in parts)
            used += parts
    assert len(set(used)) == 80  # 20 examples x 2 slots x 2 sentences, none drawn twice
    with pytest.raises(OffsiteError, match="200 sentences"):
        surrogate_inputs(DistillSpec("{text}", ("a", "b"), examples=101, sentences=2))


@pytest.mark.parametrize("spec,words", [(DistillSpec("Headline:\nSarcastic:", ("no", "yes")), "no {text} slot"),
                                        (DistillSpec("{text}", ("yes",)), "at least 2"),
                                        (DistillSpec("{text}", ("a", "a")), "repeat")])
def test_a_spec_without_a_slot_or_two_choices_is_refused(spec, words):
    with pytest.raises(OffsiteError, match=words):
        spec.check()


def test_teacher_labels_are_centred_per_choice(monkeypatch):
    import offsite.distilled_plugin as dp

    lls = [[-1.0, -3.0], [-2.0, -2.5], [-1.5, -1.0], [-4.0, -2.0]]

    def scored(offset):
        return lambda model, tok, docs, **kw: {"details": [{"lls": [a, b + offset]} for a, b in lls[:len(docs)]]}
    prompts = ["a", "b", "c", "d"]
    monkeypatch.setattr(dp, "score_mc", scored(0.0))
    labels, shares = teacher_labels(None, None, prompts, ["no", "yes"])
    # centred: no = -2.125, yes = -2.125 on average -> the raw argmax
    assert labels == [0, 0, 1, 1] and shares == [0.5, 0.5]
    monkeypatch.setattr(dp, "score_mc", scored(-50.0))  # a label word the model disfavours everywhere
    assert teacher_labels(None, None, prompts, ["no", "yes"]) == (labels, shares)


@pytest.fixture
def owner(tmp_path, small_text):
    """The model owner's side: a tiny model, its shipped emulator (saved, loaded) and a returned adapter."""
    tok = make_tokenizer()
    model = tiny_model("llama", 6, seed=0)
    save_emulator(build_emulator("uniform", model, tok, "tiny", "2,2", keep=1), tmp_path / "emu")
    bundle, _ = tune_adapter(load_emulator(tmp_path / "emu"), TrainingData("qa", PAIRS), settings())
    save_adapter(bundle, tmp_path / "ad")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return model, tok, tmp_path


def test_distill_plugin_tunes_the_full_models_adapter_and_plugs(owner):
    model, tok, root = owner
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emu, returned = load_emulator(root / "emu"), load_adapter(root / "ad")
    spec = DistillSpec("Headline: {text}\nSarcastic:", ("no", "yes"), examples=16)
    distilled, record = distill_plugin(model, tok, emu, returned, spec, settings(), root / "work")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the full model untouched
    assert not (root / "work").exists()
    assert distilled.kind == "full" and distilled.sources == returned.sources == [0, 1, 4, 5]
    assert distilled.emulator_digest == emu.manifest["digest"]
    assert record["template"] == spec.template and record["examples"] == 16 and sum(record["label_shares"]) == 1
    assert distilled.training["distilled"] == record and distilled.training["data"] == "surrogate"
    blocks = get_blocks(model)
    changed = [k for k, t in distilled.state.items()
               if not torch.equal(t, blocks[int(k.split(".")[1])].get_parameter(k.split(".", 2)[2]))]
    assert changed  # the distillation moved the adapter's weights
    plugged = plug(tiny_model("llama", 6, seed=0), distilled, emu.manifest)
    for key, t in distilled.state.items():
        _, src, name = key.split(".", 2)
        assert torch.equal(get_blocks(plugged)[int(src)].get_parameter(name), t)
    # the same inputs give the same adapter
    again, _ = distill_plugin(model, tok, load_emulator(root / "emu"), returned, spec, settings(), root / "work")
    assert all(torch.equal(again.state[k], t) for k, t in distilled.state.items())


def test_settings_of_a_returned_adapter_are_the_data_owners(owner):
    _, _, root = owner
    got = settings_of(load_adapter(root / "ad"))
    assert got.train == settings().train and got.adapter == "full" and got.blocks == "all" and got.dp is None
    lora = settings_of(AdapterBundle("lora", {}, "", "", {}, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                                     training={"blocks": "bottom"}))
    assert lora.lora == LoraOptions(r=4, alpha=8, dropout=0.0) and lora.blocks == "bottom" and lora.train == TrainConfig()


def plug_argv(root, *extra):
    return ["plug", "--model", str(root / "model"), "--adapter", str(root / "ad"), "--out", str(root / "p"), *extra]


def test_offsite_plug_distils_and_records_it(owner):
    _, _, root = owner
    assert main(plug_argv(root, "--emulator", str(root / "emu"), "--distill-template", "Headline: {text}\\nSarcastic:",
                          "--distill-choices", "no,yes", "--distill-examples", "12")) == 0
    record = json.loads((root / "p" / "distill.json").read_text())
    assert record["distilled"] is True and record["template"] == "Headline: {text}\nSarcastic:"
    assert record["choices"] == ["no", "yes"] and record["examples"] == 12 and record["sentences"] == 1
    assert record["adapter_digest"] == load_adapter(root / "ad").manifest["digest"]
    assert record["emulator_digest"] == load_emulator(root / "emu").manifest["digest"]
    from transformers import AutoModelForCausalLM

    plugged = AutoModelForCausalLM.from_pretrained(root / "p")
    returned = load_adapter(root / "ad")
    assert any(not torch.equal(get_blocks(plugged)[int(k.split(".")[1])].get_parameter(k.split(".", 2)[2]), t)
               for k, t in returned.state.items())  # not the returned adapter


@pytest.mark.parametrize("extra,words", [
    (["--distill-template", "{text}\\nA:", "--distill-choices", "a,b"], "--emulator"),
    (["--emulator", "EMU", "--distill-template", "Q:\\nA:", "--distill-choices", "a,b"], "{text}"),
    (["--emulator", "EMU", "--distill-template", "{text}", "--distill-choices", "a"], "at least 2"),
    (["--emulator", "EMU", "--distill-template", "{text}"], "--distill-choices"),
    (["--emulator", "EMU", "--distill-examples", "5"], "--distill-template"),
    (["--emulator", "EMU", "--distill-template", "{text}", "--distill-choices", "a,b", "--peft"], "--peft"),
])
def test_offsite_plug_refuses_a_distillation_it_cannot_run(tmp_path, capsys, extra, words):
    argv = ["plug", "--model", "M", "--adapter", "A", "--out", str(tmp_path / "p")]
    assert main(argv + [e.replace("EMU", str(tmp_path / "emu")) for e in extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not (tmp_path / "p").exists()
