"""The paper benchmark: every registered method on the embedded model, the papers' table per task.

    python bench/paper.py                                  # the full run (hours on a 2-core CPU)
    python bench/paper.py --tasks arc_easy --methods uniform --eval-limit 50   # minutes
    python bench/paper.py --plan                           # what is done, what is left
    python bench/paper.py --readme-table                   # docs/results.md's table from the results
    python bench/paper.py --merge runs/other.json          # add another run's cells (same budget)

For each task, Full ZS and Full FT are computed once and shared by every method (records with
``method`` null); for each method and each of its recipes (:class:`offsite.experiment.recipe.Recipe`:
its ``Method.bench_settings`` as recipes, default adapter 2,2 with the method's default options;
``uniform``/``kd`` declare keep=8 so every method's emulator can be matched to the same size) the
rows Emulator ZS, Emulator FT and Plug-in. A method registered later (``offsite.emulator.register``)
joins without any change here. ``--recipes GRID.toml`` replaces the recipes of the methods it names::

    [[recipe]]
    method = "kd"
    adapter_layers = [2, 2]
    [recipe.options]
    keep = 8
    kd_steps = 30

A grid's recipe names the method, its options and the adapter layout; the training is the budget's.

Each method setting also gets (``--no-ceiling`` / ``--no-floor`` / ``--no-probe`` skip them):

* the **ceiling**: the same adapter, data, budget and seed tuned on the full model, tuned and scored
  once per adapter layout and task and recorded under every method with that layout;
* **transfer** = (Plug-in − Full ZS) / (ceiling − Full ZS), records ``row: "plugin", metric:
  "transfer"`` per task and over the multiple-choice tasks run (``task: "avg<k>"``), with a paired
  standard error from the per-document predictions, written only where the ceiling gains at least
  two standard errors (docs/transfer.md);
* the **floor**: the same adapter, budget and seed tuned on the full model on as many of the model
  owner's public pairs, shaped like the task's inputs (:func:`offsite.assist.matched_source`:
  SQuAD for SciQ, WebQuestions otherwise), once per layout and task like the ceiling: what the owner
  gets without the data owner (``row: "floor"``; not for ``text``, whose training data is public
  text already). From it, **transfer beyond the floor** = (Plug-in − floor) / (ceiling − floor),
  records ``metric: "transfer_beyond_floor"``, per task and averaged as transfer is, where the
  ceiling is at least two standard errors above the floor;
* the **probe**: the adapter-gradient cosine between the emulator and the full model on held-out
  public text (``row: "probe"``, task ``text``; from the bundle's manifest when it carries one).

**Resumable.** A *cell* is (model, task, method, setting, row), the setting being its recipe's
(:meth:`~offsite.experiment.recipe.Recipe.setting`: the adapter layout and the method's options).
Finished cells are kept in the results file, written atomically after every cell, and skipped on
the next run; a killed run
resumes where it stopped. Emulator bundles are cached under ``--cache`` (default
``runs/paper-cache/``, git-ignored) per method and setting, adapter bundles per budget, method,
setting and task; adapter and Full FT training checkpoint into the cache and resume too. Delete the
cache after changing a method's code: it is keyed by the setting, not by the code. The Full ZS and
Plug-in rows of multiple-choice tasks also keep their per-document predictions there
(``details/``), which ``bench/paired.py`` compares without scoring again.

**Budget** (docs/protocol.md, "Budget"; :class:`offsite.experiment.budget.Budget`, the type ``offsite run``'s
presets are made of: the default is its ``paper`` preset, ``--preset`` starts from another one and
the budget flags change it), the same for every method, seed and documents:

* training: the first ``--train-limit`` (1,000) examples of the task's training split (its fixed
  hash order), one epoch; 10% of them are held out for choosing the best adapter (tune.py), so
  900 train. Adapter lr 1e-4 (the repository's ``offsite run`` presets; the paper's per-task rates
  are for 5 epochs of batch 32 on a GPU), Full FT lr 2e-5 (the paper's ``ft_all.sh``), batch 8,
  linear schedule without warm-up, seed 42, examples cut to their last 1,024 tokens.
* ``text`` (held-out English text, the papers' WikiText column): train on the first
  ``--text-train-limit`` (64) public-text training documents (about 1k tokens each) cut into
  512-token blocks, the reference's WikiText block size; 64 documents keep a cell's training cost
  near that of a QA task (an unverified choice, exposed as a flag).
* evaluation: the first ``--eval-limit`` (1,000) documents of each task's evaluation split (for
  ``text`` all 48 held-out documents), every row on the same documents.

Larger budgets (``--eval-limit all --train-limit all --epochs 5`` on a GPU) write to their own
results file: the file's name carries any budget that differs from the default, and a results file
refuses cells of another budget.

The core is :func:`run_benchmark`, which takes :class:`~offsite.experiment.benchmark.Hooks` (model loader,
training data, evaluation) so tests run it on tiny models in seconds; the ceiling and Full FT rows
run through ``offsite run``'s one row sequence (:func:`offsite.experiment.cell.run_cell`, with
:func:`paper_lab` saying where a cell's models and bundles come from). What the other benchmark scripts share with it (settings, cell
keys, the cache, results files) is :mod:`offsite.experiment.benchmark`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from offsite.assist import matched_source
from offsite.bundle import load_emulator, load_emulator_manifest
from offsite.emulator import all_methods
from offsite.errors import OffsiteError
from offsite.eval import METRIC
from offsite.experiment.benchmark import (METHOD_ROWS, Bench, Hooks, cell_key, chosen_recipes, load_grids,
                                          load_same_budget, merge_results, record_cell)
from offsite.experiment.budget import PRESETS, Budget
from offsite.experiment.recipe import Recipe
from offsite.experiment.cell import Lab, Row, RowCache, public_pairs_of, run_cell
from offsite.experiment.report import (build_report, load_results, readme_table, report_files, report_markdown,
                                       setting_key, slug)
from offsite.experiment.results import meta, write_results
from offsite.experiment.run import row_records, transfer_record
from offsite.experiment.stats import above_noise, transfer
from offsite.models.load import model_display_name
from offsite.probe import probe as probe_emulator
from offsite.probe import probe_records

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TASKS = ("openbookqa", "piqa", "arc_easy", "arc_challenge", "hellaswag", "sciq", "text")
ALL_TASKS = DEFAULT_TASKS[:-1] + ("webqs", "text")
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_CACHE = ROOT / "runs" / "paper-cache"


def default_results_path(display: str, budget: Budget) -> Path:
    base = "paper-smollm2" if display == "smollm2-135m" else f"paper-{slug(display)}"
    tag = budget.tag()
    return RESULTS_DIR / f"{base}{'-' + tag if tag else ''}.json"


# --- the benchmark ------------------------------------------------------------------------------


def run_benchmark(model_name: str = "smollm2-135m", tasks=DEFAULT_TASKS, methods=None,
                  budget: Budget = Budget(), full_ft: bool = True, results_path=None, cache=DEFAULT_CACHE,
                  recipes: list[Recipe] | None = None, batch_size: int = 32, command: str = "",
                  hooks: Hooks | None = None, progress: bool = True, plan_only: bool = False,
                  ceiling: bool = True, probe: bool = True, floor: bool = True, log=print) -> dict:
    """Run every missing cell; returns the results file's content. See the module docstring.
    ``recipes``: the grid's recipes (``--recipes``), replacing the benchmark recipes of the methods
    they name."""
    b = Bench(model_name, budget, cache, hooks or Hooks(), batch_size, progress, log)
    results_path = Path(results_path) if results_path else default_results_path(b.display, budget)
    tasks = list(tasks)
    if not tasks:
        raise OffsiteError("no tasks to run")
    grid, failures = plan_recipes(b, methods, recipes or [])
    bench = PaperRun(b, tasks, grid, failures, ResultsFile(b, results_path),
                     Rows(full_ft=full_ft, ceiling=ceiling, probe=probe, floor=floor))
    missing = bench.missing()
    log(f"[paper] {len(bench.todo()) - len(missing)} of {len(bench.todo())} cells done; results: {results_path}")
    if plan_only:
        for task, m, s, row in missing:
            log(f"[paper] to do: {task} {m or 'full model'} {s or ''} {row}")
        return {"meta": {}, "records": bench.results.records, "missing": missing, "failures": failures}
    if not missing:
        return bench.finished()
    return bench.run(command)


def plan_recipes(b: Bench, methods, given: list[Recipe]) -> tuple[list[Recipe], list[str]]:
    """The grid to run (each method's recipes in ``given``, else its benchmark recipes) and the
    methods skipped (their recipes fail)."""
    registry = all_methods()
    names = list(registry) if methods is None else list(methods)
    unknown = [m for m in names if m not in registry]
    if unknown:
        raise OffsiteError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(registry))}")
    grid, failures = [], []  # a method that fails (OffsiteError) is skipped; the others go on
    for name in names:
        try:
            grid += chosen_recipes(registry[name], given, lambda: b.base()[0].config)
        except OffsiteError as exc:
            failures.append(f"{name}: its benchmark settings: {exc}")
            b.log(f"[paper] skipping {failures[-1]}")
    return grid, failures


@dataclass(frozen=True)
class Rows:
    """The optional rows of a run (``--no-full-ft``, ``--no-ceiling``, ``--no-probe``, ``--no-floor``)."""

    full_ft: bool = True
    ceiling: bool = True
    probe: bool = True
    floor: bool = True

    def of(self, task: str) -> tuple:
        """The method rows of a task: the floor where its training data is not public already."""
        return (METHOD_ROWS + (("ceiling",) if self.ceiling else ())
                + (("floor",) if self.floor and task != "text" else ()))


class ResultsFile:
    """The benchmark's results file: the cells of earlier runs kept (the budget must match), the file
    written again, atomically, after every new cell."""

    def __init__(self, b: Bench, path: Path):
        self.b, self.path = b, path
        self.records, self.runs, self.old_meta = [], [], {}
        if path.exists():
            old = load_same_budget(path, b.budget.identity(), "now")
            self.records, self.old_meta = old["records"], old["meta"]
            self.runs = list(old["meta"].get("runs") or [])
        self.done = {record_cell(r) for r in self.records}
        self.meta_block: dict = {}

    def is_done(self, task, method, setting, row) -> bool:
        return cell_key(self.b.display, task, method, setting, row) in self.done

    def start(self, command: str) -> dict:
        """This run's meta block: its command, commit and machine added to the file's runs."""
        this_run = meta(command)
        self.runs.append({k: this_run[k] for k in ("command", "git_commit", "machine", "date")})
        self.meta_block = {**this_run, "budget": self.b.budget.identity(), "runs": self.runs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.meta_block

    def replace(self, records: list[dict], meta_block: dict) -> None:
        self.records = records
        write_results(self.path, meta_block, records)

    def add(self, new: list[dict], task, method, setting, row) -> None:
        self.records.extend(new)
        self.done.add(cell_key(self.b.display, task, method, setting, row))
        write_results(self.path, self.meta_block, self.records)

    def save(self, row, task, method, setting, metrics, seconds, extra) -> None:
        new = row_records(row, {task: metrics}, {"model": self.b.display, "method": method, "setting": setting},
                          seconds, extra)
        self.add(new, task, method, setting, row)
        headline = next((r for r in new if r["metric"] in ("acc", "exact_match", "ppl")), new[0] if new else None)
        if headline:
            self.b.log(f"[paper] {task} · {method or 'full model'} {setting_key(setting) if setting else ''} · {row}: "
                       f"{headline['metric']} {headline['value']:.4f} ({seconds:.0f}s)")


class PaperRun:
    """One call of the benchmark: its grid, its results file and the cells left, run task by task
    (a method setting that fails is skipped, the others go on)."""

    def __init__(self, b: Bench, tasks: list, grid: list[Recipe], failures: list, results: ResultsFile, rows: Rows):
        self.b, self.tasks, self.failures, self.results, self.rows = b, tasks, failures, results, rows
        self.plan = [(r.method, r.setting()) for r in grid]  # a cell's setting is its recipe's
        self.cells = Cells(b, results, rows.probe)
        self.broken: set = set()

    def todo(self) -> list[tuple]:
        todo = [("text", m, s, "probe") for m, s in self.plan] if self.rows.probe else []
        for task in self.tasks:
            todo.append((task, None, None, "full_zs"))
            todo += [(task, m, s, row) for m, s in self.plan for row in self.rows.of(task)]
            if self.rows.full_ft:
                todo.append((task, None, None, "full_ft"))
        return todo

    def missing(self) -> list[tuple]:
        return [c for c in self.todo() if not self.results.is_done(*c)]

    def finished(self) -> dict:
        """Nothing to run: the transfer records brought up to date with the cached predictions."""
        if self.rows.ceiling and self.results.records:
            updated = with_transfer(self.results.records, self.plan, self.tasks, self.b)
            if updated != self.results.records:
                self.results.replace(updated, self.results.old_meta)
        return {"meta": {"budget": self.b.budget.identity(), "runs": self.results.runs},
                "records": self.results.records, "failures": self.failures}

    def run(self, command: str) -> dict:
        meta_block = self.results.start(command)
        for task in self.tasks:
            self.cells.rows(task, None, None, ["full_zs"])
            for method, setting in self.plan:
                if not self.complete(task, method, setting):
                    self.method_cells(task, method, setting)
            if self.rows.full_ft:
                self.cells.rows(task, None, None, ["full_ft"])
        if self.rows.ceiling:
            self.results.replace(with_transfer(self.results.records, self.plan, self.tasks, self.b), meta_block)
        return {"meta": meta_block, "records": self.results.records, "failures": self.failures}

    def complete(self, task, method, setting) -> bool:
        """Nothing left of (method, setting) on ``task``, or it failed earlier in this run."""
        done = self.results.is_done
        return (method, setting_key(setting)) in self.broken or (
            all(done(task, method, setting, r) for r in self.rows.of(task))
            and (not self.rows.probe or done("text", method, setting, "probe")))

    def method_cells(self, task, method, setting) -> None:
        try:
            self.cells.method(task, method, setting, self.rows.of(task))
        except OffsiteError as exc:
            self.broken.add((method, setting_key(setting)))
            self.failures.append(f"{method} {setting_key(setting)} ({task}): {exc}")
            self.b.log(f"[paper] skipping {self.failures[-1]}")


class Cells:
    """The rows of one cell run and recorded: a method setting's emulator (cached), its probe and
    its rows on a task, or the full model's rows."""

    def __init__(self, b: Bench, results: ResultsFile, probe: bool):
        self.b, self.results, self.probe = b, results, probe

    def method(self, task, method, setting, rows) -> None:
        emu_dir = self.b.ensure_emulator(method, setting)
        shapes = load_emulator_manifest(emu_dir).get("shapes", {})
        extra = {"middle_params": shapes.get("middle_params"),
                 "original_middle_params": shapes.get("original_middle_params"),
                 "build_seconds": self.b.build_seconds(emu_dir)}
        if self.probe and not self.results.is_done("text", method, setting, "probe"):
            self.probe_cell(method, setting, emu_dir, extra)
        self.rows(task, method, setting, rows, emu_dir, extra)

    def probe_cell(self, method, setting, emu_dir, extra) -> None:
        """The transfer probe (adapter-gradient cosine on public text) of a cached emulator: from its
        manifest when it was probed at build time, else computed now against the full model."""
        figures = (load_emulator_manifest(emu_dir).get("report") or {}).get("probe")
        t0 = time.perf_counter()
        if figures is None:
            model, _ = self.b.base()
            self.b.log(f"[paper] probing {method} {setting_key(setting)}")
            figures = probe_emulator(model, load_emulator(emu_dir))
        base = {"model": self.b.display, "method": method, "setting": setting, "task": "text", **extra,
                "seconds": round(time.perf_counter() - t0, 2)}
        self.results.add(probe_records(figures, base), "text", method, setting, "probe")
        self.b.log(f"[paper] {method} {setting_key(setting)} · probe: grad_cos {figures['grad_cos']['all']:.3f}")

    def rows(self, task, method, setting, rows, emu_dir=None, method_extra=None) -> None:
        """The rows of one cell not in the results file yet, through offsite's one row sequence
        (offsite.experiment.cell.run_cell); the ceiling and floor of an adapter layout are kept in
        the cache and shared by every method with that layout."""
        def on_row(row, r):
            extra = {"eval_limit": self.b.budget.eval_limit, **(method_extra if row in METHOD_ROWS else {}), **r.extra}
            self.results.save(row, task, method, setting, r.metrics[task], r.seconds, extra)

        rows = [r for r in rows if not self.results.is_done(task, method, setting, r)]
        if rows:
            run_cell(paper_lab(self.b, task, method, setting, emu_dir), rows, SharedRows(self.b, task, setting), on_row)


def paper_lab(b: Bench, task: str, method: str | None, setting: dict | None, emu_dir: Path | None) -> Lab:
    """Where a benchmark cell's rows come from: the Bench's full model (copied, never modified),
    training data, settings and cache (emulator and adapter bundles); scored by its hooks, which
    keep the per-document predictions of the rows transfer compares (``Bench.details_path``)."""
    layout = {"adapter_layers": list(setting["adapter_layers"])} if setting else None
    source = matched_source(task)
    entries = {"full_zs": ("full_zs", None, None), "plugin": ("plugin", method, setting),
               "ceiling": ("ceiling", None, layout), "floor": ("floor", source, layout)}

    def score(model, tok, row):
        metrics, _ = b.evaluate(model, tok, task, entry=entries.get(row))
        return {task: metrics}, {}

    def work(row):
        if row in ("ceiling", "floor"):
            return SharedRows(b, task, setting).path(row).with_suffix(".work")
        return b.cache / "full_ft" / b.budget.digest() / f"{task}.work"

    return Lab(display=b.display, adapter_layers=tuple(layout["adapter_layers"]) if layout else None, base=b.base,
               score=score, data=lambda: b.data(task), settings=b.settings(task), full_ft_lr=b.budget.full_ft_lr,
               work=work, emulator_dir=emu_dir, adapter_dir=b.adapter_dir(method, setting, task) if method else None,
               floor_data=lambda: (public_pairs_of(b.data(source), len(b.data(task).items)), source),
               log=lambda msg: b.log(f"[paper] {task} · {method or 'full model'} · {msg}"))


class SharedRows(RowCache):
    """The ceiling and floor of an adapter layout on a task, tuned and scored once per layout, task
    (and public source) and budget, then shared by every method with that layout: the files
    ``Bench.ceiling_path`` / ``Bench.floor_path`` (their format unchanged)."""

    KEEP = ("train_seconds", "train_examples", "train_steps", "floor_source")

    def __init__(self, b: Bench, task: str, setting: dict | None):
        super().__init__(None)
        self.b, self.task = b, task
        self.layout = {"adapter_layers": list(setting["adapter_layers"])} if setting else None

    def path(self, row: str) -> Path | None:
        if self.layout is None or row not in ("ceiling", "floor"):
            return None
        if row == "ceiling":
            return self.b.ceiling_path(self.layout, self.task)
        return self.b.floor_path(self.layout, self.task, matched_source(self.task))

    def encode(self, row: str, result: Row) -> dict:
        return {"metrics": result.metrics[self.task], "seconds": round(result.seconds, 2),
                **{k: result.extra[k] for k in self.KEEP if k in result.extra}}

    def decode(self, row: str, data: dict) -> Row:
        return Row({self.task: data["metrics"]}, data["seconds"], {k: data[k] for k in self.KEEP if k in data},
                   cached=True)


#: the Plug-in's derived records: (the row the gain is measured from, the metric)
DERIVED = (("full_zs", "transfer"), ("floor", "transfer_beyond_floor"))


def with_transfer(records: list[dict], plan, tasks, b: Bench) -> list[dict]:
    """``records`` with the Plug-in's transfer records recomputed from the cached per-document
    predictions of Full ZS, Plug-in and ceiling (and beyond the floor: of the floor, Plug-in and
    ceiling): per task, and over the tasks that have all three (task ``avg<k>``), each only where
    the ceiling gains at least two standard errors over the row it is measured from."""
    def correct(entry, task):
        path = b.details_path(entry, task)
        return json.loads(path.read_text()) if path.exists() else None

    def base_entry(row, task, layout):  # the row transfer is measured from: Full ZS, or the floor
        return ("full_zs", None, None) if row == "full_zs" else ("floor", matched_source(task), layout)

    metrics = {m for _, m in DERIVED}
    kept = [r for r in records if not (r["row"] == "plugin" and r.get("metric") in metrics)]
    new = []
    for method, setting in plan:
        layout = {"adapter_layers": list(setting["adapter_layers"])}
        base = {"model": b.display, "method": method, "setting": setting}
        for base_row, metric in DERIVED:
            rows = {"plugin": {}, base_row: {}, "ceiling": {}}
            for task in tasks:
                got = {"plugin": correct(("plugin", method, setting), task),
                       base_row: correct(base_entry(base_row, task, layout), task),
                       "ceiling": correct(("ceiling", None, layout), task)}
                if any(g is None for g in got.values()) or len({tuple(g["ids"]) for g in got.values()}) != 1:
                    continue  # not multiple choice, not scored yet, or on other documents
                for r, g in got.items():
                    rows[r][task] = g["correct"]
                rec = transfer_record(rows, task, base, floor=base_row == "floor")
                if rec is not None:
                    new.append(rec)
            common = list(rows["plugin"])
            if len(common) > 1:
                t = transfer(*[[rows[r][k] for k in common] for r in ("plugin", base_row, "ceiling")])
                if above_noise(t):
                    new.append({**base, "task": f"avg{len(common)}", "row": "plugin", "metric": metric,
                                "value": t["value"], "stderr": t["stderr"], "n": t["n"], "tasks": common,
                                "ceiling_gain": t["ceiling_gain"], "ceiling_gain_stderr": t["ceiling_gain_stderr"]})
    return kept + new


# --- command line -------------------------------------------------------------------------------


def _limit(text: str) -> int | None:
    if text.lower() in ("all", "none", "0"):
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


_BUDGET_FLAGS = ("eval_limit", "train_limit", "text_train_limit", "epochs", "lr", "full_ft_lr", "batch_size",
                 "micro_batch_size", "seed", "adapter")


def build_parser() -> argparse.ArgumentParser:
    d = PRESETS["paper"]
    p = argparse.ArgumentParser(prog="bench/paper.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated tasks, or 'all' ({','.join(ALL_TASKS)}); default: {','.join(DEFAULT_TASKS)}")
    p.add_argument("--methods", default="all", help="comma-separated registered methods, or 'all' (default)")
    p.add_argument("--recipes", nargs="+", metavar="FILE",
                   help="grid files of recipes (TOML [[recipe]] tables or a JSON list; offsite.experiment.recipe) "
                        "replacing the benchmark recipes of the methods they name; a recipe names the method, its "
                        "options and adapter_layers (the training is the budget's)")
    g = p.add_argument_group("budget (offsite.experiment.budget: a preset, then the flags given change it)")
    g.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="the budget to start from, as `offsite run --preset` (default: paper)")
    # flags left out keep the preset's value (SUPPRESS: absent from the namespace)
    kw = {"default": argparse.SUPPRESS}
    g.add_argument("--eval-limit", type=_limit, help=f"documents per task ('all': every one; default {d.eval_limit})", **kw)
    g.add_argument("--train-limit", type=_limit, help=f"training examples per task ('all'; default {d.train_limit})", **kw)
    g.add_argument("--text-train-limit", type=_limit, **kw,
                   help=f"public-text training documents for the text task (default {d.text_train_limit})")
    g.add_argument("--epochs", type=float, help=f"default {d.epochs:g}", **kw)
    g.add_argument("--lr", type=float, help=f"adapter learning rate (default {d.lr:g})", **kw)
    g.add_argument("--full-ft-lr", type=float, help=f"default {d.full_ft_lr:g}", **kw)
    g.add_argument("--batch-size", type=int, help=f"training examples per optimizer step (default {d.batch_size})", **kw)
    g.add_argument("--micro-batch-size", type=int, help=f"default {d.micro_batch_size}", **kw)
    g.add_argument("--seed", type=int, help=f"default {d.seed}", **kw)
    g.add_argument("--adapter", choices=["full", "lora", "bitfit"], help=f"default {d.adapter}", **kw)
    p.add_argument("--full-ft", action=argparse.BooleanOptionalAction, default=True,
                   help="the Full FT row (default on)")
    p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                   help="the ceiling row (the adapter tuned on the full model) and the Plug-in's transfer (default on)")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="the floor row (the adapter tuned on the full model on the owner's public pairs of the "
                        "task's input format) and the Plug-in's transfer beyond it (default on)")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="the transfer probe of every emulator (adapter-gradient cosine on public text; default on)")
    p.add_argument("--batch-size-eval", type=int, default=32)
    p.add_argument("--results", help="results file (default bench/results/paper-<model>[-<budget>].json)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="emulator/adapter cache (default runs/paper-cache)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--plan", action="store_true", help="list the cells left to run and exit")
    p.add_argument("--merge", nargs="+", metavar="RESULTS",
                   help="add these results files' cells (same budget; e.g. task subsets run in parallel) "
                        "to --results, run nothing")
    p.add_argument("--readme-table", action="store_true",
                   help="print the markdown table of docs/results.md from the results file and exit")
    p.add_argument("--report", metavar="DIR", help="after the run, write report.md/json and plots to DIR")
    return p


def budget_from_args(args) -> Budget:
    """The ``--preset``'s budget with the budget flags given (a smaller ``--batch-size`` caps the
    micro-batch)."""
    budget = replace(PRESETS[args.preset], **{k: getattr(args, k) for k in _BUDGET_FLAGS if hasattr(args, k)})
    return replace(budget, micro_batch_size=min(budget.micro_batch_size, budget.batch_size))


def main(argv: list[str] | None = None, hooks: Hooks | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        budget = budget_from_args(args)
        display = ((hooks and hooks.display_name) or model_display_name)(args.model)
        path = Path(args.results) if args.results else default_results_path(display, budget)
        if args.merge:
            merge_results(path, [Path(m) for m in args.merge])
            return 0
        if args.readme_table:
            print(readme_table(build_report([(str(path), load_results(path))])), end="")
            return 0
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        tasks = list(ALL_TASKS) if args.tasks == "all" else [t for t in args.tasks.split(",") if t]
        bad = [t for t in tasks if t not in METRIC]
        if bad and hooks is None:
            raise OffsiteError(f"unknown task(s) {', '.join(bad)}; known: {', '.join(ALL_TASKS)}")
        methods = None if args.methods == "all" else [m for m in args.methods.split(",") if m]
        recipes = load_grids(args.recipes)
        command = "python bench/paper.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        out = run_benchmark(args.model, tasks, methods, budget, full_ft=args.full_ft, results_path=path,
                      cache=args.cache, recipes=recipes, batch_size=args.batch_size_eval,
                      command=command.strip(), hooks=hooks, plan_only=args.plan, ceiling=args.ceiling, floor=args.floor,
                      probe=args.probe)
        if not args.plan:
            report, _ = report_files([path], args.report)
            print(report_markdown(report), end="")
        if out["failures"]:
            for f in out["failures"]:
                print(f"failed: {f}", file=sys.stderr)
            return 1
    except OffsiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
