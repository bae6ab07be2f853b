"""What the benchmark scripts in ``bench/`` share, as one importable module.

* :class:`~offsite.experiment.budget.Budget` (defined in :mod:`offsite.experiment.budget`, shared with ``offsite run``): what
  one benchmark cell may spend (its identity keys the results file and the cache);
* :class:`Hooks` and :class:`Bench`: the model loader, training data and evaluation a benchmark
  uses (replaceable in tests), and its cache of emulators, adapters and per-document predictions;
* a grid's recipes (:class:`~offsite.experiment.recipe.Recipe`): :func:`method_recipes` (a method's
  defaults), :func:`chosen_recipes`, :func:`load_grids` (``--recipes FILE``); a cell's ``setting``
  is its recipe's (:meth:`~offsite.experiment.recipe.Recipe.setting`);
* cell keys and results files: :func:`cell_key`, :func:`record_cell`, :func:`load_same_budget`,
  :func:`merge_results`;
* measuring: :func:`peak_rss_mb`, :func:`status_mb` and :func:`alternating_runs` (configurations
  timed in fresh processes, alternating, so a slow phase of a busy machine hits each alike).

``bench/paper.py`` runs the benchmark itself (docs/protocol.md); ``bench/paired.py``,
``bench/emulator_cost.py``, ``bench/privacy.py``, ``bench/efficiency.py``, ``bench/precision.py``
and ``bench/pema.py`` import from here.
"""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .budget import Budget
from .recipe import Recipe, load_grid
from ..bundle import save_emulator
from ..emulator import build_emulator as _build_emulator
from ..emulator import get_method
from ..errors import OffsiteError
from ..eval import document_scores, evaluate
from ..files import write_json_atomic
from ..models.load import load_model, model_display_name
from .report import load_results, setting_key, setting_label, slug
from .results import write_results

METHOD_ROWS = ("emu_zs", "emu_ft", "plugin")


# --- the real world, replaceable in tests -------------------------------------------------------


def _load_model(name: str):
    return load_model(name)


def _train_data(task: str, budget: Budget):
    return budget.training_data(task)


def _evaluate(model, tokenizer, task: str, limit: int | None, batch_size: int, progress: bool = True) -> dict:
    return evaluate(model, tokenizer, task, limit=limit, batch_size=batch_size, progress=progress,
                    return_details=True)


@dataclass
class Hooks:
    load_model: Callable = _load_model  # name -> (model, tokenizer)
    train_data: Callable = _train_data  # (task, budget) -> TrainingData
    # (model, tokenizer, task, limit, batch_size, progress) -> metrics; a multiple-choice task's may
    # carry ``details`` (per-document predictions), kept for bench/paired.py (see ``entry_details``)
    evaluate: Callable = _evaluate
    display_name: Callable = None  # name -> display name (default: offsite.models.load.model_display_name)


# --- method settings, cells and results files --------------------------------------------------


def method_recipes(method, config_fn: Callable[[], object]) -> list[Recipe]:
    """A method's benchmark recipes: one per ``Method.bench_settings`` entry (its adapter layout and
    options; a callable is given the full model's config from ``config_fn``), else adapter 2,2 with
    the method's default options."""
    declared = method.bench_settings
    if declared is None:
        return [Recipe(method=method.name)]
    if callable(declared):
        declared = declared(config_fn())
    where = f"method {method.name}'s benchmark setting"
    for s in declared:
        if not isinstance(s, dict):
            raise OffsiteError(f"{where} must be a dict, got {s!r}")
    return [Recipe.from_dict({"method": method.name, "adapter_layers": s.get("adapter_layers", (2, 2)),
                              "options": {k: v for k, v in s.items() if k != "adapter_layers"}}, where)
            for s in declared]


