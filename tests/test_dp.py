"""Differentially private tuning (offsite.dp): Opacus's per-example gradients on every family's
blocks, the DP-SGD step, the accountant's plan, the manifest's ``dp`` entry and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import FAMILY_NAMES, tiny_model
from offsite.adapters import LoraOptions
from offsite.bundle import ADAPTER_SCHEMA, BundleError, check_schema, load_adapter, save_adapter
from offsite.dp import DPOptions, DPPlan, PerExample, make_plan, per_example_lm_loss, poisson_batch, spent_epsilon
from offsite.emulator import build_emulator
from offsite.errors import OffsiteError
from offsite.models.families import get_blocks
from offsite.train import TrainConfig, collate, train
from offsite.tune import TrainingData, TuneSettings, tune_adapter

EXAMPLES = [{"input_ids": [5 + i + k for k in range(6 + i)], "labels": [-100] * 2 + [5 + i + k for k in range(2, 6 + i)]}
            for i in range(5)]
PAIRS = [(f"Q{i}: what follows {i}?", f" {i + 1}") for i in range(12)]


def _no_dropout(model):
    """Dropout draws differ between a batched and a per-example forward: off, to compare gradients."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for a in ("dropout", "activation_dropout", "attention_dropout"):
            if isinstance(getattr(m, a, None), float):
                setattr(m, a, 0.0)
    return model


def _adapter(model, idx=(0, 3)):
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = get_blocks(model)
    params = [p for i in idx for p in blocks[i].parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def _plan(sigma=0.0, clip=1.0, q=0.5, n=5, steps=1):
    return DPPlan(target_epsilon=1.0, delta=1e-5, delta_rule="given", clip=clip, accountant="rdp", sample_rate=q,
                  noise_multiplier=sigma, steps=steps, examples=n)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_per_example_gradients_are_exact_on_every_family(family):
    """Opacus's rules (Linear, LayerNorm), its functorch fallback (RMSNorm, Gemma's RMSNorm, GPT-2's
    Conv1D) and our token-rows rule (OPT's flattened MLP) give each example's own gradient."""
    model = _no_dropout(tiny_model(family, 4)).train()
    params = _adapter(model)
    pe = PerExample(model, torch.optim.SGD(params, lr=0.1), _plan())
    losses, _ = per_example_lm_loss(pe.model, collate(EXAMPLES[:3], 0))
    losses.sum().backward()
    per_sample = [p.grad_sample.clone() for p in params]
    pe.close()
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None for p in params)
    assert not any(type(m).__name__.startswith("_TokenRows") for m in model.modules())
    for i in range(3):
        loss, _ = per_example_lm_loss(model, collate([EXAMPLES[i]], 0))
        own = torch.autograd.grad(loss.sum(), params)
        for gs, g in zip(per_sample, own):
            assert gs.shape[0] == 3
            torch.testing.assert_close(gs[i], g, rtol=1e-4, atol=1e-6)


def test_dp_step_clips_each_example_and_averages_over_the_expected_batch():
    """Without noise, one DP-SGD step with SGD(lr=1) moves the parameters by minus the sum of the
    per-example gradients, each clipped to norm C, over the expected batch size; micro-batches
    (accumulated one at a time) change nothing."""
    clip, n, q = 0.05, 5, 0.8  # expected batch 4
    ref = _no_dropout(tiny_model("llama", 4)).train()
    params = _adapter(ref)
    start = [p.detach().clone() for p in params]
    clipped = [torch.zeros_like(p) for p in params]
    for e in EXAMPLES:
        loss, _ = per_example_lm_loss(ref, collate([e], 0))
        g = torch.autograd.grad(loss.sum(), params)
        norm = torch.sqrt(sum((x ** 2).sum() for x in g))
        assert norm > clip  # the clip binds
        for acc, x in zip(clipped, g):
            acc += x * min(1.0, clip / (float(norm) + 1e-6))
    from offsite.dp import accumulate

    for micro in (5, 2):
        model = _no_dropout(tiny_model("llama", 4)).train()
        ps = _adapter(model)
        pe = PerExample(model, torch.optim.SGD(ps, lr=1.0), _plan(sigma=0.0, clip=clip, q=q, n=n))
        for k in range(0, 5, micro):
            if k:
                accumulate(pe.optimizer)
            losses, _ = per_example_lm_loss(pe.model, collate(EXAMPLES[k:k + micro], 0))
            losses.sum().backward()
        pe.optimizer.step()
        pe.close()
        for p, p0, c in zip(ps, start, clipped):
            torch.testing.assert_close(p.detach(), p0 - c / 4, rtol=1e-4, atol=1e-7)


