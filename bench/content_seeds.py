"""The content benchmark: a grid of cells (content task × recipe × seed) run through offsite's one row
sequence (:func:`offsite.experiment.cell.run_cell`), every row cached with its per-document scores,
so that recipes are compared on the same documents and over seeds (docs/transfer.md, docs/content.md).

    python bench/content_seeds.py --task sarcasm --limit 500 --seeds 1 2 3            # the default grid
    python bench/content_seeds.py --task sarcasm --recipe my.toml --seeds 1           # recipe files
    python bench/content_seeds.py --task sarcasm --rows distilled --seeds 1 2 3      # and the distilled Plug-in
    python bench/content_seeds.py --task sarcasm --collect docs/transfer.md           # results and tables

A task is a content task of :mod:`offsite.data.content` (its files built reproducibly under
``runs/content-seeds/data``); a recipe is an :class:`offsite.experiment.recipe.Recipe` (``--recipe``
files, TOML or JSON; default :data:`GRID`, every method at about half of the middle), tuned under
the ``paper`` preset's budget at each ``--seeds`` seed. The rows of a (recipe, seed): Full ZS (once
per task), the ceiling and each floor (once per seed and layout: the generic WebQuestions pairs and
the task's matched public file where it has one), Emulator ZS (once per emulator), Emulator FT and
the Plug-in; with ``--rows distilled`` also the distilled Plug-in (:mod:`offsite.distilled_plugin`: the
owner tunes the full model's adapter on public sentences in the task's prompt labelled by the tuned
emulator; the task's spec is :func:`offsite.distilled_plugin.content_spec`). Rows are cached under ``runs/content-seeds/<task>/rows`` (keyed by what each depends on,
so a second recipe reuses the first one's Full ZS, ceiling and floors), emulators under
``runs/content-seeds/emulators`` (shared by the tasks), and ``cells.json`` lists the cells run.

``--collect`` writes ``bench/results/content-seeds-<task>.{json,md}`` and the frontier plot
``docs/img/content-seeds-<task>.png`` from the cache: per recipe the Plug-in and Emulator FT per seed,
the gap, Plug-in − Full ZS, transfer over Full ZS and beyond the higher floor (intervals over
documents and seeds: :func:`offsite.experiment.stats.paired_seeds`), and the **proxy** row, computed
from the stored choice log-likelihoods with no new model work: Full ZS's scores plus the emulator's
change under the tuned adapter (Emulator FT − Emulator ZS), centred per label word on the owner's
public inputs where ``--calib`` gives them: the adaptation carried as a change of predictions, as in
proxy-tuning (the owner then serves the full model beside the emulator with and without the
adapter). A recipe with distilled rows also has a **distilled** record, the same statistics of that
row. Records measured before the benchmark became a grid of cells (2026-12-07) stay in the
results file under ``earlier``, rendered after the new ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = ROOT / "runs" / "content-seeds"
MODEL = "smollm2-135m"
CALIB_N = 200  # public inputs scored beside the task (--calib)

#: the default grid: every method at about half of the middle's parameters, the data owner alone
GRID = [{"method": "uniform", "options": {"keep": 13}}, {"method": "gradot", "options": {"ratio": 0.5}},
        {"method": "kd", "options": {"keep": 13}}, {"method": "scaleot", "options": {"alpha": 0.5}},
        {"method": "gradmatch", "options": {"keep": 13}}]


@dataclass
class Task:
    """One content task as the grid runs it: evaluation documents, training data, floors' public pairs."""

    name: str
    eval: object  # offsite.data.own.OwnTask
    data: object  # offsite.tune.TrainingData
    floors: dict  # source name -> TrainingData (as many pairs as the data owner tunes on)
    limit: int | None
    sources: list  # the floors' sources as given (task names or files)
    calib: object = None
    model: list = field(default_factory=list)  # [model, tokenizer] once loaded
    distill: object = None  # offsite.distilled_plugin.DistillSpec of the distilled row (None: it cannot run)
    root: Path | None = None  # where its cells live (default RUNS; emulators stay under RUNS, shared)

    @property
    def out(self) -> Path:
        return (self.root or RUNS) / self.name

    def base(self):
        if not self.model:
            from offsite.models.load import load_model

            self.model.extend(load_model(MODEL))
        return tuple(self.model)