def chosen_recipes(method, given: list[Recipe], config_fn: Callable[[], object]) -> list[Recipe]:
    """The recipes of ``given`` (a grid's, ``--recipes``) for ``method``, else its benchmark
    recipes; each checked by building its options (a bad option or value fails here)."""
    recipes = [r for r in given if r.method == method.name] or method_recipes(method, config_fn)
    for r in recipes:
        method.options(**r.options)
    return recipes


def load_grids(paths) -> list[Recipe]:
    """``--recipes FILE ...``: the recipes of these grid files (:func:`offsite.experiment.recipe.load_grid`),
    in order. A benchmark's training is its budget's, so a recipe here names the method, its options
    and the adapter layout only: [tuning], [assist], [dp] and floor_source are refused."""
    recipes = [r for p in paths or () for r in load_grid(p)]
    for r in recipes:
        extra = [k for k in ("floor_source", "tuning", "assist", "dp") if getattr(r, k)]
        if extra:
            raise OffsiteError(f"recipe {r.label()!r}: a benchmark grid's recipe names the method, its options "
                               f"and adapter_layers; {', '.join(extra)} come from the budget (its flags)")
    return recipes


def setting_dir(setting: dict) -> str:
    return f"{slug(setting_label(setting))}-{hashlib.sha256(setting_key(setting).encode()).hexdigest()[:8]}"


def cell_key(model: str, task: str, method: str | None, setting, row: str) -> tuple:
    return (model, task, method, setting_key(setting), row)


def record_cell(rec: dict) -> tuple:
    return cell_key(rec["model"], rec["task"], rec.get("method"), rec.get("setting"), rec["row"])


def load_same_budget(path: Path, budget: dict | None, here: str) -> dict:
    """A results file whose budget is ``budget`` (``None``: any), else a one-line error."""
    data = load_results(path)
    theirs = data["meta"].get("budget")
    if budget is not None and theirs is not None and theirs != budget:
        diff = {k: (theirs.get(k), v) for k, v in budget.items() if theirs.get(k) != v}
        what = ", ".join(f"{k}: {a} there, {c} {here}" for k, (a, c) in diff.items())
        raise OffsiteError(f"{path} holds another budget ({what}); pass --results to write elsewhere")
    return data


def merge_results(target: Path, sources: list[Path], log=print) -> dict:
    """Add the cells of ``sources`` (other results files of the same budget, e.g. task subsets run as
    parallel processes) that ``target`` lacks; a cell already in ``target`` keeps its numbers.
    ``meta.runs`` gains the sources' runs. Returns the written content."""
    if target.exists():
        data = load_same_budget(target, None, "")
    else:
        first = load_same_budget(sources[0], None, "")
        data = {"meta": {k: v for k, v in first["meta"].items() if k != "runs"}, "records": []}
    budget = data["meta"].get("budget")
    records, runs = list(data["records"]), list(data["meta"].get("runs") or [])
    done = {record_cell(r) for r in records}
    for src in sources:
        other = load_same_budget(src, budget, f"in {target}")
        budget = budget or other["meta"].get("budget")
        theirs = {record_cell(r) for r in other["records"]}
        added = theirs - done
        records += [r for r in other["records"] if record_cell(r) in added]
        done |= added
        runs += [r for r in other["meta"].get("runs") or [] if r not in runs]
        log(f"[paper] {src}: {len(added)} cells added, {len(theirs - added)} already in {target}")
    meta_block = {**data["meta"], "budget": budget, "runs": runs}
    write_results(target, meta_block, records)
    return {"meta": meta_block, "records": records}


# --- state --------------------------------------------------------------------------------------


