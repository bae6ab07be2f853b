"""Owner-assisted tuning (offsite.assist) and bottom-only tuning, on tiny random models."""

from __future__ import annotations

import copy
from dataclasses import asdict, replace
import json

import pytest
import torch
import tqdm

from conftest import make_tokenizer, tiny_model
from offsite import adapters
from offsite.assist import AssistOptions, Assistant, CorrectedLoss
from offsite.gradients import adapter_written
from offsite.data.tokenize import tokenize_qa
from offsite.emulator import build_emulator
from offsite.errors import OffsiteError
from offsite.models.families import get_blocks
from offsite.train import TrainConfig, causal_lm_loss, collate
from offsite.tune import TrainingData, TuneSettings, tune_adapter

PAIRS = [(f"Question {i}: what colour is the sky?\nAnswer:", " blue" if i % 2 else " grey") for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _public(tok):
    return tokenize_qa(tok, PAIRS[:6], 128)


def _grad(model, block_ids, examples, pad_id):
    """Plain autograd: the mean-token gradient of the blocks' parameters, per tensor."""
    params = [p for i in block_ids for p in get_blocks(model)[i].parameters()]
    loss_sum, n = causal_lm_loss(model, collate(examples, pad_id=pad_id))
    return torch.autograd.grad(loss_sum / n, params)


def _moved(emu, seed=5):
    """The emulator's adapter tensors, moved away from the shipped blocks (a data owner's adapter)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g)
            for k, v in adapters.extract(emu.model, emu.adapter_positions, "full").items()}


def test_correction_is_zero_for_the_full_middle(tok):
    model = tiny_model("llama", 6)
    emu = build_emulator("uniform", model, tok, "tiny", (2, 1), keep=3)
    a = Assistant(model, emu, AssistOptions(every=1), examples=_public(tok))
    c = a.correction(_moved(emu))
    assert max(float(t.abs().max()) for t in c.values()) < 1e-6


def test_correction_matches_direct_autograd_and_leaves_both_models_unchanged(tok):
    model = tiny_model("llama", 6, seed=2)
    emu = build_emulator("uniform", model, tok, "tiny", (2, 1), keep=1)  # stack: 0, 1, kept, 5
    before_full = copy.deepcopy(model.state_dict())
    before_emu = copy.deepcopy(emu.model.state_dict())
    state = {k: v for k, v in _moved(emu).items() if k.startswith(("blocks.0.", "blocks.1."))}  # bottom only
    ex = _public(tok)
    c = Assistant(model, emu, AssistOptions(every=1), micro_batch_size=4, examples=ex).correction(state)
    assert set(c) == set(state)
    # by hand: the same adapter written into copies of both models, plain autograd, c = g_f·|g_e|/|g_f| − g_e
    full, emu_m = copy.deepcopy(model), copy.deepcopy(emu.model)
    adapters.apply(full, state, "full")
    with adapter_written(emu_m, emu.adapter_positions, state):
        g_e = _grad(emu_m, [0, 1], ex, tok.pad_token_id)
    g_f = _grad(full, [0, 1], ex, tok.pad_token_id)
    keys = list(adapters.param_names(emu.model, {0: 0, 1: 1}))
    for k, ge, gf in zip(keys, g_e, g_f):
        want = gf * (ge.norm() / gf.norm()) - ge
        assert torch.allclose(c[k], want, atol=1e-6, rtol=1e-4), k
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_full[k]), k
    for k, v in emu.model.state_dict().items():
        assert torch.equal(v, before_emu[k]), k


def test_assistant_refuses_tensors_that_are_not_the_emulators_adapter(tok):
    model = tiny_model("llama", 6)
    emu = build_emulator("uniform", model, tok, "tiny", (2, 1), keep=1)
    a = Assistant(model, emu, AssistOptions(every=1), examples=_public(tok))
    state = _moved(emu)
    with pytest.raises(OffsiteError, match="not a tensor of this emulator's adapter"):
        a.correction({"blocks.3.mlp.up_proj.weight": torch.zeros(64, 32)})  # a middle block
    key = next(iter(state))
    with pytest.raises(OffsiteError, match="has shape"):
        a.correction({key: torch.zeros(3)})
    with pytest.raises(OffsiteError, match="NaN"):
        a.correction({key: torch.full_like(state[key], float("nan"))})
    with pytest.raises(OffsiteError, match="every must be"):
        AssistOptions(every=-1).check()


def _block0_trainable():
    """A tiny llama model with only its block 0 trainable, and those tensors by bundle key."""
    model = tiny_model("llama", 4, seed=4)
    for p in model.parameters():
        p.requires_grad_(False)
    params = {k: dict(model.named_parameters())[n] for k, n in adapters.param_names(model, {0: 0}).items()}
    for p in params.values():
        p.requires_grad_(True)
    return model, params


def test_corrected_loss_adds_the_correction_to_the_gradient(tok):
    model, params = _block0_trainable()
    c = {k: torch.randn(p.shape) for k, p in params.items()}
    seen = []
    loss = CorrectedLoss(params, lambda state: (seen.append(state), c)[1], every=2)
    batch = collate(_public(tok), pad_id=tok.pad_token_id)
    total, n = loss(model, batch)
    got = torch.autograd.grad(total / n, list(params.values()))
    plain_sum, _ = causal_lm_loss(model, batch)
    plain = torch.autograd.grad(plain_sum / n, list(params.values()))
    for (k, _), g, pg in zip(params.items(), got, plain):
        assert torch.allclose(g, pg + c[k], atol=1e-6)
    assert total.item() == pytest.approx(plain_sum.item(), rel=1e-6)  # θ = θ_c: the linear term is 0 here
    assert len(seen) == 1 and set(seen[0]) == set(params)
    loss.on_step({"step": 1})
    loss(model, batch)
    assert len(seen) == 1  # not stale before `every` steps
    loss.on_step({"step": 2})
    loss(model, batch)
    assert len(seen) == 2
    bad = CorrectedLoss(params, lambda state: {}, every=1)
    with pytest.raises(OffsiteError, match="does not name the adapter's trainable tensors"):
        bad(model, batch)


def test_the_training_bar_shows_the_lm_loss_not_the_corrections_linear_term(tok, monkeypatch):
    """The correction's linear term can make the total negative; the bar and the history's
    ``lm_loss`` show the LM loss, ``train_loss`` keeps the total."""
    from offsite.train import train

    model, params = _block0_trainable()
    c = {k: -100.0 * torch.ones(p.shape) for k, p in params.items()}  # a big term: the total goes negative
    shown = []

    def record(bar, post=None, refresh=True, **kw):  # the bar's postfix, as the engine sets it
        shown.append(float(post["loss"]))

    # patched on the class, which every module's ``tqdm`` name points at (and restored after)
    monkeypatch.setattr(tqdm.tqdm, "set_postfix", record)
    cfg = TrainConfig(lr=1e-2, max_steps=3, batch_size=2, micro_batch_size=2, checkpoint_every=None, progress=True)
    result = train(model, list(params.items()), _public(tok), None, cfg,
                   loss_fn=CorrectedLoss(params, lambda state: c, every=100), pad_id=tok.pad_token_id)
    lm = [h["lm_loss"] for h in result.history]
    assert all(x > 0 for x in lm) and result.history[-1]["train_loss"] < 0
    assert shown == pytest.approx(lm, abs=1e-4)


def _settings(blocks="all", steps=6):
    return TuneSettings(blocks=blocks, train=TrainConfig(lr=1e-2, max_steps=steps, batch_size=4, micro_batch_size=4,
                                                         checkpoint_every=None, progress=False))


def test_bottom_only_tuning_leaves_the_top_blocks_as_shipped(tok):
    model = tiny_model("llama", 6)
    emu = build_emulator("uniform", model, tok, "tiny", (2, 1), keep=2)
    shipped = adapters.extract(emu.model, emu.adapter_positions, "full")
    bundle, _ = tune_adapter(emu, TrainingData("qa", PAIRS), _settings("bottom"))
    for k, v in bundle.state.items():
        same = torch.equal(v, shipped[k])
        assert same == k.startswith("blocks.5."), k  # the top block (original 5) untouched, the bottom ones moved
    assert bundle.training["blocks"] == "bottom"
    with pytest.raises(OffsiteError, match="unknown adapter blocks"):
        TuneSettings(blocks="top").check()


def test_assisted_tuning_asks_the_owner_every_n_steps_and_records_it(tok):
    model = tiny_model("llama", 6)
    emu = build_emulator("uniform", model, tok, "tiny", (2, 1), keep=1)
    owner = Assistant(model, build_emulator("uniform", model, tok, "tiny", (2, 1), keep=1),
                      AssistOptions(every=2), examples=_public(tok))
    asked = []
    real = owner.correction
    owner.correction = lambda state: (asked.append(sorted(state)), real(state))[1]
    bundle, result = tune_adapter(emu, TrainingData("qa", PAIRS), _settings("bottom", steps=6), assist=owner)
    assert len(asked) == 3  # before step 1, after steps 2 and 4 (after 6 nothing is left to train)
    assert all(k.startswith(("blocks.0.", "blocks.1.")) for k in asked[0])  # only the trainable tensors travel
    assert bundle.training["assist"] == {"every": 2, "source": "webqs", "examples": 32, "corrections": 3}
    json.dumps(bundle.training)
    with pytest.raises(OffsiteError, match="full adapter blocks"):
        tune_adapter(emu, TrainingData("qa", PAIRS), TuneSettings(adapter="bitfit"), assist=owner)


def test_run_with_the_owner_in_the_loop_records_the_recipe(tok, tmp_path, monkeypatch):
    from test_transfer import _qa_world

    from offsite.experiment.recipe import Recipe
    from offsite.experiment.run import run

    _qa_world(monkeypatch, tok)
    tuning = {**asdict(_settings("bottom", steps=8).train), "blocks": "bottom"}
    recipe = Recipe(options={"keep": 1}, adapter_layers=(2, 1), tuning=tuning, assist={"every": 4})
    res = run("tiny", "arc_easy", recipe, tmp_path / "r", eval_limit=None, text_docs=0, probe=False,
              log=lambda *a: None)
    assert Recipe.load(tmp_path / "r" / "recipe.toml") == recipe  # the run's recipe, written back
    rows = {r["row"] for r in res.records}
    assert {"emu_ft", "plugin", "ceiling", "full_zs"} <= rows
    setting = res.records[0]["setting"]
    assert setting["blocks"] == "bottom" and setting["assist"]["every"] == 4 and setting["assist"]["source"] == "webqs"
    assert "assist(every=4, examples=32, source=webqs)" in (tmp_path / "r" / "table.md").read_text()
    assert any("owner in the loop" in n for n in res.notes) and any("bottom adapter blocks" in n for n in res.notes)
    manifest = json.loads((tmp_path / "r" / "adapter" / "manifest.json").read_text())
    assert manifest["training"]["assist"]["corrections"] == 2
    with pytest.raises(OffsiteError, match="are the task being tuned"):
        run("tiny", "arc_easy", replace(recipe, assist={"every": 4, "source": "arc_easy"}), tmp_path / "r2",
            log=lambda *a: None)


def test_run_with_the_owner_in_the_loop_under_dp(tok, tmp_path, monkeypatch):
    """A recipe with [assist] and [dp]: the data owner's adapter is DP-SGD-tuned with the owner's
    correction added after the noise (offsite.dp), and its manifest says so."""
    from test_transfer import _qa_world

    from offsite.experiment.recipe import Recipe
    from offsite.experiment.run import run

    _qa_world(monkeypatch, tok)
    tuning = {**asdict(_settings("bottom", steps=4).train), "blocks": "bottom"}
    recipe = Recipe(options={"keep": 1}, adapter_layers=(2, 1), tuning=tuning, assist={"every": 2},
                    dp={"epsilon": 8.0})
    res = run("tiny", "arc_easy", recipe, tmp_path / "r", eval_limit=4, text_docs=0, probe=False, ceiling=False,
              floor=False, log=lambda *a: None)
    assert any("owner in the loop" in n for n in res.notes) and any("differentially private" in n for n in res.notes)
    manifest = json.loads((tmp_path / "r" / "adapter" / "manifest.json").read_text())
    assert manifest["training"]["assist"]["corrections"] == 2 and manifest["dp"]["steps"] == 4
    assert "after clipping and noise" in manifest["dp"]["after_noise"] and 0 < manifest["dp"]["epsilon"] <= 8


def test_a_checkpoint_resumes_only_under_the_same_correction(tok, tmp_path):
    model = tiny_model("llama", 6)
    emu = build_emulator("uniform", model, tok, "tiny", (2, 1), keep=1)

    def tuned(every):
        owner = Assistant(model, build_emulator("uniform", model, tok, "tiny", (2, 1), keep=1),
                          AssistOptions(every=every), examples=_public(tok))
        settings = TuneSettings(blocks="bottom", train=TrainConfig(lr=1e-2, max_steps=4, batch_size=4,
                                                                   micro_batch_size=4, checkpoint_every=2,
                                                                   progress=False))
        return tune_adapter(copy.deepcopy(emu), TrainingData("qa", PAIRS), settings, tmp_path / "work", assist=owner)

    first, _ = tuned(2)
    again, _ = tuned(2)  # resumes from the finished checkpoint: the same adapter
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)
    with pytest.raises(OffsiteError, match="different run .*run"):
        tuned(3)


def test_a_pool_gives_each_correction_the_next_pairs(tok):
    """``pool``: the owner holds more public pairs than a correction takes, and each correction takes
    the next ``examples`` of them, cycling; the correction is the one taken on exactly those pairs."""
    model = tiny_model("llama", 6, seed=2)
    emu = build_emulator("uniform", model, tok, "tiny", (2, 1), keep=1)
    ex = tokenize_qa(tok, PAIRS[:5], 128)
    a = Assistant(model, emu, AssistOptions(every=1, examples=2, pool=5), examples=ex)
    state = {k: v for k, v in _moved(emu).items() if k.startswith(("blocks.0.", "blocks.1."))}
    got = []
    for _ in range(4):
        got.append(a.next_pairs())
        c = a.correction(state)
    assert got == [ex[0:2], ex[2:4], [ex[4], ex[0]], ex[1:3]]
    alone = Assistant(model, emu, AssistOptions(every=1), examples=ex[1:3]).correction(state)  # the 4th's pairs
    assert all(torch.allclose(c[k], alone[k], atol=1e-6) for k in c)
    fixed = Assistant(model, emu, AssistOptions(every=1), examples=ex)
    assert fixed.next_pairs() == ex and fixed.correction(state) and fixed.next_pairs() == ex  # no pool: all, always
    with pytest.raises(OffsiteError, match="pool must be 0 or at least"):
        AssistOptions(examples=32, pool=16).check()
