"""ScaleOT stage 2: an emulator for any (N_a, alpha, beta) from one stage-1 artifact, in seconds.

* ``alpha``: fraction of the middle blocks replaced by their harmonizers, ``round(alpha * n)``
  blocks (half up). ``importance="learned"`` replaces the blocks with the highest stage-1 scores
  (the most replaceable; ties by position); ``random`` ranks the blocks by a seeded random
  permutation instead (the "learned vs. random importance" ablation); ``uniform`` keeps the
  evenly spaced blocks of Offsite-Tuning's uniform rule and replaces the others.
  ``selection="global"`` (default) ranks the whole middle; ``group`` replaces ``round(alpha * g)``
  blocks in each stage-1 group of ``g`` consecutive blocks (what the unofficial fork does).
* ``harmonizer=False`` drops the chosen blocks instead of replacing them (Dynamic LayerDrop).
* ``beta``: Selective Rank Compression of the attention projections of the kept original middle
  blocks (:mod:`.selective_rank`); ``beta = 1`` turns SRC off.

The layer map goes into the emulator's slots: ``original`` (kept as is), ``src`` (kept with
compressed attention; ``info`` has the ranks), ``harmonizer`` (``info`` has its rank); dropped
blocks have no slot.
"""

from __future__ import annotations

import copy
import math

import torch

from ...errors import OffsiteError
from ...models.families import get_blocks, num_blocks
from ..core import ORIGINAL, Emulator, Slot, assemble, split_layers, uniform_choose
from . import harmonizer as H
from . import selective_rank as S
from .stage1 import Stage1Artifact, block_params, make_groups

IMPORTANCE = ("learned", "random", "uniform")
SELECTION = ("global", "group")


def n_replaced(n: int, alpha: float) -> int:
    return min(n, int(math.floor(alpha * n + 0.5)))


def choose_replaced(n: int, alpha: float, scores: torch.Tensor | None = None, importance: str = "learned",
                    selection: str = "global", group_size: int = 4, seed: int = 0) -> list[int]:
    """Middle positions (0..n-1) to replace or drop."""
    if importance not in IMPORTANCE:
        raise OffsiteError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    if selection not in SELECTION:
        raise OffsiteError(f"--selection must be one of {', '.join(SELECTION)}, got {selection!r}")
    k = n_replaced(n, alpha)
    if k == 0:
        return []
    if importance == "uniform":
        keep = set(uniform_choose(n, n - k))
        return [i for i in range(n) if i not in keep]
    if importance == "random":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        scores = torch.empty(n, dtype=torch.float64)
        scores[perm] = torch.arange(n, dtype=torch.float64)  # a random ranking
    elif scores is None:
        raise OffsiteError("learned importance needs a stage-1 artifact (--from)")
    sc = [float(x) for x in scores]

    def top(positions: list[int], m: int) -> list[int]:
        return sorted(positions, key=lambda i: (-sc[i], i))[:m]

    if selection == "global":
        return sorted(top(list(range(n)), k))
    return sorted(i for g in make_groups(n, group_size) for i in top(g, n_replaced(len(g), alpha)))


def build_scaleot(model, tokenizer, name: str, adapter_layers, art: Stage1Artifact | None, alpha: float,
                  beta: float, harmonizer: bool = True, importance: str = "learned", selection: str = "global",
                  seed: int = 0, src_storage: str = "auto", params: dict | None = None) -> Emulator:
    if not 0.0 <= alpha <= 1.0:
        raise OffsiteError(f"--alpha must be in [0, 1], got {alpha}")
    if not 0.0 < beta <= 1.0:
        raise OffsiteError(f"--beta must be in (0, 1], got {beta}")
    if src_storage not in S.STORAGES:
        raise OffsiteError(f"--src-storage must be one of {', '.join(S.STORAGES)}, got {src_storage!r}")
    n = num_blocks(model.config)
    _, middle, _ = split_layers(n, adapter_layers)
    if art is not None:
        art.check_fits(model, adapter_layers, check_weights=False)
    group_size = int(art.meta["config"]["group_size"]) if art is not None else 4
    replaced = choose_replaced(len(middle), alpha, art.scores if art is not None else None, importance,
                               selection, group_size, seed)
    if replaced and harmonizer and art is None:
        raise OffsiteError("replacing blocks by harmonizers needs a stage-1 artifact (--from)")
    blocks = get_blocks(model)
    p0 = next(model.parameters())
    rep = {middle[k] for k in replaced}
    parts, src_info = [], {}
    for i in middle:
        if i in rep:
            if harmonizer:
                h = art.harmonizer(model.config, i, dtype=p0.dtype).to(p0.device)
                parts.append((Slot(H.KIND, i, h.info()), h))
        elif beta < 1.0:
            blk, info = S.compress_block(blocks[i], beta, src_storage)
            parts.append((Slot(S.KIND, i, info), blk))
            src_info[i] = {k: v["rank"] for k, v in info["projections"].items()}
        else:
            parts.append((Slot(ORIGINAL, i), copy.deepcopy(blocks[i])))
    p = dict(params or {})
    p.update({"alpha": alpha, "beta": beta, "harmonizer": harmonizer, "importance": importance,
              "selection": selection, "src_storage": src_storage})
    if importance == "random":
        p["importance_seed"] = seed
    emu = assemble(model, tokenizer, name, adapter_layers, parts, "scaleot", p)
    orig = emu.base["middle_params"]
    mid = emu.middle_params()
    emu.report["scaleot"] = {
        "middle_params": mid, "original_middle_params": orig,
        "compression_ratio": orig / mid if mid else float("inf"), "middle_fraction": mid / orig,
        "replaced": sorted(rep) if harmonizer else [], "dropped": [] if harmonizer else sorted(rep),
        "kept": [i for i in middle if i not in rep], "src_ranks": src_info,
        "harmonizer_params_each": (art.meta["harmonizer"]["params_each"] if art is not None else None),
        "block_params_each": block_params(model, middle[0]),
    }
    if art is not None:
        emu.report["scaleot"]["stage1"] = {"path": str(art.path) if art.path else None,
                                           "scores": art.meta["scores"], "cost": art.meta["cost"],
                                           "middle_digest": art.meta["base"].get("middle_digest")}
    return emu