class Bench:
    """A benchmark's state for one model and budget: the full model (loaded on first need), the
    training data per task, and the cache of emulator bundles, adapter bundles, ceilings and
    per-document predictions under ``cache/<model>``."""

    def __init__(self, model_name: str, budget: Budget, cache, hooks: Hooks | None = None, batch_size: int = 32,
                 progress: bool = True, log=print):
        hooks = hooks or Hooks()
        self.model_name, self.budget, self.hooks = model_name, budget, hooks
        self.display = (hooks.display_name or model_display_name)(model_name)
        self.cache = Path(cache) / self.display
        self.batch_size, self.progress, self.log = batch_size, progress, log
        self._base = None
        self._data = {}

    # the full model, loaded on first need and never modified (copies are tuned and plugged)
    def base(self):
        if self._base is None:
            self.log(f"[paper] loading {self.model_name}")
            self._base = self.hooks.load_model(self.model_name)
        return self._base

    def data(self, task):
        if task not in self._data:
            self._data[task] = self.hooks.train_data(task, self.budget)
        return self._data[task]

    def settings(self, task, lr=None):
        """The data owner's tuning settings for ``task`` (at the budget's adapter lr unless ``lr``)."""
        return self.budget.tune_settings(task, lr, self.progress)

    def evaluate(self, model, tokenizer, task, entry=None):
        """The metrics of ``model`` on ``task`` and the seconds they took. With ``entry`` (a Full ZS or
        Plug-in row, see ``details_path``) the per-document predictions, when the evaluation gives
        them, are kept for bench/paired.py."""
        t0 = time.perf_counter()
        metrics = self.hooks.evaluate(model, tokenizer, task, self.budget.eval_limit, self.batch_size, self.progress)
        seconds = time.perf_counter() - t0
        details = metrics.pop("details", None)
        if entry is not None and details is not None:
            write_json_atomic(self.details_path(entry, task),
                              entry_details(task, entry, metrics["acc"], details, seconds))
        return metrics, seconds

    def details_path(self, entry, task: str) -> Path:
        """Where the per-document predictions of ``entry`` = (row, method, setting) on ``task`` live;
        Full ZS is ``("full_zs", None, None)``, the floor ``("floor", <public source>, layout)``. A
        Plug-in's depend on the whole budget; Full ZS trains nothing, so its predictions depend only
        on the documents (shared by budgets that differ in training, e.g. the seed)."""
        row, method, setting = entry
        if row == "ceiling":  # shared by every method with the same adapter layout
            return self.cache / "details" / self.budget.digest() / "ceiling" / setting_dir(setting) / f"{task}.json"
        if row == "floor":  # likewise, per public source
            return self.cache / "details" / self.budget.digest() / f"floor-{method}" / setting_dir(setting) / f"{task}.json"
        if method is None:
            limit = self.budget.eval_limit
            return self.cache / "details" / f"full_zs-e{'all' if limit is None else limit}" / f"{task}.json"
        return self.cache / "details" / self.budget.digest() / method / setting_dir(setting) / f"{task}.json"

    def ceiling_path(self, layout: dict, task: str) -> Path:
        """The cached metrics of the ceiling of an adapter layout ``{"adapter_layers": [b, t]}``."""
        return self.cache / "ceiling" / self.budget.digest() / setting_dir(layout) / f"{task}.json"

    def floor_path(self, layout: dict, task: str, source: str) -> Path:
        """The cached metrics of the floor of an adapter layout on ``task``, tuned on ``source``'s pairs."""
        return self.cache / f"floor-{source}" / self.budget.digest() / setting_dir(layout) / f"{task}.json"

    def emulator_dir(self, method: str, setting: dict) -> Path:
        return self.cache / "emulators" / method / setting_dir(setting)

    def adapter_dir(self, method: str, setting: dict, task: str) -> Path:
        return self.cache / "adapters" / self.budget.digest() / method / setting_dir(setting) / task

    def ensure_emulator(self, method: str, setting: dict) -> Path:
        """The cached emulator bundle of (method, setting), built (and timed) when missing."""
        path = self.emulator_dir(method, setting)
        opts = {k: v for k, v in setting.items() if k != "adapter_layers"}
        resolved = resolved_options(method, opts)
        if (path / "manifest.json").exists():
            built = self.build_info(path).get("options")
            if built is not None and built != resolved:
                changed = sorted(k for k in set(built) | set(resolved) if built.get(k) != resolved.get(k))
                raise OffsiteError(f"the cached {method} emulator {path} was built with other options "
                                   f"({', '.join(f'{k}: {built.get(k)!r} then, {resolved.get(k)!r} now' for k in changed)}"
                                   "; a default changed?): remove it and its adapters, or pass another --cache")
            return path
        model, tokenizer = self.base()
        self.log(f"[paper] building the {method} emulator {setting}")
        t0 = time.perf_counter()
        emu = build_emulator(method, model, tokenizer, self.display, setting["adapter_layers"], **opts)
        seconds = time.perf_counter() - t0
        save_emulator(emu, path, overwrite=True)
        write_build_info(path, seconds, resolved)
        self.log(f"[paper] built in {seconds:.1f}s -> {path}")
        return path

    def build_info(self, path: Path) -> dict:
        try:
            info = json.loads(_build_info_file(path).read_text())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def build_seconds(self, path: Path):
        return self.build_info(path).get("seconds")


