"""How much work a run does: one :class:`Budget` type for ``offsite run`` (its ``--preset``) and
``bench/paper.py`` (its budget flags), so the two run the same pipeline with the same numbers.

A budget fixes the data (the first ``train_limit`` training examples of a task, in its fixed hash
order; the first ``eval_limit`` evaluation documents, the same for every row), the adapter's
training (``lr``, ``epochs``, batch, schedule, seed, example length), the Full FT row's learning
rate, and the held-out text: ``offsite run`` scores perplexity on ``text_docs`` documents beside
the task, the benchmark treats ``text`` as a task of its own (tuned on ``text_train_limit``
public-text documents cut into ``text_block``-token blocks). :data:`PRESETS` are the named budgets;
``paper`` is the benchmark's default (docs/protocol.md, "Budget").

A benchmark's results file and cache are keyed by :meth:`Budget.identity` (what changes a result);
``full_ft`` (whether the Full FT row runs unless asked otherwise), ``checkpoint_every`` and
``text_docs`` (``offsite run`` only) are not part of it, so results written before those fields
joined the type keep their identity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from ..errors import OffsiteError
from ..train import TrainConfig
from ..tune import TrainingData, TuneSettings, task_data

FULL_FT_LR = 2e-5  # fine-tuning every block (the Full FT row): the paper's ft_all.sh

#: fields that do not change a result (or that the benchmark does not read): left out of the identity
NOT_IDENTITY = ("text_docs", "full_ft", "checkpoint_every")


@dataclass(frozen=True)
class Budget:
    """What one run (or one benchmark cell) may spend; see the module docstring."""

    eval_limit: int | None = 1000  # first N evaluation documents (None: every one)
    train_limit: int | None = 1000  # first N training examples (None: the whole split)
    text_train_limit: int | None = 64  # the benchmark's text task: public-text training documents
    text_block: int = 512  # ... cut into blocks of this many tokens
    lr: float = TrainConfig.lr  # the adapter's learning rate
    full_ft_lr: float = FULL_FT_LR
    epochs: float = 1.0
    batch_size: int = 8
    micro_batch_size: int = 8
    schedule: str = "linear"
    seed: int = 42
    max_length: int = 1024
    adapter: str = "full"
    text_docs: int | None = None  # offsite run: held-out text documents for perplexity (0: skip; None: all)
    full_ft: bool = False  # offsite run: whether the Full FT row runs by default
    checkpoint_every: int | None = 50

    def identity(self) -> dict:
        """The fields that change a result: a results file's ``meta.budget``, the cache's key."""
        return {k: v for k, v in asdict(self).items() if k not in NOT_IDENTITY}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:10]

    def tag(self) -> str:
        """'' for the benchmark's default budget, else a short readable name of what differs."""
        default = Budget().identity()
        mine = self.identity()
        if mine == default:
            return ""
        parts = []
        for name, short in (("eval_limit", "e"), ("train_limit", "t")):
            v = mine[name]
            if v != default[name]:
                parts.append(f"{short}{'all' if v is None else v}")
        rest = {k: v for k, v in mine.items() if k not in ("eval_limit", "train_limit")}
        if rest != {k: v for k, v in default.items() if k not in ("eval_limit", "train_limit")}:
            parts.append(self.digest()[:6])
        return "-".join(parts)

    @classmethod
    def from_identity(cls, identity: dict) -> Budget:
        """The budget a results file's ``meta.budget`` names (unknown keys refused)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(identity) - names)
        if unknown:
            raise OffsiteError(f"a budget with unknown field(s) {', '.join(unknown)}")
        return cls(**identity)

    def train_config(self, task: str | None = None, lr: float | None = None, progress: bool = True) -> TrainConfig:
        """The training loop's settings for ``task`` (``text``: blocks of ``text_block`` tokens) at the
        adapter's learning rate unless ``lr`` is given (Full FT: ``full_ft_lr``)."""
        return TrainConfig(lr=self.lr if lr is None else lr, epochs=self.epochs, batch_size=self.batch_size,
                           micro_batch_size=self.micro_batch_size, schedule=self.schedule, seed=self.seed,
                           max_length=self.text_block if task == "text" else self.max_length,
                           warmup_ratio=0.0, checkpoint_every=self.checkpoint_every, progress=progress)

    def tune_settings(self, task: str | None = None, lr: float | None = None, progress: bool = True) -> TuneSettings:
        return TuneSettings(adapter=self.adapter, train=self.train_config(task, lr, progress))

    def training_data(self, task) -> TrainingData:
        """What the adapter is tuned on: the first ``train_limit`` examples of a task's training split
        (an own task file: all of its rows); for ``text`` the first ``text_train_limit`` public-text
        training documents."""
        if task == "text":
            from ..data.text import public_text

            return TrainingData("text", list(public_text("train"))[:self.text_train_limit], source="text")
        data = task_data(task)
        return TrainingData(data.kind, data.items[:self.train_limit], source=data.source)


PRESETS: dict[str, Budget] = {
    # minutes on a 2-core CPU: a smoke run of the whole pipeline
    "quick": Budget(eval_limit=100, train_limit=None, text_docs=4, epochs=1, checkpoint_every=20),
    # `make demo`: about 35 minutes on a 2-core CPU with the owner in the loop and the ceiling and floor rows
    "demo": Budget(eval_limit=500, train_limit=None, text_docs=8, epochs=2, checkpoint_every=20),
    # the benchmark's budget (bench/paper.py's default): one cell of its table; hours on a CPU for six tasks
    "paper": Budget(),
    # a GPU: the paper's recipe (5 epochs, batch 32, linear schedule), every document, Full FT on
    "gpu": Budget(eval_limit=None, train_limit=None, lr=2e-5, epochs=5, batch_size=32, micro_batch_size=32,
                  full_ft=True, checkpoint_every=100),
}


def preset(name: str) -> Budget:
    if name not in PRESETS:
        raise OffsiteError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


__all__ = ["Budget", "FULL_FT_LR", "PRESETS", "preset"]
