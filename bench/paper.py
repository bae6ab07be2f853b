"""The paper benchmark: every registered method on the embedded model, the papers' table per task.

    python bench/paper.py                                  # the full run (hours on a 2-core CPU)
    python bench/paper.py --tasks arc_easy --methods uniform --eval-limit 50   # minutes
    python bench/paper.py --plan                           # what is done, what is left
    python bench/paper.py --readme-table                   # docs/results.md's table from the results
    python bench/paper.py --merge runs/other.json          # add another run's cells (same budget)

For each task, Full ZS and Full FT are computed once and shared by every method (records with
``method`` null); for each method and each of its settings (``Method.bench_settings``, default
adapter 2,2 with the method's default options; ``uniform``/``kd`` declare keep=8 so every method's
emulator can be matched to the same size) the rows Emulator ZS, Emulator FT and Plug-in. A method
registered later (``offsite.emulator.register``) joins without any change here.

Each method setting also gets (``--no-ceiling`` / ``--no-probe`` skip them):

* the **ceiling**: the same adapter, data, budget and seed tuned on the full model, tuned and scored
  once per adapter layout and task and recorded under every method with that layout;
* **transfer** = (Plug-in − Full ZS) / (ceiling − Full ZS), records ``row: "plugin", metric:
  "transfer"`` per task and over the multiple-choice tasks run (``task: "avg<k>"``), with a paired
  standard error from the per-document predictions, written only where the ceiling gains at least
  two standard errors (docs/transfer.md);
* the **probe**: the adapter-gradient cosine between the emulator and the full model on held-out
  public text (``row: "probe"``, task ``text``; from the bundle's manifest when it carries one).

**Resumable.** A *cell* is (model, task, method, setting, row). Finished cells are kept in the
results file, written atomically after every cell, and skipped on the next run; a killed run
resumes where it stopped. Emulator bundles are cached under ``--cache`` (default
``runs/paper-cache/``, git-ignored) per method and setting, adapter bundles per budget, method,
setting and task; adapter and Full FT training checkpoint into the cache and resume too. Delete the
cache after changing a method's code: it is keyed by the setting, not by the code. The Full ZS and
Plug-in rows of multiple-choice tasks also keep their per-document predictions there
(``details/``), which ``bench/paired.py`` compares without scoring again.

**Budget** (docs/protocol.md, "Budget"), the same for every method, seed and documents:

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

The core is :func:`run_benchmark`, which takes :class:`Hooks` (model loader, training data,
evaluation) so tests run it on tiny models in seconds.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from offsite.errors import OffsiteError  # noqa: E402
from offsite.report import setting_key  # noqa: E402

DEFAULT_TASKS = ("openbookqa", "piqa", "arc_easy", "arc_challenge", "hellaswag", "sciq", "text")
ALL_TASKS = DEFAULT_TASKS[:-1] + ("webqs", "text")
METHOD_ROWS = ("emu_zs", "emu_ft", "plugin")
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_CACHE = ROOT / "runs" / "paper-cache"
DEFAULT_SETTING = {"adapter_layers": [2, 2]}


@dataclass(frozen=True)
class Budget:
    """What one cell may spend; part of the results file's identity (see the module docstring)."""

    eval_limit: int | None = 1000
    train_limit: int | None = 1000
    text_train_limit: int | None = 64
    text_block: int = 512
    lr: float = 1e-4
    full_ft_lr: float = 2e-5
    epochs: float = 1.0
    batch_size: int = 8
    micro_batch_size: int = 8
    schedule: str = "linear"
    seed: int = 42
    max_length: int = 1024
    adapter: str = "full"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def tag(self) -> str:
        """'' for the default budget, else a short readable name of what differs."""
        default = Budget()
        if self == default:
            return ""
        parts = []
        for name, short in (("eval_limit", "e"), ("train_limit", "t")):
            v = getattr(self, name)
            if v != getattr(default, name):
                parts.append(f"{short}{'all' if v is None else v}")
        rest = {k: v for k, v in asdict(self).items() if k not in ("eval_limit", "train_limit")}
        if rest != {k: v for k, v in asdict(default).items() if k not in ("eval_limit", "train_limit")}:
            parts.append(self.digest()[:6])
        return "-".join(parts)

    def train_config(self, task: str, lr: float, progress: bool = True):
        from offsite.train import TrainConfig

        return TrainConfig(lr=lr, epochs=self.epochs, batch_size=self.batch_size,
                           micro_batch_size=self.micro_batch_size, schedule=self.schedule, seed=self.seed,
                           max_length=self.text_block if task == "text" else self.max_length,
                           warmup_ratio=0.0, checkpoint_every=50, progress=progress)


