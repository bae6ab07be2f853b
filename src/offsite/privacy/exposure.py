"""Weight exposure: how much of the original middle ``E`` does an emulator bundle give away?

The model owner computes this (it needs the full model) before shipping an emulator. The middle is
the original blocks between the adapter blocks; the adapter blocks, embeddings and head are shipped
by every method by design and are not counted. Every parameter tensor ``W`` of every original
middle block is compared with its counterpart in the emulator, found *generically* from the layer
map, whatever the slot kinds:

* the counterpart of block ``s`` is the emulator slot whose ``source`` is ``s`` and whose kind is not
  ``adapter`` (if a method ships several, the most exposing one is taken); a block without such a
  slot is *dropped*;
* inside that module, the tensor at the same path (``self_attn.q_proj.weight``...). A linear map
  (``nn.Linear``, GPT-2 ``Conv1D``) may have become a :class:`~offsite.emulator.lowrank.LowRankLinear`
  (its dense matrix ``B @ A`` is used, its bias is ``B.bias``) or a pruned linear map with fewer
  output rows or input columns: each shipped row (column) is matched to the nearest original row
  (column) in L2 distance, exact for rows kept verbatim, and the pruned ones count as not shipped.
  A slot module without the path (a harmonizer, any stand-in module) ships nothing of that
  tensor. If the path is not found as such, a unique submodule whose path ends with it is used
  (methods that wrap a block).

This gives, per original tensor, a reconstruction ``Ŵ`` in ``W``'s shape (zeros where nothing was
shipped) and a mask of the positions the bundle holds. The figures, per emulator:

``exposure_verbatim``
    The fraction of the original middle's parameters (scalars, every tensor: matrices, biases,
    norms) that the bundle holds bit-identically at their own place — the same original block, the
    same tensor, the same row and column. An emulator keeping every middle block scores 1.0; one
    made only of harmonizers, 0.0; distilled (``kd``) blocks score ~0 although they are close to
    the originals (hence the next two figures).
``rel_error``
    Over the weight *matrices* of the middle (norm gains and biases have a scale of their own and
    would dominate an energy-weighted sum), the parameter-weighted mean of ``‖Ŵ − W‖_F / ‖W‖_F``:
    0 for a verbatim matrix, 1 for a dropped or replaced one, ``sqrt`` of the pruned/truncated
    energy share for a pruned or truncated one.
``spectral_energy``
    The parameter-weighted mean over the same matrices of
    ``⟨Ŵ, W⟩_F² / (‖Ŵ‖_F² ‖W‖_F²)``: the share of ``W``'s energy explained by the shipped matrix
    (at its best scale; ``1 − min_c ‖W − cŴ‖²/‖W‖²``). For a rank-``k`` SVD truncation keeping the
    singular components ``K`` it is exactly ``Σ_{i∈K} σ_i² / Σ σ_i²`` (the spectral energy
    retained); for kept rows it is their energy share; 1 for a verbatim matrix, 0 for a dropped
    one, below 1 for a trained (distilled) one as it drifts.
``rel_error_shipped``, ``spectral_energy_shipped``
    The same two, over the matrices of which the bundle holds at least a part.
``blocks_exposed``
    The fraction of middle blocks of which the bundle holds at least one tensor position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..emulator.core import ADAPTER, Emulator, blocks_state, state_digest
from ..emulator.lowrank import LowRankLinear, dense_weight
from ..errors import OffsiteError
from ..models.families import family_of, get_blocks, num_blocks


def _is_linear(m) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (nn.Linear, Conv1D, LowRankLinear))


def _is_conv1d(m) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, Conv1D)


@dataclass
class TensorExposure:
    block: int  # original block index
    name: str  # parameter name inside the block
    numel: int
    matrix: bool  # a linear map's weight (counts in rel_error / spectral_energy)
    how: str  # same | lowrank | rows | cols | missing | unmatched
    present: int  # positions of W the bundle holds
    verbatim: int  # of those, bit-identical
    rel_error: float  # ‖Ŵ − W‖ / ‖W‖ (1.0 when nothing is shipped)
    energy: float  # ⟨Ŵ, W⟩² / (‖Ŵ‖² ‖W‖²) (0.0 when nothing is shipped)


@dataclass
class BlockExposure:
    source: int
    kind: str  # the slot kind holding it, or "dropped"
    params: int
    present: int
    verbatim: int


@dataclass
class ExposureReport:
    tensors: list[TensorExposure] = field(default_factory=list)
    blocks: list[BlockExposure] = field(default_factory=list)

    def summary(self) -> dict:
        total = sum(t.numel for t in self.tensors)
        mats = [t for t in self.tensors if t.matrix]
        shipped = [t for t in mats if t.present]

        def wmean(ts, attr):
            n = sum(t.numel for t in ts)
            return sum(getattr(t, attr) * t.numel for t in ts) / n if n else None

        return {
            "exposure_verbatim": sum(t.verbatim for t in self.tensors) / total if total else 0.0,
            "rel_error": wmean(mats, "rel_error"),
            "spectral_energy": wmean(mats, "energy"),
            "rel_error_shipped": wmean(shipped, "rel_error"),
            "spectral_energy_shipped": wmean(shipped, "energy"),
            "blocks_exposed": (sum(1 for b in self.blocks if b.present) / len(self.blocks)) if self.blocks else 0.0,
            "original_middle_params": total,
        }

    def detail(self) -> list[dict]:
        """Per original middle block: kind, verbatim share, and per-tensor figures."""
        out = []
        for b in self.blocks:
            ts = [t for t in self.tensors if t.block == b.source]
            out.append({"source": b.source, "kind": b.kind, "params": b.params,
                        "verbatim": b.verbatim / b.params if b.params else 0.0,
                        "present": b.present / b.params if b.params else 0.0,
                        "tensors": {t.name: {"how": t.how, "verbatim": t.verbatim / t.numel,
                                             "rel_error": t.rel_error, "energy": t.energy}
                                    for t in ts if t.matrix or t.how != "same"}})
        return out


# ---------------------------------------------------------------------------------------------


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        pass
    hits = [m for n, m in root.named_modules() if n.endswith("." + path)]
    return hits[0] if len(hits) == 1 else None


def _match(E: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """For each row of ``E`` the index of the nearest row of ``W`` (exact copies: distance 0)."""
    d = torch.cdist(E.double().unsqueeze(0), W.double().unsqueeze(0)).squeeze(0)
    return d.argmin(dim=1)


def _place_matrix(E: torch.Tensor, W: torch.Tensor):
    """Put the shipped (out x in) matrix ``E`` into ``W``'s shape: (Ŵ, present mask, how, rowmap)."""
    if E.shape == W.shape:
        return E, torch.ones_like(W, dtype=torch.bool), "same", None
    W_hat = torch.zeros_like(W)
    mask = torch.zeros_like(W, dtype=torch.bool)
    if E.shape[1] == W.shape[1] and E.shape[0] < W.shape[0]:
        idx = _match(E, W)
        W_hat[idx] = E.to(W.dtype)
        mask[idx] = True
        return W_hat, mask, "rows", idx
    if E.shape[0] == W.shape[0] and E.shape[1] < W.shape[1]:
        idx = _match(E.t(), W.t())
        W_hat[:, idx] = E.to(W.dtype)
        mask[:, idx] = True
        return W_hat, mask, "cols", None
    return None


