"""GradOT's two compression operators and the per-block parameter budget.

* **Dynamic Rank Decomposition (DRD)**, attention projections: ``W = U diag(S) Vh``; the top
  ``keep_top_frac`` (5 %) of the components by singular value are always kept; of the others the
  lowest-GCS ones are removed until the target rank; the result is stored factorised as a
  :class:`~offsite.emulator.lowrank.LowRankLinear` (called like the module it replaces, so the
  family's own attention code runs unchanged).
* **Selective Channel Pruning (SCP)**, MLP: intermediate channel ``j`` is scored by the sum of
  the GCS of removing its row in the up (and gate) projection and its column in the down
  projection; the lowest-scoring channels are removed until the target width; the MLP is stored
  smaller (same module types, fewer channels).

Budget (the paper leaves the ratio's definition open, docs/gradot.md §3): ``ratio`` is the fraction
of a middle block's parameters kept. Attention weights are kept at ``attn_ratio`` (default ``ratio``) of their
dense size, counting a rank-``r`` factorisation of an ``out x in`` map as ``r (out + in)``
parameters, so ``r = floor(attn_ratio · out·in / (out+in))``; the MLP width then fills the rest of
the block's budget (norms and attention biases are kept whole), unless ``mlp_ratio`` fixes it as a
fraction of the channels. A ratio of 1 leaves the part untouched (dense).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...errors import OffsiteError
from ...models.families import family_of
from ..lowrank import LowRankLinear, dense_weight
from .score import column_terms, combine, row_terms, svd_component_terms
from .stats import LayerStats, _is_conv1d, weight_matrix

KIND = "gradot"


@dataclass(frozen=True)
class Layout:
    """Where a family's block keeps its attention projections and its MLP."""

    attention: tuple[str, ...]  # linear maps compressed by DRD (paths inside the block)
    mlp_in: tuple[str, ...]  # maps into the intermediate channels (up, and gate)
    mlp_out: str  # the map out of them (down)
    mlp_holder: str | None = None  # module with an ``intermediate_size`` attribute to keep in sync

    @property
    def linears(self) -> tuple[str, ...]:
        return self.attention + self.mlp_in + (self.mlp_out,)