def test_noise_has_the_planned_scale():
    """An empty Poisson batch: the step is noise alone, of standard deviation sigma * C / expected batch."""
    from offsite.dp import empty_batch

    model = tiny_model("llama", 4).train()
    ps = _adapter(model)
    start = [p.detach().clone() for p in ps]
    pe = PerExample(model, torch.optim.SGD(ps, lr=1.0), _plan(sigma=2.0, clip=0.5, q=0.5, n=8))  # expected 4
    empty_batch(pe.optimizer)
    torch.manual_seed(0)
    pe.optimizer.step()
    pe.close()
    moved = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(ps, start)])
    assert abs(float(moved.std()) / (2.0 * 0.5 / 4) - 1) < 0.05 and abs(float(moved.mean())) < 0.01


def test_plan_spends_at_most_the_target_by_opacus_accountants():
    from opacus.accountants.utils import get_noise_multiplier

    for accountant in ("rdp", "prv"):
        plan = make_plan(DPOptions(epsilon=3.0, accountant=accountant), n_train=200, batch_size=8, steps=50)
        assert plan.delta == pytest.approx(1 / 2000) and plan.delta_rule == "1/(10n)"
        assert plan.sample_rate == pytest.approx(0.04)
        assert plan.noise_multiplier == pytest.approx(get_noise_multiplier(
            target_epsilon=3.0, target_delta=1 / 2000, sample_rate=0.04, steps=50, accountant=accountant))
        spent = spent_epsilon(plan, 50)
        assert 2.9 < spent <= 3.0 + 1e-9
        assert spent_epsilon(plan, 10) < spent and spent_epsilon(plan, 0) == 0.0
    assert make_plan(DPOptions(epsilon=1.0, delta=1e-3), 50, 8, 5).delta_rule == "given"
    for bad in (DPOptions(epsilon=0), DPOptions(epsilon=math.inf), DPOptions(epsilon=1, delta=1.5),
                DPOptions(epsilon=1, clip=-1), DPOptions(epsilon=1, accountant="moments")):
        with pytest.raises(OffsiteError):
            bad.check()


def test_poisson_batches_are_drawn_per_step_at_the_rate():
    draws = [poisson_batch(1000, 0.05, seed=3, step=t) for t in range(40)]
    assert draws[7] == poisson_batch(1000, 0.05, seed=3, step=7)  # a resumed run draws the same
    assert draws[7] != poisson_batch(1000, 0.05, seed=4, step=7)
    sizes = [len(d) for d in draws]
    assert len(set(sizes)) > 5 and abs(sum(sizes) / len(sizes) - 50) < 5


def test_dp_training_resumes_exactly(tmp_path):
    """The noise comes from the checkpointed RNG and the batches from (seed, step): stopping after
    step 2 and resuming ends where an uninterrupted run ends."""
    cfg = TrainConfig(lr=1e-2, max_steps=4, batch_size=2, micro_batch_size=1, progress=False, checkpoint_every=1)
    plan = make_plan(DPOptions(epsilon=4.0), 5, 2, 4)

    def run(out, stop=None):
        model = tiny_model("llama", 4).train()
        params = [(n, p) for n, p in model.named_parameters() if n.startswith("model.layers.0.")]

        def on_step(rec):
            if stop and rec["step"] == stop:
                raise KeyboardInterrupt

        return train(model, params, EXAMPLES, None, cfg, out_dir=out, dp=plan, on_step=on_step)

    full = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop=2)
    resumed = run(tmp_path / "b")
    for k in full.best_state:
        torch.testing.assert_close(full.best_state[k], resumed.best_state[k], rtol=0, atol=0)
    assert full.dp["steps"] == 4 and full.dp["epsilon"] <= 4.0 + 1e-9
    assert any(not torch.equal(full.best_state[k], tiny_model("llama", 4).state_dict()[k]) for k in full.best_state)