def _counterpart(emu_block: nn.Module, orig_block: nn.Module, name: str, W: torch.Tensor,
                 rowmaps: dict) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """Ŵ (W's layout), present mask and how it was found, or None when nothing is shipped."""
    path, _, attr = name.rpartition(".")
    orig_sub = _submodule(orig_block, path)
    emu_sub = _submodule(emu_block, path)
    if emu_sub is None:
        return None
    if attr == "weight" and _is_linear(orig_sub) and _is_linear(emu_sub):
        Wd, Ed = dense_weight(orig_sub).detach(), dense_weight(emu_sub).detach()
        placed = _place_matrix(Ed, Wd)
        if placed is None:
            return Wd.new_zeros(W.shape), torch.zeros_like(W, dtype=torch.bool), "unmatched"
        W_hat, mask, how, idx = placed
        if idx is not None:
            rowmaps[path] = idx
        if isinstance(emu_sub, LowRankLinear) and how == "same":
            how = "lowrank"
        if _is_conv1d(orig_sub):  # W is stored (in x out)
            W_hat, mask = W_hat.t(), mask.t()
        return W_hat, mask, how
    if attr == "bias" and isinstance(emu_sub, LowRankLinear):
        E = emu_sub.B.bias
    else:
        E = emu_sub._parameters.get(attr) if attr in getattr(emu_sub, "_parameters", {}) else None
    if E is None:
        return None
    E = E.detach()
    if E.shape == W.shape:
        return E, torch.ones_like(W, dtype=torch.bool), "same"
    if E.ndim == 1 and W.ndim == 1 and path in rowmaps and len(rowmaps[path]) == len(E):
        W_hat, mask = torch.zeros_like(W), torch.zeros_like(W, dtype=torch.bool)
        W_hat[rowmaps[path]] = E.to(W.dtype)
        mask[rowmaps[path]] = True
        return W_hat, mask, "rows"
    return W.new_zeros(W.shape), torch.zeros_like(W, dtype=torch.bool), "unmatched"


