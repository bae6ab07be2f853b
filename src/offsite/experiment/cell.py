"""The rows of one cell of the table, in their order, written once.

A *cell* is one (model, task, emulator recipe, budget, seed). Its rows, in the order they run:

* ``emu_zs``: the emulator as shipped; ``emu_ft``: the emulator with the adapter the data owner tuned
  on it (tuned here unless its bundle exists);
* ``full_zs``: the full model untouched;
* ``ceiling``: the same adapter, data, settings and seed tuned on the full model (what a perfect
  emulator gives); ``floor``: the same on as many of the model owner's public pairs (what the owner
  gets alone); both before the Plug-in, which may write into the full model;
* ``distilled``: the distilled Plug-in (:mod:`offsite.distilled_plugin`; only where the :class:`Lab`
  has a ``distill`` spec): the full model's adapter tuned on public inputs in the task's prompt,
  labelled by the emulator with the tuned adapter, plugged into the full model (before the Plug-in,
  which may write into the full model);
* ``plugin``: the tuned adapter plugged into the full model;
* ``full_ft``: every block of a fresh copy of the full model fine-tuned through the same loop.

:func:`run_cell` runs the rows asked for in this order; ``offsite run`` (:func:`offsite.experiment.run.run`)
and ``bench/paper.py`` both call it, each with a :class:`Lab` that says where the cell's models,
data and bundles come from and how a model is scored. With a :class:`RowCache`, a row already
computed for the same cell is read instead of computed again (files written atomically).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..bundle import load_adapter, load_emulator
from ..errors import OffsiteError
from ..files import write_json_atomic
from ..plug import plug, plug_into_emulator
from ..tune import TrainingData, TuneSettings, finetune_full, tune_ceiling, tune_to_dir

#: the rows of a cell, in the order :func:`run_cell` runs them
ROW_ORDER = ("emu_zs", "emu_ft", "full_zs", "ceiling", "floor", "distilled", "plugin", "full_ft")

#: what a row's log line calls it
ROW_LABELS = {"emu_zs": "Emulator ZS", "emu_ft": "Emulator FT", "full_zs": "Full ZS", "ceiling": "ceiling",
              "floor": "floor", "distilled": "distilled Plug-in", "plugin": "Plug-in", "full_ft": "Full FT"}


@dataclass
class Row:
    """One computed row: ``metrics`` per task name (the task, and ``text`` where scored beside it),
    the seconds its scoring took, its training figures (``extra``: ``train_seconds``,
    ``train_examples``, ``train_steps``, the floor's ``floor_source``), the per-document
    correctness per task where the scoring gives it (``correct``, for transfer and the harm check)
    and, where the scoring keeps them, each document's log-likelihood of every choice (``choices``,
    for rows computed from scores: the content benchmark's proxy)."""

    metrics: dict[str, dict]
    seconds: float
    extra: dict = field(default_factory=dict)
    correct: dict[str, list[float]] = field(default_factory=dict)
    cached: bool = False
    choices: dict[str, list[list[float]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "seconds": round(self.seconds, 2), "extra": self.extra,
                "correct": self.correct, **({"choices": self.choices} if self.choices else {})}

    @classmethod
    def from_json(cls, data: dict) -> Row:
        return cls(data["metrics"], data["seconds"], data.get("extra") or {}, data.get("correct") or {}, cached=True,
                   choices=data.get("choices") or {})


@dataclass
class Lab:
    """Where one cell's rows come from. ``base()`` gives the full model and its tokenizer (loaded on
    first need; never modified unless ``consume_base``: then the Plug-in is written into it, and it
    is dropped after); ``score(model, tokenizer, row)`` gives ``(metrics per task, correctness per
    task)``; ``data()`` the data owner's training data; ``floor_data()`` the owner's public pairs and
    their source; ``work(row)`` a checkpoint folder, removed once a row's training is done;
    ``fresh_full()`` a full model for Full FT (default: a copy of ``base()``'s). ``assistant()``: the
    owner's side of the assisted protocol for the adapter's tuning, or ``None``. ``score`` may also
    give a third element, each document's choice log-likelihoods per task (:attr:`Row.choices`).
    ``distill``: the task's template and label words for the distilled row
    (:class:`offsite.distilled_plugin.DistillSpec`), or ``None``."""

    display: str
    adapter_layers: tuple
    base: Callable
    score: Callable
    data: Callable[[], TrainingData]
    settings: TuneSettings
    full_ft_lr: float
    work: Callable[[str], Path]
    emulator_dir: Path | None = None
    adapter_dir: Path | None = None
    floor_data: Callable[[], tuple[TrainingData, str]] | None = None
    fresh_full: Callable | None = None
    consume_base: bool = False
    assistant: Callable | None = None
    distill: object = None  # offsite.distilled_plugin.DistillSpec
    log: Callable = print

    def emulator(self):
        if self.emulator_dir is None:
            raise OffsiteError("this cell has no emulator: only its full-model rows can run")
        return load_emulator(self.emulator_dir)

    def tuned_emulator(self):
        """The emulator with the tuned adapter, and the adapter bundle: tuned now (the bundle written
        to ``adapter_dir``) unless the bundle is there already, then written into a fresh load."""
        if self.adapter_dir is not None and (self.adapter_dir / "manifest.json").exists():
            bundle = load_adapter(self.adapter_dir)
            return plug_into_emulator(self.emulator(), bundle), bundle
        emu, data = self.emulator(), self.data()
        owner = self.assistant() if self.assistant else None
        self.log(f"tuning the adapter on the emulator ({len(data.items)} examples"
                 + (", owner in the loop)" if owner else ")"))
        bundle = tune_to_dir(emu, data, self.settings, self.adapter_dir, overwrite=True, assist=owner)
        return emu, bundle

    def adapter(self):
        if self.adapter_dir is not None and (self.adapter_dir / "manifest.json").exists():
            return load_adapter(self.adapter_dir)
        return self.tuned_emulator()[1]


class RowCache:
    """Rows of cells kept as files: ``root/<row>-<digest of what the row depends on>.json``
    (:func:`row_key`). A row found is read, not computed; a row computed is written atomically."""

    def __init__(self, root, keys: Callable[[str], dict] | None = None):
        self.root = Path(root) if root is not None else None
        self.keys = keys

    def path(self, row: str) -> Path | None:
        if self.root is None or self.keys is None:
            return None
        digest = hashlib.sha256(json.dumps(self.keys(row), sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.root / f"{row}-{digest}.json"

    def read(self, row: str) -> Row | None:
        path = self.path(row)
        if path is None or not path.is_file():
            return None
        try:
            return self.decode(row, json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OffsiteError(f"the cached row {path} is unreadable ({exc}); remove it to compute the row again") from None

    def write(self, row: str, result: Row) -> None:
        path = self.path(row)
        if path is not None:
            write_json_atomic(path, self.encode(row, result))

    def encode(self, row: str, result: Row) -> dict:
        return {"row": row, **result.to_json()}

    def decode(self, row: str, data: dict) -> Row:
        return Row.from_json(data)


#: what each row depends on, of a cell's description (see :func:`row_key`)
_DEPENDS = {"full_zs": ("eval",), "emu_zs": ("eval", "emulator"), "ceiling": ("eval", "layout", "training"),
            "floor": ("eval", "layout", "training", "floor"),
            "emu_ft": ("eval", "emulator", "training", "recipe"), "plugin": ("eval", "emulator", "training", "recipe"),
            "distilled": ("eval", "emulator", "training", "recipe", "distill"), "full_ft": ("eval", "training")}


def data_digest(data: TrainingData) -> str:
    """What identifies training data in a row's cache key: its source, kind and examples."""
    return hashlib.sha256(json.dumps([data.source, data.kind, data.items], default=str).encode()).hexdigest()[:16]


def describe_cell(model: str, task, evaluation: dict, emulator: dict | None, adapter_layers, settings: TuneSettings,
                  budget: str, data: TrainingData, assist: dict | None, floor: tuple | None,
                  distill: dict | None = None) -> dict:
    """A cell's description for :func:`row_key`: the model's name, the task (a name, or [name, sha256]
    of an own file), what the rows are scored on (``evaluation``), the emulator (method, options and
    its manifest's digest), the adapter's layout, the training (``budget``'s identity, the settings
    and the data's digest), the owner's correction (``assist``: its record, or None), the floor's
    (source, public pairs) or None, and the distilled row's spec (its record, or None)."""
    return {"model": model, "task": task, "eval": evaluation, "emulator": emulator,
            "layout": {"adapter_layers": list(adapter_layers), "blocks": settings.blocks},
            "training": {"budget": budget, "settings": repr(settings), "data": data_digest(data)},
            "recipe": assist, "floor": [floor[0], data_digest(floor[1])] if floor else None, "distill": distill}


def row_key(row: str, cell: dict) -> dict:
    """The part of a cell's description ``cell`` that ``row``'s result depends on: ``cell`` holds
    ``model`` and ``task`` and the groups ``eval`` (documents scored), ``emulator`` (method and
    options), ``layout`` (adapter layers and tuned blocks), ``training`` (budget, seed, data),
    ``recipe`` (the owner's correction), ``floor`` (its public pairs) and ``distill`` (the distilled
    row's template, label words and surrogate inputs); Full ZS, say, is shared by
    every emulator of the same model, task and documents."""
    return {"row": row, "model": cell["model"], "task": cell["task"],
            **{k: cell.get(k) for k in _DEPENDS[row]}}


def run_cell(lab: Lab, rows, cache: RowCache | None = None, on_row: Callable | None = None) -> dict[str, Row]:
    """The ``rows`` of one cell (any of :data:`ROW_ORDER`), in that order; each is read from
    ``cache`` when it holds it, else computed (and written there). ``on_row(row, result)`` is called
    as each row is ready. Returns {row: :class:`Row`}."""
    unknown = [r for r in rows if r not in ROW_ORDER]
    if unknown:
        raise OffsiteError(f"unknown row(s) {', '.join(unknown)}; a cell's rows: {', '.join(ROW_ORDER)}")
    done: dict[str, Row] = {}
    for row in [r for r in ROW_ORDER if r in rows]:
        result = cache.read(row) if cache else None
        if result is None:
            result = _COMPUTE[row](lab)
            if cache:
                cache.write(row, result)
        else:
            lab.log(f"{ROW_LABELS[row]}: read from the row cache")
        done[row] = result
        if on_row:
            on_row(row, result)
    return done


def _scored(lab: Lab, model, tokenizer, row: str, extra: dict | None = None) -> Row:
    lab.log(f"{ROW_LABELS[row]} ...")
    t0 = time.perf_counter()
    metrics, correct, *choices = lab.score(model, tokenizer, row)
    seconds = time.perf_counter() - t0
    lab.log(f"{ROW_LABELS[row]}: {seconds:.1f}s")
    return Row(metrics, seconds, extra or {}, correct or {}, choices=choices[0] if choices else {})


def _training(bundle_or_result) -> dict:
    """The training figures of a row: from an adapter bundle's record or a training result."""
    t = getattr(bundle_or_result, "training", None)
    if t is not None:
        return {"train_seconds": t.get("seconds"), "train_examples": t.get("examples"), "train_steps": t.get("steps")}
    return {"train_seconds": round(bundle_or_result.seconds, 2), "train_steps": bundle_or_result.steps}


def _emu_zs(lab: Lab) -> Row:
    emu = lab.emulator()
    return _scored(lab, emu.model, emu.tokenizer, "emu_zs")


def _emu_ft(lab: Lab) -> Row:
    emu, bundle = lab.tuned_emulator()
    return _scored(lab, emu.model, emu.tokenizer, "emu_ft", _training(bundle))


def _full_zs(lab: Lab) -> Row:
    model, tokenizer = lab.base()
    return _scored(lab, model, tokenizer, "full_zs")


def _full_model_row(lab: Lab, row: str) -> Row:
    """The ceiling (on the data owner's data) or the floor (on the owner's public pairs): the same
    adapter tuned on the full model, which is not modified."""
    model, tokenizer = lab.base()
    data, source = lab.floor_data() if row == "floor" else (lab.data(), None)
    lab.log(f"{row}: tuning the adapter on the full model on {len(data.items)} "
            + (f"public {source} pairs" if source else "examples"))
    full_middle, _, trained = tune_ceiling(model, tokenizer, lab.display, lab.adapter_layers, data, lab.settings,
                                           lab.work(row))
    extra = {**_training(trained), "train_examples": len(data.items), **({"floor_source": source} if source else {})}
    return _scored(lab, full_middle.model, tokenizer, row, extra)


def _plugin(lab: Lab) -> Row:
    from ..bundle import load_emulator_manifest

    bundle = lab.adapter()
    model, tokenizer = lab.base()
    target = model if lab.consume_base else copy.deepcopy(model)
    plugged = plug(target, bundle, load_emulator_manifest(lab.emulator_dir))
    if lab.consume_base:
        lab.base = _gone
    return _scored(lab, plugged, tokenizer, "plugin", _training(bundle))


def _distilled(lab: Lab) -> Row:
    from ..bundle import load_emulator_manifest
    from ..distilled_plugin import distill_plugin

    if lab.distill is None:
        raise OffsiteError("this cell has no distillation spec (the task's template and label words): the "
                           "distilled row cannot run")
    bundle = lab.adapter()
    model, tokenizer = lab.base()
    lab.log(f"distilled Plug-in: labelling {lab.distill.examples} public inputs with the tuned emulator, tuning "
            "the full model's adapter on them")
    distilled, record = distill_plugin(model, tokenizer, lab.emulator(), bundle, lab.distill, lab.settings,
                                       lab.work("distilled"))
    plugged = plug(copy.deepcopy(model), distilled, load_emulator_manifest(lab.emulator_dir))
    return _scored(lab, plugged, tokenizer, "distilled", {**_training(distilled), "distill": record})


def _full_ft(lab: Lab) -> Row:
    if lab.fresh_full:
        model, tokenizer = lab.fresh_full()
    else:
        model, tokenizer = lab.base()
        model = copy.deepcopy(model)
    data = lab.data()
    lab.log(f"Full FT: training every block ({len(data.items)} examples)")
    trained = tune_full_ft(model, tokenizer, data, lab.settings, lab.full_ft_lr, lab.work("full_ft"))
    return _scored(lab, model, tokenizer, "full_ft", {**_training(trained), "train_examples": len(data.items)})


def tune_full_ft(model, tokenizer, data: TrainingData, settings: TuneSettings, lr: float, work: Path):
    """The Full FT row's training: every block of ``model`` fine-tuned in place with ``settings`` at
    the learning rate ``lr`` (the budget's ``full_ft_lr``). Checkpoints go to ``work``, removed once
    done. Returns the training result."""
    result = finetune_full(model, tokenizer, data, replace(settings, train=replace(settings.train, lr=lr)), work)
    shutil.rmtree(work, ignore_errors=True)
    return result


def public_pairs_of(public: TrainingData, n: int) -> TrainingData:
    """The floor's training data: the first ``n`` of the owner's ``public`` pairs (all of them where
    it has fewer), as many as the data owner tunes on."""
    return TrainingData(public.kind, public.items[:n], source=public.source)


def _gone():
    raise OffsiteError("the full model was consumed by the Plug-in; a row after it needs fresh_full")


_COMPUTE = {"emu_zs": _emu_zs, "emu_ft": _emu_ft, "full_zs": _full_zs, "ceiling": lambda lab: _full_model_row(lab, "ceiling"),
            "floor": lambda lab: _full_model_row(lab, "floor"), "distilled": _distilled, "plugin": _plugin,
            "full_ft": _full_ft}

__all__ = ["Lab", "ROW_ORDER", "Row", "RowCache", "data_digest", "describe_cell", "public_pairs_of", "row_key", "run_cell",
           "tune_full_ft"]
