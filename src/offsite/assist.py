"""The owner's correction (the owner-in-the-loop protocol): the model owner corrects the adapter's gradient while the data owner tunes.

On our embedded model an emulator of half the middle or less points the adapter's gradient nearly
orthogonally to where the full model points it, so an adapter tuned on the emulator alone carries
little of its gain back (docs/transfer.md). The owner can fix the direction without seeing the
data owner's data, because it holds both models and public data of a similar kind:

1. the data owner trains only the **bottom** adapter blocks (``TuneSettings.blocks = "bottom"``);
   the top ones stay the original blocks, on the emulator and in the full model;
2. at the start and every ``every`` optimizer steps, the data owner sends its current trainable
   adapter tensors to the owner (:meth:`Assistant.correction`);
3. the owner writes them into its full model and into its own copy of the emulator and takes the
   adapter's mean-token LM-loss gradient on ``examples`` public QA pairs (the first ones of the
   ``source`` task's training split; WebQuestions by default) through each: ``g_e`` and ``g_f``,
   per tensor. It returns ``c = g_f · |g_e| / |g_f| − g_e``: the full model's direction at the
   emulator's scale, minus the emulator's own gradient;
4. the data owner adds ``c`` to its gradient at every step until the next correction (its loss
   gets the linear term ``<c, θ>``), so on the public data its step is the full model's; what its
   private data adds on top stays the emulator's. Under DP-SGD (``--dp-epsilon``) ``c`` is added
   to the noisy gradient after the per-example clip and the noise instead (post-processing,
   :mod:`offsite.dp`; :meth:`CorrectedLoss.added_gradient`).

Scaling ``g_f`` to the emulator's norm matters: unscaled, the correction's size follows the full
model's much smaller gradients and the emulator's own term dominates (measured in docs/transfer.md:
0.25 transfer without scaling and with all four blocks tuned, 0.57 with scaling alone, 0.73 with
both). What it carries, measured, is mostly the owner's own public pairs: their full-model gradient
enters every step, and the owner alone, tuning the same blocks of its full model on those pairs,
lifts ARC-Easy as much as the whole protocol does (docs/transfer.md, "The floor"). ``pool``: each
correction takes the next public pairs of a larger set (more of them per tuning, the same cost per
correction); over HTTP the service draws them at random from the pool instead, so that the data
owner cannot know which pairs a correction was taken on (docs/transfer.md, "The correction service"). The price is interaction and privacy: the owner sees every intermediate adapter, and the data
owner receives the full model's gradients on public data at its adapter (docs/transfer.md, "The
owner in the loop"). Both parties run in one process with ``offsite run --assist-every [N]`` (the
Python API: :class:`Assistant`); on two machines the owner serves its corrections over HTTP
(``offsite assist-serve``, :mod:`offsite.assist_service`) and the data owner tunes with ``offsite
tune --assist URL``. Tensors cross only as safetensors (:func:`tensors_to_bytes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .adapters import param_names
from .emulator.core import Emulator
from .errors import OffsiteError
from .gradients import adapter_gradients, adapter_written

#: the owner's correction period: optimizer steps between two of the owner's corrections, the
#: measured recipe (docs/transfer.md). The one definition: ``offsite tune --assist URL``, ``offsite run
#: --assist-every`` (no value), ``offsite assist-serve``'s budget, the Makefile and the docs read it
#: (tests/test_assist.py checks that no second literal appears in the package)
RECIPE_EVERY = 4
#: the owner's default public pairs: bare questions with short answers (WebQuestions)
DEFAULT_SOURCE = "webqs"
#: tasks whose inputs are shaped otherwise, and the public pairs shaped like them: SciQ puts a passage
#: before the question, as SQuAD does. The owner's pairs must share the data owner's input format
#: (docs/transfer.md, "SciQ": SciQ keeps 0.84 of the ceiling's gain with SQuAD pairs, 0.35 with
#: WebQuestions), and so must the floor's (:func:`offsite.experiment.run.run`).
MATCHED_SOURCE = {"sciq": "squad"}


def matched_source(task: str) -> str:
    """The public pair source shaped like ``task``'s inputs (:data:`MATCHED_SOURCE`, else
    :data:`DEFAULT_SOURCE`)."""
    return MATCHED_SOURCE.get(task, DEFAULT_SOURCE)


@dataclass
class AssistOptions:
    #: the correction period; 0: no correction (the papers' protocol), so ``AssistOptions()`` is off
    every: int = field(default=0, metadata={
        "help": f"the owner's correction every N optimizer steps (docs/transfer.md); the flag alone: every "
                f"{RECIPE_EVERY}, the measured recipe, with --tune-blocks bottom; left out (or 0): none, the "
                "papers' protocol",
        "argparse": {"nargs": "?", "const": RECIPE_EVERY, "metavar": "N"}})
    source: str = field(default=DEFAULT_SOURCE, metadata={"help": "public QA pairs the owner takes the gradients on: a "
                                                           "built-in task's training pairs (default webqs) or squad "
                                                           "(SQuAD passages with questions)"})
    examples: int = field(default=32, metadata={"help": "public pairs per correction (default 32)"})
    pool: int = field(default=0, metadata={"help": "the owner holds the first N pairs of the source and each "
                                                   "correction takes the next --assist-examples of them, cycling "
                                                   "(0: every correction takes the first --assist-examples); "
                                                   "offsite assist-serve draws them at random instead (0 there: "
                                                   "8 x --assist-examples)"})

    def check(self) -> None:
        if not isinstance(self.every, int) or self.every < 0:
            raise OffsiteError(f"assist every must be an integer >= 0 (got {self.every!r})")
        if not isinstance(self.examples, int) or self.examples < 1:
            raise OffsiteError(f"assist examples must be an integer >= 1 (got {self.examples!r})")
        if not isinstance(self.pool, int) or not (self.pool == 0 or self.pool >= self.examples):
            raise OffsiteError(f"assist pool must be 0 or at least the pairs per correction, {self.examples} "
                               f"(got {self.pool!r})")

    @property
    def on(self) -> bool:
        return self.every > 0

    def record(self) -> dict:
        """The options as results, manifests and checkpoints record them (``pool`` only when used, so
        that records written before it existed keep their meaning)."""
        d = asdict(self)
        if not self.pool:
            del d["pool"]
        return d


class Assistant:
    """The model owner's side: holds the full ``model`` and its own copy of the shipped emulator
    ``emu`` (neither is changed: the data owner's adapter is written in for each correction and
    taken out again) and the public pairs it corrects on (``held``: the first ``opts.examples`` of
    the source, or its first ``opts.pool`` when each correction takes the next ones; or the
    ``examples`` given)."""

    def __init__(self, model, emu: Emulator, opts: AssistOptions, micro_batch_size: int = 8,
                 examples: list[dict] | None = None, draw=None):
        from .probe import ProbeOptions, task_probe_examples

        opts.check()
        self.model, self.emu, self.opts, self.micro_batch_size = model, emu, opts, micro_batch_size
        # the public pairs, tokenized as the data owner's are (the loss on the answer); or given
        self.held = examples if examples is not None else task_probe_examples(
            emu.tokenizer, opts.source, ProbeOptions(task_examples=max(opts.examples, opts.pool)))
        pad = emu.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.positions = emu.adapter_positions
        self.full_positions = {src: src for src in self.positions.values()}
        shapes = dict(emu.model.named_parameters())
        self.shapes = {k: tuple(shapes[n].shape) for k, n in param_names(emu.model, self.positions).items()}
        self.calls = 0
        self.draw = draw  # a random.Random: each correction draws its pairs from the pool (the service's)
        self.last_indices: list[int] = []  # which held pairs the last correction took

    def correction(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``c`` (module docstring) for the data owner's current trainable adapter tensors ``state``
        (bundle keys); refuses tensors that are not the emulator's adapter's."""
        if not state:
            raise OffsiteError("the data owner sent no adapter tensors to correct")
        for key, t in state.items():
            if key not in self.shapes:
                raise OffsiteError(f"{key} is not a tensor of this emulator's adapter; is the adapter from another "
                                   "emulator?")
            if tuple(t.shape) != self.shapes[key]:
                raise OffsiteError(f"{key} has shape {tuple(t.shape)}, the emulator's adapter {self.shapes[key]}")
            if not torch.isfinite(t).all():
                raise OffsiteError(f"{key} holds NaN or infinite values")
        keys, pairs = list(state), self.next_pairs()
        with adapter_written(self.emu.model, self.positions, state):
            g_e = adapter_gradients(self.emu.model, self.positions, pairs, self.micro_batch_size, self.pad_id, keys)
        with adapter_written(self.model, self.full_positions, state):
            g_f = adapter_gradients(self.model, self.full_positions, pairs, self.micro_batch_size, self.pad_id, keys)
        self.calls += 1
        return {k: g_f[k] * (g_e[k].norm() / g_f[k].norm().clamp_min(1e-30)) - g_e[k] for k in keys}

    @property
    def per_correction(self) -> int:
        """How many public pairs one correction takes: every held pair, or with a pool
        ``opts.examples`` of them (at most all it holds)."""
        return min(self.opts.examples, len(self.held)) if self.opts.pool else len(self.held)

    def next_pairs(self) -> list[dict]:
        """The public pairs of the next correction: every held pair; with a pool, the next
        ``opts.examples`` of them (the ``i``-th correction starts at pair ``i · examples``, cycling), or
        with ``draw`` (a :class:`random.Random`) a fresh draw of that many (kept in pool order)."""
        n = len(self.held)
        if not self.opts.pool:
            self.last_indices = list(range(n))
        elif self.draw is not None:
            self.last_indices = sorted(self.draw.sample(range(n), self.per_correction))
        else:
            i = self.calls * self.opts.examples % n
            self.last_indices = [(i + j) % n for j in range(self.per_correction)]
        return [self.held[j] for j in self.last_indices]

    def loss(self, params: dict[str, torch.nn.Parameter]) -> "CorrectedLoss":
        """The data owner's training loss for the trainable adapter tensors ``params``, asking this
        owner for a correction every ``opts.every`` steps."""
        return CorrectedLoss(params, self.correction, self.opts.every)