def _block_exposure(source: int, emu_block: nn.Module | None, orig_block: nn.Module) -> list[TensorExposure]:
    out, rowmaps = [], {}
    params = list(orig_block.named_parameters())
    # weights first, so that a pruned linear map's row matching is known for its bias
    params.sort(key=lambda np_: 0 if np_[0].endswith("weight") else 1)
    for name, W in params:
        W = W.detach()
        path = name.rpartition(".")[0]
        matrix = name.endswith("weight") and _is_linear(_submodule(orig_block, path)) and W.ndim == 2
        found = _counterpart(emu_block, orig_block, name, W, rowmaps) if emu_block is not None else None
        if found is None:
            W_hat, mask, how = torch.zeros_like(W), torch.zeros_like(W, dtype=torch.bool), "missing"
        else:
            W_hat, mask, how = found
        present = int(mask.sum())
        verbatim = int(((W_hat.to(W.dtype) == W) & mask).sum()) if present else 0
        w, wh = W.double(), W_hat.double()
        nw, nwh = float(w.pow(2).sum()), float(wh.pow(2).sum())
        rel = math.sqrt(float((wh - w).pow(2).sum()) / nw) if nw > 0 else (0.0 if nwh == 0 else 1.0)
        energy = float((wh * w).sum()) ** 2 / (nw * nwh) if nw > 0 and nwh > 0 else 0.0
        out.append(TensorExposure(source, name, W.numel(), matrix, how, present, verbatim, rel, energy))
    return out


def check_same_model(model, emu: Emulator) -> None:
    """Refuse (one line) a full model that is not the one the emulator was built from."""
    base = emu.base
    if base.get("model_type") != model.config.model_type or base.get("num_layers") != num_blocks(model.config):
        raise OffsiteError(f"the emulator was built from a {base.get('model_type')} model of "
                           f"{base.get('num_layers')} blocks, this model is a {model.config.model_type} "
                           f"of {num_blocks(model.config)} blocks")
    family_of(model)
    bottom, top = emu.adapter_layers
    n = num_blocks(model.config)
    sources = list(range(bottom)) + list(range(n - top, n))
    expected = (emu.manifest or {}).get("adapter_init_digest") or state_digest(emu.adapter_state())
    if state_digest(blocks_state(model, {s: s for s in sources})) != expected:
        raise OffsiteError("the emulator was not built from this model (its adapter blocks differ from "
                           "the model's)")


@torch.no_grad()
def weight_exposure(model, emu: Emulator) -> ExposureReport:
    """Compare the middle of ``emu`` with the original middle of the owner's full ``model``."""
    check_same_model(model, emu)
    n = num_blocks(model.config)
    bottom, top = emu.adapter_layers
    orig_blocks = get_blocks(model)
    emu_blocks = get_blocks(emu.model)
    by_source: dict[int, list[tuple[str, nn.Module]]] = {}
    for pos, slot in enumerate(emu.slots):
        if slot.kind != ADAPTER:
            by_source.setdefault(slot.source, []).append((slot.kind, emu_blocks[pos]))
    report = ExposureReport()
    for s in range(bottom, n - top):
        candidates = by_source.get(s) or [("dropped", None)]
        best = None
        for kind, module in candidates:
            ts = _block_exposure(s, module, orig_blocks[s])
            key = (sum(t.verbatim for t in ts), sum(t.energy * t.numel for t in ts if t.matrix))
            if best is None or key > best[0]:
                best = (key, kind, ts)
        _, kind, ts = best
        report.tensors.extend(ts)
        report.blocks.append(BlockExposure(s, kind, sum(t.numel for t in ts), sum(t.present for t in ts),
                                           sum(t.verbatim for t in ts)))
    return report


__all__ = ["BlockExposure", "ExposureReport", "TensorExposure", "check_same_model", "weight_exposure"]
