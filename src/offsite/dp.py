"""Differentially private tuning of the adapter (DP-SGD with Opacus): the data owner's guarantee.

``offsite tune --dp-epsilon E [--dp-delta D] [--dp-clip C] [--dp-accountant rdp|prv]`` trains the
adapter with DP-SGD (Abadi et al. 2016) as Opacus implements it:

* **Unit of privacy: one training example** (one prompt/completion pair, one text document, one
  row of a task file). A secret that occurs in k examples is protected with group privacy, i.e.
  roughly k x epsilon (docs/privacy.md, "The data owner's side").
* **Sampling: Poisson.** Each optimizer step takes every training example independently with
  probability ``q = batch_size / n`` (so ``batch_size`` is the *expected* batch), the sampling that
  the accountants' subsampled-Gaussian analysis assumes. The draw of step ``t`` comes from a
  generator seeded with ``(seed, t)``, so a resumed run draws the same batches; the seed is the data
  owner's and never leaves its machine.
* **Per-example gradients** of the trainable adapter parameters come from Opacus's
  :class:`~opacus.GradSampleModule` (hooks): its own per-sample rules for ``nn.Linear``,
  ``nn.LayerNorm``, ``nn.Embedding``, ..., and for every other module that holds trainable
  parameters (llama-style RMSNorm, Gemma's RMSNorm, GPT-2's ``Conv1D``) Opacus's functorch
  fallback (``torch.func``: ``vmap`` of ``grad`` over that one module, exact, not an approximation).
  Rotary embeddings, ALiBi, attention masks and softmax carry no trainable parameters, so
  nothing is needed for them. Every family in :mod:`offsite.models.families` is tested
  (tests/test_dp.py compares the per-example gradients with one backward per example).
* **The per-example loss** is the mean next-token loss over that example's target tokens (each
  example weighs the same, unlike the engine's token-weighted batch mean); its gradient is clipped
  to L2 norm ``clip`` over all trainable parameters together, the clipped gradients are summed,
  Gaussian noise of standard deviation ``noise_multiplier x clip`` is added, and the sum is
  divided by the expected batch size (Opacus's :class:`~opacus.optimizers.DPOptimizer`; only its
  final division is ours, because micro-batches accumulate per-example gradients of a batch
  whose expected size is the global ``batch_size``). AdamW then steps on this noisy gradient
  (post-processing: it does not change the guarantee).
* **Noise multiplier** from Opacus's :func:`~opacus.accountants.utils.get_noise_multiplier` for the
  planned steps and ``q``, so that the run spends at most ``(epsilon, delta)``; the epsilon actually
  spent (for the steps done) is computed again by the same Opacus accountant (RDP by default,
  or PRV) and written into the adapter bundle's manifest (``dp``), which ``offsite plug`` prints.
* **delta** defaults to ``1 / (10 n)`` for ``n`` training examples (below ``1/n``, the rate at which
  "leak one example in full" would still meet the bound).

What DP tuning changes besides: every example trains (no validation split: choosing the kept
adapter by the loss on held-out private examples would be a non-private use of them; the final
adapter is kept), and the adapter bundle's ``training`` record carries no losses, token counts or
timings (they are statistics of the private data that the guarantee does not cover). It runs on
one process in float32, with the plain LM loss: ``accelerate launch`` with several processes, bf16
and other custom losses (distillation, FedProx) are refused with one line.

**The owner in the loop** (``--assist``, :mod:`offsite.assist`): the owner's correction ``c`` is
computed from the current adapter (already released to the owner: it is one of the iterates the
accountant covers) and the owner's public pairs, never from the private examples. It is added to
the gradient *after* Opacus has clipped the per-example gradients, added the noise and averaged
(:meth:`PerExample.add_after_noise`, Opacus's ``step_hook``), so it never passes through the
per-example clip and the step is post-processing of the noisy gradient: the (epsilon, delta) the
accountant reports is unchanged, for the final adapter and for every intermediate adapter the
owner sees. The manifest's ``dp`` entry says so (``after_noise``). LoRA and BitFit
adapters work (their trainable parameters are ``nn.Linear`` weights and 1-D biases/norms).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data.tokenize import IGNORE
from .errors import OffsiteError

ACCOUNTANTS = ("rdp", "prv")


@dataclass
class DPOptions:
    """What the data owner asks for (``--dp-*`` flags)."""

    epsilon: float
    delta: float | None = None  # None: 1 / (10 n)
    clip: float = 1.0
    accountant: str = "rdp"

    def check(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < math.inf):
            raise OffsiteError(f"--dp-epsilon must be a finite number > 0 (got {self.epsilon}); leave it out for "
                               "tuning without differential privacy")
        if self.delta is not None and not 0 < self.delta < 1:
            raise OffsiteError(f"--dp-delta must be in (0, 1) (got {self.delta})")
        if not (isinstance(self.clip, (int, float)) and 0 < self.clip < math.inf):
            raise OffsiteError(f"--dp-clip must be a finite number > 0 (got {self.clip})")
        if self.accountant not in ACCOUNTANTS:
            raise OffsiteError(f"--dp-accountant must be one of {', '.join(ACCOUNTANTS)} (got {self.accountant!r})")


@dataclass
class DPPlan:
    """The mechanism of one run, fixed before it starts: what :func:`offsite.train.train` runs."""

    target_epsilon: float
    delta: float
    delta_rule: str  # "given" | "1/(10n)"
    clip: float
    accountant: str
    sample_rate: float
    noise_multiplier: float
    steps: int  # planned optimizer steps (federated: rounds)
    examples: int  # n (federated: data owners)
    # what one unit of privacy is, how each step draws them and what runs: DP-SGD on one data owner's
    # examples (the defaults), or user-level DP-FedAvg over the data owners (federated_plan)
    unit: str = "example"
    sampling: str = "poisson"
    mechanism: str = "DP-SGD (Opacus GradSampleModule + DPOptimizer)"

    def fingerprint(self) -> dict:
        """What a checkpoint must match to resume (the unit, sampling and mechanism only where they
        are not DP-SGD's, so that checkpoints written before they existed still resume)."""
        d = asdict(self)
        for f in ("unit", "sampling", "mechanism"):
            if d[f] == DPPlan.__dataclass_fields__[f].default:
                del d[f]
        return d

    def record(self, steps_done: int, after_noise: str | None = None) -> dict:
        """The manifest's ``dp`` entry: the mechanism and the (epsilon, delta) spent in ``steps_done`` steps;
        ``after_noise``: what was added to the noisy gradient (post-processing: the owner's correction)."""
        import opacus

        extra = {"after_noise": after_noise} if after_noise else {}
        return {
            "mechanism": self.mechanism, "library": f"opacus {opacus.__version__}",
            "unit": self.unit, "sampling": self.sampling, "accountant": self.accountant,
            "epsilon": spent_epsilon(self, steps_done), "target_epsilon": self.target_epsilon,
            "delta": self.delta, "delta_rule": self.delta_rule, "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate, "steps": steps_done, "clip": self.clip, "examples": self.examples,
            **extra,
        }


def dp_summary(record: dict) -> str:
    """One line for a manifest's ``dp`` entry (what ``offsite tune``, ``offsite federate run`` and
    ``offsite plug`` print)."""
    if record.get("unit") == OWNER_UNIT:
        what, steps, units = "data owner (all its examples together)", "rounds of DP-FedAvg", "data owners"
    else:
        what, steps, units = "training example", "steps of DP-SGD", "examples"
    return (f"differential privacy: ({record['epsilon']:.3g}, {record['delta']:.3g})-DP per {what} "
            f"(target epsilon {record['target_epsilon']:g}, {record['accountant'].upper()} accountant, "
            f"{record['library']}): {record['steps']} {steps}, {record['sampling']} sampling rate "
            f"{record['sample_rate']:.4g} of {record['examples']} {units}, noise multiplier "
            f"{record['noise_multiplier']:.4g}, clip {record['clip']:g}" + (f"; {record['after_noise']}" if record.get("after_noise") else ""))


#: the unit of privacy of the federation's DP-FedAvg (the manifest's ``dp.unit``)
OWNER_UNIT = "data owner"
FEDAVG_MECHANISM = ("DP-FedAvg with client-side fixed clipping (Flower's fixedclipping_mod and "
                    "DifferentialPrivacyClientSideFixedClipping; Gaussian noise on the aggregate)")


def federated_plan(opts: DPOptions, owners: int, per_round: int, rounds: int) -> DPPlan:
    """User-level DP-FedAvg over ``owners`` data owners, ``per_round`` of them a round, ``rounds``
    rounds: the noise multiplier from Opacus's accountant with sampling rate ``per_round / owners``
    and one step per round (:func:`make_plan`; delta defaults to ``1 / (10 owners)``). Each selected
    owner's update is clipped to ``opts.clip``; the noise on the sum has standard deviation
    ``noise_multiplier x clip``. Flower selects a fixed number of owners a round, not a Poisson
    draw: with all of them each round (rate 1) the accounting is exact, below that it is the
    Poisson analysis applied to fixed-size sampling, as DP-FedAvg is usually accounted."""
    import dataclasses

    plan = make_plan(opts, owners, per_round, rounds)
    return dataclasses.replace(plan, unit=OWNER_UNIT, mechanism=FEDAVG_MECHANISM,
                               sampling="every owner" if per_round >= owners else "fixed-size")


def default_delta(n: int) -> float:
    return 1.0 / (10 * n)


def make_plan(opts: DPOptions, n_train: int, batch_size: int, steps: int) -> DPPlan:
    """The noise multiplier that spends ``opts.epsilon`` in ``steps`` Poisson-sampled steps of
    expected size ``batch_size`` over ``n_train`` examples (Opacus's ``get_noise_multiplier``)."""
    from opacus.accountants.utils import get_noise_multiplier

    opts.check()
    if n_train < 1 or steps < 1:
        raise OffsiteError("differentially private tuning needs at least one example and one step")
    delta = opts.delta if opts.delta is not None else default_delta(n_train)
    q = min(1.0, batch_size / n_train)
    try:
        sigma = get_noise_multiplier(target_epsilon=opts.epsilon, target_delta=delta, sample_rate=q, steps=steps,
                                     accountant=opts.accountant)
    except ValueError as exc:  # "The privacy budget is too low."
        raise OffsiteError(f"no noise level reaches epsilon {opts.epsilon:g} at delta {delta:.3g} in {steps} steps "
                           f"at sampling rate {q:.3g} ({exc}); allow a larger --dp-epsilon or train fewer steps") from exc
    return DPPlan(target_epsilon=float(opts.epsilon), delta=float(delta),
                  delta_rule="given" if opts.delta is not None else "1/(10n)", clip=float(opts.clip),
                  accountant=opts.accountant, sample_rate=float(q), noise_multiplier=float(sigma), steps=int(steps),
                  examples=int(n_train))


def spent_epsilon(plan: DPPlan, steps: int) -> float:
    """Epsilon at ``plan.delta`` after ``steps`` steps, by the plan's Opacus accountant (0 for none)."""
    from opacus.accountants.utils import create_accountant

    if steps < 1:
        return 0.0
    acc = create_accountant(mechanism=plan.accountant)
    acc.history = [(plan.noise_multiplier, plan.sample_rate, steps)]
    # Opacus's RDP-to-(epsilon, delta) conversion can come out below 0 for tiny budgets: the
    # guarantee then holds at epsilon 0
    return max(0.0, float(acc.get_epsilon(delta=plan.delta)))


def poisson_batch(n: int, q: float, seed: int, step: int) -> list[int]:
    """The examples of optimizer step ``step``: each of ``n`` taken independently with probability ``q``
    (from a generator seeded with ``seed`` and ``step`` only, so that a resumed run draws the same)."""
    s = int.from_bytes(hashlib.sha256(f"offsite-dp:{seed}:{step}".encode()).digest()[:8], "little") >> 1
    draw = torch.rand(n, generator=torch.Generator().manual_seed(s))
    return torch.nonzero(draw < q).flatten().tolist()


def per_example_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Each example's mean next-token loss over its target tokens (float32, shape ``[batch]``; an
    example without targets: 0), and the number of target tokens of the micro-batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    # only the logits at target positions are cast to float32 (as offsite.train.causal_lm_loss does)
    tok = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
    counts = keep.sum(dim=1)
    return sums / counts.clamp(min=1), int(counts.sum())


