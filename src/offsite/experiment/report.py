"""The papers' table and plots from results files: ``offsite report RESULTS... [--out DIR]``.

Input: results JSON files (docs/results-format.md, ``{"meta", "records"}``). Records whose ``row`` is one of
the papers' rows (``full_zs``, ``emu_zs``, ``emu_ft``, ``plugin``, ``full_ft``) or the adapter
``ceiling`` or ``floor`` are tabulated, with the Plug-in's ``transfer`` and ``transfer_beyond_floor``
records and the emulator's transfer probe
(``row: "probe"``, ``metric: "grad_cos"``) beside them; the rest (efficiency or eval-speed rows) are
ignored and counted in the notes.

* **Blocks.** One table per model + method + setting (the setting includes the adapter layers).
  Full ZS and Full FT come from the block's own records (``offsite run`` writes them per method) or,
  when it has none, from the shared baselines of the same file, model and task: records with
  ``method`` null, as ``bench/paper.py`` writes them once per task for every method.
* **Metric.** Each task's headline metric (:data:`offsite.eval.METRIC`: ``acc`` for the
  multiple-choice tasks as in the papers, ``exact_match`` for webqs, ``ppl`` for held-out text);
  fractions are printed as percents, perplexities as they are.
* **Average.** The mean over the accuracy-like tasks (not perplexity) that have a value in *every*
  row shown in the block, so each row's average covers the same tasks; the tasks used and the ones
  left out are named under the table. The summary and the privacy-utility plot average over the
  tasks that every block of the model has in every row. The standard error of a mean of ``k``
  tasks is ``sqrt(sum se_i^2) / k`` (independent tasks).
* **Gap.** Plug-in − Emulator FT per task and on average. Its standard error
  ``sqrt(se_plugin^2 + se_emuft^2)`` treats the two rows as independent although they are scored on
  the same documents; records hold no per-document scores for a paired error, and for positively
  correlated rows this overstates the error. For perplexity the gap is printed as a difference of
  perplexities (negative: the plug-in is better).
* **Transfer.** (Plug-in − Full ZS) / (ceiling − Full ZS), the share of the adapter's possible gain
  that the emulator carried, printed as recorded (its paired standard error comes from per-document
  scores, :mod:`offsite.experiment.stats`; a task whose ceiling gains under two standard errors has none). The
  average's transfer is the record of task ``avg<k>`` (``k`` tasks) where one was written.
  **Transfer beyond the floor**, (Plug-in − floor) / (ceiling − floor), likewise: the share of what
  only the task's data teaches (the floor: the adapter tuned on the full model on the owner's public
  pairs) that the emulator carried.
* **Plots** (matplotlib, Agg): ``bars-<block>.png``, the per-task bars of every row of a block with
  standard-error whiskers (perplexity on its own panel); ``privacy-utility-<model>.png``, one point
  per method and setting at (Emulator FT, Plug-in) averages, with Full FT and Full ZS as reference
  lines and the diagonal (gap 0).

When two files hold the same number (same block, row, task, metric) the later file wins and a note
says so.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OffsiteError

ROWS = ("full_zs", "emu_zs", "emu_ft", "plugin", "ceiling", "floor", "full_ft")
ROW_TITLES = {"full_zs": "Full ZS", "emu_zs": "Emulator ZS", "emu_ft": "Emulator FT",
              "plugin": "Plug-in", "ceiling": "Ceiling (adapter tuned on the full model)",
              "floor": "Floor (adapter tuned on the full model on public pairs)", "full_ft": "Full FT"}
#: the Plug-in's derived records: metric -> the _Block / block-report field that holds them
TRANSFER_METRICS = {"transfer": "transfer", "transfer_beyond_floor": "beyond_floor"}
SHARED_ROWS = ("full_zs", "full_ft")
TASK_ORDER = ("openbookqa", "piqa", "arc_easy", "arc_challenge", "hellaswag", "sciq", "webqs", "text")
TASK_TITLES = {"openbookqa": "OBQA", "piqa": "PIQA", "arc_easy": "ARC-E", "arc_challenge": "ARC-C",
               "hellaswag": "HellaSwag", "sciq": "SciQ", "webqs": "WebQs", "text": "text"}
LOWER_IS_BETTER = {"ppl", "token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
ROW_COLORS = {"full_zs": "tab:gray", "emu_zs": "tab:orange", "emu_ft": "tab:blue", "plugin": "tab:red",
              "ceiling": "tab:purple", "floor": "tab:brown", "full_ft": "tab:green"}


def human(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def headline_metric(task: str, available: set[str] | None = None) -> str:
    """The metric the papers report for ``task``."""
    try:
        from ..eval import METRIC
    except Exception:  # noqa: BLE001 - the report must work without the evaluation stack
        METRIC = {}
    if task in METRIC:
        return METRIC[task]
    for m in ("acc", "exact_match", "ppl"):
        if available is None or m in available:
            return m
    return sorted(available)[0] if available else "acc"


def is_ppl(metric: str) -> bool:
    return metric in LOWER_IS_BETTER


def task_sort_key(task: str):
    return (TASK_ORDER.index(task), "") if task in TASK_ORDER else (len(TASK_ORDER), task)


def setting_key(setting) -> str:
    return json.dumps(setting, sort_keys=True) if setting is not None else "null"


def setting_label(setting: dict | None) -> str:
    if not setting:
        return ""
    parts = []
    ad = setting.get("adapter_layers")
    if ad is not None:
        parts.append(f"adapter {','.join(str(a) for a in ad)}")
    parts += [f"{k}({', '.join(f'{a}={b}' for a, b in sorted(v.items()))})" if isinstance(v, dict) else f"{k}={v}"
              for k, v in sorted(setting.items()) if k != "adapter_layers"]
    return ", ".join(parts)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


# --- loading ------------------------------------------------------------------------------------


def load_results(path: str | Path) -> dict:
    """Read one results file; OffsiteError (one line) for anything that is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise OffsiteError(f"results file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OffsiteError(f"{path} is not a readable JSON results file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list) \
            or not isinstance(data.get("meta", {}), dict):
        raise OffsiteError(f"{path} is not a results file (needs an object with 'meta' and a 'records' list)")
    for i, r in enumerate(data["records"]):
        if not isinstance(r, dict):
            raise OffsiteError(f"{path}: record {i} is not an object")
        if r.get("row") in ROWS:
            missing = [k for k in ("model", "task", "metric", "value") if k not in r]
            if missing:
                raise OffsiteError(f"{path}: record {i} ({r.get('row')}) lacks {', '.join(missing)}")
            if not isinstance(r["value"], (int, float)):
                raise OffsiteError(f"{path}: record {i} has a non-numeric value {r['value']!r}")
    return data