def load_task(name: str, limit: int | None, floors: list[str], calib: str | None, train: str | None = None,
              root: Path | None = None) -> Task:
    """The task's files (built if missing) and its floors: ``floors`` names public sources (a built-in
    task or a file); by default the generic WebQuestions pairs and the task's matched file. ``train``:
    another training file (the task's with canaries planted, bench/data_privacy.py); ``root``: where
    the cells live."""
    from offsite.data.content import build_content_task, content_task
    from offsite.data.own import load_own_task
    from offsite.distilled_plugin import content_spec
    from offsite.experiment.cell import public_pairs_of
    from offsite.tune import file_data, task_data

    paths = build_content_task(name, RUNS / "data")
    data = file_data(train or str(paths["train"]))
    sources = floors or ["webqs"] + ([str(paths["floor"])] if paths.get("floor") else [])
    return Task(name, load_own_task(str(paths["eval"])), data,
                {Path(s).stem: public_pairs_of(task_data(s), len(data.items)) for s in sources}, limit, sources,
                load_own_task(calib) if calib else None, root=root,
                distill=content_spec(name) if content_task(name).surrogate is not None else None)


def score(task: Task):
    """The grid's scoring: the task's metrics, per-document correctness and choice log-likelihoods
    (and the public inputs' log-likelihoods with ``--calib``)."""
    from offsite.eval import document_scores, evaluate

    def fn(model, tokenizer, row):
        res = evaluate(model, tokenizer, task.eval, limit=task.limit, batch_size=32, return_details=True,
                       progress=False)
        details = res.pop("details")
        choices = {task.name: [d["lls"] for d in details]}
        if task.calib is not None:
            cal = evaluate(model, tokenizer, task.calib, limit=CALIB_N, batch_size=32, return_details=True,
                           progress=False)
            choices["calib"] = [d["lls"] for d in cal["details"]]
        return {task.name: res}, {task.name: document_scores(details)}, choices
    return fn


def emulator_dir(recipe) -> Path:
    """Where the emulator of ``recipe``'s method and options is kept (``uniform-keep13``), for every task."""
    name = "-".join([recipe.method] + [f"{k}{v}" for k, v in sorted(recipe.options.items())])
    if tuple(recipe.adapter_layers) != (2, 2):
        name += "-layers{}{}".format(*recipe.adapter_layers)
    return RUNS / "emulators" / name


def ensure_emulator(task: Task, recipe) -> Path:
    from offsite.bundle import save_emulator
    from offsite.emulator import build_emulator

    path = emulator_dir(recipe)
    if not (path / "manifest.json").exists():
        model, tok = task.base()
        t0 = time.perf_counter()
        built = build_emulator(recipe.method, model, tok, MODEL, recipe.adapter_layers, **recipe.options)
        save_emulator(built, path, overwrite=True)
        print(f"built {path.name} in {time.perf_counter() - t0:.0f}s", flush=True)
    return path


def slug(recipe) -> str:
    """A cell's name in folders and files: its recipe's label (``uniform-keep13-seed1``)."""
    return "-".join(recipe.label().replace("=", "").split())


def describe(task: Task, recipe, floor: str | None = None) -> dict:
    """The description of one cell (:func:`offsite.experiment.cell.describe_cell`): what its rows'
    cache keys are made of (:func:`cell_of`; bench/data_privacy.py keys its federated rows by it)."""
    from offsite.bundle import load_emulator_manifest
    from offsite.experiment.budget import preset
    from offsite.experiment.cell import describe_cell

    budget = preset("paper")
    settings = recipe.tune_settings(budget.train_config(progress=False))
    emu = emulator_dir(recipe)
    digest = load_emulator_manifest(emu).get("digest") if (emu / "manifest.json").exists() else None
    assist = recipe.assist_options()
    return describe_cell(MODEL, [task.name, task.eval.digest],
                         {"limit": task.limit, "calib": task.calib.digest if task.calib else None},
                         {"method": recipe.method, "options": recipe.options, "digest": digest},
                         recipe.adapter_layers, settings, budget.identity(), task.data,
                         assist.record() if assist.on else None, (floor, task.floors[floor]) if floor else None,
                         task.distill.record() if task.distill else None)


