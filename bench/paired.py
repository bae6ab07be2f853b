"""Paired differences of Plug-in accuracy: are two methods' Plug-ins really different?

The paper benchmark's table gives each cell its own standard error, as if every cell had its own
documents. All rows are scored on the same documents, so the error of a *difference* between two
rows is much smaller than the two errors combined: per document, ``d = correct_A - correct_B``, and
the paired standard error is ``sd(d) / sqrt(n)``. This script takes, document by document, the
Full ZS row and the Plug-in row of each (method, setting): the predictions ``bench/paper.py`` kept
when it scored them (``<cache>/<model>/details/``), or, for cells scored before the
benchmark kept them, a re-scoring from its cache (the tuned adapters under ``runs/paper-cache``;
with ``--tune`` a missing one is tuned again exactly as ``bench/paper.py`` tunes it). It checks
that every accuracy equals the results file's, and writes every pairwise difference per task and
over the tasks' average (the mean of the per-task differences; its error combines the per-task
paired errors). Each pair is written later entry minus earlier one, in the order Full ZS, then the
methods as given.

    python bench/paired.py [--tasks openbookqa,...] [--methods kd,uniform,scaleot] [--recipes GRID.toml]
                           [--results bench/results/paper-smollm2.json [SEED2.json ...]]
                           [--out bench/results/paired-smollm2.json] [--tune] [--score-only | --combine-only | --table]

Several results files (runs of one budget that differ only in ``--seed``) are compared per seed and
pooled: each document's correctness is averaged over the seeds before the pairing.

Re-scored predictions are cached in the same place, so two processes can score different methods
side by side (``--score-only``) and a last call combines them (``--combine-only``). Only
multiple-choice tasks (accuracy ``acc``) are compared.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

from offsite.experiment.benchmark import (Bench, Budget, Hooks, cell_key, chosen_recipes, entry_details, entry_name,
                                          load_grids, record_cell)
from offsite.errors import OffsiteError
from offsite.experiment.report import setting_key
from offsite.eval.paired import paired

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_CACHE = ROOT / "runs" / "paper-cache"  # bench/paper.py's cache, whose predictions are compared here

TASKS = ("openbookqa", "piqa", "arc_easy", "arc_challenge", "hellaswag", "sciq")
FULL = ("full_zs", None, None)  # (row, method, setting) of the reference entry


def average(per_task: list[tuple[float, float]]) -> tuple[float, float]:
    """The mean of per-task (mean, s.e.) pairs; tasks are independent document sets."""
    k = len(per_task)
    return sum(m for m, _ in per_task) / k, math.sqrt(sum(s * s for _, s in per_task)) / k


def score_entry(b: Bench, entry, task: str, tune: bool = False, docs=None, log=print) -> dict:
    """Per-document correctness of ``entry`` on ``task`` (cached); ``docs`` default to the task's
    evaluation documents up to the budget's limit, as in ``bench/paper.py``."""
    import copy

    from offsite.bundle import load_adapter, load_emulator_manifest

    from offsite.files import write_json_atomic
    from offsite.data.tasks import load_task
    from offsite.eval.mc import score_mc
    from offsite.plug import plug

    path = b.details_path(entry, task)
    if path.is_file():
        return json.loads(path.read_text())
    row, method, setting = entry
    model, tok = b.base()
    if method is None:
        scored = model
    else:
        adapter = b.adapter_dir(method, setting, task)
        emu_dir = b.emulator_dir(method, setting)
        if not (emu_dir / "manifest.json").is_file():
            raise OffsiteError(f"no {method} {setting_key(setting)} emulator in {b.cache}; run bench/paper.py "
                               "for that method first")
        if not (adapter / "manifest.json").is_file():
            if not tune:
                raise OffsiteError(f"no tuned adapter for {method} {setting_key(setting)} on {task} in {b.cache}; "
                                   "pass --tune or run bench/paper.py for that cell first")
            from offsite.bundle import load_emulator
            from offsite.tune import tune_to_dir

            log(f"[paired] tuning the adapter: {task} · {method} {setting_key(setting)} (as bench/paper.py)")
            tune_to_dir(load_emulator(emu_dir), b.data(task), b.settings(task), adapter, overwrite=True)
        scored = plug(copy.deepcopy(model), load_adapter(adapter), load_emulator_manifest(emu_dir))
    if docs is None:
        docs = load_task(task, "eval")[:b.budget.eval_limit]
    t0 = time.perf_counter()
    res = score_mc(scored, tok, docs, batch_size=b.batch_size, progress=b.progress, return_details=True)
    out = entry_details(task, entry, res["acc"], res["details"], time.perf_counter() - t0)
    write_json_atomic(path, out)
    log(f"[paired] {task} · {entry_name(entry)}: acc {out['acc']:.4f} ({out['seconds']}s)")
    return out


