"""Transfer recipes: does the adapter tuned on this emulator (with an owner-side treatment) help the
full model? One task, one recipe per call; the experiments behind docs/transfer.md.

    python bench/transfer_recipes.py run uniform:keep=13                       # ~7 min on 2 CPU cores
    python bench/transfer_recipes.py run uniform:keep=26 --zs                  # the ceiling (and Full ZS)
    python bench/transfer_recipes.py run uniform:keep=13 --correction webqs --correction-every 4   # owner in the loop
    python bench/transfer_recipes.py run uniform:keep=13 --repair webqs:512:kl # repaired adapter, delta plug-in
    python bench/transfer_recipes.py run my-recipe.toml --task sciq            # a recipe file (offsite.experiment.recipe)
    python bench/transfer_recipes.py diagnose uniform:keep=13                  # where the emulator's gradient goes wrong
    python bench/transfer_recipes.py collect --plot docs/img/transfer-probe.png --frontier docs/img/transfer-frontier.png \
        --privacy-utility docs/img/privacy-utility-transfer.png --doc docs/transfer.md   # also <task>-recipes, methods

A **recipe** is an :class:`offsite.experiment.recipe.Recipe` (method and options, adapter layout,
tuning, the owner in the loop), as ``offsite run`` takes it: a recipe file (``.toml``/``.json``), or,
as every run of the records file was named, the emulator's historical name ``KIND:opt=value:...``
with the flags ``--layers``, ``--adapter``, ``--lr``, ``--epochs``, ``--tune`` and ``--correction*``,
read into a Recipe in one place (:func:`historical_recipe`); a run takes everything from the Recipe
and writes the historical names back into its line (:func:`recipe_record`), the recipe beside them
(``recipe``; a tuning setting with no historical name, e.g. ``lr``, is named ``+lr=...``). The
recipe's tuning goes over :data:`BASE`. Treatments that are no part of a recipe stay flags:

* ``uniform:keep=K`` — the registered layer-drop method (``K = 26`` of the 26 middle blocks is the
  ceiling: the adapter tuned on the full model).
* ``--correction SOURCE --correction-every K`` (a recipe's ``[assist]``) — the model owner in the
  loop (:mod:`offsite.assist`, as ``offsite run --assist-every K``): every ``K`` steps the owner computes ``c = s·g_full −
  g_emulator`` (``g_full`` scaled to ``g_emulator``'s norm, tensor by tensor) on ``--correction-n``
  public pairs of ``SOURCE`` at the data owner's current adapter, added to the data owner's gradient;
  ``--correction-pool N``: each correction takes the next ``--correction-n`` of the first ``N``
  pairs, cycling. (The ``prune`` emulator and this script's own, static or unscaled or multi-source
  correction were removed on 2026-12-07; docs/transfer.md keeps their numbers, marked historical.)
* ``--train-task SOURCE`` — a floor: the same tuning on another task's training split (``webqs``:
  the owner's kind of public pairs), scored on ``--task``; named ``+data=SOURCE``. How much of the
  ceiling's gain comes without the data owner's data (its transfer: against the ceiling tuned on
  the task).
* ``--start-floor SOURCE:N`` — the owner first tunes the adapter (the blocks ``--tune`` trains) on its
  *full* model on the first ``N`` training pairs of ``SOURCE`` (the floor's tuning: what public pairs
  teach) and ships that adapter; the data owner tunes on the emulator from there, and the whole
  adapter is plugged in. Named ``+start=floor(SOURCE:N)``. Asks whether the emulator can carry what
  lies beyond the floor once the owner has handled the format. ``--build-at-floor`` also builds the
  emulator with that adapter in the full model (``gradmatch`` then matches the adapter's gradient
  where the data owner starts; cached apart, the bundle named ``..._floor-SOURCE-N``); named
  ``... (emulator built there)``.
* ``--repair SOURCE:N:lm|kl`` — the owner first tunes the adapter on the emulator with ``N`` public QA
  pairs (the *last* ``N`` of ``SOURCE``'s training split; LM loss on the answers, or KL to the full
  model's next-token distribution on every token), ships that adapter, and plugs in only the data
  owner's change: ``θ0 + (θ_tuned − θ_repaired)``.

Each ``run`` tunes the adapter (adapter 2,2 ``full`` unless the recipe says otherwise) on the task's
training split (its first ``--train-limit`` examples where given, as ``bench/paper.py``'s budget;
:data:`BASE` under the recipe's tuning: one epoch, batch 8, lr 1e-4, linear schedule, one validation
at the end, as the ``quick``/``demo`` presets did before validation ran several times an epoch), scores Emulator FT and
Plug-in on the first ``--limit`` evaluation documents, measures the held-out perplexity (4
documents) and the probes (``--probe``: ``text`` for public text, a task name for its first 48
training examples, e.g. ``webqs`` for public QA pairs the owner has; ``--probe-only`` stops there),
and appends one JSON line with per-document predictions to ``bench/results/transfer-recipes.records.jsonl``.
``collect`` turns those lines into the results file: per recipe and task ``emu_ft``/``plugin``
accuracies, the probes, and transfer with its paired standard error against the ceiling of the same
layout, ``--tune`` and task, and Full ZS; for a recipe measured on several tasks also transfer over
them (``task: "avg<k>"``, the tasks' gains averaged before the ratio) and a table per task, and a
table of every recipe measured on six tasks with its averages and whether it clears the transfer
issue's bar (``methods``). A run scored on more than the default 500 documents (``--limit 1000``,
the benchmark's budget) is its own recipe, named ``... [first 1000 docs]``, compared with the Full
ZS and ceiling scored on as many. Recipes of the results file that have no line in the records file
(the records of earlier runs were not kept) stay as they are.

``--tune bottom`` trains only the bottom adapter blocks (the top ones stay the original blocks on
the emulator and in the full model); its ceiling is ``uniform:keep=26 --tune bottom``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from offsite.assist import DEFAULT_SOURCE, MATCHED_SOURCE, AssistOptions
from offsite.errors import OffsiteError
from offsite.experiment.recipe import Recipe
from offsite.experiment.report import fill_generated as fill
from offsite.experiment.stats import above_noise, transfer
from offsite.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "transfer-recipes.json"
RECORDS = RESULTS.with_suffix(".records.jsonl")  # per-document predictions: kept, so collect can redo transfer
DIAGNOSIS = ROOT / "bench" / "results" / "transfer-diagnose.json"
EMULATORS = ROOT / "runs" / "transfer-recipes" / "emulators"
MODEL = "smollm2-135m"
N_LAYERS = 30  # its blocks: adapter + middle


def _first(o):
    return o[0] if isinstance(o, tuple) else o


def _opts(kind: str) -> tuple[str, dict]:
    """A historical emulator name ``KIND:opt=value:...`` as its parts (strings); read only by
    :func:`historical_recipe` and by collect, which names recipes so."""
    base, *rest = kind.split(":")
    return base, dict(x.split("=", 1) for x in rest)


# --------------------------------------------------------------------------------------------
# the recipe (offsite.experiment.recipe.Recipe)

#: the tuning every run starts from, a recipe's [tuning] on top (as a budget's under ``offsite run``):
#: one epoch, batch 8, lr 1e-4, linear schedule, no warm-up or checkpoints, one validation at the end
BASE = TrainConfig(lr=1e-4, epochs=1.0, batch_size=8, micro_batch_size=8, schedule="linear", warmup_ratio=0.0,
                   checkpoint_every=None, evals_per_epoch=1)
#: the historical recipe flags of ``run`` and their defaults (argparse's too): what a Recipe says
FLAGS = {"layers": "2,2", "adapter": "full", "lr": BASE.lr, "epochs": BASE.epochs, "tune": "all",
         "correction": "", "correction_every": 0, "correction_n": 128, "correction_pool": 0}


def _option(value: str, kind) -> object:
    """A method option written as text in a historical name, as its field's type (a float written as
    an integer stays one, so that the name the recipe prints back is the name it was read from)."""
    if kind is bool:
        if value.lower() not in ("true", "false"):
            raise SystemExit(f"error: {value!r} is not true or false")
        return value.lower() == "true"
    if kind is float and value.lstrip("-").isdigit():
        return int(value)
    return kind(value)


def historical_recipe(emulator: str, layers: str = FLAGS["layers"], adapter: str = FLAGS["adapter"],
                      lr: float = FLAGS["lr"], epochs: float = FLAGS["epochs"], tune: str = FLAGS["tune"],
                      correction: str = FLAGS["correction"], correction_every: int = FLAGS["correction_every"],
                      correction_n: int = FLAGS["correction_n"], correction_pool: int = FLAGS["correction_pool"]) -> Recipe:
    """The one reader of the historical names (those of the records file and docs/transfer.md): the
    emulator ``KIND:opt=value:...`` and the flags ``--layers``/``--adapter``/``--lr``/``--epochs``/
    ``--tune``/``--correction*``, as the :class:`Recipe` they describe. Everything after takes the
    Recipe; :func:`kind_of` and :func:`recipe_record` write the historical names back."""
    import dataclasses
    import typing

    from offsite.emulator import all_methods

    method, raw = _opts(emulator)
    if method not in all_methods():
        raise SystemExit(f"error: unknown emulator {emulator!r} (uniform:keep=K or a registered method with its "
                         "options; prune:... was removed on 2026-12-07)")
    cls = all_methods()[method].options_cls
    hints = typing.get_type_hints(cls)
    types = {f.name: next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
             for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise SystemExit(f"error: {method} has no option(s) {', '.join(unknown)}")
    if correction and ("," in correction or correction_every < 1):
        raise SystemExit("error: --correction takes one source and --correction-every >= 1 (static and "
                         "multi-source corrections were removed on 2026-12-07)")
    tuning = {k: v for k, v, default in (("adapter", adapter, "full"), ("blocks", tune, "all"), ("lr", lr, BASE.lr),
                                         ("epochs", epochs, BASE.epochs)) if v != default}
    assist = {"every": correction_every, "source": correction, "examples": correction_n,
              **({"pool": correction_pool} if correction_pool > correction_n else {})} if correction else {}
    return Recipe.from_dict({"method": method, "options": {k: _option(v, types[k]) for k, v in raw.items()},
                             "adapter_layers": layers, "tuning": tuning, "assist": assist}, emulator)


def recipe_of(a) -> Recipe:
    """``run``'s and ``diagnose``'s recipe: a recipe file (``.toml``/``.json``, without the
    historical flags), or the historical name with its flags (:func:`historical_recipe`)."""
    given = {k: getattr(a, k) for k in FLAGS if getattr(a, k, FLAGS[k]) != FLAGS[k]}
    if Path(a.recipe).suffix.lower() in (".toml", ".json"):
        if given:
            raise SystemExit(f"error: --{next(iter(given)).replace('_', '-')} is the recipe's: write it into "
                             f"{a.recipe}, or name the emulator instead of the file")
        recipe = Recipe.load(a.recipe)
        if recipe.floor_source is not None:
            raise SystemExit(f"error: {a.recipe}: floor_source is offsite run's floor row; this script's floor "
                             "is a run of its own (--train-task SOURCE)")
        return recipe
    return historical_recipe(a.recipe, **given)


def kind_of(recipe: Recipe) -> str:
    """The recipe's emulator as the records file names it: ``KIND:opt=value:...``."""
    return ":".join([recipe.method] + [f"{k}={v}" for k, v in recipe.options.items()])


