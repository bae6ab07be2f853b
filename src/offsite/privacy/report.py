"""Both privacy measurements for one emulator, as results records, a markdown section and a PNG.

``privacy_records(model_name, emulator_dir, task, budgets, ...)`` is what ``offsite privacy`` and
``bench/paper.py`` call per method and setting. It runs the attack first (from the bundle path
only; the owner's model is not even loaded yet), then the owner's side: weight exposure and the
Plug-in of the budget-0 adapter (which is the data owner's Emulator FT adapter).

Records (docs/results-format.md), all with ``row: "attack"``:

* per budget ``b`` (``budget_tokens: b``; ``b = 0`` is Emulator FT): every metric of the task
  (``acc``, ``acc_norm`` ...), ``gap_closed`` on the task's headline metric, and with held-out text
  ``ppl`` etc. under task ``text``; the field ``attack`` holds the run's facts (tokens seen, steps,
  seconds, the attacker's own held-out LM loss before/after);
* ``plugin_<metric>``: the Plug-in reference (same adapter as Emulator FT, full model);
* task ``null``: ``exposure_verbatim``, ``rel_error``, ``spectral_energy``, ``rel_error_shipped``,
  ``spectral_energy_shipped``, ``blocks_exposed`` (:mod:`offsite.privacy.exposure`), ``n`` = the
  original middle's parameter count.

``gap_closed = (recovered − emu_ft) / (plugin − emu_ft)``: 0 at budget 0, 1 when the attacker
matches the owner's plug-in, above 1 when it beats it. Its standard error is the delta-method one
treating the three accuracies as independent (they are scored on the same documents, so this is
only indicative). When ``plugin − emu_ft`` is not positive the emulator has no privacy margin to
close and ``gap_closed`` is ``null``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..cli_args import add_dataclass_args, add_train_args, tune_settings
from ..errors import OffsiteError
from ..results import metric_records
from ..run import PRESETS
from .attack import AttackConfig, recover

ROW = "attack"
EXPOSURE_METRICS = ("exposure_verbatim", "rel_error", "spectral_energy", "rel_error_shipped",
                    "spectral_energy_shipped", "blocks_exposed")
DEFAULT_BUDGETS = (0, 1_000_000, 5_000_000)


def parse_budgets(spec: str) -> list[int]:
    """``"0,1M,5e6,200k"`` -> ``[0, 1000000, 5000000, 200000]`` (sorted, unique, 0 always in)."""
    out = set()
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        mult = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(part[-1].lower(), 1)
        num = part[:-1] if mult > 1 else part
        try:
            value = float(num) * mult
        except ValueError:
            raise OffsiteError(f"--budgets must be token counts like 0,1M,5000000; got {part!r}") from None
        if value < 0 or value != int(value):
            raise OffsiteError(f"attack budgets must be whole non-negative token counts; got {part!r}")
        out.add(int(value))
    return sorted(out | {0})


def gap_closed(recovered: dict, emu_ft: dict, plugin: dict) -> tuple[float | None, float | None]:
    """``(value, stderr)`` of the share of the Plug-in − Emulator FT gap the attacker closes."""
    r, e, p = recovered["value"], emu_ft["value"], plugin["value"]
    d = p - e
    if not d > 0:
        return None, None
    g = (r - e) / d
    se = [x.get("stderr") for x in (recovered, emu_ft, plugin)]
    if any(s is None or not math.isfinite(s) for s in se):
        return g, None
    sr, s_e, sp = se
    var = (sr / d) ** 2 + (s_e * (r - p) / d ** 2) ** 2 + (sp * (r - e) / d ** 2) ** 2
    return g, math.sqrt(var)


def privacy_records(model_name: str, emulator_dir: str | Path, task: str, budgets=DEFAULT_BUDGETS, *,
                    settings=None, preset: str = "demo", attack: AttackConfig | None = None,
                    eval_limit: int | None | str = "preset", text_docs: int | None | str = "preset",
                    batch_size: int = 32, exposure: bool = True, setting: dict | None = None,
                    model=None, work_dir: str | Path | None = None, log=print,
                    train_data=None, train_limit: int | None = None, eval_docs=None, corpus_docs=None,
                    details: dict | None = None) -> list[dict]:
    """Recovery attack at every budget + weight exposure + Plug-in, as results records (see module doc).

    ``settings`` (:class:`offsite.tune.TuneSettings`) are the data owner's tuning settings; by
    default the ``preset``'s (:data:`offsite.run.PRESETS`), as ``offsite run`` uses them —
    ``bench/paper.py`` passes its own so the attacker tunes exactly like its data owner. ``setting``
    overrides the records' ``setting`` (default: adapter layers + the bundle's method parameters).
    ``model``: the owner's full model if already loaded (not modified). ``details``, if given, is
    filled with the per-block exposure detail. ``train_limit``: tune on the first N examples of
    the task's training split (its fixed hash order), as ``bench/paper.py``'s ``--train-limit``.
    """
    from ..bundle import load_emulator, load_emulator_manifest
    from ..eval import METRIC, evaluate
    from ..models.load import load_model, model_display_name
    from ..plug import plug
    from ..tune import TuneSettings

    if preset not in PRESETS:
        raise OffsiteError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if task not in METRIC or task == "text":
        raise OffsiteError(f"the attack needs a task with training data, got {task!r}")
    p = PRESETS[preset]
    eval_limit = p.eval_limit if eval_limit == "preset" else eval_limit
    text_docs = p.text_docs if text_docs == "preset" else text_docs
    settings = settings or TuneSettings(train=replace(p.train))
    attack = attack or AttackConfig()
    attack.check()
    budgets = parse_budgets(",".join(str(int(b)) for b in budgets))
    manifest = load_emulator_manifest(emulator_dir)
    if train_data is None and train_limit is not None:
        from ..tune import TrainingData, task_data

        full = task_data(task)
        train_data = TrainingData(full.kind, full.items[:train_limit], source=full.source)
    shapes = manifest.get("shapes") or {}
    base = {"model": model_display_name(model_name), "task": task, "method": manifest["method"],
            "setting": setting if setting is not None else
            {"adapter_layers": list(manifest["base"]["adapter_layers"]), **(manifest.get("params") or {})},
            "row": ROW, "middle_params": shapes.get("middle_params")}
    attack_info = {"corpus": attack.corpus if corpus_docs is None else "given", "lr": attack.lr,
                   "block_size": attack.block_size, "batch_size": attack.batch_size,
                   "train_outer": attack.train_outer, "seed": attack.seed,
                   "precision": {"no": "fp32"}.get(attack.resolved_precision(), "bf16")}
    records: list[dict] = []

    # -- the attacker: from the bundle path only
    results = {}
    for b in budgets:
        # keyed by the emulator's digest: the LM step does not depend on the task, so a second task
        # (or a rerun) resumes its finished checkpoint instead of training again, and never another
        # emulator's; a bf16 run has its own directory (float32 ones keep the earlier name)
        run_name = f"budget-{b}" + ("-bf16" if attack.resolved_precision() == "bf16" else "")
        wd = Path(work_dir) / manifest["digest"][:16] / run_name if work_dir is not None else None
        res = recover(emulator_dir, task, b, settings, attack, eval_limit=eval_limit, text_docs=text_docs or 0,
                      batch_size=batch_size, train_data=train_data, eval_docs=eval_docs,
                      corpus_docs=corpus_docs, work_dir=wd, log=log)
        results[b] = res
        rb = {**base, "budget_tokens": b, "attack": {**attack_info, **res.info()},
              "seconds": round(res.train_seconds + res.tune_seconds, 2)}
        records += metric_records(res.metrics, rb)
        if res.text_metrics:
            records += metric_records(res.text_metrics, {**rb, "task": "text"})
        log(f"[privacy] budget {b:,}: {METRIC[task]} {res.metrics[METRIC[task]]:.4f}")

    # -- the owner: Plug-in of the data owner's adapter, weight exposure
    own_model = model is None
    if own_model:
        model, _ = load_model(model_name)
    emu = load_emulator(emulator_dir)
    tokenizer = emu.tokenizer
    if exposure:
        rep = weight_exposure_of(model, emu)
        summary = rep.summary()
        for m in EXPOSURE_METRICS:
            if summary[m] is not None:
                records.append({**base, "task": None, "metric": m, "value": float(summary[m]), "stderr": None,
                                "n": summary["original_middle_params"]})
        if details is not None:
            details["exposure"] = rep.detail()
    t0 = time.perf_counter()
    plugged = plug(model if own_model else copy.deepcopy(model), results[0].adapter, manifest)
    plug_metrics = evaluate(plugged, tokenizer, task, docs=eval_docs, limit=eval_limit, batch_size=batch_size,
                            progress=attack.progress)
    rp = {**base, "budget_tokens": None, "seconds": round(time.perf_counter() - t0, 2)}
    records += metric_records(plug_metrics, rp, prefix="plugin_")
    if text_docs:
        records += metric_records(evaluate(plugged, tokenizer, "text", limit=text_docs, batch_size=batch_size,
                                            progress=attack.progress), {**rp, "task": "text"}, prefix="plugin_")
    del plugged

    # -- the share of the gap the attacker closes, on the task's headline metric
    head = METRIC[task]
    plug_rec = {"value": plug_metrics[head], "stderr": plug_metrics.get(f"{head}_stderr")}
    emu_rec = {"value": results[0].metrics[head], "stderr": results[0].metrics.get(f"{head}_stderr")}
    for b, res in results.items():
        g, se = gap_closed({"value": res.metrics[head], "stderr": res.metrics.get(f"{head}_stderr")},
                           emu_rec, plug_rec)
        records.append({**base, "budget_tokens": b, "metric": "gap_closed", "value": g, "stderr": se,
                        "n": res.metrics.get("n"), "basis": head})
    return records


def weight_exposure_of(model, emu):
    from .exposure import weight_exposure

    return weight_exposure(model, emu)


# ---------------------------------------------------------------------------------------------
# markdown and plot


def _key(r: dict) -> tuple:
    return (r.get("model"), r.get("method"), json.dumps(r.get("setting"), sort_keys=True))


def _label(r: dict) -> str:
    s = r.get("setting") or {}
    rest = ", ".join(f"{k}={v}" for k, v in s.items() if k != "adapter_layers")
    al = s.get("adapter_layers")
    return f"{r.get('method')} ({'adapter ' + ','.join(map(str, al)) if al else ''}{'; ' + rest if rest else ''})"


def _pct(rec: dict | None) -> str:
    if rec is None or rec.get("value") is None:
        return "–"
    se = rec.get("stderr")
    v = rec["value"] * 100
    return f"{v:.1f} ± {se * 100:.1f}" if se is not None and math.isfinite(se) else f"{v:.1f}"


def _num(rec: dict | None, digits: int = 2) -> str:
    if rec is None or rec.get("value") is None:
        return "–"
    se = rec.get("stderr")
    v = rec["value"]
    return f"{v:.{digits}f} ± {se:.{digits}f}" if se is not None and math.isfinite(se) else f"{v:.{digits}f}"


def format_markdown(records: list[dict]) -> str:
    """The privacy section: per emulator, the attack curve next to Emulator FT / Plug-in, and the
    weight exposure figures; then a one-line-per-emulator summary."""
    from ..eval import METRIC

    recs = [r for r in records if r.get("row") == ROW]
    if not recs:
        return "_no privacy records_\n"
    groups: dict[tuple, list[dict]] = {}
    for r in recs:
        groups.setdefault(_key(r), []).append(r)
    lines = ["## Privacy under attack", ""]
    summary = ["| emulator | task | Emulator FT | Plug-in | best recovered (budget) | gap closed | verbatim "
               "| rel. error | spectral energy |", "|---|---|---|---|---|---|---|---|---|"]
    for key, rs in groups.items():
        first = rs[0]
        lines += [f"### {first.get('model')} · {_label(first)}", ""]
        ex = {r["metric"]: r for r in rs if r.get("task") is None}
        if ex:
            lines += ["| exposure_verbatim | rel_error | spectral_energy | rel_error_shipped | "
                      "spectral_energy_shipped | blocks_exposed |", "|---|---|---|---|---|---|",
                      "| " + " | ".join(_num(ex.get(m), 3) for m in EXPOSURE_METRICS) + " |", ""]
        tasks = sorted({r["task"] for r in rs if r.get("task") not in (None, "text")})
        for task in tasks:
            head = METRIC.get(task, "acc")
            by = {(r.get("budget_tokens"), r["metric"]): r for r in rs if r.get("task") == task}
            text = {(r.get("budget_tokens"), r["metric"]): r for r in rs if r.get("task") == "text"}
            budgets = sorted({b for b, m in by if b is not None and m == head})
            has_text = any(m == "ppl" for _, m in text)
            lines += [f"**{task}** ({head}, %; attacker corpus "
                      f"{(by.get((budgets[-1], head)) or {}).get('attack', {}).get('corpus', '?')})", "",
                      "| attack budget (tokens) | tokens seen | steps | " + f"{head} (%) | gap closed |"
                      + (" text ppl |" if has_text else ""),
                      "|---|---|---|---|---|" + ("---|" if has_text else "")]
            for b in budgets:
                r = by[(b, head)]
                a = r.get("attack") or {}
                name = f"{b:,}" + (" (= Emulator FT)" if b == 0 else "")
                lines.append(f"| {name} | {a.get('tokens_seen', 0):,} | {a.get('steps', 0)} | {_pct(r)} | "
                             f"{_num(by.get((b, 'gap_closed')))} |"
                             + (f" {_num(text.get((b, 'ppl')))} |" if has_text else ""))
            plug_r = by.get((None, f"plugin_{head}"))
            lines.append(f"| Plug-in (owner) | | | {_pct(plug_r)} | 1 |"
                         + (f" {_num(text.get((None, 'plugin_ppl')))} |" if has_text else ""))
            lines.append("")
            best_b = max(budgets, key=lambda b: by[(b, head)]["value"]) if budgets else None
            summary.append(
                f"| {first.get('model')} · {_label(first)} | {task} | {_pct(by.get((0, head)))} | {_pct(plug_r)} | "
                f"{_pct(by.get((best_b, head)))} ({best_b:,}) | {_num(by.get((best_b, 'gap_closed')))} | "
                f"{_num(ex.get('exposure_verbatim'), 3)} | {_num(ex.get('rel_error'), 3)} | "
                f"{_num(ex.get('spectral_energy'), 3)} |")
    lines += ["### Summary", ""] + summary + [
        "", "gap closed = (recovered − Emulator FT) / (Plug-in − Emulator FT); errors are delta-method, "
        "treating rows as independent. Exposure: see docs/privacy.md.", ""]
    return "\n".join(lines)


def _short(n: int) -> str:
    for unit, v in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= v:
            return f"{n / v:g}{unit}"
    return str(n)


def plot_privacy(records: list[dict], path: str | Path) -> Path:
    """Accuracy vs attack budget, one panel per task, one line per emulator, with its Emulator FT
    (the budget-0 point, dotted) and Plug-in (dashed) levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..eval import METRIC

    recs = [r for r in records if r.get("row") == ROW and r.get("task") not in (None, "text")]
    tasks = sorted({r["task"] for r in recs})
    if not tasks:
        raise OffsiteError("no attack records to plot")
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    keys = list(dict.fromkeys(_key(r) for r in recs))
    per_method = {}
    for k in keys:
        per_method[k[1]] = per_method.get(k[1], 0) + 1

    def legend(r):  # the method alone unless it has several settings here (manifest params are long)
        return _label(r) if per_method[r.get("method")] > 1 else str(r.get("method"))

    for ax, task in zip(axes[0], tasks):
        head = METRIC.get(task, "acc")
        positive = sorted({r["budget_tokens"] for r in recs if r["task"] == task and r.get("budget_tokens")})
        for i, key in enumerate(keys):
            rs = [r for r in recs if _key(r) == key and r["task"] == task]
            pts = sorted((r["budget_tokens"], r["value"], r.get("stderr") or 0.0) for r in rs
                         if r["metric"] == head and r.get("budget_tokens") is not None)
            if not pts:
                continue
            c = colors[i % len(colors)]
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, [y * 100 for y in ys], yerr=[e * 100 for e in es], marker="o", color=c,
                        capsize=3, label=f"{legend(rs[0])}: recovered")
            ax.axhline(ys[0] * 100, color=c, linestyle=":", linewidth=1, label="Emulator FT" if i == 0 else None)
            plug_r = next((r for r in rs if r["metric"] == f"plugin_{head}"), None)
            if plug_r is not None:
                ax.axhline(plug_r["value"] * 100, color=c, linestyle="--", linewidth=1,
                           label="Plug-in" if i == 0 else None)
        if positive:
            ax.set_xscale("symlog", linthresh=positive[0])
            ticks = [0] + positive
            ax.set_xticks(ticks, [_short(b) for b in ticks])
            ax.minorticks_off()
        ax.set_xlabel("attack budget (public-text tokens)")
        ax.set_ylabel(f"{task} {head} (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# `offsite privacy`


def run_privacy(model_name: str, emulator_dir: str | Path, tasks: list[str], out: str | Path,
                budgets=DEFAULT_BUDGETS, overwrite: bool = False, command: str = "", log=print,
                **kwargs) -> tuple[list[dict], Path]:
    """Write ``privacy.json`` (a results file), ``privacy.md`` and ``privacy.png`` under ``out``."""
    from ..bundle import load_emulator_manifest
    from ..files import write_json_atomic
    from ..results import meta

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OffsiteError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    load_emulator_manifest(emulator_dir)  # fail early on a bad bundle
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    details: dict = {}
    m = meta(command)
    exposure = kwargs.pop("exposure", True)
    for i, task in enumerate(tasks):  # exposure does not depend on the task: computed once
        records += privacy_records(model_name, emulator_dir, task, budgets, exposure=exposure and i == 0,
                                   details=details, work_dir=out / "work", log=log, **kwargs)
        write_json_atomic(out / "privacy.json", {"meta": m, "exposure_detail": details.get("exposure"),
                                                 "records": records})
    (out / "privacy.md").write_text(format_markdown(records))
    plot_privacy(records, out / "privacy.png")
    return records, out


def add_parser(sub) -> None:
    """Register ``offsite privacy`` on the CLI's sub-parsers."""
    p = sub.add_parser("privacy", help="model owner: measure an emulator's privacy by a recovery attack "
                                       "and by weight exposure")
    p.add_argument("--model", default="smollm2-135m", help="the full model the emulator was built from")
    p.add_argument("--emulator", required=True, help="emulator bundle directory")
    p.add_argument("--task", default="arc_easy", help="task(s) to attack, comma-separated")
    p.add_argument("--budgets", default=",".join(str(b) for b in DEFAULT_BUDGETS),
                   help="attack budgets in public-text tokens, e.g. 0,1M,5M (0, = Emulator FT, is always run)")
    p.add_argument("--preset", default="demo", choices=list(PRESETS),
                   help="the data owner's tuning and evaluation budget, as in `offsite run`")
    p.add_argument("--eval-limit", type=int, help="evaluate the first N documents (default: the preset's)")
    p.add_argument("--train-limit", type=int,
                   help="tune on the first N task training examples (bench/paper.py: 1000; default: all)")
    p.add_argument("--text-docs", type=int, help="held-out text documents for perplexity (0: skip)")
    p.add_argument("--batch-size-eval", type=int, default=32)
    p.add_argument("--no-exposure", action="store_true", help="skip the weight exposure")
    p.add_argument("--out", help="output directory (default runs/privacy-<emulator>)")
    p.add_argument("--overwrite", action="store_true")
    add_dataclass_args(p.add_argument_group("attack"), AttackConfig, set(), prefix="attack_")
    add_train_args(p, PRESETS)


def cmd_privacy(args) -> None:

    attack = AttackConfig(**{f.name: getattr(args, "attack_" + f.name) for f in dataclasses.fields(AttackConfig)
                             if hasattr(args, "attack_" + f.name)})
    attack.check()
    tasks = [t for t in args.task.split(",") if t]
    budgets = parse_budgets(args.budgets)
    out = args.out or f"runs/privacy-{Path(args.emulator.rstrip('/')).name}"
    settings = tune_settings(args, base=PRESETS[args.preset].train)
    records, out = run_privacy(
        args.model, args.emulator, tasks, out, budgets, overwrite=args.overwrite,
        command="offsite " + " ".join(shlex.quote(a) for a in sys.argv[1:]), settings=settings,
        preset=args.preset, attack=attack, exposure=not args.no_exposure,
        eval_limit=args.eval_limit if args.eval_limit is not None else "preset",
        text_docs=args.text_docs if args.text_docs is not None else "preset", batch_size=args.batch_size_eval,
        train_limit=args.train_limit)
    print(format_markdown(records))
    print(f"results: {out}/privacy.json, section: {out}/privacy.md, plot: {out}/privacy.png")


__all__ = ["DEFAULT_BUDGETS", "EXPOSURE_METRICS", "add_parser", "cmd_privacy", "format_markdown", "gap_closed",
           "parse_budgets", "plot_privacy", "privacy_records", "run_privacy"]
