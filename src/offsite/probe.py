"""The transfer probe: does tuning the adapter on this emulator move it the way the full model would?

The data owner follows the adapter's gradient on the emulator; the model owner wants the step that
the full model's gradient would take. Before shipping, the owner can compare the two on public text
it already has, with the adapter as shipped (the original blocks) and no task data:

* ``grad_cos``: the cosine between the adapter's gradient on the emulator and on the full model,
  per adapter block (keyed by the original block index), per side (``bottom``, ``top``) and over
  the whole adapter (``all``). 1 for an emulator that is the full middle; ~0 for one whose
  gradient is unrelated to the model's.
* ``grad_norm_ratio``: ``|g_emulator| / |g_full|`` over the same groups. A ratio far above 1 means
  the emulator's loss is dominated by repairing the emulator itself.

The loss is the next-token cross-entropy, averaged over the tokens of ``sequences`` blocks of
``block_size`` tokens of the held-out part of the public text (books the distillation methods never
train on). The same probe runs on task examples (``examples=``) for the benchmark, where the task's
training data stands in for the data owner's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .emulator.core import Emulator
from .errors import OffsiteError
from .gradients import adapter_gradients
from .models.families import num_blocks

__all__ = ["ProbeOptions", "attach_probe", "probe", "probe_examples", "probe_records", "probe_summary",
           "task_probe_examples"]


@dataclass
class ProbeOptions:
    sequences: int = field(default=16, metadata={"help": "public-text sequences the gradients are taken on (default 16)"})
    block_size: int = field(default=256, metadata={"help": "tokens per sequence (default 256)"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per forward pass (default 4)"})
    task_examples: int = field(default=48, metadata={"help": "with --task: its first N training examples (default 48)"})

    def check(self) -> None:
        for name in ("sequences", "block_size", "micro_batch_size", "task_examples"):
            if getattr(self, name) < (2 if name == "block_size" else 1):
                raise OffsiteError(f"probe {name} must be >= {2 if name == 'block_size' else 1} "
                                   f"(got {getattr(self, name)})")


def probe_examples(tokenizer, opts: ProbeOptions) -> list[dict]:
    """The probe's default examples: the first ``sequences`` blocks of the held-out public text."""
    from .data.text import public_text
    from .data.tokenize import tokenize_text

    opts.check()
    examples = tokenize_text(tokenizer, public_text("heldout"), opts.block_size)[: opts.sequences]
    if len(examples) < opts.sequences:
        raise OffsiteError(f"the held-out public text has only {len(examples)} blocks of {opts.block_size} "
                           f"tokens; ask for fewer --sequences")
    return examples


def task_probe_examples(tokenizer, task: str, opts: ProbeOptions, max_length: int = 1024) -> list[dict]:
    """The first ``task_examples`` training examples of ``task`` as the data owner would train on them
    (prompt and answer, the loss on the answer tokens). Only the benchmark, which holds both assets,
    can probe on task data; the model owner probes on public text."""
    from .tune import task_data, tokenize

    opts.check()
    data = task_data(task)
    return tokenize(tokenizer, type(data)(data.kind, data.items[: opts.task_examples], task), max_length)


