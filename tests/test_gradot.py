"""GradOT on tiny random models: KFAC statistics, GCS, DRD, SCP, budgets, every family, bundles."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn
from conftest import FAMILY_NAMES, tiny_model

from offsite.bundle import load_emulator, save_emulator
from offsite.emulator import build_emulator, get_method
from offsite.emulator.gradot import GradOTOptions, compress_model
from offsite.emulator.gradot.compress import (LAYOUTS, channel_scores, drd, drd_select, layout_of,
                                              plan_block, scp_select, shrink_mlp, top_count)
from offsite.emulator.gradot.score import column_scores, combine, gcs, row_scores, svd_component_scores
from offsite.emulator.gradot.stats import LayerStats, collect_stats
from offsite.emulator.lowrank import LowRankLinear, dense_weight
from offsite.errors import OffsiteError
from offsite.models import family_of, get_blocks

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
_rng = random.Random(0)
_WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "who", "is"]
DOCS = [" ".join(_rng.choice(_WORDS) for _ in range(80)) for _ in range(8)]
SMALL = dict(support_seqs=6, support_len=32, support_batch_size=3)


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def emulate(model, tokenizer, **opts):
    return compress_model(model, tokenizer, "tiny", (2, 2), GradOTOptions(**{**SMALL, **opts}), DOCS)


def random_stats(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(in_f, in_f + 3, generator=g)
    d = torch.randn(out_f, out_f + 3, generator=g)
    return LayerStats(g=torch.randn(out_f, in_f, generator=g), A=a @ a.T / in_f, G=d @ d.T / out_f)


# --- KFAC statistics --------------------------------------------------------------------------------


class _One(nn.Module):
    """A single linear map (``nn.Linear`` or GPT-2 ``Conv1D``) as the whole "model"."""

    def __init__(self, kind, in_f, out_f):
        super().__init__()
        if kind == "linear":
            self.lin = nn.Linear(in_f, out_f, bias=False)
        else:
            from transformers.pytorch_utils import Conv1D

            self.lin = Conv1D(out_f, in_f)
            nn.init.zeros_(self.lin.bias)
        with torch.no_grad():
            self.lin.weight.uniform_(0.1, 1.0)

    def forward(self, x):
        return self.lin(x)


def _nll(y, u):
    """ℓ = −log(uᵀ y): its Hessian in y is exactly δ δᵀ (δ = ∂ℓ/∂y), so Fisher = Hessian."""
    return -torch.log((u * y).sum(-1))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("case", ["one_sample", "shared_input"])
def test_kfac_product_equals_exact_hessian_vector_product(kind, case):
    """For ℓ_n = −log(u_nᵀ W x) the Hessian of the mean loss is (x xᵀ) ⊗ mean(δ_n δ_nᵀ): KFAC's
    A ⊗ G is exact, so G Δ A must equal autograd's H·Δ, and g must equal the gradient."""
    torch.manual_seed(0)
    in_f, out_f = 5, 4
    model = _One(kind, in_f, out_f)
    n = 1 if case == "one_sample" else 6
    x = torch.rand(1, in_f) + 0.1
    batches = [{"x": x.expand(n, in_f), "u": torch.rand(n, out_f) + 0.1}]

    def loss_fn(m, b):
        return _nll(m(b["x"]), b["u"]).sum(), b["x"].shape[0]

    stats, info = collect_stats(model, {"lin": model.lin}, batches, loss_fn)
    st = stats["lin"]
    assert info["target_tokens"] == n and info["positions"] == n

    W0 = dense_weight(model.lin).detach().clone()  # out x in

    def mean_loss(W):
        y = batches[0]["x"] @ W.T
        return _nll(y, batches[0]["u"]).mean()

    delta = torch.randn(out_f, in_f)
    _, hvp = torch.autograd.functional.hvp(mean_loss, W0, delta)
    grad = torch.autograd.functional.jacobian(mean_loss, W0)
    torch.testing.assert_close(st.G @ delta @ st.A, hvp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.g, grad, rtol=1e-5, atol=1e-6)
    # the explicit Kronecker product gives the same (column-major vec)
    H = torch.kron(st.A, st.G)
    torch.testing.assert_close((H @ delta.T.reshape(-1)).reshape(in_f, out_f).T, hvp, rtol=1e-5, atol=1e-6)
    assert model.lin.weight.requires_grad and model.lin.weight.grad is None  # state restored