def recipe_record(recipe: Recipe, tuned: bool = True) -> dict:
    """A records line's recipe keys, named as the records file always named them (``kind``,
    ``layers``; where they apply ``tune``, and on a line that tuned, ``epochs``, ``cv``, ``cv_norm``
    and ``cv_pool``), and the recipe itself (``recipe``: what else it tunes is named apart by
    :func:`tuning_named`)."""
    settings, assist = recipe.tune_settings(BASE), recipe.assist_options()
    rec = {"kind": kind_of(recipe), "layers": list(recipe.adapter_layers), "recipe": recipe.to_dict()}
    if settings.blocks != "all":
        rec["tune"] = settings.blocks
    if not tuned:  # a probe-only or zero-shot line: the emulator and the blocks, as ever
        return rec
    if settings.train.epochs != BASE.epochs:
        rec["epochs"] = settings.train.epochs
    if assist.on:
        rec["cv"] = [assist.source, assist.examples, 1.0, assist.every]
        rec["cv_norm"] = True  # offsite.assist always scales g_full to the emulator's norm
        if assist.pool:
            rec["cv_pool"] = assist.pool
    return rec


def tuning_named(r: dict) -> str:
    """What a records line's recipe tunes beyond the historical names (``+lr=3e-05``, ``+dp.epsilon=8``):
    part of its name, and of what its ceiling and floor must share; empty for the lines written before
    lines carried their recipe."""
    recipe = r.get("recipe") or {}
    parts = [f"{k}={v}" for k, v in recipe.get("tuning", {}).items() if k not in ("blocks", "epochs")]
    return "".join(f" +{p}" for p in parts + [f"dp.{k}={v}" for k, v in recipe.get("dp", {}).items()])


# --------------------------------------------------------------------------------------------
# the recipe's emulator


def build(recipe: Recipe, model, tok, at: tuple[str, dict] | None = None):
    """The recipe's emulator. A registered method other than ``uniform`` is built once and kept as a
    bundle under ``runs/transfer-recipes/emulators/`` (named after :func:`kind_of`; its build cost is
    in the bundle's manifest). ``at`` = ``(SPEC, state)``: built with the adapter ``state`` (bundle
    keys; the floor's of ``--start-floor SPEC``) in ``model``'s adapter blocks, so a method that
    distils around the shipped adapter (``gradmatch``) does so around that one, and the emulator
    ships it."""
    from contextlib import nullcontext

    from offsite.bundle import load_emulator, save_emulator
    from offsite.emulator import build_emulator
    from offsite.gradients import adapter_written

    layers = tuple(recipe.adapter_layers)
    # the full model holds the original block i at position i
    within = adapter_written(model, {i: i for i in range(N_LAYERS)}, at[1]) if at else nullcontext()
    suffix = f"_floor-{at[0].replace(':', '-')}" if at else ""
    with within:
        if recipe.method == "uniform":
            return build_emulator("uniform", model, tok, MODEL, layers, **recipe.options)
        cached = EMULATORS / f"{kind_of(recipe).replace(':', '_').replace('=', '-')}_{layers[0]}-{layers[1]}{suffix}"
        if (cached / "manifest.json").exists():
            return load_emulator(cached)
        emu = build_emulator(recipe.method, model, tok, MODEL, layers, **recipe.options)
        save_emulator(emu, cached)
        return emu


def middle_fraction(emu, model, layers) -> float:
    from offsite.emulator.core import split_layers
    from offsite.models.families import get_blocks, num_blocks

    _, mid, _ = split_layers(num_blocks(model.config), layers)
    return emu.middle_params() / sum(p.numel() for i in mid for p in get_blocks(model)[i].parameters())


# --------------------------------------------------------------------------------------------
# owner-side treatments


def tune(model, emu, data, settings, assist: AssistOptions | None = None):
    """The data owner's tuning, as ``offsite.tune`` does it (``settings``: the recipe's, its blocks
    included); ``assist``: with the model owner in the loop (:mod:`offsite.assist`, the one
    implementation of the correction), the owner holding the full ``model`` and its own copy of the
    emulator as shipped. Returns the adapter bundle."""
    from offsite.assist import Assistant
    from offsite.tune import tune_adapter

    owner = Assistant(model, copy.deepcopy(emu), assist) if assist is not None and assist.on else None
    return tune_adapter(emu, data, settings, assist=owner)[0]