# --- the report ---------------------------------------------------------------------------------


@dataclass
class _Block:
    model: str
    method: str | None
    setting: dict | None
    cells: dict = field(default_factory=dict)  # (row, task, metric) -> record
    files: dict = field(default_factory=dict)  # task -> index of the file its method rows came from
    middle_params: int | None = None
    original_middle_params: int | None = None
    transfer: dict = field(default_factory=dict)  # task (or "avg<k>") -> record
    beyond_floor: dict = field(default_factory=dict)  # task (or "avg<k>") -> transfer_beyond_floor record
    probe: dict | None = None  # the transfer probe's grad_cos record (public text)


def _cell(rec: dict | None) -> dict | None:
    if rec is None:
        return None
    se = rec.get("stderr")
    se = float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None
    return {"value": float(rec["value"]), "stderr": se, "n": rec.get("n")}


def _mean(cells: list[dict]) -> dict:
    k = len(cells)
    ses = [c["stderr"] for c in cells]
    se = math.sqrt(sum(s * s for s in ses)) / k if all(s is not None for s in ses) else None
    return {"value": sum(c["value"] for c in cells) / k, "stderr": se}


def _diff(a: dict, b: dict) -> dict:
    se = math.sqrt(a["stderr"] ** 2 + b["stderr"] ** 2) \
        if a.get("stderr") is not None and b.get("stderr") is not None else None
    return {"value": a["value"] - b["value"], "stderr": se}


def parse_exclude(items: list[str] | None) -> list[tuple[str, object]]:
    """``KEY=VALUE`` strings as (key, value) pairs; VALUE is read as JSON when it parses (``100``,
    ``0.8``, ``true``), else kept as a string."""
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OffsiteError(f"--exclude takes KEY=VALUE (a setting's option and its value), got {item!r}")
        try:
            out.append((key.strip(), json.loads(value)))
        except ValueError:
            out.append((key.strip(), value))
    return out