def table_value(records: list[dict], entry, task: str) -> float | None:
    """The results file's accuracy of ``entry`` on ``task`` (None when it has no such cell)."""
    row, method, setting = entry
    want = cell_key(None, task, method, setting, row)[1:]
    for r in records:
        if r["metric"] == "acc" and record_cell(r)[1:] == want:
            return r["value"]
    return None


def load_scores(b: Bench, entries: list, tasks: list[str], table: list[dict]) -> tuple[dict, list[dict]]:
    """Each entry's kept predictions per task, checked against the results file, and its accuracy
    records."""
    scores, records = {}, []
    for e in entries:
        row, method, setting = e
        for t in tasks:
            p = b.details_path(e, t)
            if not p.is_file():
                raise OffsiteError(f"{entry_name(e)} on {t} is not scored yet (run without --combine-only)")
            s = scores[(entry_name(e), t)] = json.loads(p.read_text())
            ref = table_value(table, e, t)
            if ref is not None and abs(ref - s["acc"]) > 1e-9:
                raise OffsiteError(f"{entry_name(e)} on {t}: re-scored accuracy {s['acc']:.4f} differs from the "
                                   f"results file's {ref:.4f}; the cache does not hold that run's adapter")
            records.append({"task": t, "method": method, "setting": setting, "row": row, "metric": "acc",
                            "value": s["acc"], "n": s["n"], "matches_results_file": ref is not None})
    return scores, records


def differences(scores: dict, entries: list, tasks: list[str], extra: dict | None = None) -> list[dict]:
    """Every pairwise paired difference, per task and on the tasks' average."""
    records = []
    for i, a in enumerate(entries):
        for bb in entries[i + 1:]:
            per_task = []
            for t in tasks:
                sa, sb = scores[(entry_name(a), t)], scores[(entry_name(bb), t)]
                if sa["ids"] != sb["ids"]:
                    raise OffsiteError(f"{t}: {entry_name(a)} and {entry_name(bb)} were scored on other documents")
                m, se = paired(sb["correct"], sa["correct"])
                per_task.append((m, se))
                records.append(diff_record(t, bb, a, m, se, len(sa["ids"]), extra))
            m, se = average(per_task)
            records.append(diff_record(f"avg{len(tasks)}", bb, a, m, se, None, extra))
    return records


def combine(b: Bench, entries: list, tasks: list[str], table: list[dict], log=print) -> list[dict]:
    """Records: each entry's accuracy per task, and every pairwise paired difference."""
    scores, records = load_scores(b, entries, tasks, table)
    return records + differences(scores, entries, tasks)


