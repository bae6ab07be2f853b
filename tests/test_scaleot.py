"""ScaleOT: harmonizers, SRC, the RL rule, stage 1 and stage 2 on tiny random models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import FAMILY_NAMES, tiny_model
from offsite.bundle import load_emulator, save_emulator
from offsite.emulator import build_emulator
from offsite.emulator.core import ADAPTER, ORIGINAL, keep_blocks
from offsite.emulator.scaleot import Stage1Config, build_scaleot, choose_replaced, load_stage1, run_stage1
from offsite.emulator.scaleot.harmonizer import harmonizer_params, make_harmonizer
from offsite.emulator.scaleot.selective_rank import attention_projections, compress_block
from offsite.emulator.scaleot.stage1 import make_groups, rl_update, sample_candidates, sample_replaced
from offsite.errors import OffsiteError
from offsite.models.families import cache_kwarg, get_blocks, output_cache, set_blocks

DOCS = [f"Document {i}. " + "The quick brown fox jumps over the lazy dog, and the cat sleeps. " * 6
        for i in range(24)]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
TINY = dict(steps=4, batch_size=2, micro_batch_size=1, block_size=32, rl_every=2, rl_batch_size=2,
            harmonizer_rank=4, checkpoint_every=None, lr=1e-2)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def stage1(tokenizer, tmp_path_factory):
    """One tiny stage-1 run (LLaMA, 8 blocks, adapter 1,1), shared by the stage-2 tests."""
    model = tiny_model("llama", 8)
    out = tmp_path_factory.mktemp("s1") / "stage1"
    run_stage1(model, tokenizer, "tiny", (1, 1), Stage1Config(**TINY), out, DOCS[:20], DOCS[20:])
    return model, out


# ---------------------------------------------------------------------------------------------
# harmonizers


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fresh_harmonizer_is_the_identity_inside_the_models_forward(family):
    """A new harmonizer in place of block 2 == the model with block 2 dropped (every family)."""
    model = tiny_model(family, 5)
    h = make_harmonizer(model.config, rank=8, norm=True)
    x = torch.randn(2, 3, model.config.hidden_size)
    out = h(x, None, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.equal(out, x)
    blocks = list(get_blocks(model))
    dropped = copy.deepcopy(model)
    set_blocks(dropped, blocks[:2] + blocks[3:])
    replaced = copy.deepcopy(model)
    set_blocks(replaced, blocks[:2] + [h] + blocks[3:])
    assert torch.allclose(logits(replaced), logits(dropped), atol=1e-6)
    # a trained (non-zero) harmonizer changes the output: the test above can fail
    with torch.no_grad():
        h.up.weight.normal_()
    assert not torch.allclose(logits(replaced), logits(dropped), atol=1e-4)
    # its size against the block it replaces
    n = sum(p.numel() for p in h.parameters())
    assert n == harmonizer_params(model.config.hidden_size, 8, True)
    assert n < sum(p.numel() for p in blocks[2].parameters())


# ---------------------------------------------------------------------------------------------
# stage 2 extremes and SRC


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_alpha0_beta1_is_the_original_middle(family, tokenizer):
    model = tiny_model(family, 6)
    emu = build_emulator("scaleot", model, tokenizer, "tiny", "1,1", alpha=0.0, beta=1.0)
    keep_all = keep_blocks(model, tokenizer, "tiny", (1, 1), [1, 2, 3, 4], "uniform", {})
    assert [s.kind for s in emu.slots] == [ADAPTER] + [ORIGINAL] * 4 + [ADAPTER]
    assert [s.source for s in emu.slots] == list(range(6))
    assert torch.equal(logits(emu.model), logits(keep_all.model))
    assert torch.equal(logits(emu.model), logits(model))
    assert emu.report["scaleot"]["compression_ratio"] == 1.0


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_src_at_full_rank_reproduces_the_block(family):
    model = tiny_model(family, 3)
    block = get_blocks(model)[1]
    names = attention_projections(block)
    assert names and not any("mlp" in n for n in names)
    new, info = compress_block(block, 1.0, storage="factored")
    assert all(p["storage"] == "factored" for p in info["projections"].values())
    seen = {}
    hook = block.register_forward_pre_hook(lambda m, a, k: seen.update(a=a, k=k), with_kwargs=True)
    full = logits(model)
    hook.remove()

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():  # the block's own call arguments in the model's forward (masks, rotary...)
        ref, got = first(block(*seen["a"], **seen["k"])), first(new(*seen["a"], **seen["k"]))
    assert (got - ref).abs().max().item() < 1e-5
    set_blocks(model, [get_blocks(model)[0], new, get_blocks(model)[2]])
    assert (logits(model) - full).abs().max().item() < 1e-4
    # at low rank the factored block is really smaller, and the output moves
    small, _ = compress_block(block, 0.25, storage="factored")
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in block.parameters())
    # auto storage never grows the block
    auto, _ = compress_block(block, 0.9, storage="auto")
    assert sum(p.numel() for p in auto.parameters()) <= sum(p.numel() for p in block.parameters())


# ---------------------------------------------------------------------------------------------
# the RL rule


def test_rl_update_follows_the_reward():
    scores = torch.zeros(2)
    new, rewards, adv = rl_update(scores, [[0], [1]], [1.0, 3.0], lr=10.0)  # replacing 1 hurts
    assert new[0] > 0 > new[1]
    assert adv[0] > 0 > adv[1] and abs(sum(adv)) < 1e-12
    # a block in every candidate gets the sum of the advantages (zero): no information, no move
    new, _, _ = rl_update(scores, [[0, 1], [1]], [1.0, 3.0], lr=10.0)
    assert new[1] == pytest.approx(0.0, abs=1e-12) and new[0] > 0


def test_relative_reward_is_ists_direction_at_a_loss_independent_step():
    """At the loss level of stage 1 (7-10 nats) IST's exp(-loss) barely moves a score; the relative
    reward moves it in the same direction, by IST's step times exp(min loss), at any loss level."""
    scores = torch.zeros(3, dtype=torch.float64)
    cands, losses = [[0], [1], [2]], [8.0, 8.3, 8.1]
    ist, _, _ = rl_update(scores, cands, losses, lr=10.0, reward="ist")
    rel, rewards, _ = rl_update(scores, cands, losses, lr=10.0, reward="relative")
    assert ist.abs().max() < 1e-3 < rel.abs().max()
    assert torch.allclose(rel, ist * math.exp(8.0), rtol=1e-9)
    assert max(rewards) == 1.0
    shifted, _, _ = rl_update(scores, cands, [l - 6.0 for l in losses], lr=10.0, reward="relative")
    assert torch.allclose(shifted, rel, rtol=1e-9)  # a constant shift of every loss changes nothing
    with pytest.raises(ValueError):
        rl_update(scores, cands, losses, lr=10.0, reward="other")


