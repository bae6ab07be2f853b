"""What it costs the model owner to build an emulator, per method, at matched size, in one run.

Each method builds its benchmark setting (``Method.bench_settings``: adapter 2,2 and the middle
size of ``uniform``/``kd`` with keep 8) with its default options, in a fresh process of its own so
its peak memory is its own (VmHWM). For ScaleOT the clock covers stage 1 from scratch (harmonizers
and importance scores; a cached artifact is never reused here) plus stage 2; for ``kd`` the
distillation; for GradOT the statistics pass and the compression. ScaleOT's stage 1 is trained once
and serves every (alpha, beta), so the table also gives the cost of a sweep of ``--sweep`` sizes:
one stage 1 plus a stage 2 per size, against one ``kd`` run per size.

    python bench/emulator_cost.py [--methods kd,scaleot,gradot] [--sweep 4] [--recipes GRID.toml]

writes bench/results/emulator-cost.json (docs/results-format.md, row ``build``). The bundles it
builds are stored in the paper benchmark's cache (``runs/paper-cache``) when that cell is missing
there, and ScaleOT's stage-1 artifact in the offsite cache, so ``bench/paper.py`` reuses them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def median_rate(rates: list, cycle: int = 1) -> float:
    """Median over cycles of ``cycle`` steps of their effective rate (same tokens per step: the
    harmonic mean), skipping cycles with a missing rate. Robust to a busy spell on a shared machine;
    a cycle longer than one step weighs work that runs only every ``cycle`` steps at its real share."""
    cycles = [cycle / sum(1 / r for r in rates[i:i + cycle]) for i in range(0, len(rates) - cycle + 1, cycle)
              if all(rates[i:i + cycle])]
    return statistics.median(cycles)


def child(method: str, model_name: str, setting: dict, cache: str) -> dict:
    from offsite.experiment.benchmark import peak_rss_mb, resolved_options, setting_dir, write_build_info

    from offsite.bundle import save_emulator
    from offsite.emulator import build_emulator, get_method
    from offsite.models import load_model
    from offsite.models.load import model_display_name

    model, tokenizer = load_model(model_name)
    display = model_display_name(model_name)
    rss_loaded = peak_rss_mb()
    opts = {k: v for k, v in setting.items() if k != "adapter_layers"}
    extra = {}
    t0 = time.perf_counter()
    if method == "scaleot":
        from offsite.emulator.scaleot import default_stage1_path, run_stage1

        cfg = get_method("scaleot").options(**opts).stage1_config()
        final = default_stage1_path(model, display, setting["adapter_layers"], cfg)
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
            art = run_stage1(model, tokenizer, display, setting["adapter_layers"], cfg, Path(tmp) / "stage1")
            extra["stage1_seconds"] = time.perf_counter() - t0
            # the RL update runs inside every rl_every-th step: the rate per RL cycle
            extra["median_step_tokens_per_s"] = median_rate(art.meta["cost"].get("tokens_per_s", []),
                                                            max(int(cfg.rl_every), 1))
            extra["stage1_rl_seconds"] = art.meta["cost"].get("rl_seconds")
            extra["train_tokens"] = art.meta["cost"].get("train_tokens")
            source = art.path
            if not final.exists():  # hand the fresh artifact to later runs (bench/paper.py, offsite run)
                source = (Path(tmp) / "stage1").rename(final)
            t1 = time.perf_counter()
            emu = build_emulator(method, model, tokenizer, display, setting["adapter_layers"],
                                 from_=str(source), **opts)
            extra["stage2_seconds"] = time.perf_counter() - t1
    else:
        emu = build_emulator(method, model, tokenizer, display, setting["adapter_layers"], **opts)
        history = (emu.report or {}).get(method, {}).get("history") or []
        if history:
            extra["median_step_tokens_per_s"] = median_rate([h.get("tokens_per_s") for h in history])
        if (emu.report or {}).get(method, {}).get("tokens_seen") is not None:
            extra["train_tokens"] = emu.report[method]["tokens_seen"]
    seconds = time.perf_counter() - t0
    cell = Path(cache) / display / "emulators" / method / setting_dir(setting)
    if not (cell / "manifest.json").exists():
        save_emulator(emu, cell, overwrite=True)
        write_build_info(cell, seconds, resolved_options(method, opts))
    middle = emu.middle_params()
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": rss_loaded,
            "middle_params": middle, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="kd,scaleot,gradot")
    ap.add_argument("--sweep", type=int, default=4, help="sizes in the sweep-cost comparison (default 4)")
    ap.add_argument("--cache", default=str(ROOT / "runs" / "paper-cache"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "emulator-cost.json"))
    ap.add_argument("--recipes", nargs="+", metavar="FILE",
                    help="grid files of recipes (as bench/paper.py's): a method's first recipe there replaces "
                         "its benchmark recipe")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_setting", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(child(args._child, args.model, json.loads(args._setting), args.cache)))
        return

    from offsite.experiment.benchmark import chosen_recipes, load_grids

    from offsite.emulator import get_method
    from transformers import AutoConfig

    from offsite.models.load import model_display_name, resolve_model_path
    from offsite.experiment.results import meta, write_results

    command = "python bench/emulator_cost.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    from offsite.errors import OffsiteError

    try:
        given = load_grids(args.recipes)
    except OffsiteError as exc:
        raise SystemExit(f"error: {exc}") from None
    display = model_display_name(args.model)
    records, res = [], {}
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method = get_method(name)
        setting = chosen_recipes(method, given, lambda: AutoConfig.from_pretrained(
            resolve_model_path(args.model)))[0].setting()
        print(f"[cost] {name} {setting}", flush=True)
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--cache", args.cache,
                              "--_child", name, "--_setting", json.dumps(setting)],
                             stdout=subprocess.PIPE, text=True, check=True)
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"[cost] {name}: {res[name]}", flush=True)
        base = {"model": display, "task": "text", "method": name, "setting": setting, "row": "build"}
        records += [{**base, "metric": k, "value": v} for k, v in res[name].items()]
    if "kd" in res and "scaleot" in res:
        s, k = res["scaleot"], res["kd"]
        sweep = s["stage1_seconds"] + args.sweep * s["stage2_seconds"]
        base = {"model": display, "task": "text", "method": "scaleot", "setting": {"vs": "kd"}, "row": "ratio"}
        records += [{**base, "metric": "stage1_over_kd", "value": s["stage1_seconds"] / k["seconds"]},
                    {**base, "metric": "build_over_kd", "value": s["seconds"] / k["seconds"]},
                    {**base, "metric": f"sweep{args.sweep}_over_kd", "value": sweep / (args.sweep * k["seconds"])}]
        if s.get("median_step_tokens_per_s") and k.get("median_step_tokens_per_s"):
            # the cost ratio at the median step rates: training tokens / rate for each
            tok = (s.get("train_tokens") or 1) / (k.get("train_tokens") or 1)
            records.append({**base, "metric": "stage1_over_kd_at_median_step_rate",
                            "value": tok * k["median_step_tokens_per_s"] / s["median_step_tokens_per_s"]})
        print(f"[cost] ScaleOT stage 1 / kd = {s['stage1_seconds'] / k['seconds']:.2f}; a sweep of {args.sweep} "
              f"sizes costs {sweep / (args.sweep * k['seconds']):.2f}x of {args.sweep} kd runs", flush=True)
    write_results(args.out, meta(command), records)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