def cell_of(task: Task, recipe, floor: str | None = None):
    """(the Lab, the row cache) of one cell: ``recipe`` (its seed included) on ``task``; with
    ``floor`` the floor row on that source's public pairs. A recipe with the owner in the loop
    (``[assist]``) tunes its adapter with the owner's correction, the owner holding the full model
    and its own copy of the emulator (as ``offsite run --assist-every`` does)."""
    from offsite.assist import Assistant
    from offsite.bundle import load_emulator
    from offsite.experiment.budget import preset
    from offsite.experiment.cell import Lab, RowCache, row_key

    budget = preset("paper")
    settings = recipe.tune_settings(budget.train_config(progress=False))
    emu = emulator_dir(recipe)
    name = slug(recipe)
    assist = recipe.assist_options()
    lab = Lab(display=MODEL, adapter_layers=tuple(recipe.adapter_layers), base=task.base, score=score(task),
              data=lambda: task.data, settings=settings, full_ft_lr=budget.full_ft_lr,
              work=lambda row: task.out / "work" / f"{row}-{name}", emulator_dir=emu,
              adapter_dir=task.out / "adapters" / name,
              floor_data=(lambda: (task.floors[floor], floor)) if floor else None,
              assistant=(lambda: Assistant(task.base()[0], load_emulator(emu), assist)) if assist.on else None,
              distill=task.distill, log=lambda m: print(m, flush=True))
    cell = describe(task, recipe, floor)
    return lab, RowCache(task.out / "rows", lambda row: row_key(row, cell))


#: the rows of a cell the grid runs (the floors apart, one per source)
CELL_ROWS = ("full_zs", "ceiling", "emu_zs", "emu_ft", "plugin")
#: rows a grid may add (--rows): the distilled Plug-in
EXTRA_ROWS = ("distilled",)


def run_grid(task: Task, recipes: list, seeds: list[int], rows=CELL_ROWS, floors: bool = True) -> None:
    """Every (recipe, seed) cell's ``rows`` and (with ``floors``) its floors; each row computed once (the cache)."""
    from offsite.experiment.cell import run_cell
    from offsite.files import write_json_atomic

    write_json_atomic(task.out / "task.json", {"limit": task.limit, "floors": task.sources,
                                               "calib": task.calib.source if task.calib else None})
    for seed in seeds:
        for recipe in recipes:
            recipe = recipe.with_seed(seed)
            ensure_emulator(task, recipe)
            lab, cache = cell_of(task, recipe)
            run_cell(lab, list(rows), cache)
            for floor in task.floors if floors else ():
                floor_lab, floor_cache = cell_of(task, recipe, floor)
                run_cell(floor_lab, ["floor"], floor_cache)
            index = task.out / "cells.json"
            cells = json.loads(index.read_text()) if index.exists() else {}
            write_json_atomic(index, {**cells, recipe.label(): recipe.to_dict()})


# --- collecting ---------------------------------------------------------------------------------