def test_kfac_is_only_an_approximation_when_inputs_vary():
    """With different inputs per sample the identity does not hold: the test above is not vacuous."""
    torch.manual_seed(0)
    model = _One("linear", 5, 4)
    b = {"x": torch.rand(6, 5) + 0.1, "u": torch.rand(6, 4) + 0.1}
    st = collect_stats(model, {"lin": model.lin}, [b], lambda m, b: (_nll(m(b["x"]), b["u"]).sum(), 6))[0]["lin"]
    W0 = model.lin.weight.detach().clone()
    delta = torch.randn(4, 5)
    _, hvp = torch.autograd.functional.hvp(lambda W: _nll(b["x"] @ W.T, b["u"]).mean(), W0, delta)
    assert not torch.allclose(st.G @ delta @ st.A, hvp, rtol=1e-3, atol=1e-5)


def test_statistics_on_a_model_leave_it_unchanged(tokenizer):
    model = tiny_model("llama", 6)
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    emu = emulate(model, tokenizer, ratio=0.5, cost_baseline=True)
    assert emu.report["gradot"]["plain_forward_backward_seconds"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())
    st = emu.report["gradot"]["stats"]
    assert st["target_tokens"] == 6 * 31 and st["positions"] == 6 * 32 and st["passes"] == 1


def test_blocks_per_pass_gives_the_same_statistics(tokenizer):
    model = tiny_model("llama", 6)
    one = emulate(model, tokenizer, ratio=0.5)
    split = emulate(model, tokenizer, ratio=0.5, blocks_per_pass=1)
    assert split.report["gradot"]["stats"]["passes"] == 2
    assert [s.info for s in one.slots] == [s.info for s in split.slots]
    torch.testing.assert_close(logits(one.model), logits(split.model), rtol=1e-5, atol=1e-5)


# --- GCS ----------------------------------------------------------------------------------------------


def test_closed_form_scores_equal_the_literal_gcs():
    torch.manual_seed(0)
    W = torch.randn(6, 4)
    st = random_stats(6, 4)
    lam = 0.7
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    fast = svd_component_scores(U, S, Vh, st, lam)
    slow = torch.stack([gcs(-S[k] * torch.outer(U[:, k], Vh[k]), st, lam) for k in range(S.numel())])
    torch.testing.assert_close(fast, slow)
    rows = torch.stack([gcs(-torch.zeros_like(W).index_copy(0, torch.tensor([j]), W[j:j + 1]), st, lam)
                        for j in range(6)])
    torch.testing.assert_close(row_scores(W, st, lam), rows)
    cols = torch.stack([gcs(-torch.zeros_like(W).index_copy(1, torch.tensor([j]), W[:, j:j + 1]), st, lam)
                        for j in range(4)])
    torch.testing.assert_close(column_scores(W, st, lam), cols)


def test_lambda_trades_gradient_shift_for_loss_increase():
    """λ = 0 keeps the components whose removal shifts the gradient most; a huge λ keeps those whose
    removal would lower the loss (it removes the loss-raising ones)."""
    torch.manual_seed(0)
    W = torch.randn(12, 10)
    st = random_stats(12, 10, seed=3)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    second = S * (st.G @ U).abs().sum(0) * (st.A @ Vh.T).abs().sum(0)
    first = S * ((st.g @ Vh.T) * U).sum(0)
    top = top_count(10, 0.05)
    for lam, key in ((0.0, second), (1e9, first)):
        kept = drd_select(W, st, 5, lam, 0.05)[3]
        rest = [k for k in kept.tolist() if k >= top]
        expected = sorted((torch.argsort(key[top:], descending=True)[:5 - top] + top).tolist())
        assert rest == expected and list(range(top)) == kept.tolist()[:top]


def test_relative_lambda_is_the_absolute_one_rescaled():
    torch.manual_seed(0)
    second, first = torch.rand(20) * 50, torch.randn(20) * 1e-3
    lam = 1.5
    rel = combine(second, first, lam, "relative")
    ab = combine(second, first, lam * second.abs().mean() / first.abs().mean(), "absolute")
    torch.testing.assert_close(rel * second.abs().mean(), ab)
    # the literal formula with λ = 1 barely sees a first-order term 1e4 times smaller; relative does
    assert torch.equal(torch.argsort(combine(second, first, 1.0)), torch.argsort(second))
    assert not torch.equal(torch.argsort(rel), torch.argsort(second))


