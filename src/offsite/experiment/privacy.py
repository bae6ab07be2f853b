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
import math
import time
from pathlib import Path

from ..bundle import load_emulator_manifest
from ..errors import OffsiteError
from ..files import write_json_atomic
from .results import meta, metric_records
from .budget import preset as named_preset
from ..privacy.attack import AttackConfig, recover
from ..privacy.report import EXPOSURE_METRICS, ROW, format_markdown, plot_privacy

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
    default the ``preset``'s (:data:`offsite.experiment.budget.PRESETS`), as ``offsite run`` uses them —
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

    if task not in METRIC or task == "text":
        raise OffsiteError(f"the attack needs a task with training data, got {task!r}")
    p = named_preset(preset)
    eval_limit = p.eval_limit if eval_limit == "preset" else eval_limit
    text_docs = p.text_docs if text_docs == "preset" else text_docs
    settings = settings or p.tune_settings()
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
    from ..privacy.exposure import weight_exposure

    return weight_exposure(model, emu)


# ---------------------------------------------------------------------------------------------
# markdown and plot


def run_privacy(model_name: str, emulator_dir: str | Path, tasks: list[str], out: str | Path,
                budgets=DEFAULT_BUDGETS, overwrite: bool = False, command: str = "", log=print,
                **kwargs) -> tuple[list[dict], Path]:
    """Write ``privacy.json`` (a results file), ``privacy.md`` and ``privacy.png`` under ``out``."""
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


__all__ = ["DEFAULT_BUDGETS", "EXPOSURE_METRICS", "ROW", "gap_closed", "parse_budgets", "privacy_records",
           "run_privacy", "weight_exposure_of"]