def read_cells(task: Task) -> dict:
    """What the cache holds: ``{"full_zs": row, "ceiling": {layout: {seed: row}}, "floors": {layout: {source:
    {seed: row}}},
    "recipes": {label: {"spec": recipe dict, "seeds": {seed: {"emu_zs", "emu_ft", "plugin"[, "distilled"]: row}}}}}``
    (``distilled`` where that seed has one). The ceiling and the floors tune the recipe's adapter blocks,
    so they are kept per :func:`layout_of` the recipe (every block, or the bottom ones only)."""
    from offsite.experiment.recipe import Recipe

    index = task.out / "cells.json"
    if not index.exists():
        raise SystemExit(f"nothing measured under {task.out}: run a cell first (python bench/content_seeds.py "
                         f"--task {task.name} --seeds 1)")
    got = {"full_zs": None, "ceiling": {}, "floors": {}, "recipes": {}}
    for spec in json.loads(index.read_text()).values():
        recipe = Recipe.from_dict(spec)
        seed = recipe.seed
        lab, cache = cell_of(task, recipe)
        got["full_zs"] = got["full_zs"] or cache.read("full_zs")
        ceilings = got["ceiling"].setdefault(layout_of(recipe), {})
        ceilings[seed] = ceilings.get(seed) or cache.read("ceiling")
        for floor in task.floors:
            row = cell_of(task, recipe, floor)[1].read("floor")
            if row is not None:
                got["floors"].setdefault(layout_of(recipe), {}).setdefault(floor, {})[seed] = row
        rows = {r: cache.read(r) for r in ("emu_zs", "emu_ft", "plugin")}
        if all(rows.values()):
            distilled = cache.read("distilled") if task.distill else None
            rows.update({"distilled": distilled} if distilled else {})
            unseeded = replace(recipe, tuning={k: v for k, v in recipe.tuning.items() if k != "seed"})
            entry = got["recipes"].setdefault(unseeded.label(), {"spec": unseeded.to_dict(), "seeds": {}})
            entry["seeds"][seed] = rows
    got["ceiling"] = {lay: {s: r for s, r in by.items() if r is not None} for lay, by in got["ceiling"].items()}
    return got


#: the layout of the papers' recipes: adapter 2,2, every adapter block tuned
DEFAULT_LAYOUT = "2,2 all"


def layout_of(recipe) -> str:
    """The adapter layout a recipe's ceiling and floors share: its adapter layers and tuned blocks (``2,2 all``)."""
    from offsite.experiment.recipe import Recipe

    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_dict(recipe)
    return "{},{} {}".format(*recipe.adapter_layers, recipe.tuning.get("blocks") or "all")


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def proxy(full: list, emu_zs: list, emu_ft: list, gold: list[int], centre: list | None) -> list[float]:
    """Per-document correctness of the proxy row: Full ZS's choice scores plus Emulator FT − Emulator ZS,
    minus ``centre`` (that change's mean per label word on public inputs) where given."""
    out = []
    for f, z, t, g in zip(full, emu_zs, emu_ft, gold):
        s = [a + (c - b) - (centre[i] if centre else 0.0) for i, (a, b, c) in enumerate(zip(f, z, t))]
        out.append(float(max(range(len(s)), key=s.__getitem__) == g))
    return out


def record_of(task: Task, label: str, entry: dict, row: str, base: tuple, zs: list, ceilings: dict) -> dict:
    """One record (docs/results-format.md): a recipe's ``row`` (``plugin``, ``proxy`` or ``distilled``) over
    its seeds."""
    from offsite.experiment.stats import paired_seeds, transfer_seeds

    seeds = sorted(entry["seeds"])
    plug = [entry["seeds"][s][row] for s in seeds]
    diff, se = paired_seeds(plug, zs)
    rec = {"task": task.name, "recipe": label, "spec": entry["spec"], "row": row, "seeds": seeds,
           "middle_share": middle_share(entry["spec"]), "plugin": [_mean(p) for p in plug],
           "emu_ft": [_mean(entry["seeds"][s]["emu_ft"]) for s in seeds],
           "plugin_minus_full_zs": diff, "stderr": se}
    paired = [s for s in seeds if s in ceilings]
    if paired:
        plugs, ceils = [entry["seeds"][s][row] for s in paired], [ceilings[s] for s in paired]
        t = transfer_seeds(plugs, zs, ceils)
        rec["transfer"] = {"seeds": paired, **{k: t[k] for k in ("value", "stderr", "per_seed", "ceiling_gain",
                                                                  "ceiling_gain_stderr")}}
        b = transfer_seeds(plugs, base[1], ceils)
        rec["beyond_floor"] = {"floor": base[0], "value": b["value"], "stderr": b["stderr"]}
    return rec


def middle_share(spec: dict) -> float | None:
    """The share of the middle's parameters the recipe's emulator keeps (from its manifest)."""
    from offsite.experiment.recipe import Recipe

    path = emulator_dir(Recipe.from_dict(spec)) / "manifest.json"
    if not path.exists():
        return None
    shapes = json.loads(path.read_text())["shapes"]
    return shapes["middle_params"] / shapes["original_middle_params"]


