"""Selective Rank Compression (SRC): truncated SVD of the attention projections of a block.

ScaleOT applies a rank-r SVD approximation only to the attention (MHSA) weights of the original
middle blocks it keeps; the MLP stays dense (docs/scaleot.md, "SRC"). ``beta`` is the fraction of each
projection's full rank ``min(out, in)`` that is kept: ``r = max(1, round(beta * min(out, in)))``
(the triplet's "rank-reduction ratio"; its exact definition in the paper is unverified).

Which modules are "attention projections": every ``nn.Linear`` / GPT-2 ``Conv1D`` inside the
block whose path has a component containing ``attn`` or ``attention`` -- q/k/v/o_proj of the
LLaMA family, q/k/v/out_proj of OPT, ``c_attn``/``c_proj`` of GPT-2, ``query_key_value``/``dense``
of BLOOM and GPT-NeoX (fused projections are compressed as one matrix).

Storage (option ``src_storage``): a rank-r factorisation ``B (out x r) @ A (r x in)`` holds
``r (out + in)`` numbers, fewer than the dense ``out x in`` only when
``r < out * in / (out + in)`` (half the rank of a square matrix). ``factored`` always stores the
factors (a :class:`~offsite.emulator.lowrank.LowRankLinear`), ``dense`` stores the rank-r matrix
``B @ A`` in the original module (same size, same information removed), and ``auto`` (default)
takes whichever is smaller, so SRC never makes the emulator bigger. The emulator's middle
parameter count in the report is what is really stored.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..lowrank import LowRankLinear, dense_weight

KIND = "src"
STORAGES = ("auto", "factored", "dense")


def _is_linear(m: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (nn.Linear, Conv1D, LowRankLinear))


def attention_projections(block: nn.Module) -> list[str]:
    """Qualified names (inside ``block``) of its attention projection matrices."""
    out = []
    for name, m in block.named_modules():
        if not name or not _is_linear(m):
            continue
        parts = name.split(".")
        if any("attn" in p or "attention" in p for p in parts[:-1]) and not any(
                isinstance(block.get_submodule(".".join(parts[:k])), LowRankLinear) for k in range(1, len(parts))):
            out.append(name)
    return out


def src_rank(out_features: int, in_features: int, beta: float) -> int:
    return max(1, min(min(out_features, in_features), round(beta * min(out_features, in_features))))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _shape(m: nn.Module) -> tuple[int, int]:
    w = dense_weight(m)
    return int(w.shape[0]), int(w.shape[1])


@torch.no_grad()
def compress_block(block: nn.Module, beta: float, storage: str = "auto") -> tuple[nn.Module, dict]:
    """A copy of ``block`` with its attention projections replaced by rank-``beta`` SVD truncations.

    Returns ``(new_block, info)`` where ``info = {"beta", "projections": {name: {"rank", "storage",
    "out", "in"}}}`` is what :func:`src_factory` needs to rebuild the block's structure.
    """
    from transformers.pytorch_utils import Conv1D

    if storage not in STORAGES:
        raise ValueError(f"src storage must be one of {STORAGES}, got {storage!r}")
    new = copy.deepcopy(block)
    projections = {}
    for name in attention_projections(new):
        m = new.get_submodule(name)
        out_f, in_f = _shape(m)
        r = src_rank(out_f, in_f, beta)
        how = storage
        if how == "auto":
            how = "factored" if r * (out_f + in_f) < out_f * in_f else "dense"
        low = LowRankLinear.from_svd(m, r)
        if how == "factored":
            _set_submodule(new, name, low)
        else:  # the rank-r matrix, stored densely in the original module
            w = (low.B.weight.float() @ low.A.weight.float())
            if isinstance(m, Conv1D):
                m.weight.copy_(w.t().to(m.weight.dtype))
            else:
                m.weight.copy_(w.to(m.weight.dtype))
        projections[name] = {"rank": r, "storage": how, "out": out_f, "in": in_f}
    return new, {"beta": beta, "projections": projections}


def src_factory(config, slot, template: nn.Module) -> nn.Module:
    """Block-kind factory: a fresh block of the family with the factored projections of ``slot.info``."""
    for name, p in slot.info.get("projections", {}).items():
        if p.get("storage") != "factored":
            continue
        m = template.get_submodule(name)
        w = next(m.parameters())
        bias = getattr(m, "bias", None) is not None
        _set_submodule(template, name, LowRankLinear(int(p["in"]), int(p["out"]), int(p["rank"]), bias,
                                                     dtype=w.dtype, device=w.device))
    return template
