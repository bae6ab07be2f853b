"""Gradient-matched distillation (ours, not from a paper): layer drop, then train the kept middle
blocks so that the adapter's gradient through the emulator points where it points through the full
model. See docs/gradmatch.md.

Why: the data owner follows the adapter's gradient on the emulator, and on our models nearly all of
the adaptation that transfers is learnt by the *bottom* adapter blocks, whose gradient is the full
middle's Jacobian applied to what the top asks for. A layer-drop emulator at half the middle gets
the middle's output wrong and its Jacobian even more so: the adapter's gradient on it is nearly
orthogonal to the full model's (cosine 0.07 on ARC-Easy), and an adapter tuned on it gains almost
nothing once plugged in. Distilling the output alone (``kd``) or refitting it by least squares
fixes the output far more than the gradient. So this method trains for the gradient itself.

The loss, on a batch of public question/answer pairs (the LM loss on the answer tokens, as the
data owner's tuning computes it), with ``θ_b`` the bottom adapter blocks at their shipped weights:

    g_full = ∂ LM_full / ∂θ_b               (the full model, no graph)
    g_emu  = ∂ LM_emu  / ∂θ_b               (the emulator, with its graph: a second-order term)
    loss   = (1 − cos(g_emu, g_full)) + output_weight · mean_t |y_emu,t − y_full,t|² / |y_full,t|²

where ``y`` is the middle's output (the input of the first top adapter block) and ``t`` runs over
the non-padding positions after the first (whose activation is orders of magnitude larger than the
rest). Only the middle's blocks train; the adapter blocks, embeddings and head stay at the
original weights. Attention runs in its eager form while building, since PyTorch's fused CPU
attention has no second derivative. Validation is the same loss on held-out pairs of the same
sources, and the best state is kept.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..errors import OffsiteError
from ..adapters import param_names
from ..models.families import get_blocks, num_blocks, stack_prefix
from .registry import Method, register
from .core import ADAPTER, Emulator, keep_blocks
from .uniform import UniformOptions, chosen_blocks


@dataclass
class GradMatchOptions(UniformOptions):
    gm_steps: int = field(default=300, metadata={"help": "distillation optimizer steps (default 300)"})
    gm_lr: float = field(default=1e-4, metadata={"help": "distillation learning rate (default 1e-4)"})
    gm_batch_size: int = field(default=8, metadata={"help": "question/answer pairs per step (default 8)"})
    gm_output_weight: float = field(default=1.0, metadata={
        "help": "weight of the middle's relative output error beside the gradient term (default 1)"})
    gm_sources: str = field(default="webqs", metadata={
        "help": "public question/answer tasks the owner distils on, comma-separated: webqs, nq_open "
                "(default webqs)"})
    gm_examples: int = field(default=1400, metadata={"help": "training pairs taken from each source (its first N)"})
    gm_val_examples: int = field(default=48, metadata={
        "help": "held-out pairs from each source (its last N) for validation (default 48)"})
    gm_rollout: int = field(default=0, metadata={
        "help": "simulate a data owner tuning the adapter on the emulator, restarting every N steps, and "
                "match the gradients along its path (0: at the shipped adapter only)"})
    gm_rollout_lr: float = field(default=1e-4, metadata={"help": "the simulated data owner's Adam learning rate"})
    gm_seed: int = field(default=42, metadata={"help": "seed of the distillation run"})


@contextmanager
def eager_attention(model):
    """Run ``model``'s attention in its eager form (every module's config, restored afterwards)."""
    configs = {id(m.config): m.config for m in model.modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = "eager"
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


class GradientMatch:
    """The loss of the module docstring as a training-engine ``loss_fn``: ``(loss · n, n)`` with
    ``n`` the batch's target tokens, so the engine's token weighting leaves it a per-batch mean.

    With ``rollout`` > 0 the adapter is not held at its shipped weights: a simulated data owner
    tunes it on the emulator (Adam at ``rollout_lr`` on the emulator's own adapter gradient of each
    training batch) and starts again from the shipped weights every ``rollout`` steps, so the
    gradients are matched where tuning on the emulator takes the adapter. Both models always see
    the same adapter weights. Validation holds the adapter at its shipped weights."""

    def __init__(self, emu: Emulator, model, output_weight: float, rollout: int = 0, rollout_lr: float = 1e-4):
        bottom, top = emu.adapter_layers
        n_blocks = num_blocks(model.config)
        if top < 1 or bottom < 1:
            raise OffsiteError("gradmatch needs at least one bottom and one top adapter block "
                               f"(got {bottom},{top}; e.g. --adapter-layers 2,2)")
        self.output_weight, self.rollout, self.full = output_weight, rollout, model
        e_blocks, f_blocks = get_blocks(emu.model), get_blocks(model)
        pos = emu.adapter_positions
        # every adapter parameter: (emulator name, full-model name), the bottom blocks first
        e_names, f_names = param_names(emu.model, pos), param_names(model, {s: s for s in pos.values()})
        self.names = [(e, f_names[k]) for k, e in e_names.items()]
        self.n_bottom = sum(1 for k in e_names if int(k.split(".")[1]) < bottom)
        e_params = dict(emu.model.named_parameters())
        self.theta0 = [e_params[e].detach().clone() for e, _ in self.names]
        self.theta = [t.clone() for t in self.theta0]
        self.opt_state = None
        self.rollout_lr, self.steps = rollout_lr, 0
        self.e_top = e_blocks[min(p for p, s in pos.items() if s >= n_blocks - top)]
        self.f_top = f_blocks[n_blocks - top]

    def _run(self, model, which: int, theta, top_block, batch, create_graph: bool):
        """(adapter gradient per parameter, middle output, target tokens); the adapter's weights
        ``theta`` enter as fresh leaves, so no gradient lands on the model's own parameters."""
        from ..train import causal_lm_loss

        got = {}
        handle = top_block.register_forward_pre_hook(
            lambda m, a, k: got.__setitem__("y", a[0] if a else k["hidden_states"]), with_kwargs=True)
        leaves = {names[which]: t.detach().requires_grad_(True) for names, t in zip(self.names, theta)}
        try:
            loss_sum, n = causal_lm_loss(_Swapped(model, leaves), batch)
            grads = torch.autograd.grad(loss_sum / max(n, 1), list(leaves.values()), create_graph=create_graph)
        finally:
            handle.remove()
        return grads, got["y"], n

    def __call__(self, emu_model, batch):
        training = emu_model.training
        theta = self.theta if training and self.rollout else self.theta0
        with torch.enable_grad():
            g_full, y_full, n = self._run(self.full, 1, theta, self.f_top, batch, create_graph=False)
            with eager_attention(emu_model):
                g_emu, y_emu, _ = self._run(emu_model, 0, theta, self.e_top, batch, create_graph=True)
            flat = lambda gs: torch.cat([g.flatten() for g in gs[:self.n_bottom]])  # noqa: E731
            loss = 1 - F.cosine_similarity(flat(g_emu), flat(g_full).detach(), dim=0)
            if self.output_weight:
                mask = batch["attention_mask"].bool().clone()
                mask[:, 0] = False
                y_full = y_full.detach().float()
                rel = (y_emu.float() - y_full) / y_full.norm(dim=-1, keepdim=True).clamp_min(1e-6)
                loss = loss + self.output_weight * rel[mask].pow(2).sum(-1).mean()
        if training and self.rollout:
            self._simulate_step([g.detach() for g in g_emu])
        return loss * n, n

    def _simulate_step(self, grads) -> None:
        """One Adam step of the simulated data owner; back to the shipped adapter every ``rollout``."""
        self.steps += 1
        if self.steps % self.rollout == 0:
            self.theta, self.opt_state = [t.clone() for t in self.theta0], None
            return
        if self.opt_state is None:
            self.opt_state = [(torch.zeros_like(t), torch.zeros_like(t)) for t in self.theta]
            self.opt_t = 0
        self.opt_t += 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        new = []  # new tensors: this step's graph still holds the old ones
        for t, g, (m, v) in zip(self.theta, grads, self.opt_state):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            new.append(t - self.rollout_lr * (m / (1 - b1 ** self.opt_t)) / ((v / (1 - b2 ** self.opt_t)).sqrt() + eps))
        self.theta = new


