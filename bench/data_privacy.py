"""The data owner's privacy, measured: a grid of (content task × DP epsilon) cells, each one a recipe
of the content benchmark (bench/content_seeds.py) with canaries planted in the training file, and the
attacks of ``offsite privacy --side data`` on the adapter it returns (docs/privacy.md).

    python bench/data_privacy.py --task sarcasm --epsilons inf 8 3 1        # one task's cells
    python bench/data_privacy.py --collect docs/privacy.md                   # every task measured

Per task, under ``runs/data-privacy/<task>/``: the training file with canaries planted
(:func:`offsite.privacy.canary.plant`: two made-up secrets at each of 1, 4 and 16 repetitions), the
non-members (the first 500 evaluation rows, never trained on), and per epsilon the cell of
:data:`RECIPE` with ``[dp] epsilon`` (``inf``: no DP), the data owner alone, seed ``--seed``: Emulator
ZS and FT, Full ZS and the Plug-in through the content grid; the ceiling and the floors once,
**without** DP (the non-private reference: transfer beyond the floor is then the share of what the
data owner could have had). On each cell's adapter: membership inference against the plugged model
and the bare adapter on its emulator (loss, loss calibrated by the untuned model, min-k %), with ROC
AUC and TPR at 1 % FPR and their bootstrap intervals, and each canary's exposure from the plugged
model. ``--collect`` writes ``bench/results/data-privacy.json`` and ``.md``, the table in DOC and the
privacy-utility plot ``docs/img/data-privacy.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = ROOT / "runs" / "data-privacy"
#: the data owner's recipe, the same at every epsilon (only [dp] changes)
RECIPE = {"method": "uniform", "options": {"keep": 13}}
HELDOUT = 500  # non-members: the first evaluation rows
LIMIT = 500  # evaluation documents per row


def recipe_at(epsilon: float, seed: int):
    from offsite.experiment.recipe import Recipe

    return Recipe.from_dict({**RECIPE, **({"dp": {"epsilon": epsilon}} if math.isfinite(epsilon) else {})}).with_seed(seed)


def prepare(name: str):
    """The task as the grid runs it, with canaries planted in its training file; the paths of the
    planted file, its canary record and the non-members."""
    from bench import content_seeds as cs
    from offsite.data.content import build_content_task
    from offsite.files import write_text_atomic
    from offsite.privacy.canary import canary_record_path, plant

    out = RUNS / name
    paths = build_content_task(name, cs.RUNS / "data")
    planted = out / "train_canaries.jsonl"
    if not planted.exists():
        out.mkdir(parents=True, exist_ok=True)
        plant(paths["train"], planted)
    heldout = out / "heldout.jsonl"
    if not heldout.exists():
        write_text_atomic(heldout, "".join(Path(paths["eval"]).read_text().splitlines(keepends=True)[:HELDOUT]))
    task = cs.load_task(name, LIMIT, [], None, train=str(planted), root=RUNS)
    return task, planted, canary_record_path(planted), heldout


def attack_path(task, recipe) -> Path:
    from bench.content_seeds import slug

    return task.out / f"privacy-{slug(recipe)}.json"


def attack(task, recipe, planted: Path, record: Path, heldout: Path) -> Path:
    """``offsite privacy --side data`` on the cell's adapter (once: its JSON is kept)."""
    from bench import content_seeds as cs
    from offsite.cli import main as offsite

    out = attack_path(task, recipe)
    if not out.exists():
        rc = offsite(["privacy", "--side", "data", "--model", cs.MODEL, "--emulator", str(cs.emulator_dir(recipe)),
                      "--tuned-adapter", str(task.out / "adapters" / cs.slug(recipe)), "--data", str(planted),
                      "--heldout", str(heldout), "--canaries", str(record), "--json", str(out)])
        if rc:
            raise SystemExit(f"offsite privacy failed on {cs.slug(recipe)} (exit {rc})")
    return out


def run_task(name: str, epsilons: list[float], seed: int) -> None:
    from bench import content_seeds as cs

    task, planted, record, heldout = prepare(name)
    for eps in epsilons:
        recipe = recipe_at(eps, seed)
        reference = not recipe.dp  # the non-private cell also computes the ceiling and the floors
        cs.run_grid(task, [recipe], [seed], rows=cs.CELL_ROWS if reference else ("full_zs", "emu_zs", "emu_ft", "plugin"),
                    floors=reference)
        attack(task, recipe, planted, record, heldout)


def task_results(name: str) -> dict:
    """One task's rows per epsilon: utility (content grid records) and privacy (the attacks' JSON)."""
    from bench import content_seeds as cs

    task, *_ = prepare(name)
    res = cs.collect(task)
    rows = []
    for rec in (r for r in res["records"] if r["row"] == "plugin"):
        eps = rec["spec"].get("dp", {}).get("epsilon", math.inf)
        path = attack_path(task, recipe_at(eps, rec["seeds"][0]))
        if not path.exists():  # a cell whose attack did not finish: left out, said
            print(f"{name} at epsilon {eps:g}: no attack results ({path.name}); left out")
            continue
        priv = json.loads(path.read_text())
        rows.append({"epsilon": eps, "seeds": rec["seeds"], "plugin": rec["plugin"], "emu_ft": rec["emu_ft"],
                     "plugin_minus_full_zs": rec["plugin_minus_full_zs"], "stderr": rec["stderr"],
                     "transfer": rec.get("transfer"), "beyond_floor": rec.get("beyond_floor"), "dp": priv["dp"],
                     "membership": {t: {a: {k: m[k] for k in ("auc", "tpr_at_0.01_fpr")} for a, m in r["attacks"].items()}
                                    for t, r in priv["membership"].items()},
                     "members": priv["members"], "nonmembers": priv["nonmembers"],
                     "canaries": priv.get("canaries", {}).get("by_repetition"),
                     "canary_samples": priv.get("canaries", {}).get("samples")})
    rows.sort(key=lambda r: -r["epsilon"])
    return {"task": name, "full_zs": res["full_zs"], "ceiling": res["ceiling"], "floors": res["floors"],
            "beyond_floor_from": res["beyond_floor_from"], "rows": rows}


