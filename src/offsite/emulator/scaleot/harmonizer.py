"""Harmonizers: the lightweight stand-ins that replace unimportant middle blocks.

A harmonizer is a residual low-rank MLP ``y = h + W_up ReLU(W_down norm(h))`` (ScaleOT's
"simple low-rank FFN with ReLU" per an unofficial re-implementation, unverified; docs/scaleot.md). ``W_up``
(weight and bias) starts at zero, so a fresh harmonizer is exactly the identity: replacing a block
by a new harmonizer is the same as dropping the block.

It is called in place of the family's block inside the model's own forward, with the block's
call signature ``(hidden_states, *args, **kwargs)`` (everything but the hidden states is
ignored: masks, rotary embeddings, caches) and returns what that family's block returns: a
tensor for every family in transformers 5, except BLOOM whose block returns ``(hidden, attn)``.

Unverified choices (options): the rank (default 64, the fork's "medium model" value), the
optional pre-normalisation (an RMSNorm, default on: it keeps the input of ``W_down`` at unit
scale whatever the size of the residual stream, which in LLaMA-like models has a few very large
channels; the fork has none), biases in both linear maps.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...models.families import family_of

KIND = "harmonizer"

# families whose block returns a tuple (hidden_states, attentions) instead of a tensor
_TUPLE_FAMILIES = {"bloom"}


def block_returns_tuple(config) -> bool:
    return family_of(config).name in _TUPLE_FAMILIES


class Harmonizer(nn.Module):
    """``h + up(relu(down(norm(h))))``, the identity at initialisation."""

    def __init__(self, hidden_size: int, rank: int = 64, norm: bool = True, returns_tuple: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.hidden_size, self.rank, self.use_norm, self.returns_tuple = hidden_size, rank, norm, returns_tuple
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6, dtype=dtype, device=device) if norm else None
        self.down = nn.Linear(hidden_size, rank, bias=True, dtype=dtype, device=device)
        self.up = nn.Linear(rank, hidden_size, bias=True, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h) if self.norm is not None else h
        return self.up(torch.relu(self.down(x)))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states + self.delta(hidden_states)
        return (out, None) if self.returns_tuple else out

    def info(self) -> dict:
        """What the bundle needs to rebuild it (the ``Slot.info`` of a harmonizer slot)."""
        return {"rank": self.rank, "norm": self.use_norm, "hidden_size": self.hidden_size}

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, rank={self.rank}, norm={self.use_norm}"


def make_harmonizer(config, rank: int, norm: bool, dtype=None, device=None) -> Harmonizer:
    return Harmonizer(config.hidden_size, rank, norm, block_returns_tuple(config), dtype=dtype, device=device)


def harmonizer_params(hidden_size: int, rank: int, norm: bool = True) -> int:
    """Parameter count of a harmonizer (without building one)."""
    return 2 * hidden_size * rank + rank + hidden_size + (hidden_size if norm else 0)


def harmonizer_factory(config, slot, template: nn.Module) -> Harmonizer:
    """Block-kind factory: rebuild a harmonizer from its slot info when a bundle is loaded."""
    p = next(template.parameters(), None)
    return make_harmonizer(config, int(slot.info["rank"]), bool(slot.info.get("norm", True)),
                           dtype=p.dtype if p is not None else None)