@pytest.mark.parametrize("reward", ["ist", "relative"])
def test_rl_loop_learns_which_block_is_harmless_to_replace(reward):
    """Block 0 is harmless to replace, block 1 harmful, blocks 2/3 neutral: repeated RL updates with
    candidates drawn by the policy rank them 0 > 2,3 > 1 and the policy then replaces 0 more often."""
    groups = make_groups(4, 4)
    scores = torch.zeros(4, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        cands = sample_candidates(scores, groups, 3, gen)
        losses = [2.0 - 0.5 * (0 in c) + 1.0 * (1 in c) for c in cands]
        scores, _, _ = rl_update(scores, cands, losses, lr=10.0, reward=reward)
    assert scores[0] > max(scores[2], scores[3]) and min(scores[2], scores[3]) > scores[1]
    counts = torch.zeros(4)
    for _ in range(400):
        for i in sample_replaced(scores, groups, gen):
            counts[i] += 1
    assert counts[0] > counts[1] * 1.5
    assert all(len(sample_replaced(scores, groups, gen)) == 2 for _ in range(5))  # half of each group


# ---------------------------------------------------------------------------------------------
# stage 1


def test_stage1_trains_and_writes_the_artifact(stage1):
    model, out = stage1
    names = {p.name for p in out.iterdir()}
    assert {"stage1.json", "harmonizers.safetensors", "scores.safetensors", "scores.png"} <= names
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "stage1.json").read_text())
    assert meta["middle"] == [1, 2, 3, 4, 5, 6] and meta["base"]["adapter_layers"] == [1, 1]
    assert meta["cost"]["steps"] == 4 and meta["cost"]["tokens"] > 0 and meta["cost"]["seconds"] > 0
    assert len(meta["curve"]["train"]) == 4 and len(meta["curve"]["rl"]) == 2
    assert all(len(r["candidates"]) == Stage1Config().rl_candidates for r in meta["curve"]["rl"])
    art = load_stage1(out)
    assert any(float(s) != 0.0 for s in art.scores)  # the RL rule moved the scores
    # harmonizers used after the warm-up step trained away from the identity; unused ones did not move
    used = {i for rec in meta["curve"]["train"][1:] for i in rec["replaced"]}
    assert used and all((st["up.weight"].abs().sum() > 0) == (src in used) for src, st in art.harmonizers.items())
    # the model is given back untouched
    assert all(type(b).__name__.endswith(("Layer", "Block")) for b in get_blocks(model))
    assert all(p.requires_grad for p in model.parameters())  # as from_config left them
    assert torch.equal(logits(model), logits(tiny_model("llama", 8)))