def _per_block(grads: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per-tensor gradients (:func:`adapter_gradients`) flattened per original block, in float64."""
    out: dict[int, list[torch.Tensor]] = {}
    for key, g in grads.items():
        out.setdefault(int(key.split(".")[1]), []).append(g.flatten().double())
    return {src: torch.cat(gs) for src, gs in out.items()}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return float("nan")
    return float(a @ b / (na * nb))


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    nb = b.norm()
    return float(a.norm() / nb) if nb > 0 else float("nan")


def probe(model, emu: Emulator, examples: list[dict] | None = None, opts: ProbeOptions | None = None) -> dict:
    """Compare the adapter's gradient on ``emu`` with its gradient on the full ``model``.

    ``examples`` are tokenized examples (``input_ids``/``labels``); by default the held-out public
    text (:func:`probe_examples`). Returns ``{"grad_cos": {group: value}, "grad_norm_ratio": {...},
    "sequences", "tokens"}`` with groups ``"all"``, ``"bottom"``, ``"top"`` and ``"block<i>"`` for
    each adapter block's original index ``i``.
    """
    opts = opts or ProbeOptions()
    opts.check()
    n = num_blocks(model.config)
    if n != emu.base.get("num_layers"):
        raise OffsiteError(f"the emulator was built from a model of {emu.base.get('num_layers')} blocks, "
                           f"this model has {n}; probe it against the model it was built from")
    if examples is None:
        examples = probe_examples(emu.tokenizer, opts)
    pad_id = emu.tokenizer.pad_token_id if emu.tokenizer.pad_token_id is not None else 0
    positions = emu.adapter_positions
    g_emu = _per_block(adapter_gradients(emu.model, positions, examples, opts.micro_batch_size, pad_id))
    g_full = _per_block(adapter_gradients(model, {src: src for src in positions.values()}, examples,
                                          opts.micro_batch_size, pad_id))
    bottom, _ = emu.adapter_layers
    groups = {"all": sorted(g_emu), "bottom": [s for s in sorted(g_emu) if s < bottom],
              "top": [s for s in sorted(g_emu) if s >= bottom]}
    groups.update({f"block{s}": [s] for s in sorted(g_emu)})
    out = {"grad_cos": {}, "grad_norm_ratio": {}}
    for name, srcs in groups.items():
        if not srcs:
            continue
        a = torch.cat([g_emu[s] for s in srcs])
        b = torch.cat([g_full[s] for s in srcs])
        out["grad_cos"][name] = _cos(a, b)
        out["grad_norm_ratio"][name] = _ratio(a, b)
    out["sequences"] = len(examples)
    out["tokens"] = sum(len(e["input_ids"]) for e in examples)
    return out


def probe_records(figures: dict, base: dict) -> list[dict]:
    """Results-file records of a probe: ``row: "probe"``, metrics ``grad_cos`` and
    ``grad_norm_ratio`` over the whole adapter, and ``grad_cos.<group>`` / ``grad_norm_ratio.<group>``
    per side and per block."""
    recs = []
    for metric in ("grad_cos", "grad_norm_ratio"):
        for group, value in figures[metric].items():
            name = metric if group == "all" else f"{metric}.{group}"
            recs.append({**base, "row": "probe", "metric": name,
                         "value": None if math.isnan(value) else value, "stderr": None,
                         "n": figures.get("sequences")})
    return recs


def probe_summary(figures: dict) -> str:
    """One line for people: the whole-adapter and per-side cosines, the norm ratio, the data size."""
    cos, ratio = figures["grad_cos"], figures["grad_norm_ratio"]
    return (f"probe: adapter gradient cosine {cos['all']:.3f} (bottom {cos.get('bottom', float('nan')):.3f}, "
            f"top {cos.get('top', float('nan')):.3f}), norm ratio {ratio['all']:.2f}, "
            f"over {figures['sequences']} sequences / {figures['tokens']:,} tokens "
            "(1 = tuning on the emulator moves the adapter as on the full model; near 0 = it will not transfer)")


def attach_probe(model, emu: Emulator, opts: ProbeOptions | None = None, log=None) -> dict:
    """Probe ``emu`` against the ``model`` it was just built from on the held-out public text and
    record the figures in ``emu.report["probe"]`` (so they travel in the bundle's manifest)."""
    import time

    opts = opts or ProbeOptions()
    t0 = time.perf_counter()
    figures = probe(model, emu, opts=opts)
    figures["seconds"] = round(time.perf_counter() - t0, 2)
    figures["options"] = {"sequences": opts.sequences, "block_size": opts.block_size, "data": "public text (held-out)"}
    emu.report["probe"] = figures
    if log:
        log(f"[offsite] {probe_summary(figures)}")
    return figures