def build_report(sources: list[tuple[str, dict]], tasks: list[str] | None = None,
                 exclude: list[tuple[str, object]] | None = None) -> dict:
    """The report of results files ``[(path, data), ...]`` as a JSON-serialisable dict. ``exclude``:
    (option, value) pairs; a method setting with any of them is left out (e.g. ScaleOT rows made
    with a non-default stage 1: ``("stage1_steps", 100)``)."""
    notes: list[str] = []
    blocks: dict[tuple, _Block] = {}
    shared: dict[tuple, dict] = {}  # (file, model, task, row, metric) -> record
    skipped = 0
    excluded: set[tuple] = set()
    for fi, (path, data) in enumerate(sources):
        for rec in data["records"]:
            row = rec.get("row")
            is_probe = row == "probe" and rec.get("metric") == "grad_cos" and rec.get("method")
            if row not in ROWS and not is_probe:
                skipped += 1
                continue
            is_transfer = row == "plugin" and rec.get("metric") in TRANSFER_METRICS
            if tasks and rec["task"] not in tasks and not (is_probe or is_transfer):
                continue
            method = rec.get("method")
            if method is None:
                if row not in SHARED_ROWS:
                    raise OffsiteError(f"{path}: a {row} record has no method")
                shared[(fi, rec["model"], rec["task"], row, rec["metric"])] = rec
                continue
            setting = rec.get("setting")
            key = (rec["model"], method, setting_key(setting))
            if exclude and any(k in (setting or {}) and (setting or {})[k] == v for k, v in exclude):
                excluded.add(key)
                continue
            b = blocks.setdefault(key, _Block(rec["model"], method, setting))
            if is_probe:
                b.probe = rec
                continue
            if is_transfer:
                if rec.get("value") is not None:
                    getattr(b, TRANSFER_METRICS[rec["metric"]])[rec["task"]] = rec
                continue
            ck = (row, rec["task"], rec["metric"])
            old = b.cells.get(ck)
            if old is not None and old["value"] != rec["value"] and old.get("_file") != fi:
                notes.append(f"{rec['model']} {method} {row} {rec['task']} {rec['metric']}: "
                             f"{sources[old['_file']][0]} overridden by {path}")
            b.cells[ck] = {**rec, "_file": fi}
            b.files.setdefault(rec["task"], fi)
            if rec.get("middle_params") is not None:
                b.middle_params = rec["middle_params"]
            if rec.get("original_middle_params") is not None:
                b.original_middle_params = rec["original_middle_params"]
    if skipped:
        notes.append(f"{skipped} records of other kinds (not the papers' rows) were left out")
    if excluded:
        notes.append(f"{len(excluded)} method setting(s) left out by "
                     f"{', '.join(f'{k}={json.dumps(v)}' for k, v in exclude)}")

    # models with shared baselines but no method block still get a table
    for (fi, model, *_rest) in shared:
        if not any(k[0] == model for k in blocks):
            blocks[(model, None, "null")] = _Block(model, None, None, files={})
    for b in blocks.values():  # shared baselines fill the rows a block lacks
        for (fi, model, task, row, metric), rec in shared.items():
            if model != b.model or (b.method is not None and b.files.get(task) != fi):
                continue  # a method block takes baselines only for its own tasks, from the same file
            if b.method is None:
                b.files.setdefault(task, fi)
            b.cells.setdefault((row, task, metric), {**rec, "_file": fi})

    out_blocks = [_block_report(b) for b in sorted(
        blocks.values(), key=lambda b: (b.model, b.method or "", setting_key(b.setting)))]
    summaries = {model: _summary([b for b in out_blocks if b["model"] == model])
                 for model in sorted({b["model"] for b in out_blocks})}
    return {"sources": [{"path": str(p), "meta": d.get("meta", {})} for p, d in sources],
            "blocks": out_blocks, "summary": summaries, "notes": notes}