# --- the real world, replaceable in tests -------------------------------------------------------


def _load_model(name: str):
    from offsite.models.load import load_model

    return load_model(name)


def _train_data(task: str, budget: Budget):
    from offsite.tune import TrainingData, task_data

    if task == "text":
        from offsite.data.text import public_text

        return TrainingData("text", list(public_text("train"))[:budget.text_train_limit], source="text")
    data = task_data(task)
    return TrainingData(data.kind, data.items[:budget.train_limit], source=data.source)


def _evaluate(model, tokenizer, task: str, limit: int | None, batch_size: int, progress: bool = True) -> dict:
    from offsite.eval import evaluate

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


# --- plan ---------------------------------------------------------------------------------------


def method_settings(method, config_fn: Callable[[], object]) -> list[dict]:
    """A method's benchmark settings, checked: each a dict with ``adapter_layers`` and options."""
    from offsite.emulator import parse_adapter_layers

    declared = method.bench_settings
    if declared is None:
        declared = [DEFAULT_SETTING]
    elif callable(declared):
        declared = declared(config_fn())
    return [normalise_setting(method, s, parse_adapter_layers) for s in declared]


def chosen_settings(method, override, config_fn: Callable[[], object]) -> list[dict]:
    """``--settings``' entry for ``method`` (one setting or a list), else its benchmark settings."""
    if override:
        return [normalise_setting(method, s) for s in (override if isinstance(override, list) else [override])]
    return method_settings(method, config_fn)


def parse_settings_override(text: str | None) -> dict:
    """``--settings``: a JSON object {method: setting or [setting, ...]} ({} when not given)."""
    try:
        override = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise OffsiteError(f"--settings is not valid JSON ({exc})") from None
    if not isinstance(override, dict):
        raise OffsiteError("--settings must be a JSON object {method: [setting, ...]}")
    return override


def normalise_setting(method, setting: dict, parse_adapter_layers=None) -> dict:
    if parse_adapter_layers is None:
        from offsite.emulator import parse_adapter_layers
    if not isinstance(setting, dict):
        raise OffsiteError(f"method {method.name}: a benchmark setting must be a dict, got {setting!r}")
    out = dict(setting)
    out["adapter_layers"] = list(parse_adapter_layers(out.get("adapter_layers", DEFAULT_SETTING["adapter_layers"])))
    method.options(**{k: v for k, v in out.items() if k != "adapter_layers"})  # unknown options fail here
    return out


def setting_dir(setting: dict) -> str:
    from offsite.report import setting_label, slug

    return f"{slug(setting_label(setting))}-{hashlib.sha256(setting_key(setting).encode()).hexdigest()[:8]}"


def cell_key(model: str, task: str, method: str | None, setting, row: str) -> tuple:
    return (model, task, method, setting_key(setting), row)


def record_cell(rec: dict) -> tuple:
    return cell_key(rec["model"], rec["task"], rec.get("method"), rec.get("setting"), rec["row"])


def default_results_path(display: str, budget: Budget) -> Path:
    from offsite.report import slug

    base = "paper-smollm2" if display == "smollm2-135m" else f"paper-{slug(display)}"
    tag = budget.tag()
    return RESULTS_DIR / f"{base}{'-' + tag if tag else ''}.json"


