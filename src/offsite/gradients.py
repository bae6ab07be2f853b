"""The adapter's gradients and weights in either model, keyed as adapter bundles name them.

An adapter tensor is named ``blocks.{original block index}.{name}`` (:mod:`offsite.adapters`)
whether it sits in an emulator (at its stack position) or in the full model (at its own index), so
gradients taken through the two line up key by key: the transfer probe (:mod:`offsite.probe`),
the owner's correction (:mod:`offsite.assist`) and the benchmarks use these two helpers.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .adapters import param_names
from .errors import OffsiteError
from .models.families import get_blocks


def adapter_gradients(model, positions: dict[int, int], examples: list[dict], micro_batch_size: int = 4,
                      pad_id: int = 0, keys=None) -> dict[str, torch.Tensor]:
    """The mean-token LM-loss gradient of the adapter blocks at ``positions`` (stack position ->
    original block index), per tensor, keyed as adapter bundles name them
    (``blocks.{original index}.{name}``, :mod:`offsite.adapters`), so that the gradients taken on an
    emulator and on the full model (``positions`` the identity) line up key by key. ``keys``: only
    these tensors (default every tensor of the adapter blocks). Other parameters get no gradient;
    the model's ``requires_grad`` flags and train/eval mode are restored afterwards."""
    from .train import causal_lm_loss, collate, count_targets

    named = dict(model.named_parameters())
    params = {k: named[n] for k, n in param_names(model, positions).items()}
    if keys is not None:
        missing = sorted(set(keys) - set(params))
        if missing:
            raise OffsiteError(f"no adapter tensor {missing[0]} in this model ({len(missing)} unknown)")
        params = {k: params[k] for k in keys}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    total = sum(count_targets(e) for e in examples)
    if total == 0:
        raise OffsiteError("the examples have no target tokens to take the adapter's gradient on")
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params.values():
            p.requires_grad_(True)
        model.eval()  # no dropout: both models see the same deterministic function
        device = next(model.parameters()).device
        for i in range(0, len(examples), micro_batch_size):
            batch = collate(examples[i:i + micro_batch_size], pad_id=pad_id, device=device)
            loss_sum, _ = causal_lm_loss(model, batch)
            (loss_sum / total).backward()
        grads = {k: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)
    return grads


@contextmanager
def adapter_written(model, positions: dict[int, int], state: dict[str, torch.Tensor]):
    """``state`` (bundle keys ``blocks.{original index}.{name}``, :mod:`offsite.adapters`) written
    into the adapter blocks of ``model`` at ``positions`` (stack position -> original index) while
    the block runs; the model's own tensors are put back afterwards."""
    blocks, pos_of = get_blocks(model), {src: pos for pos, src in positions.items()}

    def param(key):
        _, src, name = key.split(".", 2)
        return blocks[pos_of[int(src)]].get_parameter(name)

    saved = {}
    try:
        with torch.no_grad():
            for key, t in state.items():
                p = param(key)
                saved[key] = p.detach().clone()
                p.copy_(t.to(p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for key, t in saved.items():
                param(key).copy_(t)


__all__ = ["adapter_gradients", "adapter_written"]