def test_stage1_resumes_exactly(tokenizer, tmp_path, monkeypatch):
    import offsite.train as T

    cfg = dict(TINY, steps=6, rl_every=2, checkpoint_every=2)
    ref = run_stage1(tiny_model("llama", 6), tokenizer, "tiny", (1, 1), Stage1Config(**cfg), tmp_path / "a",
                     DOCS[:20], DOCS[20:])
    real, calls = T.causal_lm_loss, {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] == 14:  # in step 5, after the checkpoint of step 4
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(T, "causal_lm_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_stage1(tiny_model("llama", 6), tokenizer, "tiny", (1, 1), Stage1Config(**cfg), tmp_path / "b",
                   DOCS[:20], DOCS[20:])
    assert (tmp_path / "b.work" / "checkpoint").exists() and not (tmp_path / "b").exists()
    monkeypatch.setattr(T, "causal_lm_loss", real)
    got = run_stage1(tiny_model("llama", 6), tokenizer, "tiny", (1, 1), Stage1Config(**cfg), tmp_path / "b",
                     DOCS[:20], DOCS[20:])
    assert not (tmp_path / "b.work").exists()
    assert torch.allclose(got.scores, ref.scores, atol=1e-6)
    for src, st in ref.harmonizers.items():
        for k, v in st.items():
            assert torch.allclose(got.harmonizers[src][k], v, atol=1e-6), (src, k)
    assert [r["candidates"] for r in got.meta["curve"]["rl"]] == [r["candidates"] for r in ref.meta["curve"]["rl"]]


# ---------------------------------------------------------------------------------------------
# stage 2


def test_stage2_layer_map_survives_a_bundle_round_trip(stage1, tokenizer, tmp_path):
    model, out = stage1
    art = load_stage1(out)
    emu = build_scaleot(model, tokenizer, "tiny", (1, 1), art, alpha=0.5, beta=0.5, src_storage="factored")
    kinds = [s.kind for s in emu.slots]
    assert kinds.count("harmonizer") == 3 and kinds.count("src") == 3
    replaced = sorted(s.source for s in emu.slots if s.kind == "harmonizer")
    order = art.meta["replace_order"]
    assert replaced == sorted(order[:3])  # the highest replaceability scores
    assert emu.middle_params() < emu.base["middle_params"]
    assert emu.report["scaleot"]["middle_params"] == emu.middle_params()
    save_emulator(emu, tmp_path / "emu")
    back = load_emulator(tmp_path / "emu")
    assert [s.to_json() for s in back.slots] == [s.to_json() for s in emu.slots]
    assert torch.equal(logits(back.model), logits(emu.model))
    manifest = json.loads((tmp_path / "emu" / "manifest.json").read_text())
    assert manifest["report"]["scaleot"]["compression_ratio"] > 1
    assert manifest["shapes"]["middle_params"] == emu.middle_params()


@pytest.mark.parametrize("family", ["gpt2", "bloom", "opt"])
def test_stage2_bundles_load_for_other_families(family, tokenizer, tmp_path):
    model = tiny_model(family, 6)
    art = run_stage1(model, tokenizer, "tiny", (1, 1), Stage1Config(**dict(TINY, steps=2)), None,
                     DOCS[:20], DOCS[20:])
    emu = build_scaleot(model, tokenizer, "tiny", (1, 1), art, alpha=0.5, beta=0.3, src_storage="factored")
    save_emulator(emu, tmp_path / "emu")
    back = load_emulator(tmp_path / "emu")
    assert torch.equal(logits(back.model), logits(emu.model))


