"""The privacy section of a report: :func:`format_markdown` (per emulator, the attack curve next to
Emulator FT and Plug-in, and the weight exposure) and :func:`plot_privacy` (accuracy against the
attack budget), from the records :func:`offsite.experiment.privacy.privacy_records` writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import OffsiteError

ROW = "attack"  # the row of every privacy record
EXPOSURE_METRICS = ("exposure_verbatim", "rel_error", "spectral_energy", "rel_error_shipped",
                    "spectral_energy_shipped", "blocks_exposed")


def emulator_key(r: dict) -> tuple:
    """(model, method, setting) of a record: which emulator it measures."""
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
        groups.setdefault(emulator_key(r), []).append(r)
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
    keys = list(dict.fromkeys(emulator_key(r) for r in recs))
    per_method = {}
    for k in keys:
        per_method[k[1]] = per_method.get(k[1], 0) + 1

    def legend(r):  # the method alone unless it has several settings here (manifest params are long)
        return _label(r) if per_method[r.get("method")] > 1 else str(r.get("method"))

    for ax, task in zip(axes[0], tasks):
        head = METRIC.get(task, "acc")
        positive = sorted({r["budget_tokens"] for r in recs if r["task"] == task and r.get("budget_tokens")})
        for i, key in enumerate(keys):
            rs = [r for r in recs if emulator_key(r) == key and r["task"] == task]
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


__all__ = ["EXPOSURE_METRICS", "ROW", "format_markdown", "plot_privacy"]