def _block_report(b: _Block) -> dict:
    task_list = sorted({t for (_, t, _) in b.cells}, key=task_sort_key)
    metrics = {}
    for t in task_list:
        available = {m for (_, tt, m) in b.cells if tt == t}
        metrics[t] = headline_metric(t, available)
    rows: dict[str, dict] = {}
    for row in ROWS:
        vals = {t: _cell(b.cells.get((row, t, metrics[t]))) for t in task_list}
        vals = {t: v for t, v in vals.items() if v is not None}
        if vals:
            rows[row] = vals
    gap = {}
    if "plugin" in rows and "emu_ft" in rows:
        for t in task_list:
            if t in rows["plugin"] and t in rows["emu_ft"]:
                gap[t] = _diff(rows["plugin"][t], rows["emu_ft"][t])
    acc_tasks = [t for t in task_list if not is_ppl(metrics[t])]
    avg_tasks = [t for t in acc_tasks if all(t in rows[r] for r in rows)]
    average = None
    if avg_tasks:
        average = {"tasks": avg_tasks, "left_out": [t for t in acc_tasks if t not in avg_tasks],
                   "rows": {r: _mean([rows[r][t] for t in avg_tasks]) for r in rows}}
        if gap:
            average["gap"] = _diff(average["rows"]["plugin"], average["rows"]["emu_ft"])
    transfer = {t: {**_cell(r), **{k: r[k] for k in ("plugin_gain", "plugin_gain_stderr") if k in r}}
                for t, r in b.transfer.items()}
    beyond = {t: _cell(r) for t, r in b.beyond_floor.items()}
    if average:
        key = f"avg{len(avg_tasks)}" if len(avg_tasks) > 1 else avg_tasks[0]
        average["transfer"], average["beyond_floor"] = transfer.get(key), beyond.get(key)
    label = (f"{b.method} ({setting_label(b.setting)})" if b.setting else b.method) if b.method \
        else "full model (baselines only)"
    return {"model": b.model, "method": b.method, "setting": b.setting, "label": label,
            "middle_params": b.middle_params, "original_middle_params": b.original_middle_params,
            "tasks": task_list, "metrics": metrics, "rows": rows, "gap": gap, "average": average,
            "transfer": transfer, "beyond_floor": beyond, "probe_grad_cos": b.probe["value"] if b.probe else None}


def _summary(blocks: list[dict]) -> dict:
    """Averages of every block of one model over the same tasks (for the privacy-utility picture)."""
    method_blocks = [b for b in blocks if b["method"] is not None]
    if not method_blocks:
        return {"tasks": [], "points": [], "reference": {}}
    shown = [(b, r) for b in method_blocks for r in b["rows"]]
    acc_sets = [{t for t in b["tasks"] if not is_ppl(b["metrics"][t])} for b in method_blocks]
    candidates = sorted(set.intersection(*acc_sets), key=task_sort_key) if acc_sets else []
    common = [t for t in candidates if all(t in b["rows"][r] for b, r in shown)]
    points, reference = [], {}
    if common:
        for b in method_blocks:
            means = {r: _mean([b["rows"][r][t] for t in common]) for r in b["rows"]}
            pt = {"label": b["label"], "method": b["method"], "setting": b["setting"],
                  "middle_params": b["middle_params"], "rows": means}
            if "plugin" in means and "emu_ft" in means:
                pt["gap"] = _diff(means["plugin"], means["emu_ft"])
            key = f"avg{len(common)}" if len(common) > 1 else common[0]
            pt["transfer"], pt["beyond_floor"] = b["transfer"].get(key), b["beyond_floor"].get(key)
            pt["probe_grad_cos"] = b["probe_grad_cos"]
            points.append(pt)
            for r in SHARED_ROWS:
                if r in means and r not in reference:
                    reference[r] = means[r]
    return {"tasks": common, "points": points, "reference": reference}


# --- markdown -----------------------------------------------------------------------------------


def fmt(cell: dict | None, metric: str, signed: bool = False) -> str:
    if cell is None:
        return "–"
    scale, digits = (1.0, 2) if is_ppl(metric) else (100.0, 1)
    sign = "+" if signed else ""
    v = f"{cell['value'] * scale:{sign}.{digits}f}"
    return f"{v} ± {cell['stderr'] * scale:.{digits}f}" if cell.get("stderr") is not None else v


