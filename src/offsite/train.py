"""The one training engine: every training job in offsite runs through :func:`train`.

Used by the data owner's adapter tuning on an emulator, the full fine-tuning baseline and the model
owner's emulator distillation (which passes its own ``loss_fn``). The loop is deliberately plain
(nanoGPT-like): AdamW, warm-up + linear/cosine/constant schedule, gradient clipping, gradient
accumulation, periodic validation keeping the best trainable state, atomic checkpoints with exact
resume. A non-finite training loss (checked before the optimizer step) or non-finite trainable
weights (after it) stop training with one line (:class:`OffsiteError`); the last checkpoint written
stays as it was. It runs under Hugging Face ``accelerate``: one process on a CPU or GPU, or many with
``accelerate launch`` / ``torchrun`` (DDP; gloo on CPUs).

Examples
--------
An *example* is a dict ``{"input_ids": list[int], "labels": list[int]}`` of equal lengths, labels
``-100`` where no loss is taken. :func:`offsite.data.tokenize.tokenize_qa` and ``tokenize_text`` build them. Batches
are right-padded per micro-batch (dynamic padding) with an ``attention_mask``.

Batches and sharding
--------------------
``cfg.batch_size`` is the *global* number of examples per optimizer step. Each epoch visits the
examples in the order of ``torch.randperm`` seeded with ``cfg.seed + epoch``; consecutive slices of
``batch_size`` form the global batches (the last one of an epoch may be smaller). Process ``r`` of
``W`` takes ``global_batch[r::W]`` and splits it into ``batch_size / (micro_batch_size * W)``
micro-batches. We do this ourselves instead of using ``accelerator.prepare(dataloader)`` so that the
set of examples in every optimizer step depends only on the seed and ``batch_size``, never on the
number of processes or on the micro-batch size, and so that resuming needs only the step number.

Loss normalisation
------------------
The loss of one optimizer step is::

    sum of the token losses over the whole global batch  /  number of target tokens in the global batch

where the target tokens are the label positions ``!= -100`` after the causal shift
(``labels[1:]``). The denominator is counted from the examples before any forward pass, so each
micro-batch can back-propagate its own *sum* scaled by ``W / N_global``: DDP averages gradients over
the ``W`` processes, which turns the sum of those into exactly the gradient of the global token mean.
Consequences: (1) the update is the same (up to float rounding) whether a global batch is run as
1 x 8, 4 x 2 or on 2 processes x 4; (2) every target token weighs the same, so long answers count
more than short ones, as in Offsite-Tuning / Hugging Face ``run_clm`` per-batch token means; unlike a
mean of per-micro-batch means, it is not biased by how tokens happen to fall into micro-batches.

A custom ``loss_fn(model, batch) -> (loss_sum, n_tokens)`` must return a *sum* over the same target
tokens (extra terms, e.g. distillation's 30 x normalised MSE, scaled as a per-token sum) and the
number of those tokens, which is checked against the count made in advance. A ``loss_fn`` whose
sum holds more than the LM loss (the owner's correction, :class:`offsite.assist.CorrectedLoss`) may
have a ``shown_sum()`` method, the LM part of its last call's sum: the progress bar shows that
(``loss``) and the history keeps it as ``lm_loss`` beside the total ``train_loss``.

Differential privacy
--------------------
With ``dp`` (an :class:`offsite.dp.DPPlan`) the same loop runs DP-SGD through Opacus instead:
each step's examples are a Poisson draw (rate ``batch_size / n``, seeded by the seed and the step),
each example's loss is its own token mean, its gradient is clipped per example and Gaussian noise
is added before AdamW steps (:mod:`offsite.dp`). The token-weighted normalisation above does not
apply there: every example weighs the same. The one custom loss it takes is the owner's correction
(:class:`offsite.assist.CorrectedLoss`), whose ``c`` is added to the noisy gradient rather than to
the loss (post-processing; :meth:`offsite.dp.PerExample.add_after_noise`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from offsite.data.tokenize import IGNORE
from offsite.errors import OffsiteError

__all__ = [
    "TrainConfig",
    "TrainResult",
    "count_targets",
    "planned_steps",
    "collate",
    "causal_lm_loss",
    "train",
]

SCHEDULES = ("linear", "cosine", "constant")


# ---------------------------------------------------------------------------------------------
# configuration and result


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults follow Offsite-Tuning where it has one)."""

    # fields with "cli" metadata are `offsite tune/run/privacy` flags (offsite.cli_args.add_train_args):
    # their help is written here once, and the default shown is the dataclass's (or the preset's)
    lr: float = field(default=1e-4, metadata={"cli": {"help": "learning rate"}})
    epochs: float = field(default=1.0, metadata={"cli": {"help": "passes over the training data (may be "
                                                                 "fractional; --max-steps overrides it)"}})
    max_steps: int | None = field(default=None, metadata={"cli": {"help": "optimizer steps", "min": 1,
                                                                  "none": "--epochs decides"}})
    # GLOBAL examples per optimizer step (all processes, all micro-batches)
    batch_size: int = field(default=8, metadata={"cli": {"help": "global examples per optimizer step", "min": 1}})
    micro_batch_size: int = field(default=8, metadata={"cli": {
        "help": "examples per forward pass on one process (gradient accumulation)", "min": 1}})
    # not applied to biases and norms (parameters with ndim < 2)
    weight_decay: float = field(default=0.0, metadata={"cli": {"help": "AdamW weight decay (not on biases "
                                                                       "and norms)"}})
    warmup_steps: int = field(default=0, metadata={"cli": {"help": "learning-rate warm-up steps (0: warmup_ratio "
                                                                   "of the steps)", "min": 0}})
    warmup_ratio: float = 0.0
    schedule: str = field(default="linear", metadata={"cli": {"help": "learning-rate schedule after the warm-up",
                                                              "choices": SCHEDULES}})
    max_grad_norm: float | None = 1.0
    seed: int = field(default=42, metadata={"cli": {"help": "seed of the data order and initialisation"}})
    # optimizer steps between validations (the best validation loss picks the kept state);
    # None -> evals_per_epoch times per epoch, so that "best" is a choice even in a one-epoch run
    eval_every: int | None = field(default=None, metadata={"cli": {
        "help": "optimizer steps between validations, which pick the kept adapter", "min": 1,
        "none": "--evals-per-epoch times per epoch"}})
    evals_per_epoch: int = field(default=4, metadata={"cli": {
        "help": "validations per epoch when --eval-every is not given", "min": 1, "advanced": True}})
    checkpoint_every: int | None = field(default=50, metadata={"cli": {
        "help": "optimizer steps between checkpoints", "min": 1, "none": "never", "advanced": True}})
    # longer examples keep their LAST max_length tokens
    max_length: int = field(default=1024, metadata={"cli": {"help": "tokens per example (a longer one keeps its "
                                                                    "last ones)", "min": 2}})
    progress: bool = True
    restore_best: bool = True  # at the end, load the best-validation state into the model
    # "no": float32 throughout; "bf16": the training forward/backward under bfloat16 autocast
    # (weights, gradients, optimizer and validation stay float32). See resolve_precision.
    mixed_precision: str = "no"

    def check(self) -> None:
        """Raise OffsiteError for a configuration that cannot run."""
        def bad(msg: str) -> None:
            raise OffsiteError(f"bad training config: {msg}")

        if not self.lr > 0:
            bad(f"lr must be > 0 (got {self.lr})")
        if self.max_steps is None and not 0 < self.epochs < math.inf:
            bad(f"epochs must be > 0 and finite (got {self.epochs}), or set max_steps")
        if self.max_steps is not None and self.max_steps < 1:
            bad(f"max_steps must be >= 1 (got {self.max_steps})")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            bad(f"batch_size and micro_batch_size must be >= 1 (got {self.batch_size}, {self.micro_batch_size})")
        if self.weight_decay < 0:
            bad(f"weight_decay must be >= 0 (got {self.weight_decay})")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            bad(f"warmup_steps must be >= 0 and warmup_ratio in [0, 1) (got {self.warmup_steps}, {self.warmup_ratio})")
        if self.schedule not in SCHEDULES:
            bad(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad(f"max_grad_norm must be > 0 or None (got {self.max_grad_norm})")
        if self.evals_per_epoch < 1:
            bad(f"evals_per_epoch must be >= 1 (got {self.evals_per_epoch})")
        for name in ("eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(f"{name} must be >= 1 or None (got {v})")
        if self.max_length < 2:
            bad(f"max_length must be >= 2 (got {self.max_length})")
        if self.mixed_precision not in PRECISIONS:
            bad(f"mixed_precision must be one of {', '.join(PRECISIONS)} (got {self.mixed_precision!r})")

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each process; OffsiteError unless it divides evenly."""
        per_step = self.micro_batch_size * world_size
        if self.batch_size % per_step:
            raise OffsiteError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
                f" x {world_size} process(es); change one of them"
            )
        return self.batch_size // per_step


PRECISIONS = ("no", "bf16")


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matrix products in hardware (a CUDA GPU with bf16 support,
    or a CPU with AVX512-BF16 or AMX): there, bf16 autocast is ~2x faster; elsewhere it is emulated
    and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(f()) for f in probes if f is not None)
    return False


def resolve_precision(spec: str, device: torch.device | str | None = None) -> str:
    """``"auto"`` -> ``"bf16"`` where :func:`bf16_native` (``device`` default: the one :func:`train`
    uses, CUDA if available, else the CPU), else ``"no"``; ``"no"``/``"bf16"`` as given (``"fp32"``
    is accepted for ``"no"``)."""
    spec = {"fp32": "no"}.get(spec, spec)
    if spec == "auto":
        return "bf16" if bf16_native(device or ("cuda" if torch.cuda.is_available() else "cpu")) else "no"
    if spec not in PRECISIONS:
        raise OffsiteError(f"unknown precision {spec!r}; choose auto, fp32 or bf16")
    return spec


def planned_steps(cfg: TrainConfig, n_train: int) -> int:
    """Optimizer steps of a run over ``n_train`` examples: ``max_steps``, else ``epochs`` x the
    steps of one epoch, rounded up; OffsiteError where ``epochs`` makes less than one step (rather
    than quietly running one)."""
    if cfg.max_steps:
        return cfg.max_steps
    exact = cfg.epochs * math.ceil(n_train / cfg.batch_size)
    if exact < 1 - 1e-9:
        raise OffsiteError(f"epochs {cfg.epochs:g} is {exact:.3g} of one optimizer step ({n_train} training examples, "
                           f"batch size {cfg.batch_size}); train at least one step (more epochs, or max_steps)")
    return math.ceil(exact - 1e-9)


# Fields that must match for a checkpoint to be resumed (the others only change speed or logging).
_RESUME_KEYS = ("lr", "epochs", "max_steps", "batch_size", "weight_decay", "warmup_steps", "warmup_ratio",
                "schedule", "max_grad_norm", "seed", "max_length")


def validation_interval(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps between validations: ``cfg.eval_every``, else an epoch split into
    ``cfg.evals_per_epoch`` parts (at least one step). Training also validates at its last step."""
    return cfg.eval_every or max(1, math.ceil(steps_per_epoch / cfg.evals_per_epoch))


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]  # trainable params (CPU) at the best val loss, else the final ones
    history: list[dict] = field(default_factory=list)  # per step: step, epoch, train_loss, val_loss, lr, tokens_per_s
    steps: int = 0  # optimizer steps done (including those before a resume)
    tokens_seen: int = 0  # non-padding tokens processed in training, all processes
    seconds: float = 0.0  # training wall time (summed over resumed runs)
    best_val_loss: float | None = None
    best_step: int | None = None
    dp: dict | None = None  # differentially private training: the mechanism and the (epsilon, delta) spent


def count_targets(example: dict) -> int:
    """Number of tokens the causal-LM loss is taken on: labels != -100 after the shift."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE)


# ---------------------------------------------------------------------------------------------
# batches and the default loss


def collate(examples: list[dict], pad_id: int = 0, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example: input_ids, attention_mask, labels (-100 on pads)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(e["labels"], dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over the label tokens (float32), and their number.

    Only the logits at target positions are cast to float32 and fed to the loss, which keeps the
    memory of the (batch x length x vocab) tensor to what the model itself produces.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    picked = logits[:, :-1][keep].float()
    return F.cross_entropy(picked, labels[keep], reduction="sum"), int(keep.sum())


# ---------------------------------------------------------------------------------------------
# the training loop


def train(
    model: torch.nn.Module,
    trainable: list[tuple[str, torch.nn.Parameter]] | None,
    train_examples: list[dict],
    val_examples: list[dict] | None,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    loss_fn: Callable | None = None,
    accelerator=None,
    *,
    pad_id: int | None = None,
    on_step: Callable[[dict], None] | None = None,
    val_loss_fn: Callable | None = None,
    run_info: dict | None = None,
    dp=None,
) -> TrainResult:
    """Train ``trainable`` (default: the parameters with ``requires_grad``) of ``model`` in place.

    * ``trainable``: ``(name, parameter)`` pairs of ``model``; all other parameters are frozen
      (``requires_grad=False``). The names key ``TrainResult.best_state`` and the checkpoints.
    * ``loss_fn(model, batch) -> (loss_sum, n_tokens)``: see the module docstring. Default
      :func:`causal_lm_loss`. ``val_loss_fn`` (default ``loss_fn``) computes the validation loss that
      selects the best state, e.g. plain LM loss (perplexity) while training with distillation.
    * ``accelerator``: an ``accelerate.Accelerator``; default one on CUDA if available, else CPU.
      The function prepares the model and optimizer itself.
    * ``out_dir``: where ``checkpoint/`` lives. If it holds a checkpoint of the same run, training
      resumes from it and ends exactly as an uninterrupted run would.
    * ``run_info``: what else defines the run (JSON), e.g. the owner's correction options: a
      checkpoint resumes only under the same (left out of the fingerprint when ``None``).
    * ``pad_id``: the padding token (any valid id works: pads are masked and carry no loss);
      default the model's ``pad_token_id``, else its ``eos_token_id``, else 0.
    * ``on_step(record)``: called on every process after each optimizer step (after validation and
      checkpointing) with the history record; an exception raised there stops training.
    * ``dp``: a :class:`offsite.dp.DPPlan`: DP-SGD with Opacus instead (Poisson batches of expected
      size ``cfg.batch_size``, per-example clipping and noise; see :mod:`offsite.dp`). The plain LM
      loss only (a ``loss_fn`` with ``added_gradient``, the owner's correction, adds that to the
      noisy gradient), one process, float32; ``cfg.max_grad_norm`` is replaced by the per-example clip.

    Returns a :class:`TrainResult`; with validation and ``cfg.restore_best`` the model is left
    holding the best state, otherwise the final one.
    """
    cfg.check()
    if not train_examples:
        raise OffsiteError("the training set has no examples; check the data source and its filters")
    train_examples = _checked(train_examples, cfg.max_length, "training")
    val_examples = _checked(val_examples, cfg.max_length, "validation") if val_examples else []
    custom_loss = loss_fn is not None
    loss_fn = loss_fn or causal_lm_loss
    shown_sum = getattr(loss_fn, "shown_sum", None)  # the LM part of a loss with more terms (module docstring)
    val_loss_fn = val_loss_fn or loss_fn

    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    accum = cfg.accumulation(world)
    device = accelerator.device
    if pad_id is None:
        pad_id = _default_pad_id(model)
    if dp is not None:
        _check_dp(dp, cfg, custom_loss, world, len(train_examples), loss_fn)

    # -- what trains: freeze the rest, remember each trainable parameter by its name in the model
    names, model_names = _resolve_trainable(model, trainable)

    decay = [p for p in _params(model, model_names) if p.ndim >= 2]
    no_decay = [p for p in _params(model, model_names) if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)

    # -- the plan: global batches per epoch and total optimizer steps
    n_train = len(train_examples)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = planned_steps(cfg, n_train)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    eval_every = validation_interval(cfg, steps_per_epoch)
    scheduler = _scheduler(cfg.schedule, optimizer, warmup, total_steps)

    if dp is None:
        model, optimizer = accelerator.prepare(model, optimizer)
        step_optimizer = optimizer
    else:  # Opacus wraps the model (per-example gradients) and AdamW (clip, noise); checkpoints keep AdamW's state
        from .dp import PerExample

        model = accelerator.prepare(model)
    params = _params(accelerator.unwrap_model(model), model_names)  # the prepared model's own tensors
    if dp is not None:
        per_example = PerExample(model, optimizer, dp)
        model, step_optimizer = per_example.model, per_example.optimizer
        if custom_loss:  # the owner's correction: added to the noisy gradient (post-processing, offsite.dp)
            per_example.add_after_noise(loss_fn.added_gradient)
    # accelerate's backward divides by its own accumulation steps; we accumulate ourselves
    loss_mult = 1.0 if str(accelerator.distributed_type).endswith("DEEPSPEED") else accelerator.gradient_accumulation_steps

    targets = [count_targets(e) for e in train_examples]
    lengths = [len(e["input_ids"]) for e in train_examples]

    # -- fresh start or resume
    state = {"step": 0, "tokens_seen": 0, "seconds": 0.0, "history": [], "best_val_loss": None, "best_step": None}
    best_state: dict[str, torch.Tensor] | None = None
    fingerprint = {"config": {k: getattr(cfg, k) for k in _RESUME_KEYS}, "n_train": n_train,
                   "data": _digest(train_examples), "trainable": names}
    if cfg.mixed_precision != "no":  # (only then: float32 checkpoints of earlier versions still resume)
        fingerprint["config"]["mixed_precision"] = cfg.mixed_precision
    if run_info is not None:
        fingerprint["run"] = run_info
    if dp is not None:
        fingerprint["dp"] = dp.fingerprint()
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.mixed_precision == "bf16"
                else nullcontext())
    ckpt_root = Path(out_dir) / "checkpoint" if out_dir is not None else None
    torch.manual_seed(cfg.seed + rank)  # dropout etc.; restored from the checkpoint on resume
    if ckpt_root is not None:
        loaded = _load_checkpoint(ckpt_root, fingerprint, names, params, optimizer, scheduler, rank)
        if loaded is not None:
            state, best_state = loaded

    # -- the loop
    step = state["step"]
    history: list[dict] = state["history"]
    bar = None
    if cfg.progress and accelerator.is_main_process and step < total_steps:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    model.train()
    epoch_of_perm, perm = -1, None
    run_start = seg_start = time.perf_counter()  # seg_start: wall time not yet added to state["seconds"]
    run_tokens = 0
    while step < total_steps:
        t0 = time.perf_counter()
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != epoch_of_perm:
            perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
            epoch_of_perm = epoch
        if dp is not None:
            from .dp import poisson_batch

            batch = poisson_batch(n_train, dp.sample_rate, cfg.seed, step)
            n_tokens = sum(lengths[j] for j in batch)
            train_loss = _dp_backward(model, step_optimizer, batch, train_examples, targets, cfg.micro_batch_size,
                                      accelerator, pad_id, device)
            lm_loss = None
        else:
            batch = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            n_tokens = sum(lengths[j] for j in batch)
            train_loss, lm_loss = _backward(model, loss_fn, batch, train_examples, targets, cfg, accum, accelerator,
                                            autocast, pad_id, device, params, loss_mult, shown_sum)
        if not math.isfinite(train_loss):  # stop before the step: the weights are still the good ones
            _diverged(step + 1, f"the training loss is {train_loss}", ckpt_root, bar)
        lr = scheduler.get_last_lr()[0]
        step_optimizer.step()
        scheduler.step()
        step_optimizer.zero_grad(set_to_none=True)
        step += 1
        bad = _non_finite_param(names, params)
        if bad is not None:
            _diverged(step, f"parameter {bad!r} holds NaN or infinite values", ckpt_root, bar)
        dt = time.perf_counter() - t0
        state["tokens_seen"] += n_tokens
        run_tokens += n_tokens
        record = {"step": step, "epoch": step / steps_per_epoch, "train_loss": train_loss, "val_loss": None,
                  "lr": lr, "tokens_per_s": n_tokens / dt if dt > 0 else None}
        if dp is not None:
            record["examples"] = len(batch)
        if lm_loss is not None:
            record["lm_loss"] = lm_loss

        if val_examples and (step % eval_every == 0 or step == total_steps):
            val_loss = _validate(model, val_examples, val_loss_fn, cfg.micro_batch_size, accelerator, pad_id)
            record["val_loss"] = val_loss
            if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
                state["best_val_loss"], state["best_step"] = val_loss, step
                best_state = _snapshot(names, params)
        history.append(record)

        if bar is not None:
            elapsed = time.perf_counter() - run_start
            post = {"loss": f"{record.get('lm_loss', train_loss):.4f}", "lr": f"{lr:.2e}", "tok/s": f"{run_tokens / max(elapsed, 1e-9):.0f}"}
            if record["val_loss"] is not None:
                post["val"] = f"{record['val_loss']:.4f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)

        if ckpt_root is not None and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total_steps):
            now = time.perf_counter()
            state.update(step=step, history=history, seconds=state["seconds"] + now - seg_start)
            seg_start = now
            _save_checkpoint(ckpt_root, accelerator, fingerprint, state, names, params, best_state,
                             optimizer, scheduler)
        if on_step is not None:
            on_step(record)
    if bar is not None:
        bar.close()

    seconds = state["seconds"] + time.perf_counter() - seg_start
    if best_state is not None and cfg.restore_best:
        _load_into(params, names, best_state)
    if best_state is None:
        best_state = _snapshot(names, params)
    accelerator.wait_for_everyone()
    if dp is not None:
        per_example.close()  # no hooks, no per-example gradients: the model is the caller's again
    return TrainResult(best_state=best_state, history=history, steps=step, tokens_seen=state["tokens_seen"],
                       seconds=seconds, best_val_loss=state["best_val_loss"], best_step=state["best_step"],
                       dp=dp.record(step, getattr(loss_fn, "after_noise", None) if custom_loss else None)
                       if dp is not None else None)


def _backward(model, loss_fn, batch, train_examples, targets, cfg, accum, accelerator, autocast, pad_id, device,
              params, loss_mult, shown_sum=None) -> tuple[float, float | None]:
    """Forward and backward of one global batch (this process's share of it, in micro-batches);
    the gradients clipped to ``cfg.max_grad_norm``. Returns the batch's token-mean training loss and,
    with ``shown_sum`` (the loss's LM part, module docstring), the token-mean LM loss (else None)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n_targets = sum(targets[j] for j in batch)
    scale = world / max(n_targets, 1) * loss_mult
    share = batch[rank::world]
    chunks = [share[k * cfg.micro_batch_size:(k + 1) * cfg.micro_batch_size] for k in range(accum)]
    local_sum = torch.zeros((), device=device, dtype=torch.float32)
    local_shown = torch.zeros((), device=device, dtype=torch.float32)
    for k, chunk in enumerate(chunks):
        weight = 1.0
        if not chunk:  # short last batch: this process has nothing left for this micro-step
            if world == 1:
                continue
            chunk, weight = batch[:1], 0.0  # keep DDP's collectives in step, contribute nothing
        examples = [train_examples[j] for j in chunk]
        sync = k == accum - 1
        with nullcontext() if sync else accelerator.no_sync(model):
            with autocast:
                loss_sum, got = loss_fn(model, collate(examples, pad_id, device))
            _check_count(got, sum(targets[j] for j in chunk))
            accelerator.backward(loss_sum * (scale * weight))
        local_sum += loss_sum.detach().float() * weight
        if shown_sum is not None:
            local_shown += shown_sum().detach().float().to(device) * weight

    if cfg.max_grad_norm is not None:
        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
    mean = (accelerator.reduce(local_sum, reduction="sum") / max(n_targets, 1)).item()
    shown = (accelerator.reduce(local_shown, reduction="sum") / max(n_targets, 1)).item() if shown_sum is not None else None
    return mean, shown


def _dp_backward(model, dp_optimizer, batch, train_examples, targets, micro_batch_size, accelerator, pad_id,
                 device) -> float:
    """Forward and backward of one Poisson batch for DP-SGD: per-example gradients of each
    example's mean token loss, micro-batch by micro-batch, clipped into Opacus's running sum (the
    optimizer's step adds the noise). Returns the batch's mean per-example loss (for the local log)."""
    from .dp import accumulate, empty_batch, per_example_lm_loss

    chunks = [batch[k:k + micro_batch_size] for k in range(0, len(batch), micro_batch_size)]
    total = 0.0
    for k, chunk in enumerate(chunks):
        if k:
            accumulate(dp_optimizer)  # clip the previous micro-batch's per-example gradients, free them
        losses, got = per_example_lm_loss(model, collate([train_examples[j] for j in chunk], pad_id, device))
        _check_count(got, sum(targets[j] for j in chunk))
        accelerator.backward(losses.sum())
        total += float(losses.detach().sum())
    if not chunks:
        empty_batch(dp_optimizer)
    return total / max(len(batch), 1)


def _check_dp(dp, cfg: TrainConfig, custom_loss: bool, world: int, n_train: int, loss_fn=None) -> None:
    """One line for what differentially private training cannot honour."""
    if custom_loss and not callable(getattr(loss_fn, "added_gradient", None)):
        raise OffsiteError("differentially private training takes the plain LM loss (Opacus clips each example's "
                           "gradient of it); a custom loss (distillation, FedProx) cannot be combined (the owner's "
                           "correction can: it is added after the noise)")
    if custom_loss and getattr(loss_fn, "base", None) is not None:
        raise OffsiteError("differentially private training adds the owner's correction to the plain LM loss's "
                           "noisy gradient; it cannot be combined with another loss term")
    if world > 1:
        raise OffsiteError("differentially private training runs on one process; run it without accelerate launch")
    if cfg.mixed_precision != "no":
        raise OffsiteError("differentially private training runs in float32; leave out --precision bf16")
    if dp.examples != n_train or dp.steps != planned_steps(cfg, n_train):
        raise OffsiteError(f"the DP plan was made for {dp.examples} examples and {dp.steps} steps, this run has "
                           f"{n_train} and {planned_steps(cfg, n_train)}")


@torch.no_grad()
def _validate(model, examples, loss_fn, micro_batch_size, accelerator, pad_id) -> float:
    """Token-weighted mean loss over ``examples``, each process taking its share of every round.

    Every process runs the same number of forwards (a process with nothing left runs a dummy one
    with weight 0), so DDP's per-forward collectives stay in step.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    order = sorted(range(len(examples)), key=lambda j: len(examples[j]["input_ids"]))  # less padding
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    per_round = micro_batch_size * world
    for start in range(0, len(order), per_round):
        round_ = order[start:start + per_round]
        mine, weight = round_[rank::world], 1.0
        if not mine:
            mine, weight = round_[:1], 0.0
        loss_sum, n = loss_fn(model, collate([examples[j] for j in mine], pad_id, accelerator.device))
        totals[0] += float(loss_sum) * weight
        totals[1] += float(n) * weight
    model.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# helpers


def _checked(examples: list[dict], max_length: int, what: str) -> list[dict]:
    """Validate the examples' shape; keep the last ``max_length`` tokens of longer ones."""
    out = []
    for i, e in enumerate(examples):
        if "input_ids" not in e or "labels" not in e or len(e["input_ids"]) != len(e["labels"]):
            raise OffsiteError(f"{what} example {i} needs input_ids and labels of equal length;"
                               " build examples with tokenize_qa or tokenize_text")
        if len(e["input_ids"]) == 0:
            raise OffsiteError(f"{what} example {i} is empty")
        if len(e["input_ids"]) > max_length:
            e = {"input_ids": list(e["input_ids"][-max_length:]), "labels": list(e["labels"][-max_length:])}
        out.append(e)
    return out


@torch.no_grad()
def _non_finite_param(names, params) -> str | None:
    """The first trainable parameter holding a NaN or an infinity, else None (one sync per step)."""
    flags = torch.stack([torch.isfinite(p).all() for p in params])
    if bool(flags.all()):
        return None
    return names[int((~flags).nonzero()[0])]


def _diverged(step: int, what: str, ckpt_root: Path | None, bar) -> None:
    """Stop training with one line; the last checkpoint written (all finite) stays as it is."""
    if bar is not None:
        bar.close()
    latest = ckpt_root / "LATEST" if ckpt_root is not None else None
    if latest is not None and latest.is_file():
        kept = f"the last good checkpoint ({latest.read_text().strip()}) is kept in {ckpt_root}"
    else:
        kept = "no checkpoint was written"
    raise OffsiteError(f"training diverged at step {step}: {what} (NaN or infinite values); stopped, "
                       f"{kept}; try a lower learning rate")


def _check_count(got, expected: int) -> None:
    got = int(got)
    if got != expected:
        raise OffsiteError(f"loss_fn returned n_tokens={got} for a micro-batch with {expected} target tokens"
                           " (labels != -100 after the shift); it must sum its loss over exactly those tokens")


def _default_pad_id(model) -> int:
    config = getattr(model, "config", None)
    for key in ("pad_token_id", "eos_token_id"):
        v = getattr(config, key, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if isinstance(v, int) and v >= 0:
            return v
    return 0


def _resolve_trainable(model, trainable) -> tuple[list[str], list[str]]:
    """Freeze everything but the trainable parameters; return (user names, names in the model)."""
    model_name = {id(p): n for n, p in model.named_parameters()}
    if trainable is None:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise OffsiteError("nothing to train: no parameter requires grad; pass the trainable parameters")
    names = [n for n, _ in trainable]
    if len(set(names)) != len(names):
        raise OffsiteError("the trainable parameters have duplicate names")
    missing = [n for n, p in trainable if id(p) not in model_name]
    if missing:
        raise OffsiteError(f"trainable parameter {missing[0]!r} is not a parameter of the model")
    wanted = {id(p) for _, p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    return names, [model_name[id(p)] for _, p in trainable]


def _params(model, model_names: list[str]) -> list[torch.nn.Parameter]:
    by_name = dict(model.named_parameters())
    return [by_name[n] for n in model_names]


def _scheduler(name: str, optimizer, warmup: int, total: int):
    from transformers import get_scheduler

    hf_name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[name]
    return get_scheduler(hf_name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _snapshot(names, params) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in zip(names, params)}


@torch.no_grad()
def _load_into(params, names, state: dict[str, torch.Tensor]) -> None:
    for n, p in zip(names, params):
        p.copy_(state[n].to(p.device, p.dtype))


def _digest(examples: list[dict]) -> str:
    """Fingerprint of the training data (so a checkpoint is not resumed on other data)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(torch.tensor([len(e["input_ids"])] + list(e["input_ids"]) + list(e["labels"]),
                              dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# checkpoints
#
# out_dir/checkpoint/
#   LATEST                  name of the newest complete step directory (replaced atomically)
#   step-00000050/
#     trainable.safetensors current trainable parameters
#     best.safetensors      best-validation parameters so far (if any)
#     optimizer.pt          optimizer state_dict (tensors and numbers only; loaded weights_only)
#     state.json            step, history, best val loss, scheduler state, run fingerprint
#     rng-<rank>.safetensors torch RNG states of each process (CPU, and CUDA if present)
#
# A step directory is written under a temporary name, fsynced, renamed, and only then named in
# LATEST; older step directories are removed afterwards. A crash at any point leaves the previous
# checkpoint usable. All processes must see the same out_dir (one machine or a shared filesystem).


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _save_checkpoint(root: Path, accelerator, fingerprint, state, names, params, best_state, optimizer,
                     scheduler) -> None:
    from safetensors.torch import save_file

    name = f"step-{state['step']:08d}"
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(_rng_state(), tmp / f"rng-{accelerator.process_index}.safetensors")
    _fsync_path(tmp / f"rng-{accelerator.process_index}.safetensors")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(_snapshot(names, params), tmp / "trainable.safetensors")
        if best_state is not None:
            save_file(best_state, tmp / "best.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        meta = {**state, "fingerprint": fingerprint, "scheduler": scheduler.state_dict()}
        (tmp / "state.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            _fsync_path(f)
        _fsync_path(tmp)
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / ".LATEST.tmp"
        latest_tmp.write_text(name + "\n")
        _fsync_path(latest_tmp)
        os.replace(latest_tmp, root / "LATEST")
        _fsync_path(root)
        for old in root.iterdir():
            if old.is_dir() and old.name != name and (old.name.startswith("step-") or old.name.startswith(".tmp-")):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(root: Path, fingerprint, names, params, optimizer, scheduler, rank):
    """Restore a checkpoint into params/optimizer/scheduler/RNG; return (state, best_state) or None."""
    from safetensors.torch import load_file

    latest = root / "LATEST"
    if not latest.is_file():
        return None
    ck = root / latest.read_text().strip()
    try:
        meta = json.loads((ck / "state.json").read_text())
        current = load_file(ck / "trainable.safetensors")
        best = load_file(ck / "best.safetensors") if (ck / "best.safetensors").is_file() else None
        opt_state = torch.load(ck / "optimizer.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise OffsiteError(f"cannot read the checkpoint in {ck} ({e}); delete {root} to start over") from e
    saved = meta.get("fingerprint", {})
    diff = [k for k in fingerprint if saved.get(k) != json.loads(json.dumps(fingerprint[k]))]
    if diff:
        detail = diff
        if "config" in diff:
            detail = [k for k in fingerprint["config"] if saved.get("config", {}).get(k) != fingerprint["config"][k]]
        raise OffsiteError(f"{root} belongs to a different run (differs in: {', '.join(map(str, detail))});"
                           " delete it or use another output directory")
    _load_into(params, names, current)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(meta["scheduler"])
    rng = ck / f"rng-{rank}.safetensors"
    if rng.is_file():
        r = load_file(rng)
        torch.set_rng_state(r["cpu"])
        if "cuda" in r and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(r["cuda"]))
    state = {k: meta[k] for k in ("step", "tokens_seen", "seconds", "history", "best_val_loss", "best_step")}
    return state, best