def _build_info_file(path: Path) -> Path:
    return path.parent / (path.name + ".build.json")


def write_build_info(path: Path, seconds: float, options: dict) -> None:
    """The sidecar of a cached emulator: its build time and the options it was built with."""
    _build_info_file(path).write_text(json.dumps({"seconds": round(seconds, 2), "options": options}))


def resolved_options(method: str, opts: dict) -> dict:
    """Every option of ``method`` as ``opts`` resolve it today (defaults included), JSON-shaped: the
    cache is keyed by the setting as written, so a changed default must not reuse an old build."""
    return json.loads(json.dumps(asdict(get_method(method).options(**opts)), default=str))


def entry_name(entry) -> str:
    """'Full ZS' or '<method> (<setting>) Plug-in' for a (row, method, setting) entry."""
    row, method, setting = entry
    if row == "ceiling":
        return f"Ceiling ({setting_label(setting)})"
    if row == "floor":
        return f"Floor on {method} pairs ({setting_label(setting)})"
    return "Full ZS" if method is None else f"{method} ({setting_label(setting)}) Plug-in"


def entry_details(task: str, entry, acc: float, details: list[dict], seconds: float) -> dict:
    """The cached per-document record bench/paired.py compares: document ids and 0/1 correctness."""
    return {"task": task, "entry": entry_name(entry), "acc": acc, "n": len(details),
            "ids": [d["id"] for d in details], "correct": [int(x) for x in document_scores(details)],
            "seconds": round(seconds, 1)}


def build_emulator(*args, **kwargs):  # indirection so tests can count builds
    return _build_emulator(*args, **kwargs)




# --- measuring -----------------------------------------------------------------------------------


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``, ...) in MiB; 0 if absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: per address space, so unlike ``ru_maxrss`` it
    does not carry over the RSS of the parent that forked us)."""
    return status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def alternating_runs(script: str, modes: list[str], args: list[str], rounds: int, model: str, keep: int) -> dict:
    """Build the uniform emulator (adapter 2,2, ``keep`` middle blocks) of ``model`` in a temporary
    bundle, then run ``script --_child MODE --emulator-dir DIR *args`` for every mode, ``rounds``
    times, alternating, each in a fresh process (slow phases of a noisy machine hit every mode
    alike). Returns ``{mode: [the child's JSON result per round]}``."""
    runs = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        m, tokenizer = load_model(model)
        save_emulator(_build_emulator("uniform", m, tokenizer, model, "2,2", keep=keep), f"{tmp}/emu")
        del m
        for r in range(rounds):
            for mode in modes:
                out = subprocess.run([sys.executable, script, "--_child", mode, "--emulator-dir", f"{tmp}/emu", *args],
                                     capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {mode}", runs[mode][-1], flush=True)
    return runs