def fmt_ratio(cell: dict | None) -> str:
    if cell is None:
        return "–"
    return f"{cell['value']:.2f}" + (f" ± {cell['stderr']:.2f}" if cell.get("stderr") is not None else "")


def _params(b: dict) -> str:
    mp, op = b.get("middle_params"), b.get("original_middle_params")
    if mp is None:
        return ""
    s = f"middle {human(mp)} parameters"
    return s + (f" ({mp / op:.1%} of the original middle)" if op else "")


def block_markdown(b: dict) -> str:
    tasks, metrics = b["tasks"], b["metrics"]
    acc_tasks = [t for t in tasks if not is_ppl(metrics[t])]
    ppl_tasks = [t for t in tasks if is_ppl(metrics[t])]
    avg = b["average"] if b["average"] and len(b["average"]["tasks"]) > 1 else None  # no average of one
    head = [f"{TASK_TITLES.get(t, t)} {metrics[t]}" for t in acc_tasks]
    if avg:
        head.append(f"avg {len(avg['tasks'])} tasks")
    head += [f"{TASK_TITLES.get(t, t)} {metrics[t]} ↓" for t in ppl_tasks]
    lines = ["| row | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for row, vals in b["rows"].items():
        cells = [fmt(vals.get(t), metrics[t]) for t in acc_tasks]
        if avg:
            cells.append(fmt(avg["rows"][row], "acc"))
        cells += [fmt(vals.get(t), metrics[t]) for t in ppl_tasks]
        lines.append(f"| {ROW_TITLES[row]} | " + " | ".join(cells) + " |")
    if b["gap"]:
        cells = [fmt(b["gap"].get(t), metrics[t], signed=True) for t in acc_tasks]
        if avg:
            cells.append(fmt(avg.get("gap"), "acc", signed=True))
        cells += [fmt(b["gap"].get(t), metrics[t], signed=True) for t in ppl_tasks]
        lines.append("| gap (Plug-in − Emulator FT) | " + " | ".join(cells) + " |")
    for key, title in (("transfer", "transfer (Plug-in − Full ZS) / (Ceiling − Full ZS)"),
                       ("beyond_floor", "transfer beyond the floor (Plug-in − Floor) / (Ceiling − Floor)")):
        if not b[key]:
            continue
        cells = [fmt_ratio(b[key].get(t)) for t in acc_tasks] + ([fmt_ratio(avg.get(key))] if avg else [])
        lines.append(f"| {title} | " + " | ".join(cells + ["" for _ in ppl_tasks]) + " |")
        if key != "transfer":
            continue
        gains = [b["transfer"].get(t) or {} for t in acc_tasks] + ([avg.get("transfer") or {}] if avg else [])
        if any("plugin_gain" in g for g in gains):  # the Plug-in's own gain, paired: is it above noise?
            cells = [f"{100 * g['plugin_gain']:+.1f} ± {100 * g['plugin_gain_stderr']:.1f}" if "plugin_gain" in g
                     else "" for g in gains] + ["" for _ in ppl_tasks]
            lines.append("| Plug-in − Full ZS (paired) | " + " | ".join(cells) + " |")
    title = f"### {b['model']} · {b['label']}"
    params = _params(b)
    if b.get("probe_grad_cos") is not None:
        params = (params + "; " if params else "") + \
            f"transfer probe (adapter-gradient cosine on public text): {b['probe_grad_cos']:.3f}"
    out = [title, ""] + ([params, ""] if params else []) + lines
    if avg:
        note = f"Average over {', '.join(avg['tasks'])} (the accuracy tasks with a value in every row)"
        if avg["left_out"]:
            note += f"; left out: {', '.join(avg['left_out'])} (missing in some row)"
        out += ["", note + ". Accuracies in %, ± standard error."]
    return "\n".join(out)


def summary_markdown(model: str, s: dict) -> str:
    if not s["points"]:
        return ""
    rows = [r for r in ROWS if r not in SHARED_ROWS]
    lines = [f"### {model} · all methods, average over {len(s['tasks'])} tasks ({', '.join(s['tasks'])})", "",
             "| method (setting) | middle params | " + " | ".join(ROW_TITLES[r].split(" (")[0] for r in rows)
             + " | gap | transfer | beyond the floor | probe cos |",
             "|---" * (len(rows) + 6) + "|"]
    for pt in s["points"]:
        mp = human(pt["middle_params"]) if pt.get("middle_params") else "–"
        cos = f"{pt['probe_grad_cos']:.2f}" if pt.get("probe_grad_cos") is not None else "–"
        lines.append(f"| {pt['label']} | {mp} | " + " | ".join(fmt(pt["rows"].get(r), "acc") for r in rows)
                     + f" | {fmt(pt.get('gap'), 'acc', signed=True)} | {fmt_ratio(pt.get('transfer'))}"
                     f" | {fmt_ratio(pt.get('beyond_floor'))} | {cos} |")
    refs = [f"{ROW_TITLES[r]} {fmt(s['reference'][r], 'acc')}" for r in SHARED_ROWS if r in s["reference"]]
    if refs:
        lines += ["", "Full model on the same tasks: " + "; ".join(refs) + "."]
    return "\n".join(lines)


def readme_table(report: dict) -> str:
    """One compact markdown table per model (every block's rows; the average over the tasks that
    every block has in every row), headed by the commands and machines that produced it."""
    parts = []
    commands = [m.get("command") for m in _metas(report) if m.get("command")]
    machines = sorted({m.get("machine") for m in _metas(report) if m.get("machine")})
    commits = sorted({m.get("git_commit") for m in _metas(report) if m.get("git_commit")})
    dates = sorted(m.get("date") for m in _metas(report) if m.get("date"))
    for model, s in report["summary"].items():
        blocks = [b for b in report["blocks"] if b["model"] == model and b["method"] is not None]
        if not blocks:
            continue
        tasks = sorted({t for b in blocks for t in b["tasks"]}, key=task_sort_key)
        metric = {t: next(b["metrics"][t] for b in blocks if t in b["metrics"]) for t in tasks}
        acc = [t for t in tasks if not is_ppl(metric[t])]
        ppl = [t for t in tasks if is_ppl(metric[t])]
        head = [TASK_TITLES.get(t, t) for t in acc] + ([f"avg ({len(s['tasks'])})"] if s["tasks"] else []) \
            + [f"{TASK_TITLES.get(t, t)} {metric[t]} ↓" for t in ppl]
        lines = ["| method (setting) | middle params | row | " + " | ".join(head) + " |",
                 "|---" * (len(head) + 3) + "|"]

        def line(name, params, row, vals, mean, signed=False):
            cells = [fmt(vals.get(t), metric[t], signed) for t in acc]
            if s["tasks"]:
                cells.append(fmt(mean, "acc", signed))
            cells += [fmt(vals.get(t), metric[t], signed) for t in ppl]
            return f"| {name} | {params} | {row} | " + " | ".join(cells) + " |"

        first = blocks[0]
        points = {pt["label"]: pt for pt in s["points"]}
        for r in SHARED_ROWS:
            if r in first["rows"]:
                lines.append(line("full model", "100%", ROW_TITLES[r], first["rows"][r], s["reference"].get(r)))
        for b in blocks:
            pt = points.get(b["label"], {"rows": {}})
            mp, op = b.get("middle_params"), b.get("original_middle_params")
            params = (human(mp) + (f" ({mp / op:.0%})" if op else "")) if mp else "–"
            name = b["label"]
            for r in [row for row in ROWS if row not in SHARED_ROWS]:
                if r in b["rows"]:
                    lines.append(line(name, params, ROW_TITLES[r], b["rows"][r], pt["rows"].get(r)))
                    name, params = "", ""
            if b["gap"]:
                lines.append(line(name, params, "gap", b["gap"], pt.get("gap"), signed=True))
        parts += [f"**{model}** — accuracy in % (± standard error); average over "
                  f"{', '.join(s['tasks']) or 'no task common to every row'}.", ""] + lines + [""]
    foot = []
    if commands:
        foot.append("Produced by " + "; ".join(f"`{c}`" for c in dict.fromkeys(commands)) + ".")
    if machines:
        foot.append("Machine: " + "; ".join(machines) + ".")
    if commits or dates:
        when = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} – {dates[-1]}") if dates else ""
        foot.append("Commit " + ", ".join(commits) + (f"; {when}" if when else "") + ".")
    return "\n".join(parts + [" ".join(foot)]).rstrip() + "\n"