LAYOUTS = {
    "llama": Layout(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
                    ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp"),
    "opt": Layout(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                  ("fc1",), "fc2"),
    "gpt2": Layout(("attn.c_attn", "attn.c_proj"), ("mlp.c_fc",), "mlp.c_proj"),
    "bloom": Layout(("self_attention.query_key_value", "self_attention.dense"),
                    ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    "gpt_neox": Layout(("attention.query_key_value", "attention.dense"),
                       ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
}


def layout_of(model_or_config, block: nn.Module) -> Layout:
    """The family's layout, checked against ``block`` (one-line error if it does not fit)."""
    config = getattr(model_or_config, "config", model_or_config)
    fam = family_of(config)
    lay = LAYOUTS[fam.name]
    for path in lay.linears:
        try:
            m = block.get_submodule(path)
        except AttributeError:
            m = None
        if m is None or not (isinstance(m, nn.Linear) or _is_conv1d(m)):
            raise OffsiteError(f"gradot does not know the block layout of model type {config.model_type!r} "
                               f"(no linear map {path}); supported: standard {', '.join(LAYOUTS)} blocks")
    if fam.name == "bloom" and getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise OffsiteError("gradot cannot factorise BLOOM attention with slow_but_exact and pretraining_tp > 1 "
                           "(that code path reads the dense weight); set slow_but_exact=False")
    return lay


# ---------------------------------------------------------------------------------------------
# module surgery


def _set_module(block: nn.Module, path: str, module: nn.Module) -> None:
    holder, _, name = path.rpartition(".")
    setattr(block.get_submodule(holder) if holder else block, name, module)


def _sized_like(module: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """A module of ``module``'s type (Linear or Conv1D), dtype and device, with new sizes."""
    w = module.weight
    if _is_conv1d(module):
        from transformers.pytorch_utils import Conv1D

        new = Conv1D(out_features, in_features)
        return new.to(dtype=w.dtype, device=w.device)
    return nn.Linear(in_features, out_features, bias=module.bias is not None, dtype=w.dtype, device=w.device)


def _linear_from(module: nn.Module, W: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A module of ``module``'s type holding the (out x in) matrix ``W`` and ``bias``."""
    new = _sized_like(module, W.shape[1], W.shape[0])
    with torch.no_grad():
        new.weight.copy_(W.t() if _is_conv1d(module) else W)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _shape(module: nn.Module) -> tuple[int, int]:
    out_f, in_f = dense_weight(module).shape
    return out_f, in_f


# ---------------------------------------------------------------------------------------------
# DRD


def rank_for(out_f: int, in_f: int, ratio: float, keep_top_frac: float = 0.05) -> int | None:
    """The rank whose factorised size is ``ratio`` of the dense ``out x in`` (None: keep dense)."""
    if ratio >= 1:
        return None
    full = min(out_f, in_f)
    r = math.floor(ratio * out_f * in_f / (out_f + in_f))
    return int(min(full, max(1, r)))  # the target rank wins over the always-kept top (drd_select)


def top_count(full_rank: int, keep_top_frac: float) -> int:
    """Components always kept: the top ``keep_top_frac`` of the rank (at least one)."""
    return max(1, math.ceil(keep_top_frac * full_rank))


def drd_select(W: torch.Tensor, st: LayerStats, rank: int, lam: float, keep_top_frac: float,
               lambda_scale: str = "absolute"):
    """SVD of ``W`` and the indices of the components DRD keeps (sorted), with their scores."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    full = S.numel()
    if not 1 <= rank <= full:
        raise OffsiteError(f"DRD rank must be in 1..{full}, got {rank}")
    top = min(top_count(full, keep_top_frac), rank)
    second, first = svd_component_terms(U, S, Vh, st)
    scores = combine(second, first, lam, lambda_scale)
    rest = torch.arange(top, full, device=S.device)
    # keep the highest-scoring of the rest, i.e. remove the lowest-GCS ones until the target rank
    order = torch.argsort(scores[rest], descending=True, stable=True)
    kept = torch.cat([torch.arange(top, device=S.device), rest[order[: rank - top]]])
    return U, S, Vh, torch.sort(kept).values, (second, first)


def drd(module: nn.Module, st: LayerStats, rank: int, lam: float, keep_top_frac: float = 0.05,
        lambda_scale: str = "absolute"):
    """The factorised replacement of ``module`` (a LowRankLinear of rank ``rank``) and facts."""
    W = weight_matrix(module)
    U, S, Vh, kept, (second, first) = drd_select(W, st, rank, lam, keep_top_frac, lambda_scale)
    root = S[kept].sqrt()
    dtype = module.weight.dtype
    B = (U[:, kept] * root).to(dtype)
    A = (root[:, None] * Vh[kept]).to(dtype)
    bias = getattr(module, "bias", None)
    new = LowRankLinear.from_factors(B, A, bias.detach() if bias is not None else None)
    by_sigma = set(range(rank))
    facts = {"rank": rank, "full_rank": S.numel(),
             "not_top_sigma": sum(1 for k in kept.tolist() if k not in by_sigma),
             "energy_kept": round(float(S[kept].pow(2).sum() / S.pow(2).sum()), 4),
             "term_scale": _term_scale(second, first)}
    return new, facts


# ---------------------------------------------------------------------------------------------
# SCP


def channel_terms(block: nn.Module, lay: Layout, stats: dict[str, LayerStats]):
    """The two GCS terms of removing each intermediate channel, summed over its rows in the
    up/gate maps and its column in the down map (``GCS = second + λ · first``)."""
    second, first = column_terms(weight_matrix(block.get_submodule(lay.mlp_out)), stats[lay.mlp_out])
    for path in lay.mlp_in:
        s, f = row_terms(weight_matrix(block.get_submodule(path)), stats[path])
        second, first = second + s, first + f
    return second, first


def channel_scores(block: nn.Module, lay: Layout, stats: dict[str, LayerStats], lam: float,
                   lambda_scale: str = "absolute") -> torch.Tensor:
    """GCS of removing each intermediate channel."""
    second, first = channel_terms(block, lay, stats)
    return combine(second, first, lam, lambda_scale)


def _term_scale(second: torch.Tensor, first: torch.Tensor) -> dict:
    """Mean |term| over the candidates: the scale against which λ is set."""
    return {"second_order": float(second.abs().mean()), "first_order": float(first.abs().mean())}


def scp_select(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Indices (sorted) of the ``width`` channels kept: the lowest-scoring ones are removed."""
    if not 1 <= width <= scores.numel():
        raise OffsiteError(f"SCP width must be in 1..{scores.numel()}, got {width}")
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[:width]).values


def shrink_mlp(block: nn.Module, lay: Layout, keep: torch.Tensor) -> None:
    """Keep only the intermediate channels ``keep`` of ``block``'s MLP (in place)."""
    keep = keep.to(torch.long)
    for path in lay.mlp_in:
        m = block.get_submodule(path)
        W = dense_weight(m).detach()
        bias = m.bias.detach()[keep] if getattr(m, "bias", None) is not None else None
        _set_module(block, path, _linear_from(m, W[keep.to(W.device)], bias))
    m = block.get_submodule(lay.mlp_out)
    W = dense_weight(m).detach()
    bias = m.bias.detach() if getattr(m, "bias", None) is not None else None
    _set_module(block, lay.mlp_out, _linear_from(m, W[:, keep.to(W.device)], bias))
    _sync_width(block, lay, int(keep.numel()))


def _sync_width(block: nn.Module, lay: Layout, width: int) -> None:
    if lay.mlp_holder is not None:
        holder = block.get_submodule(lay.mlp_holder)
        if hasattr(holder, "intermediate_size"):
            holder.intermediate_size = width


def mlp_width(block: nn.Module, lay: Layout) -> int:
    return _shape(block.get_submodule(lay.mlp_out))[1]


# ---------------------------------------------------------------------------------------------
# budget


def _numel(t) -> int:
    return t.numel() if t is not None else 0


def plan_block(block: nn.Module, lay: Layout, ratio: float, attn_ratio: float | None,
               mlp_ratio: float | None, keep_top_frac: float) -> tuple[dict[str, int | None], int]:
    """Ranks of the attention maps and the MLP width that meet the block's budget."""
    total = sum(p.numel() for p in block.parameters())
    ranks, attn_dense, attn_kept = {}, 0, 0
    a_ratio = ratio if attn_ratio is None else attn_ratio
    for path in lay.attention:
        out_f, in_f = _shape(block.get_submodule(path))
        r = rank_for(out_f, in_f, a_ratio, keep_top_frac)
        ranks[path] = r
        attn_dense += out_f * in_f
        attn_kept += out_f * in_f if r is None else r * (out_f + in_f)
    width = mlp_width(block, lay)
    per_channel = 0
    for path in lay.mlp_in:
        m = block.get_submodule(path)
        per_channel += _shape(m)[1] + (1 if getattr(m, "bias", None) is not None else 0)
    per_channel += _shape(block.get_submodule(lay.mlp_out))[0]
    other = total - attn_dense - per_channel * width
    if mlp_ratio is not None:
        w = width if mlp_ratio >= 1 else round(mlp_ratio * width)
    else:
        w = math.floor((ratio * total - other - attn_kept) / per_channel)
    if w < 1:
        raise OffsiteError(f"a budget of {ratio:g} of the block's parameters leaves no MLP channel after the "
                           f"attention ({attn_kept} of {total} parameters); raise --ratio or lower --attn-ratio")
    return ranks, int(min(width, w))


# ---------------------------------------------------------------------------------------------
# one block


def compress_block(block: nn.Module, lay: Layout, stats: dict[str, LayerStats], ranks: dict[str, int | None],
                   width: int, lam_attn: float, lam_mlp: float, keep_top_frac: float,
                   lambda_scale: str = "absolute") -> dict:
    """Apply DRD (maps with a rank) and SCP (if ``width`` is below the MLP's) to ``block`` in place."""
    facts = {"attention": {}, "mlp": {}}
    for path, r in ranks.items():
        if r is None:
            continue
        new, f = drd(block.get_submodule(path), stats[path], r, lam_attn, keep_top_frac,
                     lambda_scale)
        _set_module(block, path, new)
        facts["attention"][path] = f
    full = mlp_width(block, lay)
    if width < full:
        second, first = channel_terms(block, lay, stats)
        keep = scp_select(combine(second, first, lam_mlp, lambda_scale), width)
        shrink_mlp(block, lay, keep)
        facts["mlp"] = {"width": width, "full_width": full, "term_scale": _term_scale(second, first)}
    return facts


def build_block(config, slot, template: nn.Module) -> nn.Module:
    """Block factory for bundles: the template block reshaped to ``slot.info`` (weights load after)."""
    block = copy.deepcopy(template)
    lay = layout_of(config, block)
    info = slot.info or {}
    for path, r in (info.get("ranks") or {}).items():
        if r is None:
            continue
        if path not in lay.attention:
            raise OffsiteError(f"gradot slot names an unknown attention map {path!r}")
        m = block.get_submodule(path)
        out_f, in_f = _shape(m)
        new = LowRankLinear(in_f, out_f, int(r), getattr(m, "bias", None) is not None,
                            dtype=m.weight.dtype, device=m.weight.device)
        _set_module(block, path, new)
    width = info.get("mlp_width")
    if width is not None and int(width) != mlp_width(block, lay):
        width = int(width)
        for path in lay.mlp_in:
            m = block.get_submodule(path)
            _set_module(block, path, _sized_like(m, _shape(m)[1], width))
        m = block.get_submodule(lay.mlp_out)
        _set_module(block, lay.mlp_out, _sized_like(m, width, _shape(m)[0]))
        _sync_width(block, lay, width)
    return block