# --- DRD and SCP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_drd_at_full_rank_is_exact(kind):
    torch.manual_seed(0)
    mod = _One(kind, 12, 8).lin
    if kind == "linear":
        mod = nn.Linear(12, 8)
    x = torch.randn(3, 5, 12)
    new, facts = drd(mod, random_stats(8, 12), 8, lam=1.0)
    assert isinstance(new, LowRankLinear) and new.rank == 8 and facts["energy_kept"] == 1.0
    with torch.no_grad():
        torch.testing.assert_close(new(x), mod(x), rtol=1e-5, atol=1e-5)


def test_drd_keeps_the_top_five_percent_and_the_target_rank():
    torch.manual_seed(0)
    mod = nn.Linear(64, 48, bias=False)
    new, facts = drd(mod, random_stats(48, 64), 10, lam=1.0, keep_top_frac=0.05)
    assert new.A.weight.shape == (10, 64) and new.B.weight.shape == (48, 10)
    kept = drd_select(dense_weight(mod).detach(), random_stats(48, 64), 10, 1.0, 0.05)[3].tolist()
    assert kept[:3] == [0, 1, 2] and len(kept) == 10  # ceil(5% of 48) = 3 always kept


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_scp_full_width_is_exact_and_shapes_stay_consistent(family):
    model = tiny_model(family, 4)
    block = get_blocks(model)[1]
    lay = layout_of(model, block)
    stats = {p: random_stats(*dense_weight(block.get_submodule(p)).shape, seed=i)
             for i, p in enumerate(lay.mlp_in + (lay.mlp_out,))}
    full = dense_weight(block.get_submodule(lay.mlp_out)).shape[1]
    h = torch.randn(2, 7, model.config.hidden_size)
    mlp_of = {"llama": lambda b: b.mlp, "gpt2": lambda b: b.mlp,
              "opt": lambda b: (lambda t: b.fc2(b.activation_fn(b.fc1(t))))}[family]
    ref = mlp_of(block)(h).detach()
    same = copy.deepcopy(block)
    shrink_mlp(same, lay, scp_select(channel_scores(same, lay, stats, 1.0), full))
    torch.testing.assert_close(mlp_of(same)(h).detach(), ref, rtol=1e-5, atol=1e-5)
    small = copy.deepcopy(block)
    keep = scp_select(channel_scores(small, lay, stats, 1.0), 10)
    shrink_mlp(small, lay, keep)
    for p in lay.mlp_in:
        assert dense_weight(small.get_submodule(p)).shape == (10, model.config.hidden_size)
        if getattr(small.get_submodule(p), "bias", None) is not None:
            assert small.get_submodule(p).bias.shape == (10,)
    assert dense_weight(small.get_submodule(lay.mlp_out)).shape == (model.config.hidden_size, 10)
    if family == "llama":
        assert small.mlp.intermediate_size == 10
        # the kept channels are exactly the original ones: the rows of gate/up and columns of down
        torch.testing.assert_close(small.mlp.gate_proj.weight, block.mlp.gate_proj.weight[keep])
        torch.testing.assert_close(small.mlp.down_proj.weight, block.mlp.down_proj.weight[:, keep])
    assert mlp_of(small)(h).shape == ref.shape


def test_scp_removes_the_lowest_scoring_channels():
    scores = torch.tensor([3.0, -1.0, 5.0, 0.5, 2.0])
    assert scp_select(scores, 3).tolist() == [0, 2, 4]
    with pytest.raises(OffsiteError):
        scp_select(scores, 0)


# --- budgets ------------------------------------------------------------------------------------------


