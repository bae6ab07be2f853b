"""What every emulator method shares: the adapter/middle split, the layer map, assembly.

An emulator is an ordinary Hugging Face causal LM whose block stack is
``[A_bottom ; E* ; A_top]``: the adapter blocks (original weights, trainable by the data owner)
around the compressed middle ``E*``. Each position of the stack is a :class:`Slot` recording
which original block it came from and what it is (an adapter block, an original middle block,
or a method-specific stand-in such as a harmonizer or a rank-compressed block). The layer map
travels in the bundle's manifest, so the model owner can plug the tuned adapter back at the
right positions of the full model.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..errors import OffsiteError
from ..models.families import family_of, get_blocks, num_blocks, set_blocks, stack_prefix

ADAPTER = "adapter"
ORIGINAL = "original"


@dataclass
class Slot:
    """One position of the emulator's block stack."""

    kind: str  # "adapter", "original", or a kind registered by a method
    source: int  # index of the original block this slot came from or stands in for
    info: dict = field(default_factory=dict)  # kind-specific parameters (ranks, sizes...)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Slot":
        return cls(kind=str(d["kind"]), source=int(d["source"]), info=dict(d.get("info") or {}))


# kind -> factory(config, slot, template_block) -> module, used to rebuild non-standard slots
# when loading a bundle (the template is a freshly initialised standard block of the family).
BLOCK_KINDS: dict[str, Callable[[object, Slot, nn.Module], nn.Module]] = {}


def register_block_kind(kind: str, factory: Callable[[object, Slot, nn.Module], nn.Module]) -> None:
    BLOCK_KINDS[kind] = factory


def parse_adapter_layers(spec: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``"2,2"`` -> ``(2, 2)``: blocks at the bottom and at the top that form the adapter."""
    if isinstance(spec, str):
        parts = spec.replace(" ", "").split(",")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise OffsiteError(f"--adapter-layers must look like BOTTOM,TOP (e.g. 2,2), got {spec!r}")
        spec = (int(parts[0]), int(parts[1]))
    bottom, top = (int(x) for x in spec)
    if bottom < 0 or top < 0 or bottom + top == 0:
        raise OffsiteError(f"adapter layers must be non-negative and not both zero, got {bottom},{top}")
    return bottom, top


def split_layers(n_layers: int, adapter_layers: tuple[int, int]) -> tuple[list[int], list[int], list[int]]:
    """Indices of the bottom adapter, the middle and the top adapter blocks."""
    bottom, top = adapter_layers
    if bottom + top >= n_layers:
        raise OffsiteError(
            f"adapter layers {bottom},{top} leave no middle in a model of {n_layers} blocks"
        )
    return list(range(bottom)), list(range(bottom, n_layers - top)), list(range(n_layers - top, n_layers))


def uniform_choose(n: int, k: int) -> list[int]:
    """Offsite-Tuning's uniform selection of ``k`` of ``n`` middle blocks (positions 0..n-1).

    ``stride = (n-1)/(k-1)``, ``idx_i = round(i*stride)`` with Python's round (banker's), so the
    first and last middle blocks are always kept, exactly as the reference code does. ``k = 1``
    (undefined there) keeps the block in the middle; ``k = 0`` keeps none.
    """
    if not 0 <= k <= n:
        raise OffsiteError(f"cannot keep {k} of {n} middle blocks (choose 0..{n})")
    if k == 0:
        return []
    if k == 1:
        return [round((n - 1) / 2)]
    stride = (n - 1) / (k - 1)
    return [round(i * stride) for i in range(k)]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict, independent of key order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def blocks_state(model: nn.Module, positions: dict[int, int]) -> dict[str, torch.Tensor]:
    """Parameters of the blocks at the given stack positions, keyed ``blocks.{source}.{name}``.

    ``positions`` maps a position in ``model``'s stack to the original block index it holds, so
    the same keys name the same block in the emulator and in the full model.
    """
    blocks = get_blocks(model)
    out = {}
    for pos, source in positions.items():
        for name, tensor in blocks[pos].state_dict().items():
            out[f"blocks.{source}.{name}"] = tensor
    return out


@dataclass
class Emulator:
    """An emulator model ``[emb, A_bottom, E*, A_top, head]`` and its layer map."""

    model: nn.Module
    tokenizer: object
    slots: list[Slot]
    method: str
    params: dict
    base: dict  # {"name", "model_type", "family", "num_layers", "adapter_layers"} of the full model
    base_config: dict = field(default_factory=dict)  # the full model's HF config, as a dict
    report: dict = field(default_factory=dict)  # method-specific facts (costs, curves...) for the manifest
    manifest: dict | None = None  # set when loaded from (or saved to) a bundle

    @property
    def adapter_layers(self) -> tuple[int, int]:
        return tuple(self.base["adapter_layers"])

    @property
    def adapter_positions(self) -> dict[int, int]:
        """Stack position -> original block index, for the adapter blocks."""
        return {i: s.source for i, s in enumerate(self.slots) if s.kind == ADAPTER}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return blocks_state(self.model, self.adapter_positions)

    def adapter_param_names(self) -> list[str]:
        """Full parameter names (in ``self.model``) of the adapter blocks."""
        prefix = stack_prefix(self.model)
        return [
            f"{prefix}.{pos}.{name}"
            for pos in self.adapter_positions
            for name, _ in get_blocks(self.model)[pos].named_parameters()
        ]

    def middle_params(self) -> int:
        blocks = get_blocks(self.model)
        return sum(p.numel() for i, s in enumerate(self.slots) if s.kind != ADAPTER
                   for p in blocks[i].parameters())


def base_info(model: nn.Module, name: str, adapter_layers: tuple[int, int]) -> dict:
    fam = family_of(model)
    return {
        "name": name,
        "model_type": model.config.model_type,
        "family": fam.name,
        "num_layers": num_blocks(model.config),
        "adapter_layers": list(adapter_layers),
        "middle_params": sum(
            p.numel() for i in split_layers(num_blocks(model.config), adapter_layers)[1]
            for p in get_blocks(model)[i].parameters()
        ),
    }


def _shell_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the model without its blocks (embeddings, norm and head are copied)."""
    fam = family_of(model)
    blocks = get_blocks(model)
    holder, _, attr = fam.stack.rpartition(".")
    parent = model.get_submodule(holder)
    setattr(parent, attr, nn.ModuleList())
    try:
        shell = copy.deepcopy(model)
    finally:
        setattr(parent, attr, blocks)
    return shell