def _settings(kind="full", eps=8.0, **dp):
    return TuneSettings(adapter=kind, lora=LoraOptions(r=4, alpha=8),
                        train=TrainConfig(lr=1e-2, max_steps=3, batch_size=4, micro_batch_size=2, progress=False,
                                          checkpoint_every=None),
                        dp=DPOptions(epsilon=eps, **dp))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dp_tuning_on_every_family_writes_its_guarantee(family, tokenizer, tmp_path):
    emu = build_emulator("uniform", tiny_model(family, 6), tokenizer, "tiny", "2,2", keep=1)
    before = {k: v.clone() for k, v in emu.adapter_state().items()}
    bundle, result = tune_adapter(emu, TrainingData("qa", PAIRS, "pairs"), _settings())
    assert any(not torch.equal(before[k], v) for k, v in emu.adapter_state().items())
    manifest = save_adapter(bundle, tmp_path / "ad")
    dp = load_adapter(tmp_path / "ad").dp
    assert dp == manifest["dp"] and dp["examples"] == len(PAIRS)  # no validation split under DP
    assert 0 < dp["epsilon"] <= 8.0 and dp["delta"] == pytest.approx(1 / (10 * len(PAIRS))) and dp["steps"] == 3
    assert dp["sample_rate"] == pytest.approx(4 / len(PAIRS)) and dp["noise_multiplier"] > 0 and dp["clip"] == 1.0
    training = manifest["training"]
    assert set(training) == {"data", "data_kind", "examples", "config", "steps", "blocks"}  # no losses, no timings
    assert training["config"]["dp"]["epsilon"] == 8.0
    assert not any(type(m).__name__.startswith("_TokenRows") for m in emu.model.modules())


@pytest.mark.parametrize("kind", ["lora", "bitfit"])
def test_dp_tuning_of_lora_and_bitfit(kind, tokenizer, tmp_path):
    emu = build_emulator("uniform", tiny_model("opt", 6), tokenizer, "tiny", "2,2", keep=1)
    bundle, _ = tune_adapter(emu, TrainingData("qa", PAIRS, "pairs"), _settings(kind))
    assert load_adapter(tmp_path / "ad").dp["steps"] == 3 if save_adapter(bundle, tmp_path / "ad") else False


def test_the_owners_correction_is_added_after_clip_and_noise():
    """A huge correction and a tiny clip, no noise, SGD(lr=1): the parameters move by minus the
    clipped per-example mean and minus the whole correction: the per-example clip never saw it."""
    clip, c = 1e-3, 5.0
    model = _no_dropout(tiny_model("llama", 4)).train()
    ps = _adapter(model)
    start = [p.detach().clone() for p in ps]
    pe = PerExample(model, torch.optim.SGD(ps, lr=1.0), _plan(sigma=0.0, clip=clip, q=0.8, n=5))
    pe.add_after_noise(lambda: [(p, torch.full_like(p, c)) for p in ps])
    losses, _ = per_example_lm_loss(pe.model, collate(EXAMPLES, 0))
    losses.sum().backward()
    pe.optimizer.step()
    pe.close()
    moved = [p.detach() - p0 for p, p0 in zip(ps, start)]
    lm_part = torch.sqrt(sum(((m + c) ** 2).sum() for m in moved))  # what is left once c is taken out
    assert float(lm_part) <= 5 * clip / 4 + 1e-6 and float(lm_part) > 0  # at most 5 clipped examples over 4
    for m in moved:
        torch.testing.assert_close(m, torch.full_like(m, -c), rtol=0, atol=clip)


class _ConstantOwner:
    """The owner's side of the assisted protocol with a fixed correction (``value`` everywhere)."""

    def __init__(self, every=2, value=0.05):
        from offsite.assist import AssistOptions

        self.opts, self.value, self.asked = AssistOptions(every=every), value, 0

    def loss(self, params):
        from offsite.assist import CorrectedLoss

        def correction(state):
            self.asked += 1
            return {k: torch.full_like(v, self.value) for k, v in state.items()}

        return CorrectedLoss(params, correction, self.opts.every)


