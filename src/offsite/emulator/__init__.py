"""Emulator methods. Each method registers itself with :func:`register` (:mod:`.registry`); the
CLI, ``offsite run`` and the benchmark discover them from :func:`all_methods`, so a new method
needs its module and one import line below, and no change elsewhere.
"""

from __future__ import annotations

from .core import (ADAPTER, ORIGINAL, Emulator, Slot, assemble, keep_blocks, parse_adapter_layers,
                   register_block_kind, split_layers, state_digest, uniform_choose)
from .registry import METHODS, Method, all_methods, build_emulator, get_method, register

# the built-in methods: importing each registers it (and its block kinds)
from . import uniform, gradot, kd, scaleot, gradmatch  # noqa: F401  (in this order: the registry lists them so)

__all__ = [
    "ADAPTER", "ORIGINAL", "Emulator", "METHODS", "Method", "Slot", "all_methods", "assemble",
    "build_emulator", "get_method", "keep_blocks", "parse_adapter_layers", "register",
    "register_block_kind", "split_layers", "state_digest", "uniform_choose",
]