def test_budget_meets_the_ratio_and_expert_ratios(tokenizer):
    model = tiny_model("llama", 6)
    block = get_blocks(model)[2]
    lay = layout_of(model, block)
    total = sum(p.numel() for p in block.parameters())
    ranks, width = plan_block(block, lay, 0.4, None, None, 0.05)
    assert ranks["self_attn.q_proj"] == int(0.4 * 32 * 32 / 64)
    emu = emulate(model, tokenizer, ratio=0.4)
    assert abs(emu.report["gradot"]["middle_ratio_achieved"] - 0.4) < 0.03
    assert emu.middle_params() <= 0.4 * 2 * total + 1
    ranks, width = plan_block(block, lay, 0.5, 1.0, 0.25, 0.05)
    assert set(ranks.values()) == {None} and width == 16
    ranks, width = plan_block(block, lay, 1.0, None, None, 0.05)
    assert set(ranks.values()) == {None} and width == 64


@pytest.mark.parametrize("opts", [dict(ratio=0.0), dict(ratio=1.5), dict(ratio=0.5, attn_ratio=0.5, mlp_ratio=0.5),
                                  dict(ratio=0.02, attn_ratio=0.5), dict(support_len=1),
                                  dict(lambda_scale="log")])
def test_bad_options_fail_with_one_line(tokenizer, opts):
    with pytest.raises(OffsiteError) as e:
        emulate(tiny_model("llama", 6), tokenizer, **opts)
    assert "\n" not in str(e.value)


def test_method_is_registered_with_its_flags():
    m = get_method("gradot")
    assert m.options_cls is GradOTOptions
    from offsite.cli import build_parser

    args = build_parser().parse_args(["emulate", "--method", "gradot", "--out", "x", "--ratio", "0.3",
                                      "--lambda-attn", "2", "--support-seqs", "16"])
    assert (args.ratio, args.lambda_attn, args.support_seqs) == (0.3, 2.0, 16)


# --- whole emulators, every family -----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_removing_nothing_leaves_the_model_unchanged(family, tokenizer):
    model = tiny_model(family, 6)
    emu = emulate(model, tokenizer, ratio=1.0)
    assert all(s.info == {"ranks": {p: None for p in LAYOUTS[family_of(model).name].attention},
                          "mlp_width": dense_weight(get_blocks(model)[0].get_submodule(
                              LAYOUTS[family_of(model).name].mlp_out)).shape[1]}
               for s in emu.slots if s.kind == "gradot")
    torch.testing.assert_close(logits(emu.model), logits(model), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_runs_factorised_in_its_own_attention_and_round_trips(family, tokenizer, tmp_path):
    model = tiny_model(family, 6)
    full = logits(model)
    emu = emulate(model, tokenizer, ratio=0.5)
    assert [s.kind for s in emu.slots] == ["adapter", "adapter", "gradot", "gradot", "adapter", "adapter"]
    lay = LAYOUTS[family_of(model).name]
    calls = []
    hooks = []
    for pos, s in enumerate(emu.slots):
        block = get_blocks(emu.model)[pos]
        if s.kind != "gradot":
            continue
        for path in lay.attention:
            m = block.get_submodule(path)
            assert isinstance(m, LowRankLinear) and m.rank == s.info["ranks"][path]
            hooks.append(m.register_forward_hook(lambda *a, p=path: calls.append(p)))
        assert dense_weight(block.get_submodule(lay.mlp_out)).shape[1] == s.info["mlp_width"]
    out = logits(emu.model)
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * len(lay.attention)  # every factorised map ran in the family's attention
    assert torch.isfinite(out).all() and not torch.allclose(out, full)
    assert 0.4 < emu.middle_params() / emu.base["middle_params"] <= 0.5
    save_emulator(emu, tmp_path / "emu")
    loaded = load_emulator(tmp_path / "emu")
    assert [s.info for s in loaded.slots] == [s.info for s in emu.slots]
    assert torch.equal(logits(loaded.model), out)
    rep = loaded.manifest["report"]["gradot"]
    assert rep["build_seconds"] > 0 and rep["peak_rss_mb"] > 0 and rep["stats"]["stats_mb"] > 0


def test_build_emulator_entry_point_uses_the_support_text(tokenizer, monkeypatch):
    import offsite.data.text as text

    monkeypatch.setattr(text, "public_text", lambda part: list(DOCS))
    emu = build_emulator("gradot", tiny_model("llama", 6), tokenizer, "tiny", "2,2", ratio=0.5, **SMALL)
    assert emu.method == "gradot" and emu.params["support_seqs"] == 6
