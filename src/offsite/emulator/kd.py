"""Offsite-Tuning with distillation: uniform layer drop, then train the kept blocks (docs/offsite-tuning.md).

Only the emulator's middle blocks train; the adapter blocks, embeddings and head stay frozen at
the original weights (the reference's ``--train_module student``). The loss on public English
text is ``lm_weight * LM + kd_weight * NMSE`` where LM is next-token cross-entropy through the
emulated model and NMSE compares the middle's output with the original middle's output on the
same input (the output of the bottom adapter):

    nmse = mean(((h_teacher - h_student) / rms(h_teacher)) ** 2)

with ``rms`` the scalar root-mean-square of the teacher's output, as in the reference. Padding
positions are left out of both means (our text blocks have none; the reference has none either).

Defaults follow the reference where it is known (lr 1e-4, cosine, kd_weight 30, lm_weight 1,
block size 512) but the budget is small by default (``--kd-steps 100`` of 8 x 256 tokens) so it
runs on a CPU; the reference trains one epoch over a shard of the Pile on 8 GPUs. Our corpus is
the training part of the offline public text (:func:`offsite.data.text.public_text`), and the
reference's model selection by WikiText-2 perplexity becomes validation on the held-out part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..models.families import get_blocks, num_blocks
from .registry import Method, register
from .core import ADAPTER, Emulator
from .uniform import UniformOptions, chosen_blocks


@dataclass
class KDOptions(UniformOptions):
    kd_steps: int = field(default=100, metadata={"help": "distillation optimizer steps (default 100)"})
    kd_lr: float = field(default=1e-4, metadata={"help": "distillation learning rate (reference: 1e-4)"})
    kd_weight: float = field(default=30.0, metadata={"help": "weight of the normalised MSE (reference: 30)"})
    lm_weight: float = field(default=1.0, metadata={"help": "weight of the LM loss (reference: 1)"})
    kd_batch_size: int = field(default=8, metadata={"help": "sequences per distillation step"})
    kd_block_size: int = field(default=256, metadata={"help": "tokens per distillation sequence (reference: 512)"})
    kd_val_docs: int = field(default=4, metadata={"help": "held-out text documents for validation"})
    kd_seed: int = field(default=42, metadata={"help": "seed of the distillation run"})


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class MiddleTap:
    """Forward hooks capturing the input of the emulator's first middle block (with its call
    arguments) and the output of its last one, so the teacher can run on the same input."""

    def __init__(self, blocks: nn.ModuleList, first: int, last: int):
        self.inputs = None
        self.output = None
        self.handles = [
            blocks[first].register_forward_pre_hook(self._pre, with_kwargs=True),
            blocks[last].register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        self.inputs = (args, kwargs)

    def _post(self, module, args, output):
        self.output = _first(output)

    def remove(self):
        for h in self.handles:
            h.remove()


def run_blocks(blocks, args, kwargs):
    """Run ``blocks`` in sequence on captured call arguments; returns the last hidden state."""
    hidden, rest = args[0] if args else kwargs["hidden_states"], args[1:]
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    for block in blocks:
        hidden = _first(block(hidden, *rest, **kwargs))
    return hidden


def middle_nmse(teacher: nn.ModuleList, tap: MiddleTap, attention_mask: torch.Tensor) -> torch.Tensor:
    """NMSE between the emulator middle's output (captured by ``tap``) and the original middle
    ``teacher`` run on the same captured input, over the non-padding positions."""
    args, kwargs = tap.inputs
    with torch.no_grad():
        h_t = run_blocks(teacher, args, kwargs).float()
    h_s = tap.output.float()
    mask = attention_mask.unsqueeze(-1).to(h_t.dtype)
    denom = mask.sum() * h_t.shape[-1]
    rms = ((h_t.pow(2) * mask).sum() / denom).sqrt()
    return ((((h_t - h_s) / rms).pow(2)) * mask).sum() / denom


def make_kd_loss(teacher: nn.ModuleList, tap: MiddleTap, kd_weight: float, lm_weight: float):
    from ..train import causal_lm_loss

    def loss_fn(model, batch):
        lm_sum, n_tokens = causal_lm_loss(model, batch)
        nmse = middle_nmse(teacher, tap, batch["attention_mask"])
        # the engine divides by the global token count: weight the per-sequence NMSE by tokens
        return lm_weight * lm_sum + kd_weight * nmse * n_tokens, n_tokens

    return loss_fn


def build(model, tokenizer, name: str, adapter_layers, opts: KDOptions) -> Emulator:
    from ..data.text import public_text
    from .core import keep_blocks

    keep = chosen_blocks(num_blocks(model.config), adapter_layers, opts.keep)
    emu = keep_blocks(model, tokenizer, name, adapter_layers, keep, "kd", {"keep": len(keep)})
    return distill(emu, model, public_text("train"), public_text("heldout")[: opts.kd_val_docs], opts)


def distill(emu: Emulator, model, train_docs: list[str], val_docs: list[str], opts: KDOptions) -> Emulator:
    """Train the middle blocks of ``emu`` to match the middle of the full ``model`` (in place)."""
    from ..data.tokenize import tokenize_text
    from ..train import TrainConfig, causal_lm_loss, train

    tokenizer = emu.tokenizer
    middle_pos = [i for i, s in enumerate(emu.slots) if s.kind != ADAPTER]
    bottom, top = emu.adapter_layers
    n = num_blocks(model.config)
    teacher = nn.ModuleList(get_blocks(model)[bottom:n - top])
    for p in emu.model.parameters():
        p.requires_grad_(False)
    for pos in middle_pos:
        for p in get_blocks(emu.model)[pos].parameters():
            p.requires_grad_(True)
    need = opts.kd_steps * opts.kd_batch_size
    train_ex = tokenize_text(tokenizer, train_docs, opts.kd_block_size)[:need]
    val_ex = tokenize_text(tokenizer, val_docs, opts.kd_block_size) if val_docs else None
    cfg = TrainConfig(lr=opts.kd_lr, max_steps=opts.kd_steps, batch_size=opts.kd_batch_size,
                      micro_batch_size=min(opts.kd_batch_size, 4), schedule="cosine",
                      warmup_ratio=0.05, seed=opts.kd_seed, eval_every=max(1, opts.kd_steps // 4),
                      checkpoint_every=None, max_length=opts.kd_block_size)
    tap = MiddleTap(get_blocks(emu.model), middle_pos[0], middle_pos[-1])
    teacher_was = [block.training for block in teacher]  # the owner's blocks (a new ModuleList says "training")
    teacher.eval()
    try:
        emu.model.train()
        result = train(emu.model, None, train_ex, val_ex, cfg, out_dir=None,
                       loss_fn=make_kd_loss(teacher, tap, opts.kd_weight, opts.lm_weight),
                       val_loss_fn=causal_lm_loss,  # select by held-out perplexity, as the reference
                       pad_id=tokenizer.pad_token_id)
    finally:
        tap.remove()
        for block, was in zip(teacher, teacher_was):
            block.train(was)
    for p in emu.model.parameters():
        p.requires_grad_(False)
    emu.model.eval()
    emu.params.update({"kd_steps": opts.kd_steps, "kd_lr": opts.kd_lr, "kd_weight": opts.kd_weight,
                       "lm_weight": opts.lm_weight, "kd_batch_size": opts.kd_batch_size,
                       "kd_block_size": opts.kd_block_size, "kd_seed": opts.kd_seed})
    emu.report["kd"] = {"seconds": round(result.seconds, 2), "tokens_seen": result.tokens_seen,
                        "best_val_loss": result.best_val_loss, "history": result.history}
    return emu


register(Method("kd", "Offsite-Tuning + distillation: uniform drop, then train the kept blocks "
                "(LM + 30 x NMSE) on public text", KDOptions, build,
                bench_settings=[{"adapter_layers": [2, 2], "keep": 8}]))