def test_dp_with_the_owner_in_the_loop_spends_the_same_epsilon(tokenizer, tmp_path):
    """DP-SGD with the owner's correction: the same (epsilon, delta) as without it (post-processing),
    recorded as added after the noise; the correction changes the adapter (same seed, same noise)."""
    def tuned(owner):
        emu = build_emulator("uniform", tiny_model("llama", 6), tokenizer, "tiny", "2,2", keep=1)
        s = _settings(eps=4.0)
        s.blocks = "bottom"
        bundle, _ = tune_adapter(emu, TrainingData("qa", PAIRS, "pairs"), s, assist=owner)
        return bundle

    alone, owner = tuned(None), _ConstantOwner(every=2)
    helped = tuned(owner)
    assert owner.asked == 2  # steps 1 and 3 of 3
    assert helped.training["assist"]["corrections"] == 2
    assert {k: v for k, v in helped.dp.items() if k != "after_noise"} == alone.dp
    assert "after_noise" not in alone.dp and "post-processing" in helped.dp["after_noise"]
    assert any(not torch.equal(alone.state[k], helped.state[k]) for k in alone.state)
    manifest = save_adapter(helped, tmp_path / "ad")
    check_schema(manifest, ADAPTER_SCHEMA, "m")
    assert load_adapter(tmp_path / "ad").dp["after_noise"] == helped.dp["after_noise"]


def test_dp_refuses_what_it_cannot_honour(tokenizer):
    from offsite.assist import CorrectedLoss

    s = _settings()
    s.train.mixed_precision = "bf16"
    with pytest.raises(OffsiteError, match="float32"):
        s.check()
    model = tiny_model("llama", 4)
    with pytest.raises(OffsiteError, match="plain LM loss"):
        train(model, None, EXAMPLES, None, TrainConfig(max_steps=1, progress=False),
              loss_fn=lambda m, b: (torch.zeros(()), 0), dp=_plan(n=5, steps=1))
    fedprox_and_owner = CorrectedLoss({}, lambda state: state, 1, base=lambda m, b: (torch.zeros(()), 0))
    with pytest.raises(OffsiteError, match="another loss term"):
        train(model, None, EXAMPLES, None, TrainConfig(max_steps=1, progress=False), loss_fn=fedprox_and_owner,
              dp=_plan(n=5, steps=1))


def test_manifest_dp_entry_is_checked(tokenizer, tmp_path):
    emu = build_emulator("uniform", tiny_model("llama", 6), tokenizer, "tiny", "2,2", keep=1)
    bundle, _ = tune_adapter(emu, TrainingData("qa", PAIRS, "pairs"), _settings())
    manifest = save_adapter(bundle, tmp_path / "ad")
    check_schema(manifest, ADAPTER_SCHEMA, "m")
    for field, value in (("epsilon", -1), ("unit", "user"), ("steps", 1.5), ("extra", 1)):
        bad = json.loads(json.dumps(manifest))
        bad["dp"][field] = value
        with pytest.raises(BundleError):
            check_schema(bad, ADAPTER_SCHEMA, "m")
    old = {k: v for k, v in manifest.items() if k != "dp"}  # an adapter without DP (or an older offsite's)
    check_schema(old, ADAPTER_SCHEMA, "m")


def test_cli_tune_and_plug_print_the_guarantee(tiny_dir, tmp_path, capsys):
    from offsite.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    assert main(["emulate", "--model", str(tiny_dir), "--keep", "1", "--no-probe", "--out", str(tmp_path / "emu")]) == 0
    tune = ["tune", "--emulator", str(tmp_path / "emu"), "--data", str(data), "--max-steps", "3", "--batch-size", "4",
            "--lr", "1e-2"]
    assert main(tune + ["--out", str(tmp_path / "ad"), "--dp-epsilon", "5", "--dp-clip", "0.5",
                        "--dp-accountant", "prv"]) == 0
    out = capsys.readouterr().out
    assert "-DP per training example" in out and "PRV" in out and "clip 0.5" in out
    assert main(["plug", "--model", str(tiny_dir), "--adapter", str(tmp_path / "ad"), "--emulator",
                 str(tmp_path / "emu"), "--out", str(tmp_path / "plugged")]) == 0
    assert "differential privacy: (" in capsys.readouterr().out
    assert main(tune + ["--out", str(tmp_path / "ad2"), "--dp-delta", "1e-5"]) == 2
    assert "--dp-delta needs --dp-epsilon" in capsys.readouterr().err