class _Swapped(torch.nn.Module):
    """``model`` called with some parameters replaced (``torch.func.functional_call``)."""

    def __init__(self, model, replace: dict):
        super().__init__()
        self.inner, self.replace = model, replace

    def forward(self, **kwargs):
        return functional_call(self.inner, self.replace, args=(), kwargs=kwargs, strict=False)


def source_pairs(src: str) -> list[tuple[str, str]]:
    """The training pairs of a public question/answer source (``webqs``, ``nq_open``). The
    multiple-choice tasks are left out on purpose: they are the data owners' tasks."""
    from ..data.generation import GENERATION_TASKS, task_pairs

    if src not in GENERATION_TASKS:
        raise OffsiteError(f"gradmatch distils on public question/answer pairs: gm_sources takes "
                           f"{', '.join(GENERATION_TASKS)} (got {src!r})")
    return task_pairs(src)


def public_pairs(tokenizer, sources: str, first: int, last: int) -> tuple[list[dict], list[dict]]:
    """(training, validation) examples: the first ``first`` and the last ``last`` pairs of each
    source's training split, tokenized as the data owner's tuning tokenizes its pairs (the loss on
    the answer)."""
    from ..data.tokenize import tokenize_qa

    train, val = [], []
    for src in filter(None, (s.strip() for s in sources.split(","))):
        items = source_pairs(src)
        if len(items) < first + last:
            raise OffsiteError(f"gradmatch: {src} has {len(items)} training pairs, fewer than "
                               f"gm_examples + gm_val_examples = {first + last}")
        train += tokenize_qa(tokenizer, items[:first], 256)
        val += tokenize_qa(tokenizer, items[len(items) - last:], 256)
    if not train:
        raise OffsiteError("gradmatch: no public sources given (gm_sources)")
    return train, val


