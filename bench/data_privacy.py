"""The data owner's privacy, measured: a grid of (content task × protocol × DP epsilon) cells, each
one a recipe of the content benchmark (bench/content_seeds.py) with canaries planted in the training
file, and the attacks of ``offsite privacy --side data`` on the adapter it returns (docs/privacy.md).

    python bench/data_privacy.py --task sarcasm --epsilons inf 8 3 1                 # the data owner alone
    python bench/data_privacy.py --task sarcasm --protocol assist --epsilons inf 8   # the owner in the loop
    python bench/data_privacy.py --task sarcasm --protocol federated                 # 4 data owners, SecAgg+
    python bench/data_privacy.py --collect docs/privacy.md                           # every task measured

Per task, under ``runs/data-privacy/<task>/``: the training file with canaries planted
(:func:`offsite.privacy.canary.plant`: two made-up secrets at each of 1, 4 and 16 repetitions), the
non-members (the first 500 evaluation rows, never trained on), the ceiling and the floors once,
**without** DP (the non-private reference of every protocol: transfer beyond the floor is then the
share of what the data owner alone could have had), and per protocol and epsilon one cell, seed
``--seed`` (``inf``: no DP):

* ``alone`` (:data:`RECIPE`): the data owner tunes on its emulator and sends the adapter, with
  ``[dp] epsilon`` (DP-SGD, per example); Emulator ZS and FT, Full ZS and the Plug-in through the
  content grid;
* ``assist``: the same recipe with the owner in the loop (:data:`ASSIST`, the package's recipe, what
  ``offsite run --tune-blocks bottom --assist-every`` runs: the bottom adapter blocks tuned, the
  owner's correction every :data:`offsite.assist.RECIPE_EVERY` steps on its public pairs, under DP
  added after the noise), through the content grid likewise (its cells are named by their recipe's
  label, which holds ``blocks`` and ``assist``);
* ``federated``: :data:`CLIENTS` data owners, each holding a share of the planted training file
  (``offsite federate partition``, :data:`PARTITION`: IID, seed 0: the protocol's effect apart from a
  skew of labels between owners, which would change utility on its own; each canary's repetitions
  land with the owners independently, like any row), tuned together on the same emulator by
  ``offsite federate run`` (Flower's simulation engine, SecAgg+, ``--dp-epsilon``: user-level
  DP-FedAvg, per data owner) for :data:`ROUNDS` rounds of L local steps, L chosen so that rounds × L
  × owners is nearest to the alone cell's optimizer steps (one epoch of the training rows left after
  the 10 % validation share, at batch 8; on sarcasm's 1,042 planted rows 118 steps, so L = 7 and 112
  steps): each row is then trained on about once, as alone (:func:`federation_steps`), at the same
  learning rate, batch and example length. (Matching rounds × L alone to those steps would train
  each row about 4 times, a privacy difference that is not the protocol's.) The final adapter's Emulator FT and Plug-in are scored as the grid scores
  (:func:`bench.content_seeds.score`, kept in the same row cache), against the same Full ZS, ceiling
  and floors; the attack's members are each owner's training part of its shard.

On each cell's adapter: membership inference against the plugged model and the bare adapter on its
emulator (loss, loss calibrated by the untuned model, min-k %), with ROC AUC and TPR at 1 % FPR and
their bootstrap intervals, and each canary's exposure from the plugged model; what the attacks
compute on the untuned models is kept in ``reference/`` (``--reference-cache``,
:mod:`offsite.privacy.reference`) and computed once per task. Everything finished is kept (rows,
federations, attacks): a rerun continues. ``--collect`` writes ``bench/results/data-privacy.json`` and
``.md``, the table in DOC and the privacy-utility plot ``docs/img/data-privacy.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from offsite.assist import RECIPE_EVERY  # noqa: E402

RUNS = ROOT / "runs" / "data-privacy"
#: the data owner's recipe, the same at every epsilon (only [dp] changes)
RECIPE = {"method": "uniform", "options": {"keep": 13}}
#: the owner in the loop, added to RECIPE: the package's recipe (offsite run --tune-blocks bottom --assist-every)
ASSIST = {"tuning": {"blocks": "bottom"}, "assist": {"every": RECIPE_EVERY}}
#: the protocols of the grid, in the table's order
PROTOCOLS = ("alone", "assist", "federated")
CLIENTS = 4  # data owners of the federated protocol
ROUNDS = 4  # its rounds (local steps: federation_steps)
PARTITION = {"scheme": "iid", "seed": 0}  # how the planted file is split between them
HELDOUT = 500  # non-members: the first evaluation rows
LIMIT = 500  # evaluation documents per row


def recipe_at(epsilon: float, seed: int, protocol: str = "alone"):
    """The recipe of a cell: :data:`RECIPE` (with :data:`ASSIST` for ``assist``) with ``[dp] epsilon``
    (none at ``inf``) at ``seed``. A federated cell runs on the alone recipe's emulator, seed and
    epsilon, and is named after it (:func:`cell_name`)."""
    from offsite.experiment.recipe import Recipe

    if protocol not in PROTOCOLS:
        raise SystemExit(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    spec = dict(RECIPE)
    if protocol == "assist":
        spec = {**spec, "tuning": {**spec.get("tuning", {}), **ASSIST["tuning"]}, "assist": dict(ASSIST["assist"])}
    if math.isfinite(epsilon):
        spec["dp"] = {"epsilon": epsilon}
    return Recipe.from_dict(spec).with_seed(seed)


def protocol_of(spec: dict) -> str:
    """The protocol of a content-grid recipe (its dict): the owner in the loop where it has ``[assist]``."""
    return "assist" if spec.get("assist") else "alone"


def cell_name(protocol: str, recipe) -> str:
    """A cell's name in folders and files: its recipe's (:func:`bench.content_seeds.slug`: the owner in
    the loop is part of the recipe's label), a federated cell's prefixed with its owners' count."""
    from bench.content_seeds import slug

    return f"federated{CLIENTS}-{slug(recipe)}" if protocol == "federated" else slug(recipe)


def epsilon_of(recipe) -> float:
    return recipe.dp.get("epsilon", math.inf)


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


def attack_path(task, protocol: str, recipe) -> Path:
    return task.out / f"privacy-{cell_name(protocol, recipe)}.json"


def attack(task, protocol: str, recipe, planted: Path, record: Path, heldout: Path, adapter: Path,
           shards: Path | None = None) -> Path:
    """``offsite privacy --side data`` on the cell's ``adapter`` (once: its JSON is kept; the untuned
    models' results are read from the task's reference cache after the first cell)."""
    from bench import content_seeds as cs
    from offsite.cli import main as offsite

    out = attack_path(task, protocol, recipe)
    if not out.exists():
        rc = offsite(["privacy", "--side", "data", "--model", cs.MODEL, "--emulator", str(cs.emulator_dir(recipe)),
                      "--tuned-adapter", str(adapter), "--data", str(planted), "--heldout", str(heldout),
                      "--canaries", str(record), "--reference-cache", str(task.out / "reference"), "--json", str(out)]
                     + (["--shards", str(shards)] if shards else []))
        if rc:
            raise SystemExit(f"offsite privacy failed on {cell_name(protocol, recipe)} (exit {rc})")
    return out


# --- the federated protocol ----------------------------------------------------------------------

def shards_of(task, planted: Path) -> Path:
    """The planted training file split between the :data:`CLIENTS` data owners (once)."""
    from offsite.federated.partition import make_shards, write_shards

    out = task.out / "shards"
    if not (out / "partition.json").exists():  # written last: the shards are complete
        write_shards(make_shards(str(planted), CLIENTS, PARTITION["scheme"], seed=PARTITION["seed"]), out,
                     overwrite=True)
    return out


def federation_steps(task, seed: int) -> tuple[int, int]:
    """(rounds, local steps) of the federated cells: :data:`ROUNDS` rounds, and local steps such that
    rounds × local steps × :data:`CLIENTS` is as near as can be to the optimizer steps of the alone
    cell without DP (one epoch of what its validation share leaves, at the budget's batch size; the
    same at every epsilon, so that only DP changes between the federated cells)."""
    from offsite.experiment.budget import preset
    from offsite.train import planned_steps

    settings = recipe_at(math.inf, seed).tune_settings(preset("paper").train_config(progress=False))
    steps = planned_steps(settings.train, len(settings.split(task.data.items)[0]))
    return ROUNDS, max(1, round(steps / (ROUNDS * CLIENTS)))


def federation_dir(task, recipe) -> Path:
    return task.out / "federated" / cell_name("federated", recipe)


def federate(task, recipe, shards: Path) -> Path:
    """``offsite federate run`` of the federated cell (simulation engine, SecAgg+, ``--dp-epsilon`` where
    the recipe has one) at the paper budget's learning rate, batch and example length; its folder,
    the final adapter in ``adapter/``. A finished federation is kept; a stopped one resumes after its
    last round."""
    from offsite.cli import main as offsite
    from offsite.experiment.budget import preset
    from offsite.files import read_json_file

    from bench import content_seeds as cs

    out = federation_dir(task, recipe)
    state = out / "federation.json"
    if state.is_file() and read_json_file(state).get("status") == "done" and (out / "adapter" / "manifest.json").is_file():
        return out
    rounds, local = federation_steps(task, recipe.seed)
    cfg = preset("paper").train_config(progress=False)
    eps = epsilon_of(recipe)
    rc = offsite(["federate", "run", "--engine", "simulation", "--emulator", str(cs.emulator_dir(recipe)),
                  "--shards", str(shards), "--out", str(out), "--clients", str(CLIENTS), "--rounds", str(rounds),
                  "--local-steps", str(local), "--lr", repr(cfg.lr), "--schedule", cfg.schedule,
                  "--batch-size", str(cfg.batch_size), "--micro-batch-size", str(cfg.micro_batch_size),
                  "--max-length", str(cfg.max_length), "--seed", str(recipe.seed), "--secagg", "--no-eval"]
                 + (["--dp-epsilon", repr(eps)] if math.isfinite(eps) else []))
    if rc or not (out / "adapter" / "manifest.json").is_file():
        raise SystemExit(f"offsite federate run failed on {cell_name('federated', recipe)} (exit {rc})")
    return out


def federated_cell(task, recipe):
    """(the Lab, the row cache) of a federated cell: the alone cell's (:func:`bench.content_seeds.cell_of`:
    the grid's scoring, emulator and documents) with the federation's final adapter, and its rows keyed
    by that adapter (its manifest's digest, which covers its weights) instead of a tuning."""
    from dataclasses import replace

    from bench import content_seeds as cs
    from offsite.experiment.cell import RowCache, row_key
    from offsite.files import sha256_file

    adapter = federation_dir(task, recipe) / "adapter"
    lab, _ = cs.cell_of(task, recipe)
    manifest = adapter / "manifest.json"
    digest = sha256_file(manifest) if manifest.is_file() else None
    cell = {**cs.describe(task, recipe), "training": {"federated": digest}, "recipe": None}
    return replace(lab, adapter_dir=adapter), RowCache(task.out / "rows", lambda row: row_key(row, cell))


def run_federated(task, recipe, planted: Path, record: Path, heldout: Path) -> None:
    from bench import content_seeds as cs
    from offsite.experiment.cell import run_cell
    from offsite.files import write_json_atomic

    cs.ensure_emulator(task, recipe)
    shards = shards_of(task, planted)
    fed = federate(task, recipe, shards)
    lab, cache = federated_cell(task, recipe)
    run_cell(lab, ["emu_ft", "plugin"], cache)
    index = task.out / "federated.json"
    cells = json.loads(index.read_text()) if index.exists() else {}
    write_json_atomic(index, {**cells, cell_name("federated", recipe): recipe.to_dict()})
    attack(task, "federated", recipe, planted, record, heldout, fed / "adapter", shards)


def run_task(name: str, epsilons: list[float], seed: int, protocols=("alone",)) -> None:
    from bench import content_seeds as cs

    task, planted, record, heldout = prepare(name)
    # the non-private reference of every protocol: Full ZS, the ceiling and the floors (once, cached)
    cs.run_grid(task, [recipe_at(math.inf, seed)], [seed], rows=("full_zs", "ceiling"), floors=True)
    for protocol in protocols:
        for eps in epsilons:
            recipe = recipe_at(eps, seed, protocol)
            if protocol == "federated":
                run_federated(task, recipe, planted, record, heldout)
                continue
            cs.run_grid(task, [recipe], [seed], rows=("full_zs", "emu_zs", "emu_ft", "plugin"), floors=False)
            attack(task, protocol, recipe, planted, record, heldout, task.out / "adapters" / cs.slug(recipe))


def _row(protocol: str, epsilon: float, rec: dict, priv: dict) -> dict:
    """One row of the results: the cell's utility (a content-grid record) and its privacy (the attack's JSON)."""
    return {"protocol": protocol, "epsilon": epsilon, "seeds": rec["seeds"], "plugin": rec["plugin"],
            "emu_ft": rec["emu_ft"], "plugin_minus_full_zs": rec["plugin_minus_full_zs"], "stderr": rec["stderr"],
            "transfer": rec.get("transfer"), "beyond_floor": rec.get("beyond_floor"), "dp": priv["dp"],
            "membership": {t: {a: {k: m[k] for k in ("auc", "tpr_at_0.01_fpr")} for a, m in r["attacks"].items()}
                           for t, r in priv["membership"].items()},
            "members": priv["members"], "nonmembers": priv["nonmembers"],
            "canaries": priv.get("canaries", {}).get("by_repetition"),
            "canary_samples": priv.get("canaries", {}).get("samples")}


def task_results(name: str) -> dict:
    """One task's rows per protocol and epsilon: utility (content grid records, and the federated
    cells' rows measured against the same Full ZS, ceiling and floors) and privacy (the attacks' JSON).
    A cell whose attack or rows are not there is left out, and said."""
    from bench import content_seeds as cs
    from offsite.experiment.recipe import Recipe

    task, *_ = prepare(name)
    res = cs.collect(task, reference=cs.layout_of(RECIPE))  # every protocol against the data owner alone's ceiling
    cells = []  # (protocol, recipe with its seed, content-grid record)
    for rec in (r for r in res["records"] if r["row"] == "plugin"):
        cells.append((protocol_of(rec["spec"]), Recipe.from_dict(rec["spec"]).with_seed(rec["seeds"][0]), rec))
    index = task.out / "federated.json"
    if index.exists():
        got = cs.read_cells(task)
        zs, ceilings, _, base = cs.baseline(task, got, cs.layout_of(RECIPE))
        for fed_name, spec in json.loads(index.read_text()).items():
            recipe = Recipe.from_dict(spec)
            _, cache = federated_cell(task, recipe)
            rows = {r: cache.read(r) for r in ("emu_ft", "plugin")}
            if not all(rows.values()):
                print(f"{name}, {fed_name}: no scored rows; left out")
                continue
            entry = {"spec": spec, "seeds": {recipe.seed: {r: rows[r].correct[name] for r in rows}}}
            cells.append(("federated", recipe, cs.record_of(task, fed_name, entry, "plugin", base, zs, ceilings)))
    rows = []
    for protocol, recipe, rec in cells:
        eps = epsilon_of(recipe)
        path = attack_path(task, protocol, recipe)
        if not path.exists():
            print(f"{name}, {protocol} at epsilon {eps:g}: no attack results ({path.name}); left out")
            continue
        rows.append(_row(protocol, eps, rec, json.loads(path.read_text())))
    rows.sort(key=lambda r: (PROTOCOLS.index(r["protocol"]), -r["epsilon"]))
    return {"task": name, "full_zs": res["full_zs"], "ceiling": res["ceiling"], "floors": res["floors"],
            "beyond_floor_from": res["beyond_floor_from"], "rows": rows}


def _ci(m: dict) -> str:
    return f"{m['value']:.2f} ({m['ci95'][0]:.2f}–{m['ci95'][1]:.2f})"


def strongest(membership: dict, target: str) -> tuple[str, dict]:
    """The attack with the highest ROC AUC against ``target``, and its figures."""
    return max(membership[target].items(), key=lambda kv: kv[1]["auc"]["value"])


def protocol_of_row(r: dict) -> str:
    """A result row's protocol (rows written before the grid had protocols: the data owner alone)."""
    return r.get("protocol", "alone")


def _epsilon(r: dict) -> str:
    """ε (δ) as the table shows it; a federation's guarantee is per data owner, not per example."""
    if not math.isfinite(r["epsilon"]):
        return "∞"
    per = " per owner" if (r.get("dp") or {}).get("unit") == "data owner" else ""
    return f"{r['epsilon']:g} ({r['dp']['delta']:.2g}){per}"


def table(results: list[dict]) -> str:
    head = ("| task | protocol | ε (δ) | Emulator FT | Plug-in | beyond the floor | membership AUC, plugged model | "
            "membership AUC, bare adapter on its emulator | TPR at 1 % FPR, bare adapter | canary exposure (bits) at "
            "1 / 4 / 16 repetitions |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for t in results:
        for r in t["rows"]:
            bf = r.get("beyond_floor") or {}
            reps = r["canaries"]["plugged"] if r.get("canaries") else {}
            lines.append(" | ".join([
                f"| {t['task']}", protocol_of_row(r), _epsilon(r), f"{100 * sum(r['emu_ft']) / len(r['emu_ft']):.1f}",
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
    return (head + "\n".join(lines) + "\n\nProtocols: alone, the data owner tunes and sends the adapter (DP-SGD, ε per "
            "example); assist, the owner in the loop (bottom blocks, the owner's correction every "
            f"{ASSIST['assist']['every']} steps; ε per example); federated, {CLIENTS} data owners with SecAgg+ "
            "(DP-FedAvg, ε per data owner). Each membership AUC is the strongest of the three attacks (named: loss, "
            "loss_ref, min_k) with its 95 % bootstrap interval; 0.5 is a coin. " + notes + "\n")


def plot(results: list[dict], path: Path) -> None:
    """ε against transfer beyond the floor and the bare adapter's membership AUC, one line per (task, protocol)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"alone": "o-", "assist": "s--", "federated": "^:"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    lines = [(t["task"], p, [r for r in t["rows"] if protocol_of_row(r) == p]) for t in results for p in PROTOCOLS]
    for i, (task, protocol, rows) in enumerate(line for line in lines if line[2]):
        label = f"{task}, {protocol}"
        xs = [r["epsilon"] if math.isfinite(r["epsilon"]) else 30 for r in rows]
        bf = [(r.get("beyond_floor") or {}).get("value") for r in rows]
        a1.plot([x for x, b in zip(xs, bf) if b is not None], [b for b in bf if b is not None], styles[protocol],
                color=f"C{i}", label=label)
        auc = [strongest(r["membership"], "emulator")[1]["auc"] for r in rows]
        a2.errorbar(xs, [a["value"] for a in auc], yerr=[[a["value"] - a["ci95"][0] for a in auc],
                                                         [a["ci95"][1] - a["value"] for a in auc]],
                    fmt=styles[protocol], color=f"C{i}", capsize=3, label=label)
    for ax, label in ((a1, "transfer beyond the floor"), (a2, "membership AUC (bare adapter, strongest attack)")):
        ax.set_xscale("log")
        ax.set_xticks([1, 3, 8, 30], ["1", "3", "8", "∞"])
        ax.set_xlabel("ε (the data owner's DP budget)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    a2.axhline(0.5, color="grey", lw=0.8)
    a2.axhline(0.55, color="green", lw=0.8, ls="--")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
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
    write_json_atomic(out, {"meta": {
        **meta("python bench/data_privacy.py --collect"), "recipe": RECIPE, "assist": ASSIST,
        "federated": {"clients": CLIENTS, "rounds": ROUNDS, "partition": PARTITION, "secagg": True},
        "protocol": "the paper preset's tuning, 500 evaluation documents; per protocol (alone, assist: the owner in the "
                    "loop; federated: offsite federate run, local steps matching the alone cell's optimizer steps) "
                    "and epsilon (alone, assist: DP-SGD per example, offsite.dp; federated: DP-FedAvg per data owner); "
                    "Full ZS, ceiling and floors without DP, shared by every protocol"},
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
    ap.add_argument("--protocol", action="append", choices=PROTOCOLS, default=[],
                    help="alone (default), assist (the owner in the loop) or federated (%d data owners, SecAgg+); "
                         "repeatable" % CLIENTS)
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
        run_task(name, a.epsilons, a.seed, list(dict.fromkeys(a.protocol)) or ["alone"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