class _TokenRows:
    """Marks a module whose input a block flattened to one row per token (``[batch x length, d]``):
    OPT's decoder layer reshapes the hidden states so before its MLP (``final_layer_norm``, ``fc1``,
    ``fc2``). Opacus would take every token for an example there; the module's class is swapped for
    a subclass whose per-sample rule reshapes the rows back to ``[batch, length, d]`` and then applies
    Opacus's own rule for the parent class (a sum over the example's tokens: its exact gradient)."""


def _rows_sampler(base):
    def sampler(layer, activations, backprops):
        b = layer._dp_examples
        acts = [a.reshape(b, -1, *a.shape[1:]) for a in activations]
        return base(layer, acts, backprops.reshape(b, -1, *backprops.shape[1:]))
    return sampler


_ROWS_CLASSES: dict[type, type] = {}


def _rows_class(cls: type) -> type:
    from opacus import GradSampleModule

    if cls not in _ROWS_CLASSES:
        sub = type(f"_TokenRows{cls.__name__}", (cls, _TokenRows), {})
        GradSampleModule.GRAD_SAMPLERS[sub] = _rows_sampler(GradSampleModule.GRAD_SAMPLERS[cls])
        _ROWS_CLASSES[cls] = sub
    return _ROWS_CLASSES[cls]


