"""Transfer recipes, the historical records: ``collect`` turns bench/results/transfer-recipes.records.jsonl
into the results file, the generated tables of docs/transfer.md and its plots.

    python bench/transfer_recipes.py collect --plot docs/img/transfer-probe.png --frontier docs/img/transfer-frontier.png \
        --privacy-utility docs/img/privacy-utility-transfer.png --doc docs/transfer.md   # also <task>-recipes, methods

This script now only collects the historical records; it measures nothing. Its measuring commands
were removed on 2026-12-07: ``run`` (one recipe per call, an emulator with an owner-side treatment,
tuned, plugged in and scored by a row sequence of its own, with the treatments only it ran:
``--repair``, ``--start-floor``, ``--build-at-floor``, ``--train-task``, ``--plug-bottom``) and
``diagnose`` (the emulator's task gradient against the full model's, into
bench/results/transfer-diagnose.json). The last commit that has them is 4cdca7b:

    git show 4cdca7be61499d834143b33ca0fba890d265fb46:bench/transfer_recipes.py

and every records line names the command that made it. New measurements go through
bench/content_seeds.py: a grid of recipes, each an :class:`offsite.experiment.recipe.Recipe`, whose
rows run through :func:`offsite.experiment.cell.run_cell`, the one row sequence ``offsite run`` and
every benchmark share.

Each line of the records file is one historical run on one task: the emulator's name ``kind``
(``KIND:opt=value:...``), the adapter ``layers``, ``frac`` (the share of the middle kept) and the
``command``; where they applied, the tuned blocks ``tune`` (``bottom``), ``epochs``, the owner in
the loop ``cv`` = ``[source, examples, weight, every]`` (with ``cv_norm`` and ``cv_pool``), a floor's
``train_task`` (tuned on another task's training split), ``start_floor`` and ``built_at_floor`` (the
floor's adapter shipped), ``repair`` and ``train_limit``; the held-out perplexity ``ppl`` and the
probes ``probe_<source>``; and per row (``emu_zs``, ``emu_ft``, ``plugin``) its accuracy
``<row>_<task>`` and per-document predictions ``<row>_pred_<task>``.

``collect`` turns those lines into the results file: per recipe and task ``emu_ft``/``plugin``
accuracies, the probes, and transfer with its paired standard error against the ceiling of the same
layout, ``tune`` and task (``uniform:keep=26``: every middle block kept), and Full ZS; for a recipe
measured on several tasks also transfer over them (``task: "avg<k>"``, the tasks' gains averaged
before the ratio) and a table per task, and a table of every recipe measured on six tasks with its
averages and whether it clears the transfer issue's bar (``methods``). A run scored on more than
the default 500 documents (``--limit 1000``, the benchmark's budget) is its own recipe, named
``... [first 1000 docs]``, compared with the Full ZS and ceiling scored on as many. Recipes of the
results file that have no line in the records file (the records of earlier runs were not kept)
stay as they are.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from offsite.assist import DEFAULT_SOURCE, MATCHED_SOURCE
from offsite.experiment.report import fill_generated as fill
from offsite.experiment.stats import above_noise, transfer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "transfer-recipes.json"
RECORDS = RESULTS.with_suffix(".records.jsonl")  # per-document predictions: kept, so collect can redo transfer
MODEL = "smollm2-135m"
N_LAYERS = 30  # its blocks: adapter + middle
#: where the removed measuring code (``run``, ``diagnose``) can still be read
REMOVED = "git show 4cdca7be61499d834143b33ca0fba890d265fb46:bench/transfer_recipes.py"


def _opts(kind: str) -> tuple[str, dict]:
    """A historical emulator name ``KIND:opt=value:...`` as its parts (strings)."""
    base, *rest = kind.split(":")
    return base, dict(x.split("=", 1) for x in rest)


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
    """Whether two records lines tuned the same blocks for as many epochs."""
    return c.get("tune") == r.get("tune") and c.get("epochs", 1) == r.get("epochs", 1)


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["run"], ["diagnose"]):
        print(f"error: {argv[0]} was removed on 2026-12-07 ({REMOVED}); measure recipes with "
              "bench/content_seeds.py", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--task", default="arc_easy")
    c.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    c.add_argument("--plot", help="also draw transfer against the probe into this PNG")
    c.add_argument("--frontier", help="also draw transfer against the gap, per method as its size varies, into this PNG")
    c.add_argument("--doc", help="also refresh the generated tables of this markdown file (docs/transfer.md): "
                                 "the recipes on --task, a '<task>-recipes' block per other task, the tasks")
    c.add_argument("--privacy-utility", help="also draw Emulator FT against transfer (privacy against utility) into this PNG")
    cmd_collect(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
