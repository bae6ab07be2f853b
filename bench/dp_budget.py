"""Does DP-SGD learn a content task at some tuning budget? (docs/privacy.md, "A DP budget that learns")

At the content benchmark's budget (1 epoch, batch 8, lr 1e-4, the full adapter) the adapters tuned at
ε = 8, 3 and 1 are one adapter: the noise dominates every step and AdamW's per-coordinate step makes
the update independent of the noise's scale. DP-SGD is known to need large batches (the noise on the
mean gradient falls with the batch) and few trainable parameters (the noise's norm grows with their
square root). This grid tunes the data owner's adapter on the content benchmark's emulator
(``uniform --keep 13``, adapter 2,2) at a few such budgets, with and without DP, and scores each
adapter on the emulator (Emulator FT: what the data owner's tuning learnt, the most that can cross).

    python bench/dp_budget.py --task sarcasm            # the grid below; each run kept under runs/dp-budget
    python bench/dp_budget.py --task sarcasm --collect  # bench/results/dp-budget-<task>.json

Each run is ``offsite tune --emulator E --data <task>_train.jsonl --seed S <flags>`` and ``offsite eval
--emulator E --adapter A --data <task>_eval.jsonl --limit 500``; a finished run (its eval JSON) is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = ROOT / "runs" / "dp-budget"
LIMIT = 500

#: name -> the tuning flags (on top of offsite tune's defaults); "-dp8": the same at epsilon 8
BUDGETS = {
    "paper": [],
    "b64-lr1e-3-e4": ["--batch-size", "64", "--micro-batch-size", "16", "--lr", "1e-3", "--epochs", "4"],
    "lora-b64-lr3e-3-e4": ["--adapter", "lora", "--batch-size", "64", "--micro-batch-size", "16", "--lr", "3e-3",
                           "--epochs", "4"],
}
EPSILONS = ("inf", "8")


def runs() -> list[tuple[str, str, list[str]]]:
    """(name, epsilon, flags) of every run of the grid."""
    return [(f"{b}-eps{e}", e, flags + ([] if e == "inf" else ["--dp-epsilon", e]))
            for b, flags in BUDGETS.items() for e in EPSILONS]


def run(task: str, seed: int) -> None:
    from bench import content_seeds as cs
    from offsite.cli import main as offsite
    from offsite.data.content import build_content_task
    from offsite.experiment.recipe import Recipe

    paths = build_content_task(task, cs.RUNS / "data")
    t = cs.load_task(task, LIMIT, [], None)
    emu = cs.ensure_emulator(t, Recipe.from_dict({"method": "uniform", "options": {"keep": 13}}))
    out = RUNS / task
    for name, _, flags in runs():
        adapter, scored = out / f"{name}-seed{seed}", out / f"{name}-seed{seed}.json"
        if scored.exists():
            continue
        print(f"{name}: tuning", flush=True)
        if offsite(["tune", "--emulator", str(emu), "--data", str(paths["train"]), "--out", str(adapter), "--overwrite",
                    "--seed", str(seed), *flags]):
            raise SystemExit(f"{name}: offsite tune failed")
        if offsite(["eval", "--emulator", str(emu), "--adapter", str(adapter), "--data", str(paths["eval"]),
                    "--limit", str(LIMIT), "--json", str(scored)]):
            raise SystemExit(f"{name}: offsite eval failed")


def collect(task: str) -> int:
    from offsite.bundle import load_adapter
    from offsite.experiment.results import meta
    from offsite.files import write_json_atomic

    out = RUNS / task
    records = []
    for path in sorted(out.glob("*-seed*.json")):
        name, seed = path.stem.rsplit("-seed", 1)
        budget, eps = name.rsplit("-eps", 1)
        if budget not in BUDGETS:
            continue
        bundle = load_adapter(path.with_suffix(""))
        dp = bundle.dp or {}
        metrics = json.loads(path.read_text())
        records.append({"task": task, "budget": budget, "flags": BUDGETS[budget], "epsilon": eps, "seed": int(seed),
                        "emu_ft": metrics["acc"], "stderr": metrics["acc_stderr"], "n": metrics["n"], "dp": dp})
    if not records:
        raise SystemExit(f"nothing measured under {out}: run python bench/dp_budget.py --task {task} first")
    dest = ROOT / "bench" / "results" / f"dp-budget-{task}.json"
    write_json_atomic(dest, {"meta": {**meta(f"python bench/dp_budget.py --task {task}"),
                                      "protocol": "offsite tune on the uniform --keep 13 emulator (adapter 2,2), the task's "
                                                  "1,000 training rows; Emulator FT on the first 500 evaluation rows"},
                             "records": records})
    for r in records:
        print(f"{r['budget']:>22} ε {r['epsilon']:>3} seed {r['seed']}: Emulator FT {100 * r['emu_ft']:.1f} "
              f"± {100 * r['stderr']:.1f}" + (f"  (σ {r['dp'].get('noise_multiplier', 0):.3g}, "
                                             f"{r['dp'].get('steps')} steps)" if r["dp"] else ""))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sarcasm")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--collect", action="store_true")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if a.collect:
        return collect(a.task)
    run(a.task, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