def collect(task: Task, reference: str | None = None) -> dict:
    """The cache of ``task`` -> results: Full ZS, ceilings and floors per seed, a record per recipe and row,
    each measured against the ceiling and floors of its own adapter layout, or of the layout ``reference``
    for every recipe (bench/data_privacy.py: every protocol against the data owner alone's)."""
    got = read_cells(task)
    name = task.name
    bases = {lay: baseline(task, got, lay) for lay in {reference or layout_of(e["spec"]) for e in got["recipes"].values()}
             | set(got["ceiling"])}
    zs = got["full_zs"].correct[name]
    gold = [d.gold for d in task.eval.docs][:len(zs)]
    records = []
    for label, entry in sorted(got["recipes"].items()):
        _, ceilings, _, base = bases[reference or layout_of(entry["spec"])]
        entry = {"spec": entry["spec"], "seeds": {s: _rows_of(rows, got, name, gold) for s, rows in entry["seeds"].items()}}
        records += [record_of(task, label, entry, row, base, zs, ceilings) for row in ("plugin", "proxy")]
        distilled = {s: rows for s, rows in entry["seeds"].items() if "distilled" in rows}
        if distilled:
            rec = record_of(task, label, {"spec": entry["spec"], "seeds": distilled}, "distilled", base, zs, ceilings)
            rec["distill"] = {**task.distill.record(), "label_shares": [
                got["recipes"][label]["seeds"][s]["distilled"].extra["distill"]["label_shares"] for s in rec["seeds"]]}
            records.append(rec)
    main = DEFAULT_LAYOUT if DEFAULT_LAYOUT in got["ceiling"] else min(got["ceiling"], default=DEFAULT_LAYOUT)
    zs, ceilings, floors, base = bases.get(main) or baseline(task, got, main)
    others = {lay: bases[lay] for lay in sorted(got["ceiling"]) if lay != main}
    return {"full_zs": _mean(zs), "ceiling": _accs(ceilings), "floors": {f: _accs(by) for f, by in floors.items()},
            "beyond_floor_from": base[0], "records": records,
            "layouts": {lay: {"ceiling": _accs(c), "floors": {f: _accs(by) for f, by in fl.items()}, "beyond_floor_from": b[0]}
                        for lay, (_, c, fl, b) in others.items()},
            "head": head(zs, ceilings, floors, base[0])
            + "".join(f". Adapter {lay} (its own ceiling and floors): "
                      + references(zs, c, fl, b[0], "the " + lay.split()[1] + " adapter blocks")[2:]
                      for lay, (_, c, fl, b) in others.items())}


def _accs(by_seed: dict) -> dict:
    return {"seeds": sorted(by_seed), "acc": [_mean(by_seed[s]) for s in sorted(by_seed)]}


def baseline(task: Task, got: dict, layout: str = DEFAULT_LAYOUT) -> tuple:
    """What the records of ``task`` with adapter ``layout`` are measured against, from :func:`read_cells`'s
    ``got``: Full ZS's per-document correctness, the layout's ceilings' and floors' per seed, and the base
    of "beyond the floor" (``(name, per-document scores)``: the higher of Full ZS and the best floor,
    seeds averaged)."""
    name = task.name
    zs = got["full_zs"].correct[name]
    ceilings = {s: r.correct[name] for s, r in got["ceiling"].get(layout, {}).items()}
    floors = {f: {s: r.correct[name] for s, r in by.items()} for f, by in got["floors"].get(layout, {}).items()}
    base = ("full_zs", zs)
    for f, by in floors.items():
        mean = [_mean(col) for col in zip(*by.values())]
        if sum(mean) > sum(base[1]):
            base = (f, mean)
    return zs, ceilings, floors, base


def _rows_of(rows: dict, got: dict, name: str, gold: list[int]) -> dict:
    """One seed's per-document rows of a recipe: Emulator FT, the Plug-in, the proxy and the distilled
    Plug-in where it was run."""
    choices = {r: rows[r].choices for r in ("emu_zs", "emu_ft")}
    centre = None
    if "calib" in choices["emu_ft"]:
        centre = [_mean(t) - _mean(z) for t, z in zip(zip(*choices["emu_ft"]["calib"]), zip(*choices["emu_zs"]["calib"]))]
    return {"emu_ft": rows["emu_ft"].correct[name], "plugin": rows["plugin"].correct[name],
            "proxy": proxy(got["full_zs"].choices[name], choices["emu_zs"][name], choices["emu_ft"][name], gold, centre),
            **({"distilled": rows["distilled"].correct[name]} if "distilled" in rows else {})}


