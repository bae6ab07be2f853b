"""Distillation of the kept blocks (Offsite-Tuning's kd emulator) on a tiny model."""

from __future__ import annotations

import random

import torch
from conftest import tiny_model

from offsite.emulator import build_emulator
from offsite.emulator.kd import KDOptions, MiddleTap, distill, run_blocks
from offsite.models import get_blocks


def middle_nmse(emu, model, x):
    """NMSE between the emulator's middle output and the original middle's, on the same input."""
    pos = [i for i, s in enumerate(emu.slots) if s.kind != "adapter"]
    tap = MiddleTap(get_blocks(emu.model), pos[0], pos[-1])
    with torch.no_grad():
        emu.model(x)
        args, kwargs = tap.inputs
        h_t = run_blocks(get_blocks(model)[2:-2], args, kwargs)
    tap.remove()
    return (((h_t - tap.output) / h_t.pow(2).mean().sqrt()) ** 2).mean().item()


def test_teacher_replay_reproduces_the_full_model(tokenizer):
    """Running the original middle on the captured input gives the full model's middle output."""
    model = tiny_model("llama", 8)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=4)  # keeps every block
    x = torch.randint(0, 256, (2, 16))
    assert middle_nmse(emu, model, x) == 0.0


def test_distillation_brings_the_middle_closer(tokenizer):
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    docs = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(8)]
    model = tiny_model("llama", 8)
    emu = build_emulator("uniform", model, tokenizer, "tiny", "2,2", keep=2)
    x = torch.tensor([tokenizer(docs[0]).input_ids[:64]])
    before = middle_nmse(emu, model, x)
    opts = KDOptions(keep=2, kd_steps=30, kd_lr=3e-3, kd_batch_size=4, kd_block_size=64, kd_val_docs=1)
    distill(emu, model, docs[1:], docs[:1], opts)
    after = middle_nmse(emu, model, x)
    assert after < 0.7 * before, (before, after)
    assert emu.params["kd_steps"] == 30 and emu.report["kd"]["tokens_seen"] > 0
    # only the kept middle blocks moved; the adapter blocks are the original ones
    for pos, src in emu.adapter_positions.items():
        a, b = get_blocks(emu.model)[pos].state_dict(), get_blocks(model)[src].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