def _metas(report: dict) -> list[dict]:
    out = []
    for src in report["sources"]:
        m = src.get("meta") or {}
        out += list(m.get("runs") or [m])
    return out


def report_markdown(report: dict) -> str:
    parts = ["# Offsite-tuning results", ""]
    for src in report["sources"]:
        m = src["meta"] or {}
        bits = [f"`{src['path']}`"]
        if m.get("command"):
            bits.append(f"command `{m['command']}`")
        for k in ("machine", "git_commit", "date"):
            if m.get(k):
                bits.append(f"{k.replace('_', ' ')} {m[k]}")
        parts.append("* " + ", ".join(bits))
    parts.append("")
    for model, s in report["summary"].items():
        md = summary_markdown(model, s)
        if md:
            parts += [md, ""]
    for b in report["blocks"]:
        parts += [block_markdown(b), ""]
    if not report["blocks"]:
        parts += ["No records of the papers' rows (full_zs, emu_zs, emu_ft, plugin, full_ft) were found.", ""]
    parts += [f"* {n}" for n in report["notes"]]
    return "\n".join(parts).rstrip() + "\n"


def fill_generated(text: str, name: str, content: str) -> str:
    """``text`` with what lies between ``<!-- begin generated: NAME ... -->`` and ``<!-- end
    generated: NAME -->`` replaced by ``content`` (the markers stay); unchanged without them."""
    m = re.search(rf"(<!-- begin generated: {name}\b[^\n]*-->\n)(.*?)(<!-- end generated: {name} -->)", text, re.S)
    if m is None:
        return text
    return text[:m.start(2)] + content.rstrip("\n") + "\n" + text[m.end(2):]


