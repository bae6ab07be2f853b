"""The two-party pipeline on tiny random models: emulate -> tune -> plug, for every family."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAMILY_NAMES, tiny_model

from offsite.adapters import LoraOptions
from offsite.bundle import load_adapter, load_emulator, save_emulator
from offsite.emulator import build_emulator, split_layers, uniform_choose
from offsite.errors import OffsiteError
from offsite.models import family_of, get_blocks
from offsite.plug import plug
from offsite.train import TrainConfig
from offsite.tune import TrainingData, TuneSettings, tune_adapter, untuned_adapter

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
PAIRS = [(f"Question: what is {i} plus {i}?\nAnswer:", f" {2 * i}") for i in range(24)]


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def settings(kind="full", steps=3):
    return TuneSettings(adapter=kind, lora=LoraOptions(r=4, alpha=8),
                        train=TrainConfig(lr=1e-2, max_steps=steps, batch_size=4, micro_batch_size=4,
                                          progress=False, checkpoint_every=None))


# --- the uniform rule ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_layers,k,expected", [
    (24, 8, [2, 5, 7, 10, 13, 16, 18, 21]),
    (48, 16, [2, 5, 8, 11, 13, 16, 19, 22, 25, 28, 31, 34, 36, 39, 42, 45]),
    (32, 18, [2, 4, 5, 7, 8, 10, 12, 13, 15, 16, 18, 19, 21, 23, 24, 26, 27, 29]),
    (30, 12, [2, 4, 7, 9, 11, 13, 16, 18, 20, 22, 25, 27]),
])
def test_uniform_selection_matches_reference(n_layers, k, expected):
    _, middle, _ = split_layers(n_layers, (2, 2))
    assert [middle[i] for i in uniform_choose(len(middle), k)] == expected


def test_uniform_rejects_impossible_k():
    with pytest.raises(OffsiteError):
        uniform_choose(4, 5)
    with pytest.raises(OffsiteError):
        split_layers(4, (2, 2))


# --- exactness for every family -----------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_keep_all_emulator_and_untuned_plugin_are_the_full_model(family, tokenizer, tmp_path):
    model = tiny_model(family, 6)
    expected = logits(model)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=2)
    assert torch.equal(logits(emu.model), expected)
    assert family_of(emu.model).name == family_of(model).name
    # round trip through the bundle, then plug the untuned adapter back
    save_emulator(emu, tmp_path / "emu")
    loaded = load_emulator(tmp_path / "emu")
    assert torch.equal(logits(loaded.model), expected)
    bundle = untuned_adapter(loaded)
    plugged = plug(copy.deepcopy(model), bundle, loaded.manifest)
    assert torch.equal(logits(plugged), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("kind", ["full", "lora", "bitfit"])
def test_plugin_of_keep_all_emulator_equals_tuned_emulator(family, kind, tokenizer, tmp_path):
    """With every middle block kept, the emulator with the tuned adapter IS the plugged model."""
    model = tiny_model(family, 6)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=2)
    save_emulator(emu, tmp_path / "emu")
    emu = load_emulator(tmp_path / "emu")
    before = logits(emu.model)
    bundle, _ = tune_adapter(emu, TrainingData("qa", PAIRS), settings(kind))
    after = logits(emu.model)
    assert not torch.allclose(before, after), "tuning changed nothing"
    plugged = plug(copy.deepcopy(model), bundle, emu.manifest)
    torch.testing.assert_close(logits(plugged), after, rtol=1e-5, atol=1e-5)


def test_adapter_bundle_holds_only_the_adapter(tokenizer, tmp_path):
    from offsite.bundle import save_adapter

    model = tiny_model("llama", 8)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "1,2", keep=3)
    bundle, _ = tune_adapter(emu, TrainingData("qa", PAIRS), settings())
    assert bundle.sources == [0, 6, 7]
    save_adapter(bundle, tmp_path / "ad")
    back = load_adapter(tmp_path / "ad")
    assert back.state.keys() == bundle.state.keys()
    assert all(torch.equal(back.state[k], bundle.state[k]) for k in bundle.state)
    n_adapter = sum(p.numel() for i in (0, 6, 7) for p in get_blocks(model)[i].parameters())
    assert sum(t.numel() for t in back.state.values()) == n_adapter


def test_emulator_bundle_round_trip_is_bit_exact(tokenizer, tmp_path):
    model = tiny_model("qwen2", 8)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=3)
    manifest = save_emulator(emu, tmp_path / "emu")
    back = load_emulator(tmp_path / "emu")
    a, b = emu.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s.to_json() for s in back.slots] == manifest["slots"]
    assert [s.source for s in back.slots] == [0, 1, 2, 4, 5, 6, 7]
    assert back.manifest["digest"] == manifest["digest"]


def test_plugged_directory_loads_with_plain_transformers(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import offsite.data.text as text
    from offsite.cli import main

    monkeypatch.setattr(text, "public_text", lambda part: [" ".join(p + c for p, c in PAIRS)] * 20)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    assert main(["emulate", "--model", str(tiny_dir), "--keep", "1", "--out", str(tmp_path / "emu")]) == 0
    probed = json.loads((tmp_path / "emu" / "manifest.json").read_text())["report"]["probe"]
    assert -1 <= probed["grad_cos"]["all"] <= 1 and probed["sequences"] == 16
    assert main(["probe", "--model", str(tiny_dir), "--emulator", str(tmp_path / "emu"), "--sequences", "4",
                 "--json", str(tmp_path / "probe.json")]) == 0
    recs = json.loads((tmp_path / "probe.json").read_text())["records"]
    assert {r["metric"] for r in recs} >= {"grad_cos", "grad_norm_ratio", "grad_cos.bottom"}
    assert all(r["row"] == "probe" and r["method"] == "uniform" for r in recs)
    assert main(["tune", "--emulator", str(tmp_path / "emu"), "--data", str(data), "--out", str(tmp_path / "ad"),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2"]) == 0
    assert main(["plug", "--model", str(tiny_dir), "--adapter", str(tmp_path / "ad"),
                 "--emulator", str(tmp_path / "emu"), "--out", str(tmp_path / "plugged")]) == 0
    plugged = AutoModelForCausalLM.from_pretrained(tmp_path / "plugged")
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    bundle = load_adapter(tmp_path / "ad")
    for key, t in bundle.state.items():
        _, src, name = key.split(".", 2)
        assert torch.equal(get_blocks(plugged)[int(src)].get_parameter(name), t)
    assert not torch.equal(logits(plugged), logits(original))


def test_lora_exports_in_peft_format(tiny_dir, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from offsite.bundle import save_adapter
    from offsite.cli import main

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=2)
    save_emulator(emu, tmp_path / "emu")
    emu = load_emulator(tmp_path / "emu")
    bundle, _ = tune_adapter(emu, TrainingData("qa", PAIRS), settings("lora"))
    save_adapter(bundle, tmp_path / "ad")
    assert main(["plug", "--model", str(tiny_dir), "--adapter", str(tmp_path / "ad"), "--peft",
                 "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "peft").eval()
    merged = plug(AutoModelForCausalLM.from_pretrained(tiny_dir), load_adapter(tmp_path / "ad"))
    torch.testing.assert_close(logits(served), logits(merged), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_anatomy_is_found(family):
    from offsite.models import get_body, get_final_norm
    from offsite.models.families import _getattr_path

    model = tiny_model(family, 4)
    fam = family_of(model)
    assert len(get_blocks(model)) == 4
    assert "norm" in type(get_final_norm(model)).__name__.lower()
    for path in fam.embeddings:
        assert isinstance(_getattr_path(get_body(model), path), torch.nn.Module)
    assert model.get_output_embeddings() is not None


def test_unsupported_family_names_the_supported_ones():
    from transformers import FalconConfig

    with pytest.raises(OffsiteError, match="supported families: llama"):
        family_of(FalconConfig())


def test_weights_that_do_not_cover_the_config_are_no_model(tiny_dir, tokenizer, tmp_path):
    """An emulator's directory without its manifest (weights for some blocks, the full model's
    config) is refused with what is wrong, not loaded with random blocks."""
    from transformers import AutoModelForCausalLM

    from offsite.models.load import load_model

    emu = build_emulator("uniform", AutoModelForCausalLM.from_pretrained(tiny_dir), tokenizer, "tiny", "2,2", keep=1)
    save_emulator(emu, tmp_path / "emu")
    (tmp_path / "emu" / "manifest.json").unlink()
    with pytest.raises(OffsiteError, match="not a complete model: 9 tensors .* missing .*--emulator"):
        load_model(str(tmp_path / "emu"))
    load_model(str(tiny_dir))  # a complete model (tied head included) loads


def test_tuned_adapter_goes_back_into_its_emulator_only(tokenizer, tmp_path):
    """plug_into_emulator: the Emulator FT model from a saved adapter equals the emulator tuned in
    place; an adapter of another emulator is refused."""
    from offsite.bundle import BundleError, save_adapter
    from offsite.plug import plug_into_emulator

    model = tiny_model("llama", 8)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=2)
    save_emulator(emu, tmp_path / "emu")
    save_emulator(build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=3), tmp_path / "emu3")
    tuned = load_emulator(tmp_path / "emu")
    bundle, _ = tune_adapter(tuned, TrainingData("qa", PAIRS), settings())
    save_adapter(bundle, tmp_path / "ad")
    again = plug_into_emulator(load_emulator(tmp_path / "emu"), load_adapter(tmp_path / "ad"))
    assert torch.equal(logits(again.model), logits(tuned.model))
    with pytest.raises(BundleError, match="another emulator"):
        plug_into_emulator(load_emulator(tmp_path / "emu3"), load_adapter(tmp_path / "ad"))


def test_plug_check_data_scores_before_and_after_and_refuses_harm(tiny_dir, tmp_path, monkeypatch, capsys):
    import offsite.eval as ev
    from offsite.cli import main
    from offsite.data.own import load_own_task
    from offsite.models.load import load_model

    rows = [{"question": f"Which is {w}?", "choices": ["red", "blue", "green"], "answer": c}
            for w, c in (("sky", "blue"), ("grass", "green"), ("blood", "red"), ("sea", "blue"))]
    mc = tmp_path / "check.jsonl"
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    assert main(["emulate", "--model", str(tiny_dir), "--keep", "1", "--no-probe", "--out", str(tmp_path / "emu")]) == 0
    assert main(["tune", "--emulator", str(tmp_path / "emu"), "--data", str(data), "--out", str(tmp_path / "ad"),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2"]) == 0
    capsys.readouterr()
    plug = ["plug", "--model", str(tiny_dir), "--adapter", str(tmp_path / "ad"), "--emulator", str(tmp_path / "emu"),
            "--check-data", str(mc)]
    code = main(plug + ["--out", str(tmp_path / "p1")])
    out = capsys.readouterr().out
    model, tok = load_model(str(tiny_dir))
    zs = ev.evaluate(model, tok, load_own_task(mc), progress=False)["acc"]
    assert f"check on 4 rows of {mc}: Full ZS {100 * zs:.1f}, Plug-in" in out
    assert (tmp_path / "p1").is_dir() == (code == 0)
    # an adapter that makes every row wrong: refused, nothing written
    real = ev.evaluate
    calls = []

    def rigged(model, tokenizer, task, **kw):
        res = real(model, tokenizer, task, **kw)
        calls.append(1)
        for d in res["details"]:
            d["pred"] = d["gold"] if len(calls) == 1 else d["gold"] + 1
        return res

    monkeypatch.setattr(ev, "evaluate", rigged)
    assert main(plug + ["--out", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "100.0 ± 0.0 points below Full ZS on check" in errors[0] and "nothing written" in errors[0]
    assert not (tmp_path / "p2").exists()
    assert main(plug + ["--out", str(tmp_path / "p3"), "--peft"]) == 2