def combine_seeds(runs: list[tuple[Bench, list[dict]]], entries: list, tasks: list[str]) -> list[dict]:
    """The same comparison over several benchmark runs that differ only in the training seed: each
    run's differences (records carry ``seed``), then the pooled ones, where each document's
    correctness is averaged over the seeds before pairing (``seed``: the list). The pooled error is
    still over documents: with a few seeds it does not measure the seed-to-seed spread, which the
    per-seed rows show."""
    records, per_seed = [], []
    for b, table in runs:
        scores, accs = load_scores(b, entries, tasks, table)
        extra = {"seed": b.budget.seed}
        records += [{**r, **extra} for r in accs] + differences(scores, entries, tasks, extra)
        per_seed.append(scores)
    pooled = {}
    for key in per_seed[0]:
        runs_of = [sc[key] for sc in per_seed]
        if any(r["ids"] != runs_of[0]["ids"] for r in runs_of):
            raise OffsiteError(f"{key[0]} on {key[1]}: the seeds' runs were scored on other documents")
        correct = [sum(c) / len(c) for c in zip(*(r["correct"] for r in runs_of))]
        pooled[key] = {"ids": runs_of[0]["ids"], "correct": correct}
    return records + differences(pooled, entries, tasks, {"seed": [b.budget.seed for b, _ in runs]})


def diff_record(task, a, b, mean, se, n, extra=None) -> dict:
    label = f"{entry_name(a)} - {entry_name(b)}"
    seed = (extra or {}).get("seed")
    if seed is not None:
        label += f", seeds {'+'.join(map(str, seed))} pooled" if isinstance(seed, list) else f", seed {seed}"
    return {"task": task, "method": a[1], "setting": a[2], "row": "paired_diff", "metric": "acc",
            "vs": {"method": b[1], "setting": b[2], "row": b[0]}, "label": label,
            "value": mean, "stderr": se, "n": n, "z": mean / se if se else None, **(extra or {})}


SHORT = {"openbookqa": "OBQA", "piqa": "PIQA", "arc_easy": "ARC-E", "arc_challenge": "ARC-C",
         "hellaswag": "HellaSwag", "sciq": "SciQ"}


def markdown(records: list[dict]) -> str:
    """The markdown table of docs/results.md: one row per pair, the paired difference in points (± paired s.e.) per
    task and on the average."""
    diffs = [r for r in records if r["row"] == "paired_diff"]
    tasks = list(dict.fromkeys(r["task"] for r in diffs))
    head = ["difference (points)"] + [SHORT.get(t, t) for t in tasks]
    rows, seen = [], {}
    for r in diffs:
        seen.setdefault(r["label"], {})[r["task"]] = r
    for label, per in seen.items():
        rows.append([label] + [f"{100 * per[t]['value']:+.2f} ± {100 * per[t]['stderr']:.2f}" for t in tasks])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows]) + "\n" + seed_table(records)


def seed_table(records: list[dict]) -> str:
    """With runs of several seeds: each entry's accuracy (%) per seed and their mean, per task and
    on the average ('' otherwise)."""
    accs = [r for r in records if r["row"] in ("full_zs", "plugin") and r.get("seed") is not None]
    seeds = sorted({r["seed"] for r in accs})
    if len(seeds) < 2:
        return ""
    tasks = list(dict.fromkeys(r["task"] for r in accs))
    by = {}
    for r in accs:
        name = entry_name((r["row"], r["method"], r["setting"]))
        by.setdefault(name, {})[(r["seed"], r["task"])] = 100 * r["value"]
    head = ["accuracy (%)", "seed"] + [SHORT.get(t, t) for t in tasks] + [f"avg{len(tasks)}"]
    out = ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in by.items():
        rows = [(str(s), [v[(s, t)] for t in tasks]) for s in seeds]
        rows.append(("mean", [sum(v[(s, t)] for s in seeds) / len(seeds) for t in tasks]))
        for i, (label, vals) in enumerate(rows):
            cells = [f"{x:.1f}" for x in vals] + [f"{sum(vals) / len(vals):.2f}"]
            out.append("| " + " | ".join([name if i == 0 else "", label] + cells) + " |")
    return "\n".join(out) + "\n"