def build(model, tokenizer, name: str, adapter_layers, opts: GradMatchOptions) -> Emulator:
    keep = chosen_blocks(num_blocks(model.config), adapter_layers, opts.keep)
    emu = keep_blocks(model, tokenizer, name, adapter_layers, keep, "gradmatch", {"keep": len(keep)})
    train_ex, val_ex = public_pairs(tokenizer, opts.gm_sources, opts.gm_examples, opts.gm_val_examples)
    return match_gradients(emu, model, train_ex, val_ex, opts)


def match_gradients(emu: Emulator, model, train_ex: list[dict], val_ex: list[dict] | None,
                    opts: GradMatchOptions, out_dir=None) -> Emulator:
    """Train the middle blocks of ``emu`` (in place) by the loss of the module docstring on
    tokenized pairs (``labels`` on the answer); ``out_dir``: where the training engine keeps a
    resumable checkpoint."""
    from ..train import TrainConfig, train

    middle = [(n, p) for i, s in enumerate(emu.slots) if s.kind != ADAPTER
              for n, p in get_blocks(emu.model)[i].named_parameters(prefix=f"{stack_prefix(emu.model)}.{i}")]
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = TrainConfig(lr=opts.gm_lr, max_steps=opts.gm_steps, batch_size=opts.gm_batch_size,
                      micro_batch_size=opts.gm_batch_size, schedule="cosine", warmup_ratio=0.05,
                      seed=opts.gm_seed, eval_every=max(1, opts.gm_steps // 4), weight_decay=0.0,
                      checkpoint_every=max(1, opts.gm_steps // 10) if out_dir is not None else None,
                      max_length=256, restore_best=not opts.gm_rollout)  # (validation holds the shipped adapter)
    loss_fn = GradientMatch(emu, model, opts.gm_output_weight, opts.gm_rollout, opts.gm_rollout_lr)
    model.eval()
    t0 = time.time()
    result = train(emu.model, middle, train_ex, val_ex, cfg, out_dir=out_dir, loss_fn=loss_fn,
                   pad_id=emu.tokenizer.pad_token_id)
    for p in emu.model.parameters():
        p.requires_grad_(False)
    emu.model.eval()
    emu.params.update({f.name: getattr(opts, f.name) for f in fields(GradMatchOptions) if f.name.startswith("gm_")})
    emu.report["gradmatch"] = {"seconds": round(time.time() - t0, 2), "tokens_seen": result.tokens_seen,
                               "best_val_loss": result.best_val_loss, "best_step": result.best_step,
                               "history": result.history}
    return emu


register(Method("gradmatch", "layer drop, then distil the kept blocks so the adapter's gradient on public "
                "QA matches the full model's (ours; docs/gradmatch.md)", GradMatchOptions, build,
                bench_settings=[{"adapter_layers": [2, 2], "keep": 13}]))
