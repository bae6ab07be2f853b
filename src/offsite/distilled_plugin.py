"""The distilled Plug-in: the model owner carries the tuned emulator's task predictions to the full
model by weights, where the returned adapter plugged in as it is changes nothing.

On a content task an adapter tuned on a small emulator may learn the task there (Emulator FT) and
yet change no prediction of the full model once plugged in. The model owner holds everything needed
to carry it over: the full model, the emulator it shipped, the adapter the data owner returned and
public text. It

1. writes *surrogate inputs*: sentences of its public text (:func:`offsite.data.text.public_text`)
   put into the task's prompt template (:func:`surrogate_inputs`);
2. labels them with the emulator carrying the returned adapter (the *teacher*): each label word's
   log-likelihood, centred per label word over the surrogate set, argmax (:func:`teacher_labels`);
3. tunes the full model's adapter blocks, from the weights it shipped, on those (prompt, label)
   pairs with the data owner's training settings (:func:`offsite.tune.tune_ceiling`, the ceiling's
   training path), and returns that adapter as a bundle naming the shipped emulator, which
   :func:`offsite.plug.plug` checks and plugs like any returned adapter (:func:`distill_plugin`).

What the data owner gives up beyond the protocol: the task's prompt template and its label words
(:class:`DistillSpec`). Nothing else of its crosses; the plugged model then serves that task format
as tuned. ``offsite plug --distill-template T --distill-choices a,b`` runs it; a content task's spec
is :func:`content_spec`.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, fields, replace

import torch

from . import adapters
from .bundle import AdapterBundle
from .data.tasks import Doc
from .emulator.core import Emulator, state_digest
from .errors import OffsiteError
from .eval import score_mc
from .plug import plug_into_emulator
from .train import TrainConfig
from .tune import TrainingData, TuneSettings, adapter_bundle, tune_ceiling

SLOT = "{text}"
#: the public sentences kept as surrogate text: this many words (inclusive), starting upper-case
SENTENCE_WORDS = (5, 25)


@dataclass(frozen=True)
class DistillSpec:
    """What the model owner needs of the task: its prompt ``template`` (one or more ``{text}`` slots,
    each filled by ``sentences`` consecutive public sentences) and its label words ``choices``
    (scored as ``" " + choice``, as everywhere in offsite); and how many surrogate inputs
    (``examples``) drawn in which order (``seed``)."""

    template: str
    choices: tuple[str, ...]
    examples: int = 2000
    seed: int = 7
    sentences: int = 1

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))

    @property
    def slots(self) -> int:
        return self.template.count(SLOT)

    def check(self) -> None:
        if not self.slots:
            raise OffsiteError(f"the distillation template {self.template[:60]!r} has no {SLOT} slot for the input")
        if len(self.choices) < 2 or not all(c.strip() for c in self.choices):
            raise OffsiteError(f"the distillation needs at least 2 non-empty label words (got {list(self.choices)})")
        if len(set(self.choices)) != len(self.choices):
            raise OffsiteError(f"the distillation's label words repeat (got {list(self.choices)})")
        if self.examples < 1 or self.sentences < 1:
            raise OffsiteError(f"the distillation needs at least 1 example and 1 sentence per slot (got "
                               f"{self.examples} and {self.sentences})")

    def record(self) -> dict:
        return {**asdict(self), "choices": list(self.choices)}


def content_spec(name: str) -> DistillSpec:
    """The spec of a content task (:mod:`offsite.data.content`): its prompt with its surrogate's
    shape in place of the text (a mail's is ``Subject: {text}\\n{text}``), its label words, and its
    sentences per slot."""
    from .data.content import content_task

    task = content_task(name)
    if task.surrogate is None:
        raise OffsiteError(f"content task {name} has no single prompt template to distil on")
    return DistillSpec(task.prompt.format(text=task.surrogate), task.labels, sentences=task.surrogate_sentences)


def public_sentences() -> list[str]:
    """The sentences of the owner's public text (its ``train`` part, in order) of
    :data:`SENTENCE_WORDS` words that start with an upper-case letter."""
    from .data import text

    lo, hi = SENTENCE_WORDS
    return [s for doc in text.public_text("train") for s in text.split_sentences(doc)
            if lo <= len(s.split()) <= hi and s[0].isupper()]


def surrogate_inputs(spec: DistillSpec) -> list[str]:
    """``spec.examples`` prompts: the public sentences shuffled with ``random.Random(spec.seed)`` and
    drawn in that order, ``spec.sentences`` consecutive ones (joined by a space) per slot."""
    spec.check()
    pool = public_sentences()
    random.Random(spec.seed).shuffle(pool)
    per_slot, parts = spec.sentences, spec.template.split(SLOT)
    per_example = per_slot * spec.slots
    if spec.examples * per_example > len(pool):
        raise OffsiteError(f"the public text has {len(pool)} sentences; {spec.examples} surrogate inputs of "
                           f"{per_example} need {spec.examples * per_example}")
    out = []
    for i in range(spec.examples):
        drawn = pool[i * per_example:(i + 1) * per_example]
        texts = [" ".join(drawn[j * per_slot:(j + 1) * per_slot]) for j in range(spec.slots)]
        out.append(parts[0] + "".join(t + rest for t, rest in zip(texts, parts[1:])))
    return out


def teacher_labels(model, tokenizer, prompts: list[str], choices) -> tuple[list[int], list[float]]:
    """The teacher's label of each prompt: every choice's log-likelihood (:func:`offsite.eval.score_mc`),
    centred per choice over ``prompts`` (a label word the model favours everywhere does not win
    everywhere), argmax (the first on a tie). Returns (labels, each choice's share of them)."""
    docs = [Doc(f"s{i}", p, list(choices), 0) for i, p in enumerate(prompts)]
    res = score_mc(model, tokenizer, docs, batch_size=32, progress=False, return_details=True)
    lls = torch.tensor([d["lls"] for d in res["details"]])
    labels = (lls - lls.mean(0, keepdim=True)).argmax(1)
    return labels.tolist(), [float((labels == i).float().mean()) for i in range(len(choices))]


def settings_of(bundle: AdapterBundle) -> TuneSettings:
    """The data owner's training settings as its adapter's manifest states them (``training.config``,
    the adapter's kind and LoRA options, the blocks it tuned); TrainConfig's defaults for what it
    leaves out; without differential privacy (the owner tunes on its own public inputs)."""
    from .adapters import LoraOptions

    training = bundle.training or {}
    config = training.get("config") or {}
    known = {f.name for f in fields(TrainConfig)}
    settings = TuneSettings(adapter=bundle.kind, lora=LoraOptions(**(bundle.lora or {})),
                            train=TrainConfig(**{k: v for k, v in config.items() if k in known}),
                            blocks=training.get("blocks", "all"))
    settings.check()
    return settings


def distill_plugin(model, tokenizer, emulator: Emulator, bundle: AdapterBundle, spec: DistillSpec,
                   settings: TuneSettings, work) -> tuple[AdapterBundle, dict]:
    """The distilled adapter: ``emulator`` (the shipped one, loaded from its bundle; not modified) with
    the returned adapter ``bundle`` labels :func:`surrogate_inputs`, and the adapter blocks of
    ``model`` (not modified) are tuned on them with ``settings`` (without DP), checkpoints in ``work``.
    Returns (a full adapter of the same blocks naming ``emulator``, to plug like the returned one;
    the record: ``spec``'s fields, ``label_shares``, ``teacher_adapter_digest`` (the returned
    adapter's tensors, :func:`offsite.emulator.core.state_digest`) and ``seconds``)."""
    spec.check()
    if not (emulator.manifest or {}).get("digest"):
        raise OffsiteError("the distilled Plug-in needs the emulator as shipped (loaded from its bundle)")
    t0 = time.perf_counter()
    teacher = plug_into_emulator(copy.deepcopy(emulator), bundle)
    prompts = surrogate_inputs(spec)
    labels, shares = teacher_labels(teacher.model, teacher.tokenizer, prompts, spec.choices)
    del teacher
    data = TrainingData("qa", [(p, " " + spec.choices[label]) for p, label in zip(prompts, labels)],
                        source="surrogate")
    full_middle, tuned, _ = tune_ceiling(model, tokenizer, emulator.base["name"], emulator.adapter_layers, data,
                                         replace(settings, dp=None), work)
    state = adapters.extract(full_middle.model, full_middle.adapter_positions, "full")
    record = {**spec.record(), "label_shares": shares, "teacher_adapter_digest": state_digest(bundle.state),
              "seconds": round(time.perf_counter() - t0, 2)}
    return adapter_bundle(emulator, "full", state, training={**tuned.training, "distilled": record}), record


__all__ = ["DistillSpec", "SENTENCE_WORDS", "content_spec", "distill_plugin", "public_sentences", "settings_of",
           "surrogate_inputs", "teacher_labels"]