def _load_same_budget(path: Path, budget: dict | None, here: str) -> dict:
    """A results file whose budget is ``budget`` (``None``: any), else a one-line error."""
    from offsite.report import load_results

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
    from offsite.results import write_results

    if target.exists():
        data = _load_same_budget(target, None, "")
    else:
        first = _load_same_budget(sources[0], None, "")
        data = {"meta": {k: v for k, v in first["meta"].items() if k != "runs"}, "records": []}
    budget = data["meta"].get("budget")
    records, runs = list(data["records"]), list(data["meta"].get("runs") or [])
    done = {record_cell(r) for r in records}
    for src in sources:
        other = _load_same_budget(src, budget, f"in {target}")
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


class _Bench:
    def __init__(self, model_name, budget, results_path, cache, hooks, batch_size, progress, log):
        from offsite.models.load import model_display_name

        self.model_name, self.budget, self.hooks = model_name, budget, hooks
        self.display = (hooks.display_name or model_display_name)(model_name)
        self.results_path = Path(results_path) if results_path else default_results_path(self.display, budget)
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

    def settings(self, task, lr):
        from offsite.tune import TuneSettings

        return TuneSettings(adapter=self.budget.adapter, train=self.budget.train_config(task, lr, self.progress))

    def evaluate(self, model, tokenizer, task, entry=None):
        """The metrics of ``model`` on ``task`` and the seconds they took. With ``entry`` (a Full ZS or
        Plug-in row, see ``details_path``) the per-document predictions, when the evaluation gives
        them, are kept for bench/paired.py."""
        from offsite.files import write_json_atomic

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
        Full ZS is ``("full_zs", None, None)``. A Plug-in's depend on the whole budget; Full ZS
        trains nothing, so its predictions depend only on the documents (shared by budgets that
        differ in training, e.g. the seed)."""
        row, method, setting = entry
        if row == "ceiling":  # shared by every method with the same adapter layout
            return self.cache / "details" / self.budget.digest() / "ceiling" / setting_dir(setting) / f"{task}.json"
        if method is None:
            limit = self.budget.eval_limit
            return self.cache / "details" / f"full_zs-e{'all' if limit is None else limit}" / f"{task}.json"
        return self.cache / "details" / self.budget.digest() / method / setting_dir(setting) / f"{task}.json"

    def ceiling_path(self, layout: dict, task: str) -> Path:
        """The cached metrics of the ceiling of an adapter layout ``{"adapter_layers": [b, t]}``."""
        return self.cache / "ceiling" / self.budget.digest() / setting_dir(layout) / f"{task}.json"

    def emulator_dir(self, method: str, setting: dict) -> Path:
        return self.cache / "emulators" / method / setting_dir(setting)

    def adapter_dir(self, method: str, setting: dict, task: str) -> Path:
        return self.cache / "adapters" / self.budget.digest() / method / setting_dir(setting) / task

    def ensure_emulator(self, method: str, setting: dict) -> Path:
        """The cached emulator bundle of (method, setting), built (and timed) when missing."""
        from offsite.bundle import save_emulator

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
    from dataclasses import asdict

    from offsite.emulator import get_method

    return json.loads(json.dumps(asdict(get_method(method).options(**opts)), default=str))


def entry_name(entry) -> str:
    """'Full ZS' or '<method> (<setting>) Plug-in' for a (row, method, setting) entry."""
    from offsite.report import setting_label

    row, method, setting = entry
    if row == "ceiling":
        return f"Ceiling ({setting_label(setting)})"
    return "Full ZS" if method is None else f"{method} ({setting_label(setting)}) Plug-in"


def entry_details(task: str, entry, acc: float, details: list[dict], seconds: float) -> dict:
    """The cached per-document record bench/paired.py compares: document ids and 0/1 correctness."""
    return {"task": task, "entry": entry_name(entry), "acc": acc, "n": len(details),
            "ids": [d["id"] for d in details], "correct": [int(d["pred"] == d["gold"]) for d in details],
            "seconds": round(seconds, 1)}


def build_emulator(*args, **kwargs):  # indirection so tests can count builds
    from offsite.emulator import build_emulator as build

    return build(*args, **kwargs)


# --- the benchmark ------------------------------------------------------------------------------


def run_benchmark(model_name: str = "smollm2-135m", tasks=DEFAULT_TASKS, methods=None,
                  budget: Budget = Budget(), full_ft: bool = True, results_path=None, cache=DEFAULT_CACHE,
                  settings_override: dict | None = None, batch_size: int = 32, command: str = "",
                  hooks: Hooks | None = None, progress: bool = True, plan_only: bool = False,
                  ceiling: bool = True, probe: bool = True, log=print) -> dict:
    """Run every missing cell; returns the results file's content. See the module docstring."""
    from offsite.bundle import load_adapter, load_emulator, load_emulator_manifest
    from offsite.emulator import all_methods
    from offsite.plug import plug, plug_into_emulator
    from offsite.results import meta, write_results
    from offsite.probe import probe as probe_emulator, probe_records
    from offsite.run import ceiling_emulator, row_records
    from offsite.tune import finetune_full, tune_adapter, tune_to_dir

    hooks = hooks or Hooks()
    b = _Bench(model_name, budget, results_path, cache, hooks, batch_size, progress, log)
    registry = all_methods()
    names = list(registry) if methods is None else list(methods)
    unknown = [m for m in names if m not in registry]
    if unknown:
        raise OffsiteError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(registry))}")
    for over in (settings_override or {}):
        if over not in registry:
            raise OffsiteError(f"--settings names an unknown method {over!r}")
    tasks = list(tasks)
    if not tasks:
        raise OffsiteError("no tasks to run")

    plan = []  # (method, setting)
    failures: list[str] = []  # a method that fails (OffsiteError) is skipped; the others go on
    for name in names:
        try:
            settings = chosen_settings(registry[name], (settings_override or {}).get(name),
                                       lambda: b.base()[0].config)
        except OffsiteError as exc:
            failures.append(f"{name}: its benchmark settings: {exc}")
            log(f"[paper] skipping {failures[-1]}")
            continue
        plan += [(name, s) for s in settings]

    # the results file: earlier cells are kept, the budget must match
    records, runs = [], []
    if b.results_path.exists():
        old = _load_same_budget(b.results_path, asdict(budget), "now")
        records = old["records"]
        runs = list(old["meta"].get("runs") or [])
    done = {record_cell(r) for r in records}

    method_rows = METHOD_ROWS + (("ceiling",) if ceiling else ())
    todo = [("text", m, s, "probe") for m, s in plan] if probe else []
    for task in tasks:
        todo.append((task, None, None, "full_zs"))
        todo += [(task, m, s, row) for m, s in plan for row in method_rows]
        if full_ft:
            todo.append((task, None, None, "full_ft"))
    missing = [c for c in todo if cell_key(b.display, c[0], c[1], c[2], c[3]) not in done]
    log(f"[paper] {len(todo) - len(missing)} of {len(todo)} cells done; results: {b.results_path}")
    if plan_only:
        for task, m, s, row in missing:
            log(f"[paper] to do: {task} {m or 'full model'} {s or ''} {row}")
        return {"meta": {}, "records": records, "missing": missing, "failures": failures}
    if not missing:
        if ceiling and records:
            updated = with_transfer(records, plan, tasks, b)
            if updated != records:
                records = updated
                write_results(b.results_path, old["meta"], records)
        return {"meta": {"budget": asdict(budget), "runs": runs}, "records": records, "failures": failures}

    this_run = meta(command)
    runs.append({k: this_run[k] for k in ("command", "git_commit", "machine", "date")})
    meta_block = {**this_run, "budget": asdict(budget), "runs": runs}
    b.results_path.parent.mkdir(parents=True, exist_ok=True)

    def save(row, task, method, setting, metrics, seconds, extra):
        base = {"model": b.display, "method": method, "setting": setting}
        new = row_records(row, {task: metrics}, base, seconds, extra)
        records.extend(new)
        done.add(cell_key(b.display, task, method, setting, row))
        write_results(b.results_path, meta_block, records)
        headline = next((r for r in new if r["metric"] in ("acc", "exact_match", "ppl")), new[0] if new else None)
        if headline:
            log(f"[paper] {task} · {method or 'full model'} {setting_key(setting) if setting else ''} · {row}: "
                f"{headline['metric']} {headline['value']:.4f} ({seconds:.0f}s)")

    def is_done(task, method, setting, row):
        return cell_key(b.display, task, method, setting, row) in done

    broken: set = set()

    def ceiling_cell(task, setting):
        """The ceiling's metrics for this setting's adapter layout on ``task``: tuned and scored once
        per layout, task and budget, then shared by every method with that layout."""
        layout = {"adapter_layers": list(setting["adapter_layers"])}
        path = b.ceiling_path(layout, task)
        if path.exists():
            return json.loads(path.read_text())
        from offsite.files import write_json_atomic

        model, tok = b.base()
        full_middle = ceiling_emulator(model, tok, b.display, layout["adapter_layers"])
        data = b.data(task)
        log(f"[paper] ceiling: tuning the adapter {setting_key(layout)} on the full model ({task})")
        work = path.with_suffix(".work")
        _, trained = tune_adapter(full_middle, data, b.settings(task, budget.lr), work)
        metrics, dt = b.evaluate(full_middle.model, tok, task, entry=("ceiling", None, layout))
        cell = {"metrics": metrics, "seconds": round(dt, 2), "train_seconds": round(trained.seconds, 2),
                "train_examples": len(data.items), "train_steps": trained.steps}
        write_json_atomic(path, cell)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        return cell

    def probe_cell(method, setting, emu_dir, extra):
        """The transfer probe (adapter-gradient cosine on public text) of a cached emulator: from its
        manifest when it was probed at build time, else computed now against the full model."""
        figures = (load_emulator_manifest(emu_dir).get("report") or {}).get("probe")
        t0 = time.perf_counter()
        if figures is None:
            model, _ = b.base()
            log(f"[paper] probing {method} {setting_key(setting)}")
            figures = probe_emulator(model, load_emulator(emu_dir))
        base = {"model": b.display, "method": method, "setting": setting, "task": "text", **extra,
                "seconds": round(time.perf_counter() - t0, 2)}
        records.extend(probe_records(figures, base))
        done.add(cell_key(b.display, "text", method, setting, "probe"))
        write_results(b.results_path, meta_block, records)
        log(f"[paper] {method} {setting_key(setting)} · probe: grad_cos {figures['grad_cos']['all']:.3f}")

    def method_cells(task, method, setting):
        eval_extra = {"eval_limit": budget.eval_limit}
        emu_dir = b.ensure_emulator(method, setting)
        shapes = load_emulator_manifest(emu_dir).get("shapes", {})
        extra = {**eval_extra, "middle_params": shapes.get("middle_params"),
                 "original_middle_params": shapes.get("original_middle_params"),
                 "build_seconds": b.build_seconds(emu_dir)}
        if probe and not is_done("text", method, setting, "probe"):
            probe_cell(method, setting, emu_dir, {k: v for k, v in extra.items() if k != "eval_limit"})
        if ceiling and not is_done(task, method, setting, "ceiling"):
            cell = ceiling_cell(task, setting)
            save("ceiling", task, method, setting, cell["metrics"], cell["seconds"],
                 {**eval_extra, **{k: cell[k] for k in ("train_seconds", "train_examples", "train_steps")}})
        if not is_done(task, method, setting, "emu_zs"):
            emu = load_emulator(emu_dir)
            metrics, dt = b.evaluate(emu.model, emu.tokenizer, task)
            save("emu_zs", task, method, setting, metrics, dt, extra)
            del emu
        adapter_dir = b.adapter_dir(method, setting, task)
        tuned = None
        if not (adapter_dir / "manifest.json").exists():
            data = b.data(task)
            tuned = load_emulator(emu_dir)
            log(f"[paper] tuning the adapter: {task} · {method} {setting_key(setting)} "
                f"({len(data.items)} examples)")
            tune_to_dir(tuned, data, b.settings(task, budget.lr), adapter_dir, overwrite=True)
        bundle = load_adapter(adapter_dir)
        ft_extra = {**extra, "train_seconds": bundle.training.get("seconds"),
                    "train_examples": bundle.training.get("examples"),
                    "train_steps": bundle.training.get("steps")}
        if not is_done(task, method, setting, "emu_ft"):
            emu = tuned if tuned is not None else plug_into_emulator(load_emulator(emu_dir), bundle)
            metrics, dt = b.evaluate(emu.model, emu.tokenizer, task)
            save("emu_ft", task, method, setting, metrics, dt, ft_extra)
            del emu
        tuned = None
        if not is_done(task, method, setting, "plugin"):
            model, tok = b.base()
            plugged = plug(copy.deepcopy(model), bundle, load_emulator_manifest(emu_dir))
            metrics, dt = b.evaluate(plugged, tok, task, entry=("plugin", method, setting))
            save("plugin", task, method, setting, metrics, dt, ft_extra)
            del plugged

    for task in tasks:
        eval_extra = {"eval_limit": budget.eval_limit}
        if not is_done(task, None, None, "full_zs"):
            model, tok = b.base()
            metrics, dt = b.evaluate(model, tok, task, entry=("full_zs", None, None))
            save("full_zs", task, None, None, metrics, dt, eval_extra)

        for method, setting in plan:
            if (method, setting_key(setting)) in broken or (
                    all(is_done(task, method, setting, r) for r in method_rows)
                    and (not probe or is_done("text", method, setting, "probe"))):
                continue
            try:
                method_cells(task, method, setting)
            except OffsiteError as exc:
                broken.add((method, setting_key(setting)))
                failures.append(f"{method} {setting_key(setting)} ({task}): {exc}")
                log(f"[paper] skipping {failures[-1]}")

        if full_ft and not is_done(task, None, None, "full_ft"):
            model, tok = b.base()
            data = b.data(task)
            ft = copy.deepcopy(model)
            log(f"[paper] Full FT: {task} ({len(data.items)} examples)")
            work = b.cache / "full_ft" / budget.digest() / f"{task}.work"
            result = finetune_full(ft, tok, data, b.settings(task, budget.full_ft_lr), work)
            metrics, dt = b.evaluate(ft, tok, task)
            save("full_ft", task, None, None, metrics, dt,
                 {**eval_extra, "train_seconds": round(result.seconds, 2), "train_examples": len(data.items),
                  "train_steps": result.steps})
            del ft
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    if ceiling:
        records = with_transfer(records, plan, tasks, b)
        write_results(b.results_path, meta_block, records)
    return {"meta": meta_block, "records": records, "failures": failures}