def repair(model, emu, spec: str, lr: float, epochs: float) -> None:
    """The owner tunes the shipped adapter on the emulator with public QA pairs (in place)."""
    import torch.nn.functional as F

    from offsite import adapters
    from offsite.train import TrainConfig, train
    from offsite.tune import TrainingData, task_data, tokenize

    src, n, loss = spec.split(":")
    d = task_data(src)
    ex = tokenize(emu.tokenizer, TrainingData(d.kind, d.items[-int(n):], src), 1024)
    m = adapters.prepare(emu.model, emu.adapter_positions, "full", None)
    loss_fn = None
    if loss == "kl":  # every next token, against the full model's distribution
        ex = [{"input_ids": e["input_ids"], "labels": list(e["input_ids"])} for e in ex]

        def loss_fn(model_, batch):
            keep = batch["labels"][:, 1:] != -100
            with torch.no_grad():
                t = F.log_softmax(model(input_ids=batch["input_ids"],
                                        attention_mask=batch["attention_mask"]).logits.float(), -1)
            s = F.log_softmax(model_(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits.float(), -1)
            return (t.exp() * (t - s)).sum(-1)[:, :-1][keep].sum(), int(keep.sum())
    cfg = TrainConfig(lr=lr, epochs=epochs, batch_size=8, micro_batch_size=8, schedule="linear",
                      warmup_ratio=0.0, checkpoint_every=None, restore_best=False)
    train(m, None, ex, None, cfg, out_dir=None, loss_fn=loss_fn, pad_id=emu.tokenizer.pad_token_id)
    for p in emu.model.parameters():
        p.requires_grad_(False)
    emu.model.eval()


# --------------------------------------------------------------------------------------------
# commands


def floor_state(model, tok, spec: str, settings, layers) -> dict[str, torch.Tensor]:
    """The adapter tuned on the full ``model`` on the first ``N`` pairs of ``SOURCE`` (``spec`` =
    ``SOURCE:N``), as the floor is (``settings``: the recipe's, its blocks included); bundle keys."""
    from offsite.experiment.cell import ceiling_emulator
    from offsite.tune import TrainingData, task_data

    src, n = spec.split(":")
    d = task_data(src)
    full = ceiling_emulator(model, tok, MODEL, tuple(layers))
    return tune(model, full, TrainingData(d.kind, d.items[:int(n)], src), settings).state


def start_from_floor(model, emu, spec: str, settings, layers) -> None:
    """``--start-floor``: the adapter blocks of ``emu`` become the floor's (:func:`floor_state`)."""
    from offsite.adapters import param_names

    state = floor_state(model, emu.tokenizer, spec, settings, layers)
    names, params = param_names(emu.model, emu.adapter_positions), dict(emu.model.named_parameters())
    with torch.no_grad():
        for key, t in state.items():  # bundle keys, the same in the emulator and the full model
            params[names[key]].copy_(t)


def _command() -> str:
    return "python bench/transfer_recipes.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])


def cmd_run(a) -> None:
    """One recipe on ``--task``: its emulator measured (perplexity, probes), then tuned and plugged
    in; one records line (:func:`_append`)."""
    from offsite.models.load import load_model

    recipe = recipe_of(a)
    if a.build_at_floor and not a.start_floor:
        raise SystemExit("error: --build-at-floor builds the emulator around the --start-floor adapter: pass both")
    model, tok = load_model(MODEL)
    settings = recipe.tune_settings(BASE)
    at = None
    if a.build_at_floor:
        t1 = time.time()
        at = (a.start_floor, floor_state(model, tok, a.start_floor, settings, recipe.adapter_layers))
        at_s = time.time() - t1
    t0 = time.time()
    emu = build(recipe, model, tok, at)
    rec = {**recipe_record(recipe, tuned=False), "frac": middle_fraction(emu, model, recipe.adapter_layers),
           "build_s": time.time() - t0, "command": _command()}
    measure_emulator(rec, model, emu, tok, a.probe)
    if a.probe_only:
        return _append(rec)
    if a.zs or a.zs_only:
        _score(rec, "emu_zs", emu.model, tok, a.task, a.limit)
    if a.zs_only:
        return _append(rec)
    if at is not None:  # the emulator was built around the floor's adapter and ships it
        rec["start_floor"], rec["built_at_floor"] = [a.start_floor, at_s], True
    rec.update(recipe_record(recipe))
    tune_and_plug(rec, model, emu, a, recipe, settings)
    rec["total_s"] = time.time() - t0
    _append(rec)
    print(f"{kind_of(recipe)}: middle {rec['frac']:.3f}, ppl {rec['ppl']:.1f}, Emulator FT "
          f"{rec[f'emu_ft_{a.task}']:.3f}, Plug-in {rec[f'plugin_{a.task}']:.3f}")


def measure_emulator(rec: dict, model, emu, tok, probes: str) -> None:
    """The emulator's held-out perplexity (4 documents) and its probes (``text`` or a task's name,
    comma-separated), into ``rec``."""
    from offsite.eval import evaluate
    from offsite.probe import ProbeOptions, probe, probe_examples, task_probe_examples

    rec["ppl"] = evaluate(emu.model, tok, "text", limit=4, progress=False)["ppl"]
    opts = ProbeOptions()
    for src in filter(None, probes.split(",")):
        ex = probe_examples(tok, opts) if src == "text" else task_probe_examples(tok, src, opts)
        f = probe(model, emu, ex, opts)
        rec[f"probe_{src}"] = {k: round(v, 3) for k, v in f["grad_cos"].items() if k in ("all", "bottom", "top")}
        rec[f"ratio_{src}"] = round(f["grad_norm_ratio"]["all"], 2)


def _score(rec: dict, row: str, model, tok, task: str, limit: int) -> None:
    """``row``'s accuracy on the first ``limit`` documents of ``task`` and its per-document predictions."""
    from offsite.eval import correct

    c = correct(model, tok, task, limit=limit, progress=False)
    rec[f"{row}_{task}"], rec[f"{row}_pred_{task}"] = sum(c) / len(c), [int(x) for x in c]


def tune_and_plug(rec: dict, model, emu, a, recipe: Recipe, settings) -> None:
    """The owner-side treatments before tuning (``--start-floor``, ``--repair``), the data owner's
    tuning on the emulator (on ``--train-task``'s data where given; the owner in the loop where the
    recipe says so), Emulator FT, and the Plug-in (only the bottom blocks' change too, with
    ``--plug-bottom``), into ``rec``."""
    from offsite import adapters
    from offsite.eval import evaluate
    from offsite.tune import TrainingData, task_data

    task, layers = a.task, recipe.adapter_layers
    if a.start_floor and not rec.get("built_at_floor"):
        t1 = time.time()
        start_from_floor(model, emu, a.start_floor, settings, layers)
        rec["start_floor"] = [a.start_floor, time.time() - t1]
    theta0 = {k: v.clone() for k, v in emu.adapter_state().items()}
    if a.repair:
        t1 = time.time()
        repair(model, emu, a.repair, settings.train.lr, 1)
        rec["repair"] = [a.repair, 1, time.time() - t1]
    theta_r = {k: v.clone() for k, v in emu.adapter_state().items()}
    t1 = time.time()
    data = task_data(a.train_task or task)
    if a.train_task:  # a floor: the same tuning without the task's data
        rec["train_task"] = a.train_task
    if a.train_limit:  # the first N training examples, as bench/paper.py's --train-limit
        data = TrainingData(data.kind, data.items[:a.train_limit], data.source)
        rec["train_limit"] = a.train_limit
    bundle = tune(model, emu, data, settings, recipe.assist_options())
    rec[f"tune_s_{task}"] = time.time() - t1
    rec[f"emu_ft_{task}"] = evaluate(emu.model, emu.tokenizer, task, limit=a.limit, progress=False)["acc"]
    state = {k: theta0[k] + (v - theta_r[k]) for k, v in bundle.state.items()} if a.repair else bundle.state
    plug = lambda s: adapters.apply(copy.deepcopy(model), s, bundle.kind, bundle.lora).eval()  # noqa: E731
    _score(rec, "plugin", plug(state), emu.tokenizer, task, a.limit)
    if a.plug_bottom:  # only the bottom adapter blocks' change goes into the full model
        bottom_only = {k: (theta0[k] if int(k.split(".")[1]) >= N_LAYERS - layers[1] else v) for k, v in state.items()}
        _score(rec, "plugin_bottom", plug(bottom_only), emu.tokenizer, task, a.limit)


def _append(rec: dict) -> None:
    RECORDS.parent.mkdir(parents=True, exist_ok=True)
    with open(RECORDS, "a") as f:
        f.write(json.dumps(rec) + "\n")


def cmd_diagnose(a) -> None:
    """How the recipe's emulator's task gradient differs from the full model's, and which corrections fix it."""
    from offsite.models.load import load_model
    from offsite.gradients import adapter_gradients
    from offsite.probe import ProbeOptions, task_probe_examples
    from offsite.data.tokenize import tokenize_text
    from offsite.data.text import public_text

    recipe = recipe_of(a)
    model, tok = load_model(MODEL)
    emu = build(recipe, model, tok)
    pad, positions = tok.pad_token_id or 0, emu.adapter_positions

    def g(m, pos, ex):  # the adapter's gradient, flattened in the bundle's key order
        return torch.cat([t.flatten() for t in adapter_gradients(m, pos, ex, 4, pad).values()]).double()

    def both(ex):
        return g(emu.model, positions, ex), g(model, {s: s for s in positions.values()}, ex)

    cos = lambda x, y: float(x @ y / (x.norm() * y.norm()))  # noqa: E731
    task = task_probe_examples(tok, a.task, ProbeOptions(task_examples=96))
    (e1, m1), (e2, m2) = both(task[:48]), both(task[48:])
    et, mt = both(tokenize_text(tok, public_text("train"), 256)[1000:1016])
    out = {"recipe": kind_of(recipe), "task": a.task,
           "cos(E, M) on task examples": cos(e1, m1),
           "cos(M on set 1, M on set 2): the task gradient's consistency": cos(m1, m2),
           "cos(E-M on set 1, E-M on set 2): the emulator's bias is systematic": cos(e1 - m1, e2 - m2),
           "cos(E-M on task, E-M on public text)": cos(e1 - m1, et - mt),
           "cos(E - (E-M) on public text, M)": cos(e1 - (et - mt), m1),
           "cos(E - (E-M) on other task examples, M): an oracle correction": cos(e1 - (e2 - m2), m1)}
    for s in filter(None, a.sources.split(",")):
        ex = task_probe_examples(tok, s, ProbeOptions(task_examples=64))
        es, ms = both(ex)
        out[f"cos(E - (E-M) on {s}, M)"] = cos(e1 - (es - ms), m1)
    for k, v in out.items():
        print(f"{k}: {v if isinstance(v, str) else round(v, 3)}")
    write_diagnosis(out, _command(), recipe.adapter_layers)


def write_diagnosis(out: dict, command: str, layers=(2, 2)) -> None:
    """``bench/results/transfer-diagnose.json``: one record (``row: "diagnose"``) per cosine."""
    from offsite.experiment.results import meta, write_results

    base = {"model": MODEL, "task": out["task"], "method": out["recipe"], "setting": {"adapter_layers": list(layers)},
            "row": "diagnose"}
    write_results(DIAGNOSIS, meta(command), [{**base, "metric": k, "value": v} for k, v in out.items()
                                             if k not in ("recipe", "task")])


def run_task(r: dict) -> str:
    """The task a records line was tuned and scored on (a probe-only line: arc_easy, the default)."""
    for prefix in ("tune_s_", "plugin_pred_", "emu_zs_pred_"):
        for k in r:
            if k.startswith(prefix):
                return k[len(prefix):]
    return "arc_easy"


DEFAULT_LIMIT = 500  # evaluation documents a run scores unless ``--limit`` says otherwise
MORE_DOCS = " [first {n} docs]"  # the name's tail for a run scored on more documents than that


def run_docs(r: dict) -> int:
    """How many evaluation documents a records line was scored on (0: a probe-only line)."""
    task = run_task(r)
    return len(r.get(f"plugin_pred_{task}") or r.get(f"emu_zs_pred_{task}") or [])


def without_docs(kind: str) -> str:
    """A recipe's name without its ``[first N docs]`` tail."""
    return kind.split(MORE_DOCS.split("{")[0])[0]


def more_docs(kind: str) -> bool:
    """Whether a recipe's name says it was scored on more documents than the default (its own rows;
    left out of the plots, where the same recipe on the default documents already stands)."""
    return without_docs(kind) != kind


def recipe_key(r: dict) -> str:
    """The recipe's name in the results: emulator, then tuning and treatments; a run scored on more
    than ``DEFAULT_LIMIT`` documents says how many (its Full ZS and ceiling are scored on the same)."""
    name = r["kind"] + (" +tune=bottom" if r.get("tune") == "bottom" else "")
    name += f" +epochs={r['epochs']:g}" if r.get("epochs", 1) != 1 else ""
    name += tuning_named(r)
    name += f" +correction={r['cv'][0]}" if r.get("cv") else ""
    name += f" n={r['cv'][1]}" if r.get("cv") and r["cv"][1] != 128 else ""
    name += f" +start=floor({r['start_floor'][0]})" if r.get("start_floor") else ""
    name += " (emulator built there)" if r.get("built_at_floor") else ""
    name += f" +repair={r['repair'][0]}" if r.get("repair") else ""
    name += f" +data={r['train_task']}" if r.get("train_task") else ""
    name += f" every {r['cv'][3]} steps" if len(r.get("cv") or []) > 3 else ""
    name += f" from a pool of {r['cv_pool']}" if r.get("cv_pool") else ""
    name += " (norm-matched)" if r.get("cv_norm") else ""
    return name + (MORE_DOCS.format(n=run_docs(r)) if run_docs(r) > DEFAULT_LIMIT else "")


def _same_tuning(c: dict, r: dict) -> bool:
    """Whether two records lines tuned the same blocks the same way (epochs, the recipe's other tuning)."""
    return (c.get("tune") == r.get("tune") and c.get("epochs", 1) == r.get("epochs", 1)
            and tuning_named(c) == tuning_named(r))


def _ceiling_of(recs: list[dict], r: dict, task: str) -> dict | None:
    """The line of ``r``'s ceiling: every middle block kept, the same layout, tuning and documents."""
    layers = list(r["layers"])
    n_mid = N_LAYERS - sum(layers)
    return next((c for c in recs if c["kind"] == f"uniform:keep={n_mid}" and list(c["layers"]) == layers
                 and not any(c.get(k) for k in ("cv", "repair", "train_task", "start_floor"))
                 and _same_tuning(c, r) and f"plugin_pred_{task}" in c and run_docs(c) == run_docs(r)), None)


def _full_zs_of(recs: list[dict], r: dict, task: str) -> dict | None:
    """The line that scored Full ZS on ``r``'s documents: the untouched full model, whatever the
    layout (any "every block kept" run with ``--zs``)."""
    return next((c for c in recs if c["kind"] == f"uniform:keep={N_LAYERS - sum(c['layers'])}"
                 and f"emu_zs_pred_{task}" in c and run_docs(c) == run_docs(r)), None)


def _floor_of(recs: list[dict], r: dict, ceil: dict, task: str) -> dict | None:
    """The line of ``r``'s floor: the same blocks tuned on the full model on the owner's public pairs
    (the correction's or the shipped floor's source), no task data, on at least as many documents."""
    source = r["cv"][0] if r.get("cv") else r["start_floor"][0].split(":")[0] if r.get("start_floor") else None
    return next((c for c in recs if source and c["kind"] == ceil["kind"] and c.get("train_task") == source
                 and _same_tuning(c, r) and list(c["layers"]) == list(r["layers"])
                 and not c.get("cv") and not c.get("start_floor") and run_task(c) == task
                 and run_docs(c) >= run_docs(r)), None)


def _line_rows(r: dict, base: dict, task: str, limit: int, is_ceiling: bool, is_zs: bool) -> list[dict]:
    """A line's own records: held-out perplexity, probes, and its rows' accuracies."""
    out = []
    if "ppl" in r:
        out.append({**base, "task": "text", "row": "emu_zs", "metric": "ppl", "value": r["ppl"], "n": 4})
    for name in (k for k in r if k.startswith("probe_")):
        out.append({**base, "task": name[len("probe_"):], "row": "probe", "metric": "grad_cos",
                    "value": r[name]["all"], "groups": r[name]})
    n_docs = run_docs(r) or limit  # a task may have fewer
    for row in ("emu_zs", "emu_ft", "plugin"):
        if f"{row}_{task}" in r:
            out.append({**base, "row": "ceiling" if is_ceiling and row == "plugin" else row, "metric": "acc",
                        "value": r[f"{row}_{task}"], "n": n_docs})
    if is_zs:
        out.append({**base, "method": None, "row": "full_zs", "metric": "acc", "value": r[f"emu_zs_{task}"],
                    "n": n_docs})
    return out


def _ratio_fields(t: dict, gains: bool = True) -> dict:
    """A transfer's fields in a record; ``value``/``stderr`` ``None`` where the ceiling's gain is within
    noise (a ratio over noise means nothing)."""
    noise = not above_noise(t)
    out = {"value": None if noise else t["value"], "stderr": None if noise else t["stderr"], "n": t["n"],
           "ceiling_gain": t["ceiling_gain"], "ceiling_gain_stderr": t["ceiling_gain_stderr"]}
    return {**out, "plugin_gain": t["plugin_gain"], "plugin_gain_stderr": t["plugin_gain_stderr"]} if gains else out


def collect_records(recs: list[dict], limit: int) -> list[dict]:
    """Results-file records from the records lines: per line its task's rows, its perplexity and
    probes, and transfer against the ceiling of the same layout, tuning and task; per recipe
    measured on several tasks, transfer over them (``task: "avg<k>"``, numerator and denominator
    averaged over the tasks)."""
    out, pooled = [], {}
    for r in recs:
        task, layers = run_task(r), list(r["layers"])
        ceil, zs = _ceiling_of(recs, r, task), _full_zs_of(recs, r, task)
        base = {"model": MODEL, "task": task, "method": recipe_key(r), "setting": {"adapter_layers": layers},
                "middle_fraction": round(r["frac"], 4), "command": r.get("command")}
        if r.get("train_limit"):
            base["train_limit"] = r["train_limit"]
        out += _line_rows(r, base, task, limit, r is ceil, zs is r)
        if ceil is None or zs is None or r is ceil or f"plugin_pred_{task}" not in r:
            continue
        preds = (r[f"plugin_pred_{task}"], zs[f"emu_zs_pred_{task}"], ceil[f"plugin_pred_{task}"])
        t = transfer(*([p] for p in preds))
        out.append({**base, "row": "plugin", "metric": "transfer", **_ratio_fields(t)})
        pooled.setdefault((base["method"], tuple(layers)), {})[task] = (preds, base)
        floor = _floor_of(recs, r, ceil, task)
        if floor is not None and above_noise(t):  # documents are first-N: a floor on more is cut to these
            fp = floor[f"plugin_pred_{task}"][:run_docs(r)]
            out.append({**base, "row": "plugin", "metric": "transfer_beyond_floor",
                        **_ratio_fields(transfer([preds[0]], [fp], [preds[2]]), gains=False),
                        "floor": sum(fp) / len(fp), "floor_command": floor.get("command")})
    out += matched_records(out, pooled)
    for (method, layers), per_task in pooled.items():
        if len(per_task) > 1:
            tasks = sorted(per_task)
            t = transfer(*([per_task[k][0][i] for k in tasks] for i in range(3)))
            out.append({**per_task[tasks[0]][1], "task": f"avg{len(tasks)}", "tasks": tasks, "command": None,
                        "row": "plugin", "metric": "transfer", "value": t["value"], "stderr": t["stderr"],
                        "n": t["n"], "ceiling_gain": t["ceiling_gain"], "ceiling_gain_stderr": t["ceiling_gain_stderr"],
                        "plugin_gain": t["plugin_gain"], "plugin_gain_stderr": t["plugin_gain_stderr"]})
    return out


def matched_records(out: list[dict], pooled: dict) -> list[dict]:
    """A recipe with the WebQuestions correction becomes ``+correction=matched`` where the same
    recipe was also run with each task's matched source (``MATCHED_SOURCE``): its per-task rows and
    transfer are those runs' (each record keeps its run's command; of a task's runs on the default
    and on more documents, the one on the most), and ``pooled`` gains it, so that its average over
    the tasks is computed like any recipe's."""
    added = []
    bases: dict[tuple, set] = {}  # every task a recipe was run on, on any number of documents
    for (m, layers), per_task in pooled.items():
        bases.setdefault((without_docs(m), layers), set()).update(per_task)
    for (method, layers), tasks in bases.items():
        if f"+correction={DEFAULT_SOURCE}" not in method:
            continue
        name = method.replace(f"+correction={DEFAULT_SOURCE}", "+correction=matched")
        chosen = {}
        for task in tasks | set(MATCHED_SOURCE):
            src = MATCHED_SOURCE.get(task, DEFAULT_SOURCE)
            run = method.replace(f"+correction={DEFAULT_SOURCE}", f"+correction={src}")
            runs = [m for (m, lay), tasks in pooled.items()
                    if lay == layers and task in tasks and without_docs(m) == run]
            if runs:  # the run on the most documents
                chosen[task] = max(runs, key=lambda m: len(pooled[(m, layers)][task][0][0]))
        if len(chosen) < 2 or not any(task in MATCHED_SOURCE for task in chosen):
            continue
        for task, run in chosen.items():
            added += [{**r, "method": name} for r in out if r["method"] == run and r["task"] == task
                      and tuple(r["setting"]["adapter_layers"]) == layers]
            preds, base = pooled[(run, layers)][task]
            pooled.setdefault((name, layers), {})[task] = (preds, {**base, "method": name})
    return added


def cmd_collect(a) -> None:

    from offsite.experiment.results import meta, write_results

    out = collect_records([json.loads(line) for line in open(RECORDS)], a.limit)

    def key(o):  # a record's place: what a new line re-measures replaces it, nothing else does
        return o["method"], tuple(o["setting"]["adapter_layers"]), o["task"], o["row"], o["metric"]

    new = {key(o) for o in out}
    if RESULTS.exists():  # recipes measured before their records were kept
        kept = [o for o in json.loads(RESULTS.read_text())["records"] if key(o) not in new]
        out = kept + out
    write_results(RESULTS, meta("python bench/transfer_recipes.py collect"), out,
                  notes=[f"first {a.limit} evaluation documents of each task; adapter tuned one epoch on the task's "
                         "training split (its first train_limit examples where a record says so; batch 8, lr 1e-4); "
                         "each record's command made it"])
    print(f"wrote {RESULTS} ({len(out)} records)")
    print(markdown(out, a.task))
    print(tasks_markdown(out))
    print(methods_markdown(out))
    if a.plot:
        print(scatter(out, a.task, Path(a.plot)))
    if a.frontier:
        frontier(out, a.task, Path(a.frontier))
    if a.privacy_utility:
        privacy_utility(out, a.task, Path(a.privacy_utility))
    if a.doc:
        doc = Path(a.doc)
        text = fill(doc.read_text(), "recipes", markdown(out, a.task))
        for task in re.findall(r"<!-- begin generated: (\w+)-recipes\b", text):  # another task's recipes
            text = fill(text, f"{task}-recipes", markdown(out, task))
        text = fill(text, "tasks", tasks_markdown(out))
        text = fill(text, "methods", methods_markdown(out))
        doc.write_text(text)
        print(f"refreshed the tables of {doc}")


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share the mean rank
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def trained_on(kind: str, source: str) -> bool:
    """Whether the emulator was trained on ``source``'s pairs (``gradmatch``: its ``gm_sources``), so
    that its probe there is in-sample and says nothing about other data."""
    base, o = _opts(kind.split(" ")[0])
    return base == "gradmatch" and source in o.get("gm_sources", "webqs").split(",")


def scatter(records: list[dict], task: str, path: Path) -> str:
    """Transfer against the probe's cosine (public text and task examples), one point per emulator
    without a treatment; the ceiling sits at (1, 1). Returns a line with the rank correlations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = {}
    for r in records:
        if r["method"] is None or "+" in r["method"]:
            continue
        k = (r["method"], tuple(r["setting"]["adapter_layers"]))
        if r["row"] == "ceiling":
            continue  # (1, 1) by definition: drawn as a star, not counted in the correlation
        if r["metric"] == "transfer" and r["value"] is not None and r["task"] == task:
            pts.setdefault(k, {})["transfer"] = r["value"]
            pts[k]["stderr"] = r["stderr"]
        elif r["row"] == "probe" and not trained_on(r["method"], r["task"]):
            pts.setdefault(k, {})[f"probe_{r['task']}"] = r["value"]
    sources = ["text", task] + sorted({r["task"] for r in records if r["row"] == "probe"} - {"text", task})
    titles = {"text": "public text (the owner's probe)", task: f"{task} training examples (the data owner's)"}
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 4.2), sharey=True)
    line = []
    for ax, src in zip(axes, sources):
        key, title = f"probe_{src}", titles.get(src, f"{src} pairs (public QA, the owner's)")
        got = [(k, p) for k, p in pts.items() if key in p and "transfer" in p]
        xs, ys = [p[key] for _, p in got], [p["transfer"] for _, p in got]
        ax.errorbar(xs, ys, yerr=[p.get("stderr", 0) for _, p in got], fmt="o", capsize=3)
        ax.plot([1], [1], "*", ms=12, color="tab:green")
        ax.annotate("the full middle (ceiling)", (1, 1), fontsize=7, xytext=(-110, -4), textcoords="offset points")
        for (k, p), x, y in zip(got, xs, ys):
            ax.annotate(k[0].replace(":skip=0:w=rel", ""), (x, y), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        rho = spearman(xs, ys) if len(xs) > 2 else float("nan")
        line.append(f"{title}: Spearman {rho:.2f} over {len(xs)} emulators")
        ax.set_title(f"{title}\nSpearman rank correlation {rho:.2f} (n = {len(xs)})", fontsize=9)
        ax.set_xlabel("probe: adapter-gradient cosine, emulator vs full model")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel(f"transfer on {task} (Plug-in gain / ceiling gain)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return "; ".join(line)


def frontier(records: list[dict], task: str, path: Path) -> None:
    """Transfer against the gap, one line per emulator family as its size varies (recipes without a
    treatment; a family is the recipe with its size option, ``keep`` or ``width``, left out), and
    the recipes with a treatment as grey points (labelled where they transfer 0.55 or more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list] = {}
    treated = []  # recipes with an owner-side treatment or another tuning: points, not lines
    for (kind, _), c in recipe_cells(records, task).items():
        if "transfer" in c and "emu_ft" in c and c["transfer"]["value"] is not None and not more_docs(kind):
            family = ":".join(x for x in kind.split(" ")[0].split(":") if not x.startswith(("keep=", "width=")))
            gap = 100 * (c["plugin"]["value"] - c["emu_ft"]["value"])
            point = (c["frac"], gap, c["transfer"]["value"], c["transfer"]["stderr"])
            (treated.append((kind, *point)) if "+" in kind else lines.setdefault(family, []).append(point))
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for family, p in sorted(lines.items()):
        p.sort()
        ax.errorbar([x[1] for x in p], [x[2] for x in p], yerr=[x[3] for x in p], marker="o", capsize=3,
                    label=family)
        for frac, gap, t, _ in p:
            ax.annotate(f"{100 * frac:.0f} %", (gap, t), fontsize=7, xytext=(4, -9), textcoords="offset points")
    if treated:
        ax.errorbar([t[2] for t in treated], [t[3] for t in treated], yerr=[t[4] for t in treated], fmt="x",
                    color="grey", capsize=2, label="with an owner-side treatment or bottom-only tuning")
        best = sorted((t for t in treated if t[3] >= 0.55), key=lambda t: -t[3])
        for i, (kind, frac, gap, t, _) in enumerate(best):
            ax.annotate(kind.replace(" +tune=bottom", " bottom").replace("+correction=webqs every 4 steps", "corr/4")
                        .replace(" (norm-matched)", " scaled") + f" ({100 * frac:.0f} %)", (gap, t), fontsize=6,
                        xytext=(-250, 30 - 14 * i), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"})
    ax.axhline(0.7, color="tab:green", ls="--", lw=0.8)
    ax.axvline(5, color="tab:green", ls="--", lw=0.8)
    ax.annotate("the bar: transfer >= 0.7 at a gap >= 5", (5.3, 0.72), fontsize=7, color="tab:green")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("gap = Plug-in − Emulator FT (points; larger: more privacy)")
    ax.set_ylabel(f"transfer on {task} (Plug-in gain / ceiling gain)")
    ax.set_title(f"Transfer against gap as the emulator's size varies (labels: middle kept), {task}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def privacy_utility(records: list[dict], task: str, path: Path) -> None:
    """The privacy-utility picture with transfer as utility: Emulator FT (what the emulator alone
    does with the tuned adapter; lower: the owner gave away less) against transfer, one point per
    recipe on ``task`` (circles: the emulator alone, the papers' protocol; triangles: with the
    owner in the loop or another owner-side treatment), and a star per recipe measured on three
    tasks or more at its average over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    best = []  # treated recipes that transfer 0.55 or more: labelled in a column, with leader lines
    for (kind, _), c in recipe_cells(records, task).items():
        if "transfer" not in c or "emu_ft" not in c or c["transfer"]["value"] is None or more_docs(kind):
            continue
        treated = "+correction" in kind or "+repair" in kind
        x, t = 100 * c["emu_ft"]["value"], c["transfer"]
        ax.errorbar(x, t["value"], yerr=t["stderr"], fmt="^" if treated else "o", capsize=2, alpha=0.8,
                    color="tab:orange" if treated else "tab:blue")
        if not treated:
            ax.annotate(kind.split(" ")[0], (x, t["value"]), fontsize=6, xytext=(4, 2), textcoords="offset points")
        elif t["value"] >= 0.55:
            best.append((t["value"], x, kind))
    for i, (v, x, kind) in enumerate(sorted(best, reverse=True)):
        label = (kind.replace(" +tune=bottom", " bottom").replace(" +correction=webqs", " +owner")
                 .replace(" every 4 steps", "/4").replace(" (norm-matched)", " scaled"))
        ax.annotate(label, (x, v), fontsize=6, xytext=(0.42, 0.97 - 0.045 * i), textcoords="axes fraction",
                    va="top", arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"})
    for avg in (r for r in shown_averages(records) if len(r["tasks"]) > 2):
        key = (avg["method"], tuple(avg["setting"]["adapter_layers"]))
        fts = [recipe_cells(records, t)[key]["emu_ft"]["value"] for t in avg["tasks"]]
        x = 100 * sum(fts) / len(fts)
        ax.errorbar(x, avg["value"], yerr=avg["stderr"], fmt="*", ms=14, color="tab:red", capsize=3)
        ax.annotate(f"{avg['method'].split(' ')[0]} +owner, average of {len(avg['tasks'])} tasks", (x, avg["value"]),
                    fontsize=7, color="tab:red", xytext=(6, -12), textcoords="offset points")
    ax.plot([], [], "o", color="tab:blue", label=f"emulator alone (the papers' protocol), {task}")
    ax.plot([], [], "^", color="tab:orange", label=f"with an owner-side treatment, {task}")
    ax.axhline(0.7, color="tab:green", ls="--", lw=0.8, label="transfer 0.7")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("Emulator FT accuracy (%): lower, more of the model kept private")
    ax.set_ylabel("transfer = (Plug-in − Full ZS) / (ceiling − Full ZS): utility")
    ax.set_title("Privacy against utility, utility measured as transfer (smollm2-135m, adapter 2,2)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: what the tables say of a recipe that can no longer be run
HISTORICAL = "historical (produced by code removed on 2026-12-07)"


def historical(method: str) -> bool:
    """Whether a recipe was produced by code removed on 2026-12-07: the ``prune`` emulator, or this
    script's own correction where offsite.assist cannot run it (static: no ``every``; unscaled: not
    norm-matched; pooled over several sources)."""
    cv = re.search(r"\+correction=(\S+)", method)
    return method.startswith("prune:") or bool(cv and (" every " not in method or "(norm-matched)" not in method
                                                        or "," in cv.group(1)))


def recipe_name(method: str) -> str:
    """A recipe's name in a table: code-formatted, with a dagger where it is :data:`HISTORICAL`."""
    return f"`{method}`" + (" †" if historical(method) else "")


def historical_note(methods) -> list[str]:
    """The line under a table that shows a :data:`HISTORICAL` recipe (none otherwise)."""
    return ["", f"† {HISTORICAL}: the `prune` emulator and this script's static, unscaled or multi-source "
            "correction; the numbers stay as the record of what was measured."] if any(map(historical, methods)) else []


def recipe_cells(records: list[dict], task: str) -> dict[tuple, dict]:
    """The records of each recipe ``(method, adapter layers)`` measured on ``task``, in the order
    first measured, keyed by what they hold: ``ppl``, ``probe_<source>``, ``emu_zs``, ``emu_ft``,
    ``plugin`` or ``ceiling``, ``transfer``, ``transfer_beyond_floor``; and ``frac``, the middle kept. Full ZS (no method) is
    left out."""
    cells: dict[tuple, dict] = {}
    on_task = {(r["method"], tuple(r["setting"]["adapter_layers"])) for r in records
               if r["task"] == task and r["row"] != "probe"}
    for r in records:
        key = (r["method"], tuple(r["setting"]["adapter_layers"]))
        if r["method"] is None or key not in on_task:
            continue
        if r["row"] != "probe" and r["task"] not in (task, "text"):
            continue
        c = cells.setdefault(key, {"frac": r["middle_fraction"]})
        name = {"probe": f"probe_{r['task']}", "emu_zs": "ppl" if r["task"] == "text" else "emu_zs"}.get(
            r["row"], r["metric"] if r["metric"].startswith("transfer") else r["row"])
        c[name] = r
    return cells


def markdown(records: list[dict], task: str) -> str:
    """docs/transfer.md's table of the recipes: one line per recipe, in the order first measured."""
    zs = sorted((r for r in records if r["method"] is None and r["task"] == task), key=lambda r: r["n"])
    more = "".join(f"; {100 * r['value']:.1f} % on the first {r['n']}, where the recipe's name says so" for r in zs[1:])
    head = [f"Full ZS: {100 * zs[0]['value']:.1f} % on the first {zs[0]['n']} {task} documents (every row is scored "
            f"on them{more}); gap = Plug-in − Emulator FT."] if zs else []
    cells = recipe_cells(records, task)

    def pct(c, name):
        return f"{100 * c[name]['value']:.1f}" if name in c else "–"

    lines = [f"| recipe | adapter | middle kept | held-out ppl | probe: text | probe: {task} (bottom / top) | "
             "Emulator FT | Plug-in | gap | transfer | beyond the floor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, c in cells.items():
        pt = c.get(f"probe_{task}")
        probe_task = (f"{pt['value']:.2f} ({pt['groups']['bottom']:.2f} / {pt['groups']['top']:.2f})"
                      if pt and "bottom" in pt["groups"] else f"{pt['value']:.2f}" if pt else "–")
        plug = pct(c, "ceiling") + " (ceiling)" if "ceiling" in c else pct(c, "plugin")
        t = c.get("transfer")
        tr = f"{t['value']:.2f} ± {t['stderr']:.2f}" if t and t["value"] is not None else "–"
        ppl = f"{c['ppl']['value']:,.0f}" if "ppl" in c else "–"
        ptext = f"{c['probe_text']['value']:.2f}" if "probe_text" in c else "–"
        top = c.get("ceiling") or c.get("plugin")
        gap = f"{100 * (top['value'] - c['emu_ft']['value']):+.1f}" if top and "emu_ft" in c else "–"
        lines.append(f"| {recipe_name(k[0])} | {k[1][0]},{k[1][1]} | {100 * c['frac']:.0f} % | {ppl} | {ptext} | "
                     f"{probe_task} | {pct(c, 'emu_ft')} | {plug} | {gap} | {tr} | "
                     f"{_transfer_cell(c.get('transfer_beyond_floor'))} |")
    return "\n".join(head + [""] + lines + historical_note(k[0] for k in cells))


def task_rows(records: list[dict], avg: dict) -> dict[str, tuple]:
    """Per task of an average-over-tasks record: ``(Full ZS, ceiling, Emulator FT, Plug-in, transfer
    record)``, each row scored on the same documents (the ceiling: the same layout and tuning)."""
    key, out = (avg["method"], tuple(avg["setting"]["adapter_layers"])), {}
    for task in avg["tasks"]:
        cells = recipe_cells(records, task)
        c = cells[key]
        ceil = next(v["ceiling"] for k, v in cells.items() if "ceiling" in v and k[1] == key[1]
                    and ("+tune=bottom" in k[0]) == ("+tune=bottom" in key[0]) and v["ceiling"]["n"] == c["plugin"]["n"])
        zs = next(r["value"] for r in records if r["method"] is None and r["task"] == task
                  and r["n"] == c["plugin"]["n"])
        out[task] = (zs, ceil["value"], c["emu_ft"]["value"], c["plugin"]["value"], c["transfer"])
    return out


def task_means(rows: dict[str, tuple]) -> list[float]:
    """Full ZS, ceiling, Emulator FT and Plug-in of :func:`task_rows`, averaged over the tasks."""
    return [sum(v[i] for v in rows.values()) / len(rows) for i in range(4)]


def shown_averages(records: list[dict]) -> list[dict]:
    """The averages over tasks worth a table: every one, except a recipe's own-source average where
    its ``+correction=matched`` twin covers the same tasks and more (a subset of what the twin shows)."""
    avgs = [r for r in records if r["metric"] == "transfer" and r["task"].startswith("avg")]
    matched = {(r["method"], tuple(r["setting"]["adapter_layers"])): set(r["tasks"]) for r in avgs
               if "+correction=matched" in r["method"]}
    out = []
    for r in avgs:
        twin = (r["method"].replace(f"+correction={DEFAULT_SOURCE}", "+correction=matched"),
                tuple(r["setting"]["adapter_layers"]))
        if twin[0] != r["method"] and twin in matched and set(r["tasks"]) < matched[twin]:
            continue
        out.append(r)
    return out


def tasks_markdown(records: list[dict]) -> str:
    """docs/transfer.md's table of the recipes measured on several tasks: per task Full ZS, ceiling,
    Emulator FT, Plug-in, gap and transfer (where the ceiling gains at least two standard errors),
    then the average over those tasks (transfer with the tasks' gains averaged before the ratio,
    every task counted)."""
    lines = []
    for avg in shown_averages(records):
        layers = avg["setting"]["adapter_layers"]
        lines += [f"{recipe_name(avg['method'])} (adapter {layers[0]},{layers[1]}, {100 * avg['middle_fraction']:.0f} % of "
                  "the middle kept; ceiling: the same tuning on the full model):", "",
                  "| task | Full ZS | ceiling | Emulator FT | Plug-in | gap | transfer |", "|---|---|---|---|---|---|---|"]
        rows = task_rows(records, avg)
        for task, (*vals, t) in rows.items():
            tr = (f"{t['value']:.2f} ± {t['stderr']:.2f}" if t["value"] is not None else
                  f"– (ceiling gain {100 * t['ceiling_gain']:+.1f} ± {100 * t['ceiling_gain_stderr']:.1f}: within noise)")
            lines.append(f"| {task} | " + " | ".join(f"{100 * v:.1f}" for v in vals)
                         + f" | {100 * (vals[3] - vals[2]):+.1f} | {tr} |")
        mean = task_means(rows)
        lines.append(f"| **average of {len(rows)}** | " + " | ".join(f"{100 * v:.1f}" for v in mean)
                     + f" | {100 * (mean[3] - mean[2]):+.1f} | **{avg['value']:.2f} ± {avg['stderr']:.2f}** |")
        lines.append("")
    return "\n".join(lines + historical_note(a["method"] for a in shown_averages(records))[1:])


#: the bar of the transfer issue: transfer on the average and on these tasks, and the least gap
BAR = {"transfer": 0.7, "tasks": ("arc_easy", "sciq"), "gap": 5.0}


def _transfer_cell(t: dict | None) -> str:
    """A task's transfer with its standard error, and its documents where more than the default;
    "within noise" where the ceiling's gain over the row it is measured from is under two standard
    errors (nothing to carry)."""
    if t and t["value"] is None and "ceiling_gain" in t:
        return "within noise"
    if not t or t["value"] is None:
        return "–"
    return f"{t['value']:.2f} ± {t['stderr']:.2f}" + (f" ({t['n']} docs)" if t["n"] > DEFAULT_LIMIT else "")


def methods_markdown(records: list[dict], n_tasks: int = 6) -> str:
    """One line per recipe measured on ``n_tasks`` tasks: its averages over them (Full ZS, ceiling,
    Emulator FT, Plug-in, gap, transfer), transfer on the bar's tasks, the emulator's probe (public
    text and public QA pairs: the owner's, before shipping) and whether it clears the bar."""
    probes = {}  # the emulator's, whatever the recipe around it
    for r in records:
        if r["row"] == "probe" and r["method"] is not None:
            probes.setdefault((r["method"].split(" ")[0], tuple(r["setting"]["adapter_layers"]), r["task"]), r["value"])
    lines = ["| recipe | middle kept | Full ZS | ceiling | Emulator FT | Plug-in | gap | transfer | "
             + " | ".join(f"transfer: {t}" for t in BAR["tasks"]) + " | "
             + " | ".join(f"beyond the floor: {t}" for t in BAR["tasks"]) + " | probe: text / webqs | the bar |",
             "|---|---|---|---|---|---|---|---|" + "---|" * 2 * len(BAR["tasks"]) + "---|---|"]
    for avg in shown_averages(records):
        if len(avg["tasks"]) != n_tasks:
            continue
        layers = tuple(avg["setting"]["adapter_layers"])
        rows = task_rows(records, avg)
        mean = task_means(rows)
        gap = 100 * (mean[3] - mean[2])
        per = [rows[t][4] if t in rows else None for t in BAR["tasks"]]
        floors = [recipe_cells(records, t).get((avg["method"], layers), {}).get("transfer_beyond_floor")
                  for t in BAR["tasks"]]
        emulator = avg["method"].split(" ")[0]
        probe = " / ".join(f"{probes[(emulator, layers, s)]:.2f}" if (emulator, layers, s) in probes else "–"
                           for s in ("text", "webqs"))
        clears = (avg["value"] >= BAR["transfer"] and gap >= BAR["gap"]
                  and all(t is not None and t["value"] is not None and t["value"] >= BAR["transfer"] for t in per))
        lines.append(f"| {recipe_name(avg['method'])} | {100 * avg['middle_fraction']:.0f} % | "
                     + " | ".join(f"{100 * v:.1f}" for v in mean) + f" | {gap:+.1f} | "
                     f"**{avg['value']:.2f} ± {avg['stderr']:.2f}** | "
                     + " | ".join(_transfer_cell(t) for t in per) + " | "
                     + " | ".join(_transfer_cell(t) for t in floors)
                     + f" | {probe} | {'yes' if clears else 'no'} |")
    shown = [a["method"] for a in shown_averages(records) if len(a["tasks"]) == n_tasks]
    return "\n".join(lines + historical_note(shown))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    recipe_help = ("a recipe file (.toml or .json: offsite.experiment.recipe), or the emulator's historical name "
                   "KIND:opt=value:... with the recipe flags below (historical_recipe)")
    r = sub.add_parser("run")
    r.add_argument("recipe", help=recipe_help)
    r.add_argument("--task", default="arc_easy")
    h = r.add_argument_group("the recipe's, with a historical name (a recipe file says them itself)")
    h.add_argument("--layers", default=FLAGS["layers"])
    h.add_argument("--adapter", default=FLAGS["adapter"])
    h.add_argument("--lr", type=float, default=FLAGS["lr"])
    r.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    r.add_argument("--probe", default="text,arc_easy")
    r.add_argument("--zs", action="store_true", help="also score the emulator untouched (Full ZS for keep=all)")
    r.add_argument("--zs-only", action="store_true", help="score the untouched emulator and stop")
    r.add_argument("--probe-only", action="store_true", help="measure the perplexity and the probes and stop")
    h.add_argument("--correction", default=FLAGS["correction"], help="the owner corrects the adapter's gradient on this public "
                   "source's pairs (offsite.assist, scaled to the emulator's norm); needs --correction-every")
    h.add_argument("--correction-n", type=int, default=FLAGS["correction_n"], help="public QA pairs per source the owner's correction averages over")
    h.add_argument("--epochs", type=float, default=FLAGS["epochs"], help="the data owner's epochs (default 1, the budget's)")
    r.add_argument("--train-limit", type=int, default=0, help="tune on the first N training examples (0: all)")
    r.add_argument("--train-task", help="tune on this task's training split instead of --task's (a floor: what the "
                                        "tuning gives --task without its data; e.g. webqs, the owner's public pairs)")
    h.add_argument("--correction-every", type=int, default=FLAGS["correction_every"],
                   help="the owner's correction at the current adapter every N steps (with --correction)")
    h.add_argument("--correction-pool", type=int, default=FLAGS["correction_pool"],
                   help="the owner's pool of public pairs per source: each correction takes the next --correction-n "
                        "of its first N, cycling (0: always the first --correction-n)")
    r.add_argument("--repair", default="")
    r.add_argument("--start-floor", default="", metavar="SOURCE:N",
                   help="ship the adapter tuned on the full model on the first N pairs of SOURCE (the floor's) "
                        "and tune on the emulator from there")
    r.add_argument("--build-at-floor", action="store_true",
                   help="with --start-floor: build the emulator with the floor's adapter in the full model (a method "
                        "that distils around the shipped adapter, gradmatch, matches the gradients there)")
    h.add_argument("--tune", choices=("all", "bottom"), default=FLAGS["tune"],
                   help="which adapter blocks the data owner trains (bottom: the top ones stay the original)")
    r.add_argument("--plug-bottom", action="store_true",
                   help="also score the full model with only the bottom adapter blocks' change plugged in")
    d = sub.add_parser("diagnose")
    d.add_argument("recipe", help=recipe_help)
    d.add_argument("--task", default="arc_easy")
    d.add_argument("--sources", default="webqs,sciq,openbookqa,piqa,arc_challenge")
    c = sub.add_parser("collect")
    c.add_argument("--task", default="arc_easy")
    c.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    c.add_argument("--plot", help="also draw transfer against the probe into this PNG")
    c.add_argument("--frontier", help="also draw transfer against the gap, per method as its size varies, into this PNG")
    c.add_argument("--doc", help="also refresh the generated tables of this markdown file (docs/transfer.md): "
                                 "the recipes on --task, a '<task>-recipes' block per other task, the tasks")
    c.add_argument("--privacy-utility", help="also draw Emulator FT against transfer (privacy against utility) into this PNG")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        {"run": cmd_run, "diagnose": cmd_diagnose, "collect": cmd_collect}[a.cmd](a)
    except OffsiteError as exc:  # a recipe file refused (offsite.experiment.recipe), in one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
