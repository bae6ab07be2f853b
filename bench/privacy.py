"""Privacy by attack for every method at the paper benchmark's matched size, in one results file.

For each registered method, its first benchmark setting's emulator from the paper benchmark's cache
(``bench/paper.py`` builds them; ``runs/paper-cache``) is attacked with ``offsite privacy`` (recovery
attack at each ``--budgets`` size, then weight exposure and Plug-in), with the same data owner as
the benchmark's ``--train-limit``/``--eval-limit`` cells. A method whose ``<out>/<method>/privacy.json``
exists is not run again (delete it to redo); ``--suffix S`` runs into ``<out>/<method>-S`` instead, so a
larger budget can join an earlier run. Then all records are merged into one results file
(docs/results-format.md, rows ``attack``), with ``privacy.md`` and ``privacy.png`` beside the runs.

    python bench/privacy.py --tasks arc_easy,openbookqa --budgets 0,50k --train-limit 200 --eval-limit 100
    python bench/privacy.py ... --budgets 500k --suffix 500k   # a larger budget beside that run
    python bench/privacy.py ... --merge-only        # only merge the runs that exist

writes bench/results/privacy-e<eval>-t<train>.json and docs/img/privacy-attack-e<eval>-t<train>.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="uniform,kd,scaleot,gradot")
    ap.add_argument("--tasks", default="arc_easy,openbookqa")
    ap.add_argument("--budgets", default="0,50k")
    ap.add_argument("--train-limit", type=int, default=200)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--cache", default=str(ROOT / "runs" / "paper-cache"))
    ap.add_argument("--out", help="run directory (default runs/privacy-e<eval>-t<train>)")
    ap.add_argument("--attack-precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="precision of the attack's LM step (offsite privacy --attack-precision; default auto)")
    ap.add_argument("--suffix", default="",
                    help="run into <out>/<method>-<suffix> (e.g. a larger budget beside an earlier run); "
                         "the merge takes every run of a method, earlier ones first, without duplicates")
    ap.add_argument("--merge-only", action="store_true", help="merge the existing runs, run nothing")
    args = ap.parse_args(argv)

    from offsite.experiment.benchmark import method_recipes, setting_dir
    from transformers import AutoConfig

    from offsite.emulator import get_method
    from offsite.errors import OffsiteError
    from offsite.models.load import model_display_name, resolve_model_path
    from offsite.privacy import format_markdown, plot_privacy
    from offsite.privacy.report import emulator_key
    from offsite.experiment.results import meta, write_results

    tag = f"e{args.eval_limit}-t{args.train_limit}"
    out = Path(args.out or ROOT / "runs" / f"privacy-{tag}")
    display = model_display_name(args.model)
    runs = []
    for name in [m for m in args.methods.split(",") if m]:
        setting = method_recipes(get_method(name), lambda: AutoConfig.from_pretrained(
            resolve_model_path(args.model)))[0].setting()
        emu = Path(args.cache) / display / "emulators" / name / setting_dir(setting)
        done = out / (f"{name}-{args.suffix}" if args.suffix else name) / "privacy.json"
        if not done.exists() and not args.merge_only:
            if not (emu / "manifest.json").exists():
                raise OffsiteError(f"{emu} is missing: build it with bench/paper.py --methods {name} first")
            subprocess.run(["offsite", "privacy", "--model", args.model, "--emulator", str(emu), "--task", args.tasks,
                            "--budgets", args.budgets, "--preset", "demo", "--epochs", "1",
                            "--train-limit", str(args.train_limit), "--eval-limit", str(args.eval_limit),
                            "--text-docs", "0", "--out", str(done.parent), "--overwrite", "--no-attack-progress",
                            "--attack-precision", args.attack_precision],
                           check=True)
        found = [d / "privacy.json" for d in [out / name, *sorted(out.glob(f"{name}-*"))]
                 if (d / "privacy.json").exists()]
        runs += [json.loads(f.read_text()) for f in found]
        if not found:
            print(f"[privacy] {name}: no run in {out / name}", file=sys.stderr)
    if not runs:
        raise OffsiteError(f"no privacy runs under {out}")
    records, seen = [], set()
    for run in runs:  # budget 0 and the exposure figures come with every run: keep the first
        for r in run["records"]:
            key = (*emulator_key(r), r["task"], r.get("row"), r.get("budget_tokens"), r["metric"])
            if key not in seen:
                seen.add(key)
                records.append(r)
    m = meta("python bench/privacy.py " + " ".join(sys.argv[1:] if argv is None else argv))
    m["runs"] = [run["meta"] for run in runs]
    write_results(ROOT / "bench" / "results" / f"privacy-{tag}.json", m, records)
    (out / "privacy.md").write_text(format_markdown(records))
    png = plot_privacy(records, ROOT / "docs" / "img" / f"privacy-attack-{tag}.png")
    print(format_markdown(records))
    print(f"wrote bench/results/privacy-{tag}.json, {out / 'privacy.md'}, {png}")
    return 0


if __name__ == "__main__":
    from offsite.errors import OffsiteError

    try:
        sys.exit(main())
    except OffsiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
