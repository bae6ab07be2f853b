"""``offsite run``: play both parties on one machine and print the papers' table.

1. the model owner builds the emulator and writes its bundle;
2. the data owner loads the bundle, evaluates it untouched (Emulator ZS), tunes the adapter and
   writes the adapter bundle; evaluates the emulator with the tuned adapter (Emulator FT);
3. the model owner loads the adapter bundle, checks it and plugs it into the full model (Plug-in);
4. Full ZS is the untouched model; Full FT (optional) fine-tunes every block through the same loop;
5. the ceiling (on by default) tunes the same adapter with the same data, settings and seed on the
   full model itself: what a perfect emulator would give. Only a run that holds both assets can
   compute it. From it, **transfer** = (Plug-in − Full ZS) / (ceiling − Full ZS) with its paired
   standard error (:mod:`offsite.experiment.stats`), the share of the adaptation the emulator carried;
6. the floor (on by default) tunes the same adapter, settings and seed on the full model on as many
   of the model owner's *public* pairs, shaped like the task's inputs
   (:func:`offsite.assist.matched_source`, or the owner's correction source when it is in the loop):
   what the owner gets alone, without the data owner. On our model most of what the ceiling learns
   is the question-and-answer format, which any such pairs teach (docs/transfer.md, "The floor"), so
   a Plug-in at the floor has carried nothing of the data owner's own. From it, **transfer beyond
   the floor** = (Plug-in − floor) / (ceiling − floor), reported where the ceiling is at least two
   standard errors above the floor.

The rows run through :func:`offsite.experiment.cell.run_cell` (their order is its ``ROW_ORDER``,
the same for ``bench/paper.py``); with ``cache=DIR`` a row this cell already computed there is read.

The emulator's transfer probe (:mod:`offsite.probe`, data-free) is measured when it is built and
written into its manifest and the results (``row: "probe"``).

Every row is evaluated on the same documents: the task's headline metric (with standard errors)
and perplexity on held-out English text. The task is a built-in one or a data owner's own file
(``docs/own-task.md``): ``run(model, "my.jsonl", ..., train_data=file_data("train.jsonl"))``
evaluates on the file's rows and tunes on the training file; a built-in task tunes on its own train
split unless ``train_data`` is given.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..assist import Assistant, matched_source
from ..bundle import load_emulator, save_emulator
from ..data.own import OwnTask, resolve_task, task_name
from ..emulator import build_emulator, parse_adapter_layers
from ..errors import DataUnavailable, OffsiteError
from ..files import check_parent, write_text_atomic
from ..harm import harm_note
from ..models.load import load_model, model_display_name
from ..probe import attach_probe, probe_records
from ..tune import TrainingData, task_data
from .budget import Budget, preset as named_preset
from .recipe import Recipe
from .cell import ROW_ORDER, Lab, RowCache, describe_cell, public_pairs_of, row_key, run_cell
from .report import block_markdown, build_report
from .results import meta, metric_records, write_results

@dataclass
class RunResult:
    meta: dict
    records: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def evaluate_row(model, tokenizer, task, eval_limit, text_docs, batch_size: int,
                 scores: dict | None = None) -> dict[str, dict]:
    """The task's metrics and held-out text perplexity of one model, keyed by task name. With
    ``scores`` (a dict), the per-document correctness of a multiple-choice task (or exact match of
    an own generation task) is stored in ``scores[<task name>]``."""
    from ..eval import document_scores, evaluate, metric_of

    own_gen = isinstance(task, OwnTask) and task.kind == "gen"
    details = scores is not None and (metric_of(task) == "acc" or own_gen)
    res = evaluate(model, tokenizer, task, limit=eval_limit, batch_size=batch_size, return_details=details)
    if details:
        scores[task_name(task)] = document_scores(res.pop("details"))
    out = {task_name(task): res}
    if text_docs != 0:
        out["text"] = evaluate(model, tokenizer, "text", limit=text_docs, batch_size=batch_size)
    return out


def row_records(row: str, results: dict[str, dict], base: dict, seconds: float, extra: dict) -> list[dict]:
    """Records (docs/results-format.md) of one row of the table: every metric of every task evaluated."""
    return [rec for task, metrics in results.items()
            for rec in metric_records(metrics, {**base, "task": task, "row": row},
                                      seconds=round(seconds, 2), **extra)]


def run(model_name: str, task, recipe: Recipe, out: str | Path, preset: str | Budget = "demo",
        full_ft: bool | None = None, ceiling: bool = True, probe: bool = True, floor: bool = True,
        eval_limit: int | None | str = "preset", text_docs: int | None | str = "preset",
        batch_size: int = 32, overwrite: bool = False, command: str = "", log=print,
        train_data: TrainingData | None = None, cache: str | Path | None = None) -> RunResult:
    """Both parties on one machine; ``task`` is a built-in task name, a task file of one's own or an
    :class:`~offsite.data.own.OwnTask` (evaluated on its rows); ``recipe`` (:class:`~offsite.experiment.recipe.Recipe`)
    is what the parties choose: the emulator's method and options, the adapter's layout, the data
    owner's tuning over the budget's (seed included), the owner in the loop, the floor's source.
    ``train_data`` is what the adapter is tuned on (default: the first ``train_limit`` examples of a
    built-in task's train split, per the budget; an own task file needs it). ``preset``: a
    :data:`~offsite.experiment.budget.PRESETS` name or a :class:`~offsite.experiment.budget.Budget`.
    ``cache``: a folder of computed rows (:class:`~offsite.experiment.cell.RowCache`): a row this
    cell already computed there is read, not computed again. The recipe is written to
    ``out/recipe.toml`` (``offsite run out/recipe.toml`` runs it again)."""
    budget = preset if isinstance(preset, Budget) else named_preset(preset)
    eval_limit = budget.eval_limit if eval_limit == "preset" else eval_limit
    text_docs = budget.text_docs if text_docs == "preset" else text_docs
    full_ft = budget.full_ft if full_ft is None else full_ft
    recipe.check()
    method, adapter_layers, method_options = recipe.method, recipe.adapter_layers, dict(recipe.options)
    settings = recipe.tune_settings(budget.train_config())
    floor_source = recipe.floor_source
    for name, v, lo in (("eval_limit", eval_limit, 1), ("text_docs", text_docs, 0), ("batch_size", batch_size, 1)):
        if v is not None and (not isinstance(v, int) or v < lo):
            raise OffsiteError(f"{name} must be an integer >= {lo} (got {v!r})")
    settings.check()
    assist = recipe.assist_options()
    if assist.on and settings.adapter != "full":
        raise OffsiteError(f"the owner's correction (--assist-every) applies to full adapter blocks, not {settings.adapter}")
    out = Path(out)
    check_parent(out)
    if out.exists() and not out.is_dir():
        raise OffsiteError(f"{out} is a file; choose a directory for --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OffsiteError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    # fail early on an unknown task or a bad file, before any model work
    task = resolve_task(task)
    if task == "text":
        raise OffsiteError("`offsite run` needs a task to tune on; held-out text is scored in every run")
    name = task_name(task)
    if isinstance(task, OwnTask) and train_data is None:
        raise OffsiteError(f"{task.source} is evaluation data: pass the examples to tune on as train_data "
                           "(--data), never the rows the adapter is scored on")
    data: TrainingData = train_data if train_data is not None else budget.training_data(task)
    if assist.on:
        if assist.source == name:
            raise OffsiteError(f"the owner's public pairs (--assist-source {assist.source}) are the task being tuned; "
                               "choose public data of another task")
        task_data(assist.source)  # fetched? (fails here, before any model work)
    if floor_source and not floor:
        raise OffsiteError("--floor-source names the floor's public pairs; drop it or drop --no-floor")
    if floor:
        floor_source = floor_source or (assist.source if assist.on else matched_source(name))
        if floor_source == name:
            raise OffsiteError(f"the floor's public pairs (--floor-source {floor_source}) are the task being tuned; "
                               "choose public data of another task")
        try:  # fetched? (fails here, before any model work)
            floor_data = public_pairs_of(task_data(floor_source), len(data.items))
        except DataUnavailable as exc:
            raise DataUnavailable(f"{exc} (the floor's public pairs; pass --no-floor to skip the floor)") from None
    result = RunResult(meta={**meta(command), "recipe": recipe.to_dict()})
    if isinstance(task, OwnTask):
        result.notes.append(f"evaluation data {task.describe()}")
        result.meta["eval_data"] = {"task": name, "path": task.source, "sha256": task.digest,
                                    "kind": task.kind, "documents": len(task.docs), "template": task.template}
    if train_data is not None or isinstance(task, OwnTask):
        result.notes.append(f"training data: {len(data.items)} {data.kind} examples from {data.source}")
    if isinstance(task, OwnTask):
        n_docs = len(task.docs)
        subset = (f"the first {eval_limit} of the {n_docs} rows" if eval_limit and eval_limit < n_docs
                  else f"all {n_docs} rows") + f" of {task.source}"
    else:
        subset = f"first {eval_limit} documents of the evaluation split" if eval_limit else "every evaluation document"
    text = "skipped" if text_docs == 0 else f"{text_docs} documents" if text_docs else "all documents"
    result.notes.append(f"evaluated on {subset}; held-out text: {text}")
    if isinstance(task, OwnTask) and text_docs != 0:
        log(f"[offsite] every row also scores held-out text perplexity ({text}) beside {name}: minutes per row "
            "on a CPU; --text-docs 0 skips it (docs/own-task.md)")
    if not full_ft:
        result.notes.append("Full FT skipped (pass --full-ft to run it)")
    if not ceiling:
        result.notes.append("ceiling and transfer skipped (--no-ceiling)")
    if floor:
        result.notes.append(f"floor: the same adapter tuned on the full model on {len(floor_data.items)} public "
                            f"{floor_source} pairs, what the model owner gets without the data owner")
    else:
        result.notes.append("floor skipped (--no-floor)")
    if settings.blocks != "all":
        result.notes.append(f"the data owner tunes only the {settings.blocks} adapter blocks (the ceiling too)")
    if settings.dp is not None:  # --dp-* (offsite.dp): one recipe for every tuning of the run
        result.notes.append(f"differentially private tuning (DP-SGD, target epsilon {settings.dp.epsilon:g}): the data "
                            "owner's adapter, and the ceiling, floor and Full FT rows with the same recipe; the spent "
                            "(epsilon, delta) is in <run>/adapter/manifest.json")
    if assist.on:
        result.notes.append(f"owner in the loop: the model owner corrected the adapter's gradient every {assist.every} "
                            f"steps on {assist.examples} public {assist.source} pairs"
                            + (f" (the next ones of its first {assist.pool} each time)" if assist.pool else "")
                            + ", seeing each intermediate adapter "
                            "(docs/transfer.md)")

    def timed(label, fn):
        log(f"[offsite] {label} ...")
        t0 = time.perf_counter()
        value = fn()
        dt = time.perf_counter() - t0
        log(f"[offsite] {label}: {dt:.1f}s")
        return value, dt

    model, tokenizer = load_model(model_name)
    # 1. owner: emulator bundle
    built, build_s = timed("building the emulator", lambda: build_emulator(
        method, model, tokenizer, _name(model_name), adapter_layers, **method_options))
    if probe:
        timed("probing the emulator (adapter gradients on public text)", lambda: attach_probe(model, built, log=log))
    out.mkdir(parents=True, exist_ok=True)  # only now: a command refused above leaves nothing behind
    write_text_atomic(out / "recipe.toml", recipe.to_toml())
    emu_dir = out / "emulator"
    emu_manifest = save_emulator(built, emu_dir, overwrite=True)
    del built
    base = {"model": _name(model_name), "method": method, "setting": recipe.setting(),
            "build_seconds": round(build_s, 2)}
    if probe:
        result.records.extend(probe_records(emu_manifest["report"]["probe"], {**base, "task": "text"}))
    base["middle_params"] = emu_manifest["shapes"]["middle_params"]
    _save(result, out)

    # 2.-5. the rows (offsite.experiment.cell): the data owner's, then the owner's
    full = [model, tokenizer]  # the full model: the Plug-in is written into it, then it is dropped
    del model
    scores: dict[str, dict] = {}  # row -> {task: per-document correctness}, for transfer and harm

    def score(m, tok, row):
        correct: dict = {}
        return evaluate_row(m, tok, task, eval_limit, text_docs, batch_size, correct), correct

    def on_row(row, r):
        scores[row] = r.correct
        result.records.extend(row_records(row, r.metrics, base, r.seconds, r.extra))
        _save(result, out)
        if row == "plugin":
            full.clear()
            _after_plugin(result, scores, name, base, ceiling, floor, floor_source, log)
            _save(result, out)

    lab = Lab(display=_name(model_name), adapter_layers=_pair(adapter_layers), base=lambda: tuple(full), score=score,
              data=lambda: data, settings=settings, full_ft_lr=budget.full_ft_lr, work=lambda row: out / f"{row}.work",
              emulator_dir=emu_dir, adapter_dir=out / "adapter",
              floor_data=(lambda: (floor_data, floor_source)) if floor else None,
              fresh_full=lambda: load_model(model_name), consume_base=True,
              assistant=(lambda: Assistant(full[0], load_emulator(emu_dir), assist)) if assist.on else None,
              log=lambda msg: log(f"[offsite] {msg}"))
    # the distilled row needs the task's template and label words (offsite plug --distill-*, bench/content_seeds.py)
    skipped = {row for row, on in (("ceiling", ceiling), ("floor", floor), ("full_ft", full_ft), ("distilled", False))
               if not on}
    rows = [row for row in ROW_ORDER if row not in skipped]
    cell = describe_cell(_name(model_name), name if not isinstance(task, OwnTask) else [name, task.digest],
                         {"eval_limit": eval_limit, "text_docs": text_docs},
                         {"method": method, "digest": emu_manifest.get("digest")}, _pair(adapter_layers), settings,
                         budget.identity(), data, assist.record() if assist.on else None,
                         (floor_source, floor_data) if floor else None)
    run_cell(lab, rows, RowCache(cache, lambda row: row_key(row, cell)) if cache else None, on_row)
    _save(result, out)
    write_text_atomic(out / "table.md", format_table(result.records, name) + "\n\n" + "\n".join(
        f"* {n}" for n in result.notes) + "\n")
    return result


def _after_plugin(result: RunResult, scores: dict, name: str, base: dict, ceiling: bool, floor: bool,
                  floor_source: str | None, log) -> None:
    """Once the Plug-in is scored: the harm warning, and transfer (and beyond the floor) or why not."""
    harm = harm_note(scores, name)
    if harm:
        log(f"[offsite] WARNING: {harm}")
        result.notes.insert(0, f"WARNING: {harm}")
    if ceiling:
        rec = transfer_record(scores, name, base)
        if name not in scores["full_zs"]:
            result.notes.append(f"transfer not reported: it needs per-document accuracies, which {name} "
                                "(not multiple choice) does not give")
        elif rec is None:
            result.notes.append(f"transfer not reported: the ceiling's gain on {name} is under two standard "
                                "errors (nothing to transfer)")
        else:
            result.records.append(rec)
    if ceiling and floor and name in scores["floor"]:
        rec = transfer_record(scores, name, base, floor=True)
        if rec is None:
            result.notes.append(f"transfer beyond the floor not reported: the ceiling is within two standard errors "
                                f"of the floor on {name} (what the adapter learns there, the owner's public "
                                f"{floor_source} pairs teach too)")
        else:
            result.records.append(rec)


def transfer_record(scores: dict, task: str, base: dict, floor: bool = False) -> dict | None:
    """The ``row: "plugin", metric: "transfer"`` record of ``task`` from per-document correctness of
    the Full ZS, Plug-in and ceiling rows; ``None`` where the ceiling's gain is under two standard
    errors (a ratio over noise means nothing). ``floor``: the ``metric: "transfer_beyond_floor"``
    record instead, (Plug-in − floor) / (ceiling − floor), from the floor row in place of Full ZS
    (its ``ceiling_gain`` and ``plugin_gain`` are then over the floor)."""
    from .stats import above_noise, transfer

    base_row = "floor" if floor else "full_zs"
    if not all(task in scores.get(r, {}) for r in ("plugin", base_row, "ceiling")):
        return None
    t = transfer([scores["plugin"][task]], [scores[base_row][task]], [scores["ceiling"][task]])
    if not above_noise(t):
        return None
    metric = "transfer_beyond_floor" if floor else "transfer"
    return {**base, "task": task, "row": "plugin", "metric": metric, "value": t["value"],
            "stderr": t["stderr"], "n": t["n"], "ceiling_gain": t["ceiling_gain"],
            "ceiling_gain_stderr": t["ceiling_gain_stderr"], "plugin_gain": t["plugin_gain"],
            "plugin_gain_stderr": t["plugin_gain_stderr"]}


def _name(model_name: str) -> str:
    return model_display_name(model_name)


def _pair(adapter_layers):
    return parse_adapter_layers(adapter_layers)


def _save(result: RunResult, out: Path) -> None:
    write_results(out / "results.json", result.meta, result.records, notes=result.notes)


def format_table(records: list[dict], task: str) -> str:
    """The papers' table of one run (the task and held-out text), rendered by :mod:`offsite.experiment.report`."""
    rep = build_report([("run", {"records": records})], tasks=[task, "text"])
    return "\n\n".join(block_markdown(b) for b in rep["blocks"])


__all__ = ["RunResult", "evaluate_row", "format_table", "row_records",
           "run", "transfer_record"]