class CorrectedLoss:
    """The data owner's side: the training engine's ``loss_fn`` with the owner's linear term
    ``n · <c, θ − θ_c>`` (``n`` the batch's target tokens, so the engine's per-token mean turns it
    into ``+ c`` on the gradient; ``θ_c`` the adapter ``c`` was computed at, so the loss shown stays
    the LM loss plus a small term), and its ``on_step``, which marks ``c`` stale every ``every`` steps.
    A stale ``c`` is asked for again, at the current adapter, before the next forward pass (also the
    first one after a resume). ``params``: the trainable adapter tensors by bundle key;
    ``correction(state) -> c``: the owner (:meth:`Assistant.correction`); ``base``: the loss the
    term is added to (default the LM loss; e.g. FedProx's)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], correction, every: int, base=None):
        if every < 1:
            raise OffsiteError(f"assist every must be >= 1 (got {every})")
        self.params, self.correction, self.every, self.base = params, correction, every, base
        self.c: dict[str, torch.Tensor] | None = None
        self.calls = 0

    def refresh(self) -> None:
        state = {k: p.detach().cpu().clone() for k, p in self.params.items()}
        c = self.correction(state)
        if set(c) != set(state):
            raise OffsiteError("the owner's correction does not name the adapter's trainable tensors "
                               f"({len(set(c) ^ set(state))} differ)")
        for k, t in c.items():
            if tuple(t.shape) != tuple(self.params[k].shape) or not torch.isfinite(t).all():
                raise OffsiteError(f"the owner's correction of {k} has the wrong shape or non-finite values")
        self.c = {k: t.to(self.params[k].device, self.params[k].dtype) for k, t in c.items()}
        self.at = {k: p.detach().clone() for k, p in self.params.items()}
        self.calls += 1

    def __call__(self, model, batch):
        from .train import causal_lm_loss

        if self.c is None:
            self.refresh()
        loss_sum, n = (self.base or causal_lm_loss)(model, batch)
        self._shown = loss_sum.detach()
        linear = sum((self.c[k] * (p - self.at[k])).sum() for k, p in self.params.items())
        return loss_sum + n * linear, n

    #: what :meth:`added_gradient` adds under DP-SGD, as the manifest's ``dp`` entry records it
    after_noise = ("the owner's correction (its public pairs, at the current adapter) added to the noisy "
                   "gradient after clipping and noise: post-processing")

    def added_gradient(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """``(parameter, c)`` pairs for DP-SGD (:meth:`offsite.dp.PerExample.add_after_noise`), which trains
        on the plain per-example LM loss and adds ``c`` to the noisy gradient instead of the linear
        term to the loss (whose gradient Opacus would clip with each example's); a stale ``c`` is
        asked for again first, at the current adapter, as :meth:`__call__` does."""
        if self.base is not None:
            raise OffsiteError("differentially private training adds the owner's correction to the plain LM "
                               "loss's noisy gradient; it cannot be combined with another loss term")
        if self.c is None:
            self.refresh()
        return [(p, self.c[k]) for k, p in self.params.items()]

    def shown_sum(self) -> torch.Tensor:
        """The LM part (``base``'s) of the last call's sum: what the training bar shows as the loss;
        the linear term, whose value is arbitrary (its gradient is what matters), can make the total
        negative (:mod:`offsite.train`)."""
        return self._shown

    def on_step(self, record: dict) -> None:
        if record["step"] % self.every == 0:
            self.c = None


def tensors_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Adapter tensors or a correction as they cross between the parties: safetensors bytes."""
    from safetensors.torch import save

    return save({k: t.detach().cpu().contiguous() for k, t in state.items()})


def tensors_from_bytes(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes a peer sent (never a pickle); ``what`` names them in the error."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(bytes(data))
    except (SafetensorError, ValueError, TypeError, RuntimeError, KeyError, OverflowError) as e:
        raise OffsiteError(f"{what} is not a safetensors file: {' '.join(str(e).split())[:200]}") from None


__all__ = ["DEFAULT_SOURCE", "MATCHED_SOURCE", "RECIPE_EVERY", "AssistOptions", "Assistant", "CorrectedLoss", "matched_source",
           "tensors_from_bytes", "tensors_to_bytes"]
