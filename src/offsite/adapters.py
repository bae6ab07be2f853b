"""What the data owner trains inside the adapter blocks, and how it is carried back.

Three kinds, as in Offsite-Tuning's code and its Table 5 (docs/offsite-tuning.md, "Tuning"):

* ``full``: every parameter of the adapter blocks (the paper's default);
* ``lora``: LoRA matrices on the linear maps of the adapter blocks, through ``peft``;
* ``bitfit``: the 1-D parameters of the adapter blocks (biases and norm gains, as the reference
  code's ``--use_bitfit`` does).

Whatever the kind, the adapter bundle names tensors ``blocks.{original block index}.{name}``,
so the owner can apply it to the full model without knowing the emulator's stack positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import OffsiteError
from .models.families import get_blocks, stack_prefix

KINDS = ("full", "lora", "bitfit")


@dataclass
class LoraOptions:
    # the flags of `--adapter lora` (offsite.cli_args.add_train_args)
    r: int = field(default=8, metadata={"help": "LoRA rank (default 8)", "min": 1})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha: the update is scaled by alpha / r (default 16)",
                                             "min": 1})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path (default 0)"})

    def check(self) -> None:
        """Raise OffsiteError for options peft would refuse (or take silently) later."""
        for name in ("r", "alpha"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise OffsiteError(f"LoRA {name} must be an integer >= 1 (got {v!r})")
        if not 0.0 <= self.dropout < 1.0:
            raise OffsiteError(f"LoRA dropout must be in [0, 1) (got {self.dropout!r})")


def param_names(model: nn.Module, positions: dict[int, int]) -> dict[str, str]:
    """Every parameter of the adapter blocks at ``positions`` (stack position -> original index):
    its bundle key ``blocks.{original index}.{name}`` -> its name in ``model``, the blocks in
    original order. The same key names a tensor in the emulator and in the full model (whose
    positions are the identity), which is how gradients and weights of the two line up."""
    prefix, blocks = stack_prefix(model), get_blocks(model)
    return {f"blocks.{src}.{name}": f"{prefix}.{pos}.{name}"
            for pos, src in sorted(positions.items(), key=lambda x: x[1]) for name, _ in blocks[pos].named_parameters()}


def trained_params(model: nn.Module, positions: dict[int, int]) -> dict[str, nn.Parameter]:
    """The adapter tensors of ``model`` that train (``requires_grad``), by bundle key (:func:`param_names`)."""
    named = dict(model.named_parameters())
    return {k: named[n] for k, n in param_names(model, positions).items() if named[n].requires_grad}


def linear_names(block: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def lora_config(model: nn.Module, positions: list[int], opts: LoraOptions):
    """A peft LoraConfig targeting every linear map of the blocks at ``positions``."""
    from peft import LoraConfig

    prefix = stack_prefix(model)
    blocks = get_blocks(model)
    targets = [f"{prefix}.{p}.{name}" for p in positions for name in linear_names(blocks[p])]
    fan_in_fan_out = model.config.model_type == "gpt2"  # GPT-2 stores Conv1D weights transposed
    return LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                      fan_in_fan_out=fan_in_fan_out, bias="none")


def prepare(model: nn.Module, positions: dict[int, int], kind: str, lora: LoraOptions | None = None):
    """Freeze ``model`` except the adapter's trainable part; returns the model to train.

    ``positions`` maps stack positions of the adapter blocks to their original indices. For LoRA
    the returned model is a peft model wrapping ``model`` (whose weights stay untouched).
    """
    if kind not in KINDS:
        raise OffsiteError(f"unknown adapter kind {kind!r}; choose one of {', '.join(KINDS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = get_blocks(model)
    if kind == "lora":
        from peft import get_peft_model

        return get_peft_model(model, lora_config(model, sorted(positions), lora or LoraOptions()))
    for pos in positions:
        for p in blocks[pos].parameters():
            if kind == "full" or p.dim() == 1:
                p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise OffsiteError(f"adapter kind {kind!r} has nothing to train in this model's adapter blocks")
    return model


def extract(trained: nn.Module, positions: dict[int, int], kind: str) -> dict[str, torch.Tensor]:
    """The adapter's trained tensors, keyed ``blocks.{source}.{name}``."""
    if kind == "lora":
        from peft import get_peft_model_state_dict

        base = trained.get_base_model()
        prefix = stack_prefix(base) + "."
        out = {}
        for key, t in get_peft_model_state_dict(trained).items():
            key = key.removeprefix("base_model.model.")
            if not key.startswith(prefix):
                raise OffsiteError(f"unexpected LoRA tensor {key}")
            pos, rest = key[len(prefix):].split(".", 1)
            out[f"blocks.{positions[int(pos)]}.{rest}"] = t.detach().cpu().clone()
        return out
    blocks = get_blocks(trained)
    out = {}
    for pos, source in positions.items():
        for name, p in blocks[pos].named_parameters():
            if kind == "full" or p.dim() == 1:
                out[f"blocks.{source}.{name}"] = p.detach().cpu().clone()
    return out


def apply(model: nn.Module, state: dict[str, torch.Tensor], kind: str, lora: dict | None = None) -> nn.Module:
    """Write an adapter into a model whose stack holds the original block ``i`` at position ``i``
    (the full model). LoRA is merged into the weights. Returns the model (a new object for LoRA)."""
    if kind == "lora":
        return lora_peft_model(model, state, lora).merge_and_unload()
    blocks = get_blocks(model)
    with torch.no_grad():
        for key, t in state.items():
            _, source, name = key.split(".", 2)
            param = blocks[int(source)].get_parameter(name)
            param.copy_(t.to(param.dtype))
    return model


def lora_peft_model(model: nn.Module, state: dict[str, torch.Tensor], lora: dict | None):
    """A peft model over the full ``model`` holding the adapter's LoRA weights at their sources."""
    from peft import get_peft_model, set_peft_model_state_dict

    if not lora:
        raise OffsiteError("LoRA adapter bundle lacks its LoRA settings (r, alpha)")
    sources = sorted({int(k.split(".")[1]) for k in state})
    cfg = lora_config(model, sources, LoraOptions(r=int(lora["r"]), alpha=int(lora["alpha"])))
    peft_model = get_peft_model(model, cfg)
    prefix = stack_prefix(model)
    peft_state = {}
    for key, t in state.items():
        _, source, rest = key.split(".", 2)
        peft_state[f"base_model.model.{prefix}.{source}.{rest}"] = t
    result = set_peft_model_state_dict(peft_model, peft_state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise OffsiteError(f"LoRA tensors do not fit the model: {unexpected[:3]}")
    return peft_model