def _ci(m: dict) -> str:
    return f"{m['value']:.2f} ({m['ci95'][0]:.2f}–{m['ci95'][1]:.2f})"


def strongest(membership: dict, target: str) -> tuple[str, dict]:
    """The attack with the highest ROC AUC against ``target``, and its figures."""
    return max(membership[target].items(), key=lambda kv: kv[1]["auc"]["value"])


def table(results: list[dict]) -> str:
    head = ("| task | ε (δ) | Emulator FT | Plug-in | beyond the floor | membership AUC, plugged model | membership AUC, "
            "bare adapter on its emulator | TPR at 1 % FPR, bare adapter | canary exposure (bits) at 1 / 4 / 16 "
            "repetitions |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for t in results:
        for r in t["rows"]:
            eps = "∞" if not math.isfinite(r["epsilon"]) else f"{r['epsilon']:g} ({r['dp']['delta']:.2g})"
            bf = r.get("beyond_floor") or {}
            reps = r["canaries"]["plugged"] if r.get("canaries") else {}
            lines.append(" | ".join([
                f"| {t['task']}", eps, f"{100 * sum(r['emu_ft']) / len(r['emu_ft']):.1f}",
                f"{100 * sum(r['plugin']) / len(r['plugin']):.1f}",
                f"{bf['value']:.2f} ± {bf['stderr']:.2f}" if bf.get("value") is not None else "–",
                *(f"{_ci(m['auc'])} {a}" for a, m in (strongest(r["membership"], t) for t in ("plugged", "emulator"))),
                _ci(strongest(r["membership"], "emulator")[1]["tpr_at_0.01_fpr"]),
                " / ".join(f"{reps[k]['mean_bits']:.1f}" for k in sorted(reps, key=int)) or "–"]) + " |")
    notes = "\n".join(
        f"{t['task']}: Full ZS {100 * t['full_zs']:.1f}, ceiling (no DP) "
        + " / ".join(f"{100 * a:.1f}" for a in t["ceiling"]["acc"]) + ", floors "
        + ", ".join(f"{f} {100 * sum(v['acc']) / len(v['acc']):.1f}" for f, v in t["floors"].items())
        + f"; beyond the floor from {t['beyond_floor_from']}." for t in results)
    return (head + "\n".join(lines) + "\n\nEach membership AUC is the strongest of the three attacks (named: loss, "
            "loss_ref, min_k) with its 95 % bootstrap interval; 0.5 is a coin. " + notes + "\n")


def plot(results: list[dict], path: Path) -> None:
    """ε against transfer beyond the floor and the bare adapter's membership AUC, one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, t in enumerate(results):
        rows = t["rows"]
        xs = [r["epsilon"] if math.isfinite(r["epsilon"]) else 30 for r in rows]
        bf = [(r.get("beyond_floor") or {}).get("value") for r in rows]
        a1.plot([x for x, b in zip(xs, bf) if b is not None], [b for b in bf if b is not None], "o-", color=f"C{i}",
                label=t["task"])
        auc = [strongest(r["membership"], "emulator")[1]["auc"] for r in rows]
        a2.errorbar(xs, [a["value"] for a in auc], yerr=[[a["value"] - a["ci95"][0] for a in auc],
                                                         [a["ci95"][1] - a["value"] for a in auc]],
                    fmt="o-", color=f"C{i}", capsize=3, label=t["task"])
    for ax, label in ((a1, "transfer beyond the floor"), (a2, "membership AUC (bare adapter, strongest attack)")):
        ax.set_xscale("log")
        ax.set_xticks([1, 3, 8, 30], ["1", "3", "8", "∞"])
        ax.set_xlabel("ε (the data owner's DP budget)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    a2.axhline(0.5, color="grey", lw=0.8)
    a2.axhline(0.55, color="green", lw=0.8, ls="--")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def collect(doc: str) -> int:
    from offsite.experiment.report import fill_generated
    from offsite.experiment.results import meta
    from offsite.files import write_json_atomic, write_text_atomic

    tasks = sorted(p.name for p in RUNS.iterdir() if (p / "cells.json").exists()) if RUNS.exists() else []
    if not tasks:
        raise SystemExit(f"nothing measured under {RUNS}: run a task first")
    results = [task_results(t) for t in tasks]
    out = ROOT / "bench" / "results" / "data-privacy.json"
    write_json_atomic(out, {"meta": {**meta("python bench/data_privacy.py --collect"), "recipe": RECIPE,
                                     "protocol": "the data owner alone, the paper preset's tuning, 500 evaluation documents; "
                                                 "DP-SGD (offsite.dp) at each epsilon, ceiling and floors without DP"},
                            "tasks": results})
    text = table(results)
    write_text_atomic(out.with_suffix(".md"), text)
    plot(results, ROOT / "docs" / "img" / "data-privacy.png")
    print(text)
    if doc:
        write_text_atomic(Path(doc), fill_generated(Path(doc).read_text(), "data-privacy", text))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", action="append", default=[], help="a content task (repeatable)")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[math.inf, 8, 3, 1])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--collect", metavar="DOC", nargs="?", const="", help="write the results (and the table in DOC)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if a.collect is not None:
        return collect(a.collect)
    if not a.task:
        ap.error("give --task (or --collect)")
    for name in a.task:
        run_task(name, a.epsilons, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
