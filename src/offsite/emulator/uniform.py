"""Offsite-Tuning's emulator without training: keep K evenly spaced middle blocks (layer drop)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.families import num_blocks
from .registry import Method, register
from .core import Emulator, keep_blocks, split_layers, uniform_choose


@dataclass
class UniformOptions:
    keep: int | None = field(default=None, metadata={
        "help": "middle blocks kept in the emulator (default: a third of the middle, rounded)"})


def default_keep(n_middle: int) -> int:
    return max(1, round(n_middle / 3))


def chosen_blocks(n_layers: int, adapter_layers: tuple[int, int], keep: int | None) -> list[int]:
    """Absolute indices of the middle blocks the uniform rule keeps."""
    _, middle, _ = split_layers(n_layers, adapter_layers)
    k = default_keep(len(middle)) if keep is None else keep
    return [middle[i] for i in uniform_choose(len(middle), k)]


def build(model, tokenizer, name: str, adapter_layers, opts: UniformOptions) -> Emulator:
    keep = chosen_blocks(num_blocks(model.config), adapter_layers, opts.keep)
    return keep_blocks(model, tokenizer, name, adapter_layers, keep, "uniform", {"keep": len(keep)})


register(Method("uniform", "Offsite-Tuning layer drop: keep K evenly spaced middle blocks",
                UniformOptions, build, bench_settings=[{"adapter_layers": [2, 2], "keep": 8}]))
