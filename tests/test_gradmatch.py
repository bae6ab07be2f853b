"""Gradient-matched distillation (the gradmatch emulator) on a tiny model."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from conftest import tiny_model

from offsite.emulator import build_emulator
from offsite.emulator.gradmatch import GradientMatch, GradMatchOptions, match_gradients
from offsite.models import get_blocks
from offsite.train import collate


def pairs(tokenizer, n, seed):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    out = []
    for _ in range(n):
        q = tokenizer("Q: " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "\nA:").input_ids
        a = tokenizer(" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))).input_ids
        out.append({"input_ids": q + a, "labels": [-100] * len(q) + a})
    return out


def bottom_grad(model, blocks, batch):
    """The bottom adapter's LM-loss gradient, computed directly with autograd."""
    from offsite.train import causal_lm_loss

    ps = [p for b in blocks for p in b.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in ps:
        p.requires_grad_(True)
    loss, n = causal_lm_loss(model, batch)
    g = torch.cat([x.flatten() for x in torch.autograd.grad(loss / n, ps)])
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    return g


def test_the_full_middle_has_zero_loss_and_the_loss_is_the_direct_cosine(tokenizer):
    model = tiny_model("llama", 8)
    batch = collate(pairs(tokenizer, 4, 0), pad_id=0)
    full_middle = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=4)
    loss, n = GradientMatch(full_middle, model, output_weight=1.0)(full_middle.model, batch)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    assert abs(loss.item() / n) < 1e-5
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=1)
    loss, n = GradientMatch(emu, model, output_weight=0.0)(emu.model, batch)
    pos = sorted(p for p, s in emu.adapter_positions.items() if s < 2)
    direct = F.cosine_similarity(bottom_grad(emu.model, [get_blocks(emu.model)[p] for p in pos], batch),
                                 bottom_grad(model, get_blocks(model)[:2], batch), dim=0)
    assert abs(loss.item() / n - (1 - direct.item())) < 1e-4
    assert not any(p.grad is not None for p in model.parameters())


def test_distillation_aligns_the_gradient_on_held_out_pairs(tokenizer):
    model = tiny_model("llama", 8)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=2)
    held = collate(pairs(tokenizer, 16, 1), pad_id=0)
    pos = sorted(p for p, s in emu.adapter_positions.items() if s < 2)

    def cos():
        return F.cosine_similarity(bottom_grad(emu.model, [get_blocks(emu.model)[p] for p in pos], held),
                                   bottom_grad(model, get_blocks(model)[:2], held), dim=0).item()

    before = cos()
    opts = GradMatchOptions(keep=2, gm_steps=40, gm_lr=3e-3, gm_batch_size=8)
    match_gradients(emu, model, pairs(tokenizer, 128, 2), pairs(tokenizer, 8, 3), opts)
    after = cos()
    assert after > before + 0.1, (before, after)
    assert emu.params["gm_steps"] == 40 and emu.report["gradmatch"]["tokens_seen"] > 0
    for p, src in emu.adapter_positions.items():  # the adapter blocks are the original ones
        a, b = get_blocks(emu.model)[p].state_dict(), get_blocks(model)[src].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not p.requires_grad for p in emu.model.parameters())


def test_the_rollout_moves_the_simulated_adapter_and_restarts(tokenizer):
    model = tiny_model("llama", 8)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=2)
    batch = collate(pairs(tokenizer, 4, 0), pad_id=0)
    gm = GradientMatch(emu, model, output_weight=1.0, rollout=3, rollout_lr=1e-2)
    emu.model.train()
    gm(emu.model, batch)
    gm(emu.model, batch)
    moved = max((a - b).abs().max().item() for a, b in zip(gm.theta, gm.theta0))
    assert moved > 1e-3
    emu.model.eval()  # validation holds the shipped adapter and leaves the simulation alone
    at_theta0, _ = gm(emu.model, batch)
    assert max((a - b).abs().max().item() for a, b in zip(gm.theta, gm.theta0)) == moved
    emu.model.train()
    gm(emu.model, batch)  # the third step restarts from the shipped adapter
    assert all(torch.equal(a, b) for a, b in zip(gm.theta, gm.theta0))
    # the emulator's own parameters never moved: the simulated adapter lives beside them
    pos = sorted(emu.adapter_positions)
    assert all(torch.equal(get_blocks(emu.model)[p].state_dict()[k], get_blocks(model)[emu.adapter_positions[p]].state_dict()[k])
               for p in pos for k in get_blocks(emu.model)[p].state_dict())
    held = GradientMatch(emu, model, output_weight=1.0)
    assert torch.allclose(at_theta0, held(emu.model.eval(), batch)[0])