def summary(records: list[dict]) -> str:
    lines = []
    for r in records:
        if r["row"] == "paired_diff" and r["task"].startswith("avg"):
            lines.append(f"{r['label']}: {100 * r['value']:+.2f} ± {100 * r['stderr']:.2f} points "
                         f"(paired, {r['task']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/paired.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default="kd,uniform,scaleot")
    p.add_argument("--recipes", nargs="+", metavar="FILE",
                   help="grid files of recipes (as bench/paper.py's) replacing the benchmark recipes of the methods they name")
    p.add_argument("--no-full-zs", action="store_true", help="leave the Full ZS entry out")
    p.add_argument("--results", nargs="+", default=[str(RESULTS_DIR / "paper-smollm2.json")],
                   help="the paper benchmark's results file (its budget is used; accuracies are checked); "
                        "several: runs whose budgets differ only in the seed, compared per seed and pooled")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--out", default=str(RESULTS_DIR / "paired-smollm2.json"))
    p.add_argument("--threads", type=int)
    p.add_argument("--tune", action="store_true",
                   help="tune a missing adapter with the results file's budget (the same run as bench/paper.py's; "
                        "the accuracy check then tells whether it reproduced the table)")
    p.add_argument("--batch-size-eval", type=int, default=32)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--score-only", action="store_true", help="score and cache, write no results file")
    g.add_argument("--combine-only", action="store_true", help="only combine cached scores")
    g.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = p.parse_args(argv)
    try:
        if args.table:
            try:
                records = json.loads(Path(args.out).read_text())["records"]
            except (OSError, ValueError, KeyError) as exc:
                raise OffsiteError(f"{args.out} is not a paired-differences results file ({exc})") from None
            print(markdown(records), end="")
            return 0
        from offsite.emulator import all_methods
        from offsite.experiment.results import meta, write_results

        tables, budgets = [], []
        for path in args.results:
            try:
                tables.append(json.loads(Path(path).read_text()))
                budgets.append(Budget.from_identity(tables[-1]["meta"]["budget"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise OffsiteError(f"{path} is not a paper benchmark results file ({exc})") from None
        unseeded = {json.dumps({**x.identity(), "seed": None}, sort_keys=True) for x in budgets}
        if len(unseeded) > 1 or len({x.seed for x in budgets}) < len(budgets):
            raise OffsiteError("several --results files must be runs of one budget with different seeds")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        benches = [Bench(args.model, x, args.cache, Hooks(), args.batch_size_eval, True, print)
                   for x in budgets]
        b = benches[0]
        given = load_grids(args.recipes)
        registry = all_methods()
        entries = [] if args.no_full_zs else [FULL]
        for name in [m for m in args.methods.split(",") if m]:
            if name not in registry:
                raise OffsiteError(f"unknown method {name!r}; known: {', '.join(registry)}")
            recipes = chosen_recipes(registry[name], given, lambda: b.base()[0].config)
            entries += [("plugin", name, r.setting()) for r in recipes]
        tasks = [t for t in args.tasks.split(",") if t]
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise OffsiteError(f"only multiple-choice tasks are compared, not {', '.join(bad)}")
        if not args.combine_only:
            for bench in benches:
                for t in tasks:
                    for e in entries:
                        score_entry(bench, e, t, tune=args.tune)
        if args.score_only:
            return 0
        if len(benches) == 1:
            records = combine(b, entries, tasks, tables[0]["records"])
        else:
            records = combine_seeds([(x, t["records"]) for x, t in zip(benches, tables)], entries, tasks)
        command = "python bench/paired.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        records = [{"model": b.display, **r} for r in records]
        where = {"budget": b.budget.identity(), "results_file": str(Path(args.results[0]))}
        if len(benches) > 1:
            where = {"budget": {**b.budget.identity(), "seed": [x.seed for x in budgets]},
                     "results_files": [str(Path(x)) for x in args.results]}
        write_results(Path(args.out), {**meta(command.strip()), **where}, records)
        print(summary(records))
        print(f"wrote {args.out}")
    except OffsiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