class PerExample:
    """``model`` wrapped to compute per-example gradients (:attr:`model`, Opacus's
    :class:`~opacus.GradSampleModule`) and ``optimizer`` wrapped to clip them, add the plan's noise
    and average over the expected batch size (:attr:`optimizer`, Opacus's DPOptimizer). :meth:`close`
    gives the model back as it was (no hooks, no per-example tensors, its modules' own classes)."""

    def __init__(self, model, optimizer, plan: DPPlan):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.utils.module_utils import has_trainable_params

        class _Optimizer(DPOptimizer):
            # the per-example losses are summed (loss_reduction "sum"), possibly over several
            # micro-batches of one Poisson batch: divide the noisy sum by the expected batch size once
            def scale_grad(self):
                for p in self.params:
                    p.grad /= self.expected_batch_size

        # the first trainable block's input (frozen embeddings) needs no gradient, so torch warns that the
        # full backward hook fires with respect to the module's outputs: what Opacus uses (tests/test_dp.py)
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs")
        self.base, self.examples, self.swapped = model, None, []
        self.handles = [model.register_forward_pre_hook(self._batch, with_kwargs=True)]
        self.handles += [m.register_forward_pre_hook(self._rows) for m in model.modules() if has_trainable_params(m)]
        try:
            self.model = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        except NotImplementedError as exc:
            self.close()
            raise OffsiteError(f"Opacus cannot compute per-example gradients for this adapter "
                               f"({str(exc)[:200]})") from exc
        expected = max(1, round(plan.sample_rate * plan.examples))
        self.optimizer = _Optimizer(optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.clip,
                                    expected_batch_size=expected, loss_reduction="sum")

    def add_after_noise(self, terms) -> None:
        """Add ``terms()`` (``(parameter, tensor)`` pairs) to the gradient at every step after Opacus's
        clip, noise and averaging, before AdamW steps (Opacus's ``step_hook``): what is added this way
        never passes through the per-example clip, and must not depend on the private examples."""
        def hook(opt):
            for p, t in terms():
                p.grad.add_(t.to(p.grad.device, p.grad.dtype))

        self.optimizer.attach_step_hook(hook)

    def _batch(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.examples = int(ids.shape[0])

    def _rows(self, module, args):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        b = self.examples
        if x is None or b is None or x.dim() != 2 or x.shape[0] == b:
            return
        base = type(module).__mro__[1] if isinstance(module, _TokenRows) else type(module)
        if base not in (torch.nn.Linear, torch.nn.LayerNorm) or x.shape[0] % b:
            raise OffsiteError(f"the model flattens batch and tokens before a trainable {base.__name__}, for which "
                               "offsite has no per-example gradient rule; tune without --dp-epsilon")
        if not isinstance(module, _TokenRows):
            module.__class__ = _rows_class(base)
            self.swapped.append((module, base))
        module._dp_examples = b
        module.max_batch_len = b  # Opacus's per-sample buffer: one row per example, not per token

    def close(self) -> None:
        if getattr(self, "model", None) is not None:
            self.model.to_standard_module()
            self.model = None
        for h in self.handles:
            h.remove()
        for module, cls in self.swapped:
            module.__class__ = cls
            for attr in ("_dp_examples", "max_batch_len"):
                if hasattr(module, attr):
                    delattr(module, attr)
        self.handles, self.swapped = [], []


def accumulate(dp_opt) -> None:
    """Clip the per-example gradients of the micro-batches so far into the running sum, and free them
    (so that one Poisson batch holds at most one micro-batch of per-example gradients)."""
    dp_opt.clip_and_accumulate()
    for p in dp_opt.params:
        p.grad_sample = None


def empty_batch(dp_opt) -> None:
    """A Poisson draw with no example: the step adds only noise (as the analysis assumes)."""
    for p in dp_opt.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