def assemble(model: nn.Module, tokenizer, name: str, adapter_layers: tuple[int, int],
             middle: list[tuple[Slot, nn.Module]], method: str, params: dict) -> Emulator:
    """Build ``[A_bottom ; middle ; A_top]`` as a new model; ``model`` is left untouched.

    ``middle`` gives, in order, each emulator middle slot and its module (modules that are
    original blocks must already be copies: they become part of the emulator).
    """
    n = num_blocks(model.config)
    bottom, _, top = split_layers(n, adapter_layers)
    blocks = get_blocks(model)
    layer_types = getattr(model.config, "layer_types", None)
    slots, modules = [], []
    for i in bottom:
        slots.append(Slot(ADAPTER, i))
        modules.append(copy.deepcopy(blocks[i]))
    for slot, module in middle:
        slots.append(slot)
        modules.append(module)
    for i in top:
        slots.append(Slot(ADAPTER, i))
        modules.append(copy.deepcopy(blocks[i]))
    emu = _shell_copy(model)
    set_blocks(emu, modules, [layer_types[s.source] for s in slots] if layer_types else None)
    emu.eval()
    return Emulator(emu, tokenizer, slots, method, dict(params), base_info(model, name, adapter_layers),
                    base_config=model.config.to_dict())


def keep_blocks(model: nn.Module, tokenizer, name: str, adapter_layers: tuple[int, int],
                keep: list[int], method: str, params: dict) -> Emulator:
    """An emulator whose middle is copies of the original blocks ``keep`` (absolute indices)."""
    blocks = get_blocks(model)
    middle = [(Slot(ORIGINAL, i), copy.deepcopy(blocks[i])) for i in keep]
    return assemble(model, tokenizer, name, adapter_layers, middle, method, params)