def head(zs: list, ceilings: dict, floors: dict, base: str) -> str:
    """The table's first line: Full ZS, the ceiling and each floor, with their paired differences."""
    return f"Full ZS {100 * _mean(zs):.1f} on {len(zs)} documents" + references(zs, ceilings, floors, base)


def references(zs: list, ceilings: dict, floors: dict, base: str, tuned: str = "every adapter block") -> str:
    """``; ceiling ...; floor on ...; ...``: the ceiling and each floor against Full ZS, and the base of
    "beyond the floor"."""
    from offsite.experiment.stats import paired_seeds

    text = ""
    parts = [(f"ceiling ({tuned} tuned on the full model)", ceilings)] + \
            [(f"floor on {f}", by) for f, by in floors.items()]
    for what, by in parts:
        if by:
            rows = [by[s] for s in sorted(by)]
            d, s = paired_seeds(rows, zs)
            text += (f"; {what} " + " / ".join(f"{100 * _mean(r):.1f}" for r in rows)
                     + f" (seeds {', '.join(map(str, sorted(by)))}; − Full ZS {100 * d:+.1f} ± {100 * s:.1f})")
    return text + (f"; transfer beyond the floor is measured from the floor on {base}" if base != "full_zs" else
                   "; no floor is above Full ZS, so transfer beyond the floor is measured from Full ZS")


def line(rec: dict) -> str:
    """A record's table line (new records and the earlier ones alike)."""
    share = rec.get("middle_share")
    n = len(rec["seeds"])
    gap = _mean(rec["plugin"]) - _mean(rec["emu_ft"])
    cells = [f"`{rec['recipe']}`", f"{100 * share:.0f} %" if share else "?", rec["row"], ",".join(map(str, rec["seeds"])),
             f"{100 * sum(rec['emu_ft']) / n:.1f}", " / ".join(f"{100 * v:.1f}" for v in rec["plugin"]),
             f"{100 * gap:+.1f}", f"{100 * rec['plugin_minus_full_zs']:+.1f} ± {100 * rec['stderr']:.1f}"]
    for key in ("transfer", "beyond_floor"):
        t = rec.get(key) or {}
        cells.append(f"{t['value']:.2f} ± {t['stderr']:.2f}" if t.get("value") is not None else "–")
    return "| " + " | ".join(cells) + " |"


TABLE_HEAD = ("| recipe | middle kept | row | seeds | Emulator FT | Plug-in per seed | gap | Plug-in − Full ZS | "
              "transfer | beyond the floor |\n|---|---|---|---|---|---|---|---|---|---|\n")


def table(res: dict) -> str:
    text = res["head"] + "\n\n" + TABLE_HEAD + "\n".join(line(r) for r in res["records"]) + "\n"
    earlier = res.get("earlier")
    if earlier and earlier.get("records"):
        text += ("\nMeasured before the benchmark became a grid of cells (same protocol; rows no longer cached): "
                 f"Full ZS {100 * earlier['full_zs']:.1f}, ceiling "
                 + " / ".join(f"{100 * a:.1f}" for a in earlier["ceiling"]["acc"])
                 + f" (seeds {', '.join(map(str, earlier['ceiling']['seeds']))}).\n\n" + TABLE_HEAD
                 + "\n".join(line(r) for r in earlier["records"]) + "\n")
    return text


def earlier_of(path: Path) -> dict | None:
    """The records of a results file written before the grid (no ``spec``), kept as they are."""
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    if "earlier" in old:
        return old["earlier"]
    if any("spec" in r for r in old.get("records", [])):
        return None
    return {k: old[k] for k in ("meta", "full_zs", "ceiling", "floors", "records") if k in old}


