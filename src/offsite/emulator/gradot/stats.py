"""GradOT's statistics: per linear map, the loss gradient ``g`` and the KFAC factors ``A``, ``G``.

One forward/backward pass of the full model over the support set. For each watched linear map
``y = W x (+ b)`` (``W``: out x in; an ``nn.Linear`` or a GPT-2 ``Conv1D``):

* ``A = (1/T) sum_t x_t x_tᵀ`` over the ``T`` token positions seen (in x in), from a forward hook;
* ``G = (1/N) sum_t δ_t δ_tᵀ`` (out x out), with ``δ_t = ∂(sum of token losses of its sequence)/∂y_t``
  captured by a gradient hook on the module's output, and ``N`` the number of target tokens;
* ``g = ∂L/∂W`` of the mean token loss ``L`` (out x in, also for ``Conv1D``).

With this scaling ``A ⊗ G ≈ (1/N) sum_t (x_t x_tᵀ) ⊗ (δ_t δ_tᵀ)``, the empirical Fisher (the
Gauss-Newton/Hessian stand-in) of ``L`` with token positions as samples, so ``H·vec(Δ) ≈
vec(G Δ A)`` is on the same scale as ``g`` and the full P x P matrix is never formed. The identity
is exact when the KFAC assumption holds exactly (one sample, or the same input ``x`` for every
sample); ``tests/test_gradot.py`` checks it against ``torch.autograd.functional.hvp``.

Memory: the factors of every watched map (``in² + out²`` floats each, float32) plus the gradients
of the watched weights; ``blocks_per_pass`` trades extra passes for less memory on big models.
Choices not fixed by the paper (docs/gradot.md §1): token positions as KFAC samples, the empirical
Fisher (data labels, not labels sampled from the model), float32 accumulation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from ...errors import OffsiteError
from ..lowrank import dense_weight


@dataclass
class LayerStats:
    """Statistics of one linear map (all float32, on the model's device)."""

    g: torch.Tensor  # out x in, gradient of the mean loss
    A: torch.Tensor  # in x in, E[x xᵀ]
    G: torch.Tensor  # out x out, E[δ δᵀ]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.g, self.A, self.G))


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


class KFACCollector:
    """Hooks on ``modules`` accumulating ``x xᵀ`` (forward) and ``δ δᵀ`` (output gradient)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.A_sum: dict[str, torch.Tensor] = {}
        self.G_sum: dict[str, torch.Tensor] = {}
        self.rows = 0  # token positions seen (T), counted once per forward via the first module
        self._first = next(iter(modules)) if modules else None
        self.handles = [m.register_forward_hook(self._forward_hook(name)) for name, m in modules.items()]

    def _forward_hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            if name == self._first:
                self.rows += x.shape[0]
            acc = self.A_sum.get(name)
            self.A_sum[name] = x.T @ x if acc is None else acc.addmm_(x.T, x)
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.register_hook(self._grad_hook(name))

        return hook

    def _grad_hook(self, name: str):
        def hook(grad):
            d = grad.detach().reshape(-1, grad.shape[-1]).float()
            acc = self.G_sum.get(name)
            self.G_sum[name] = d.T @ d if acc is None else acc.addmm_(d.T, d)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def collect_stats(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable,
                  loss_fn: Callable, blocks_per_pass: list[list[str]] | None = None) -> tuple[dict[str, LayerStats], dict]:
    """Gradients and KFAC factors of ``modules`` (name -> linear module inside ``model``).

    ``loss_fn(model, batch) -> (loss_sum, n_targets)`` returns the *sum* of the per-target losses
    of a batch; the mean loss is their total over the total count. ``batches`` must be
    re-iterable when ``blocks_per_pass`` splits the modules into several groups (one pass each).
    Returns the statistics and facts about the cost (seconds, tokens, passes).
    """
    groups = blocks_per_pass or [list(modules)]
    params = list(model.parameters())
    was_grad = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()  # no dropout: the statistics of the deterministic model
    out: dict[str, LayerStats] = {}
    t0 = time.perf_counter()
    n_targets = rows = 0
    try:
        for group in groups:
            watched = {name: modules[name] for name in group}
            for p in params:
                p.requires_grad_(False)
            weights = {}
            for name, m in watched.items():
                w = m.weight
                w.grad = None
                w.requires_grad_(True)
                weights[name] = w
            collector = KFACCollector(watched)
            n_targets = 0
            try:
                for batch in batches:
                    loss_sum, n = loss_fn(model, batch)
                    loss_sum.backward()
                    n_targets += int(n)
            finally:
                collector.remove()
            if n_targets == 0 or collector.rows == 0:
                raise OffsiteError("the support set gave no target tokens to compute GradOT's statistics")
            rows = collector.rows
            for name, m in watched.items():
                if name not in collector.G_sum:
                    raise OffsiteError(f"no gradient reached {name}: it does not influence the loss")
                grad = weights[name].grad
                g = (grad.t() if _is_conv1d(m) else grad).float() / n_targets
                out[name] = LayerStats(g=g.contiguous(), A=collector.A_sum[name] / rows,
                                       G=collector.G_sum[name] / n_targets)
                weights[name].grad = None
    finally:
        for p, flag in zip(params, was_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    info = {"seconds": round(time.perf_counter() - t0, 3), "target_tokens": n_targets,
            "positions": rows, "passes": len(groups),
            "stats_mb": round(sum(s.nbytes() for s in out.values()) / 2**20, 2)}
    return out, info


def time_plain_pass(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable, loss_fn: Callable) -> float:
    """Seconds of one forward/backward over ``batches`` with the same weights trainable as
    :func:`collect_stats` but no hooks: the baseline GradOT's statistics cost is compared with."""
    params = list(model.parameters())
    was_grad = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        for p in params:
            p.requires_grad_(False)
        for m in modules.values():
            m.weight.requires_grad_(True)
        for batch in batches:
            loss_fn(model, batch)[0].backward()
    finally:
        for m in modules.values():
            m.weight.grad = None
        for p, flag in zip(params, was_grad):
            p.requires_grad_(flag)
        model.train(was_training)
    return time.perf_counter() - t0


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The (out x in) weight of a linear map, detached, float32."""
    return dense_weight(module).detach().float()