def test_ablations(stage1, tokenizer):
    model, out = stage1
    art = load_stage1(out)
    drop = build_scaleot(model, tokenizer, "tiny", (1, 1), art, alpha=0.5, beta=1.0, harmonizer=False)
    assert [s.kind for s in drop.slots].count("harmonizer") == 0 and len(drop.slots) == 5
    uni = build_scaleot(model, tokenizer, "tiny", (1, 1), None, alpha=2 / 3, beta=1.0, harmonizer=False,
                        importance="uniform")
    ref = build_emulator("uniform", model, tokenizer, "tiny", "1,1", keep=2)
    assert [s.source for s in uni.slots] == [s.source for s in ref.slots]
    assert torch.equal(logits(uni.model), logits(ref.model))
    r1 = choose_replaced(12, 0.5, importance="random", seed=1)
    assert len(r1) == 6 and r1 != choose_replaced(12, 0.5, importance="random", seed=2)
    grouped = choose_replaced(8, 0.5, torch.arange(8.0), selection="group", group_size=4)
    assert grouped == [2, 3, 6, 7]
    assert choose_replaced(8, 0.5, torch.arange(8.0)) == [4, 5, 6, 7]


def test_stage2_refuses_a_mismatched_artifact(stage1, tokenizer):
    model, out = stage1
    with pytest.raises(OffsiteError, match="--adapter-layers 1,1"):
        build_emulator("scaleot", model, tokenizer, "tiny", "2,1", from_=str(out), alpha=0.5)
    other = tiny_model("llama", 8, seed=3)
    with pytest.raises(OffsiteError, match="other weights"):
        build_emulator("scaleot", other, tokenizer, "tiny", "1,1", from_=str(out), alpha=0.5)
    for bad in (dict(alpha=1.5), dict(beta=0.0), dict(importance="magic")):
        with pytest.raises(OffsiteError):
            build_emulator("scaleot", model, tokenizer, "tiny", "1,1", from_=str(out), **bad)


def test_cli_stage1_then_stage2(tiny_dir, tmp_path, capsys, monkeypatch):
    from offsite import cli

    s1 = tmp_path / "s1"
    common = ["--model", str(tiny_dir), "--method", "scaleot", "--adapter-layers", "1,1",
              "--stage1-steps", "2", "--stage1-batch-size", "2", "--stage1-block-size", "32",
              "--harmonizer-rank", "4", "--rl-every", "1"]
    monkeypatch.setattr("offsite.data.text.public_text", lambda part: list(DOCS))
    assert cli.main(["emulate", *common, "--stage1-out", str(s1), "--out", str(tmp_path / "e1")]) == 0
    assert (s1 / "stage1.json").exists()
    assert cli.main(["emulate", "--model", str(tiny_dir), "--method", "scaleot", "--from", str(s1),
                     "--alpha", "0.5", "--beta", "0.8", "--adapter-layers", "1,1",
                     "--out", str(tmp_path / "e2")]) == 0
    slots = json.loads((tmp_path / "e2" / "manifest.json").read_text())["slots"]
    assert [s["kind"] for s in slots].count("harmonizer") == 2
    capsys.readouterr()
    assert cli.main(["emulate", "--model", str(tiny_dir), "--method", "scaleot", "--from", str(s1),
                     "--adapter-layers", "2,2", "--out", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--adapter-layers 1,1" in err


def test_emulator_with_harmonizers_runs_with_a_kv_cache(stage1, tokenizer):
    """Harmonizer positions never touch the cache: prefix + cached suffix == one full forward."""
    model, out = stage1
    emu = build_scaleot(model, tokenizer, "tiny", (1, 1), load_stage1(out), alpha=0.5, beta=0.5)
    m = emu.model
    with torch.no_grad():
        full = m(input_ids=IDS, use_cache=False).logits
        first = m(input_ids=IDS[:, :7], use_cache=True)
        rest = m(input_ids=IDS[:, 7:], **{cache_kwarg(m): output_cache(first)}, use_cache=True).logits
    assert torch.allclose(rest, full[:, 7:], atol=1e-5)