# --- plots --------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(b: dict, path: Path) -> Path:
    plt = _plt()
    metrics = b["metrics"]
    acc_tasks = [t for t in b["tasks"] if not is_ppl(metrics[t])]
    ppl_tasks = [t for t in b["tasks"] if is_ppl(metrics[t])]
    groups = acc_tasks + (["avg"] if b["average"] else [])
    rows = list(b["rows"])
    panels = [p for p in (groups, ppl_tasks) if p]
    widths = [max(len(p), 1) + 1 for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 * sum(widths) + 2, 4.2),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    width = 0.8 / max(len(rows), 1)
    for ax, panel in zip(axes[0], panels):
        ppl = panel is ppl_tasks
        for i, row in enumerate(rows):
            xs, ys, es = [], [], []
            for j, t in enumerate(panel):
                c = b["average"]["rows"][row] if t == "avg" else b["rows"][row].get(t)
                if c is None:
                    continue
                scale = 1.0 if ppl else 100.0
                xs.append(j + (i - (len(rows) - 1) / 2) * width)
                ys.append(c["value"] * scale)
                es.append((c["stderr"] or 0.0) * scale)
            if xs:
                ax.bar(xs, ys, width, yerr=es, capsize=2, label=ROW_TITLES[row], color=ROW_COLORS[row])
        ax.set_xticks(range(len(panel)))
        ax.set_xticklabels([TASK_TITLES.get(t, t) for t in panel], rotation=30, ha="right")
        ax.set_ylabel("perplexity (lower is better)" if ppl else "accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, ncol=min(len(rows), 3))
    fig.suptitle(f"{b['model']} · {b['label']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _point_label(p: dict) -> str:
    """A point's annotation: its options, compact (the method is in the legend, the split in the title)."""
    opts = {k: v for k, v in (p.get("setting") or {}).items() if k != "adapter_layers"}
    short = {"lambda_attn": "λa", "lambda_mlp": "λm", "alpha": "α", "beta": "β", "stage1_steps": "s1",
             "rl_every": "K"}
    parts = [f"{short.get(k, k)}={v:.3g}" if isinstance(v, float) else f"{short.get(k, k)}={v}"
             for k, v in sorted(opts.items())]
    return ", ".join(parts) or (p.get("method") or "")


def plot_privacy_utility(model: str, s: dict, path: Path) -> Path | None:
    pts = [p for p in s["points"] if "plugin" in p["rows"] and "emu_ft" in p["rows"]]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 5.4))
    methods = sorted({p["method"] for p in pts})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    splits = {setting_label({"adapter_layers": (p["setting"] or {}).get("adapter_layers")}) for p in pts}
    split = splits.pop() if len(splits) == 1 else ""
    xs = [p["rows"]["emu_ft"]["value"] * 100 for p in pts]
    ys = [p["rows"]["plugin"]["value"] * 100 for p in pts]
    styles = {"full_ft": ("tab:green", "--"), "full_zs": ("tab:gray", ":")}
    refs = {r: s["reference"][r]["value"] * 100 for r in styles if r in s["reference"]}
    for r, v in refs.items():
        ax.axhline(v, color=styles[r][0], ls=styles[r][1], lw=1, label=f"{ROW_TITLES[r]} ({v:.1f})")
    # each axis spans its own values (Plug-in sits near the model, Emulator FT far below it)
    x_lo, x_hi = min(xs) - 3, max(xs) + 5
    y_lo, y_hi = min(ys + list(refs.values())) - 3, max(ys + list(refs.values())) + 3
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    # labels in points (about 440 x 310 of them inside the axes): each takes the first offset, above
    # or below its point, whose box does not overlap a label placed before it
    sx, sy = 440 / (x_hi - x_lo), 310 / (y_hi - y_lo)
    boxes = []
    for p, x0, y0 in zip(pts, xs, ys):
        x, y = p["rows"]["emu_ft"], p["rows"]["plugin"]
        ax.errorbar(x0, y0, xerr=(x["stderr"] or 0) * 100, yerr=(y["stderr"] or 0) * 100, fmt="o",
                    color=colors[p["method"]], ecolor=colors[p["method"]], elinewidth=0.8, alpha=0.9,
                    capsize=0, markersize=6)
        label = _point_label(p) if split else p["label"]
        w, h = 4.0 * len(label), 9.0
        for dy in (3, -11, 14, -22, 25, -33, 36):
            box = (x0 * sx + 5, y0 * sy + dy, x0 * sx + 5 + w, y0 * sy + dy + h)
            if not any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in boxes):
                break
        boxes.append(box)
        ax.annotate(label, (x0, y0), fontsize=7, color=colors[p["method"]],
                    xytext=(5, dy), textcoords="offset points")
    for m in methods:
        ax.plot([], [], "o", color=colors[m], label=m)
    ax.set_xlabel("Emulator FT accuracy (%) — lower: more model privacy")
    ax.set_ylabel("Plug-in accuracy (%) — higher: more utility")
    where = f", {split}" if split else ""
    ax.set_title(f"{model}{where}: privacy vs utility (avg of {len(s['tasks'])} tasks; bars: ±1 s.e.)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- writing ------------------------------------------------------------------------------------


def write_report(report: dict, out: str | Path, plots: bool = True) -> list[Path]:
    """Write report.md, report.json and (with ``plots``) the PNGs into ``out``; returns the paths."""
    from ..files import write_json_atomic

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OffsiteError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    md = out / "report.md"
    md.write_text(report_markdown(report))
    written.append(md)
    write_json_atomic(out / "report.json", report)
    written.append(out / "report.json")
    if plots:
        used = set()
        for b in report["blocks"]:
            if not b["rows"]:
                continue
            name = slug(f"{b['model']}-{b['label']}")
            while name in used:
                name += "-x"
            used.add(name)
            written.append(plot_bars(b, out / f"bars-{name}.png"))
        for model, s in report["summary"].items():
            p = plot_privacy_utility(model, s, out / f"privacy-utility-{slug(model)}.png")
            if p is not None:
                written.append(p)
    return written


def report_files(paths: list[str | Path], out: str | Path | None = None, tasks: list[str] | None = None,
                 plots: bool = True, exclude: list[tuple[str, object]] | None = None) -> tuple[dict, list[Path]]:
    """Load results files, build the report and (with ``out``) write it."""
    if not paths:
        raise OffsiteError("give at least one results file")
    report = build_report([(str(p), load_results(p)) for p in paths], tasks=tasks, exclude=exclude)
    written = write_report(report, out, plots=plots) if out is not None else []
    return report, written


__all__ = ["ROWS", "ROW_TITLES", "block_markdown", "build_report", "fill_generated", "load_results", "parse_exclude", "plot_bars",
           "plot_privacy_utility", "readme_table", "report_files", "report_markdown", "summary_markdown",
           "write_report"]