def with_transfer(records: list[dict], plan, tasks, b: _Bench) -> list[dict]:
    """``records`` with the Plug-in's transfer records recomputed from the cached per-document
    predictions of Full ZS, Plug-in and ceiling: per task, and over the tasks that have all three
    (task ``avg<k>``), each only where the ceiling gains at least two standard errors."""
    from offsite.run import transfer_record
    from offsite.stats import transfer

    def correct(entry, task):
        path = b.details_path(entry, task)
        return json.loads(path.read_text()) if path.exists() else None

    kept = [r for r in records if not (r["row"] == "plugin" and r.get("metric") == "transfer")]
    new = []
    for method, setting in plan:
        layout = {"adapter_layers": list(setting["adapter_layers"])}
        base = {"model": b.display, "method": method, "setting": setting}
        rows = {"plugin": {}, "full_zs": {}, "ceiling": {}}
        for task in tasks:
            got = {"plugin": correct(("plugin", method, setting), task), "full_zs": correct(("full_zs", None, None), task),
                   "ceiling": correct(("ceiling", None, layout), task)}
            if any(g is None for g in got.values()) or len({tuple(g["ids"]) for g in got.values()}) != 1:
                continue  # not multiple choice, not scored yet, or on other documents
            for row, g in got.items():
                rows[row][task] = g["correct"]
            rec = transfer_record(rows, task, base)
            if rec is not None:
                new.append(rec)
        common = list(rows["plugin"])
        if len(common) > 1:
            t = transfer(*[[rows[r][k] for k in common] for r in ("plugin", "full_zs", "ceiling")])
            if t["value"] is not None and t["ceiling_gain"] > 2 * t["ceiling_gain_stderr"]:
                new.append({**base, "task": f"avg{len(common)}", "row": "plugin", "metric": "transfer",
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


def build_parser() -> argparse.ArgumentParser:
    d = Budget()
    p = argparse.ArgumentParser(prog="bench/paper.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated tasks, or 'all' ({','.join(ALL_TASKS)}); default: {','.join(DEFAULT_TASKS)}")
    p.add_argument("--methods", default="all", help="comma-separated registered methods, or 'all' (default)")
    p.add_argument("--settings", help='JSON replacing methods\' declared settings, e.g. '
                                      '\'{"uniform": [{"adapter_layers": [2, 2], "keep": 4}]}\'')
    p.add_argument("--eval-limit", type=_limit, default=d.eval_limit, help="documents per task ('all': every one)")
    p.add_argument("--train-limit", type=_limit, default=d.train_limit, help="training examples per task ('all')")
    p.add_argument("--text-train-limit", type=_limit, default=d.text_train_limit,
                   help="public-text training documents for the text task")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr, help="adapter learning rate")
    p.add_argument("--full-ft-lr", type=float, default=d.full_ft_lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="training examples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--adapter", default=d.adapter, choices=["full", "lora", "bitfit"])
    p.add_argument("--full-ft", action=argparse.BooleanOptionalAction, default=True,
                   help="the Full FT row (default on)")
    p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                   help="the ceiling row (the adapter tuned on the full model) and the Plug-in's transfer (default on)")
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
    return Budget(eval_limit=args.eval_limit, train_limit=args.train_limit, text_train_limit=args.text_train_limit,
                  lr=args.lr, full_ft_lr=args.full_ft_lr, epochs=args.epochs, batch_size=args.batch_size,
                  micro_batch_size=min(args.micro_batch_size, args.batch_size), seed=args.seed,
                  adapter=args.adapter)


def main(argv: list[str] | None = None, hooks: Hooks | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from offsite.models.load import model_display_name
        from offsite.report import build_report, load_results, readme_table, report_files

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
        from offsite.eval import METRIC

        bad = [t for t in tasks if t not in METRIC]
        if bad and hooks is None:
            raise OffsiteError(f"unknown task(s) {', '.join(bad)}; known: {', '.join(ALL_TASKS)}")
        methods = None if args.methods == "all" else [m for m in args.methods.split(",") if m]
        override = parse_settings_override(args.settings)
        command = "python bench/paper.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        out = run_benchmark(args.model, tasks, methods, budget, full_ft=args.full_ft, results_path=path,
                      cache=args.cache, settings_override=override, batch_size=args.batch_size_eval,
                      command=command.strip(), hooks=hooks, plan_only=args.plan, ceiling=args.ceiling,
                      probe=args.probe)
        if not args.plan:
            report, _ = report_files([path], args.report)
            from offsite.report import report_markdown

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