def plot_frontier(records: list[dict], path: Path, task: str) -> None:
    """Transfer against the share of the middle kept, one marker per recipe (seed mean, error bar: the
    interval over documents and seeds); the Plug-in, the proxy and the distilled Plug-in, earlier records
    included."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for rows, colour, label in ((("plugin", "plugin@1"), "C0", "Plug-in"), (("proxy",), "C1", "proxy (logit arithmetic)"),
                                (("distilled",), "C2", "distilled Plug-in")):
        pts = [(r["middle_share"], r["transfer"]["value"], r["transfer"]["stderr"], len(r["seeds"])) for r in records
               if r["row"] in rows and r.get("middle_share") and (r.get("transfer") or {}).get("value") is not None]
        for i, (x, y, e, n) in enumerate(sorted(pts)):
            ax.errorbar(100 * x, y, yerr=e, fmt="o" if n > 1 else "x", color=colour, capsize=3,
                        label=label if i == 0 else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(0.8, color="green", lw=0.8, ls="--", label="target 0.8")
    ax.set_xlabel("share of the middle's parameters kept (%)")
    ax.set_ylabel("transfer (Plug-in − Full ZS) / (ceiling − Full ZS)")
    ax.set_title(f"{task}: what crosses, by emulator size (o: ≥ 2 seeds, x: 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_collected(task: Task, doc: str) -> int:
    from offsite.experiment.report import fill_generated
    from offsite.experiment.results import meta
    from offsite.files import write_json_atomic, write_text_atomic

    name = f"content-seeds-{task.name}"
    path = ROOT / "bench" / "results" / f"{name}.json"
    res = collect(task)
    res["earlier"] = earlier_of(path)
    text = table(res)
    write_json_atomic(path, {
        "meta": {**meta(f"python bench/content_seeds.py --task {task.name} --collect"),
                 "protocol": "a grid of cells through offsite.experiment.cell.run_cell; each recipe tuned once per seed "
                             "under the paper preset (1 epoch, batch 8, lr 1e-4, adapter 2,2); intervals: documents' paired "
                             "standard error on seed means plus the seeds' variance (offsite.experiment.stats.paired_seeds)"},
        **{k: v for k, v in res.items() if k != "head"}})
    write_text_atomic(path.with_suffix(".md"), text)
    plot_frontier(res["records"] + ((res["earlier"] or {}).get("records") or []), ROOT / "docs" / "img" / f"{name}.png",
                  task.name)
    print(text)
    if doc:
        write_text_atomic(Path(doc), fill_generated(Path(doc).read_text(), name, text))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, help="a content task (offsite.data.content: sentiment, sarcasm, ...)")
    ap.add_argument("--recipe", action="append", default=[], help="a recipe file, TOML or JSON (repeatable; default: GRID)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--floor", action="append", default=[],
                    help="public pairs for a floor, a task name or file (default: webqs and the task's matched file)")
    ap.add_argument("--limit", type=int, help="the first N evaluation documents")
    ap.add_argument("--calib", help="public inputs every model is also scored on (their labels unused)")
    ap.add_argument("--rows", nargs="+", choices=EXTRA_ROWS, default=[],
                    help="rows to add to each cell: distilled (the distilled Plug-in, offsite.distilled_plugin)")
    ap.add_argument("--collect", metavar="DOC", nargs="?", const="",
                    help="write bench/results/content-seeds-<task>.{json,md} from the cache (and the table in DOC)")
    a = ap.parse_args(argv)
    import torch

    from offsite.experiment.recipe import Recipe

    torch.set_num_threads(1)
    saved = RUNS / a.task / "task.json"
    if a.collect is not None and saved.exists():  # collect what was run: its documents, floors and public inputs
        was = json.loads(saved.read_text())
        a.limit, a.floor, a.calib = a.limit or was["limit"], a.floor or was["floors"], a.calib or was["calib"]
    task = load_task(a.task, a.limit, a.floor, a.calib)
    if a.collect is not None:
        return write_collected(task, a.collect)
    if "distilled" in a.rows and task.distill is None:
        raise SystemExit(f"content task {a.task} has no single prompt template: it has no distilled row")
    recipes = [Recipe.load(p) for p in a.recipe] or [Recipe.from_dict(r) for r in GRID]
    run_grid(task, recipes, a.seeds, CELL_ROWS + tuple(a.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
