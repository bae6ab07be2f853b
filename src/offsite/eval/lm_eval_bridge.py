"""Parity check against lm-evaluation-harness on the very same documents and in-memory model.

``lm_eval_parity(model, tokenizer, task, docs)`` exports ``docs`` to a JSONL file, writes a local
lm-eval task config that reads it (``dataset_path: json`` + ``data_files``; ``doc_to_text`` =
``context``, ``doc_to_choice`` = ``choices``, ``doc_to_target`` = ``gold``, i.e. exactly our prompt
strings — the prompt *formats* themselves are pinned against lm-eval's YAML in ``offsite.data.tasks``
and its tests), runs ``lm_eval.simple_evaluate`` with an ``HFLM`` wrapping the model, scores the
same docs with ``offsite.eval.mc.score_mc``, and compares per-document decisions and aggregates.

Needs the optional ``lm_eval`` package (``pip install lm_eval``); raises OffsiteError without it.
Only multiple-choice tasks are supported (webqs is scored as multiple choice too, but its
multi-target config is not exported here).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from offsite.data.tasks import Doc
from offsite.errors import OffsiteError
from offsite.eval.mc import score_mc

__all__ = ["lm_eval_parity", "run_harness_task", "run_lm_eval", "write_task", "yaml_task_name"]

TOLERANCE_ACC = 0.001  # aggregate acc must agree within 0.1 points


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise OffsiteError("the lm-eval parity check needs lm_eval; run `pip install lm_eval`") from e


def write_task(docs: Sequence[Doc], folder: Path, name: str) -> str:
    """Write ``docs`` as JSONL plus an lm-eval YAML task named ``name`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "context": d.context, "choices": d.choices, "gold": d.gold}) + "\n")
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    # JSON is valid YAML; lm-eval's loader reads *.yaml files
    (folder / f"{name}.yaml").write_text(json.dumps(cfg, indent=1))
    return name


def run_lm_eval(model, tokenizer, docs: Sequence[Doc], batch_size: int = 32,
                max_length: int | None = None, name: str = "offsite_parity") -> dict:
    """Score ``docs`` with lm-eval; returns acc, acc_norm, n, per-doc ``lls`` and ``seconds``."""
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    docs = list(docs)
    with tempfile.TemporaryDirectory(prefix="offsite-lm-eval-") as tmp:
        write_task(docs, Path(tmp), name)
        kw = {"max_length": max_length} if max_length else {}
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kw)
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=tmp),
                                      log_samples=True, num_fewshot=0, bootstrap_iters=0,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0)
        seconds = time.perf_counter() - t0
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    res = out["results"][name]
    return {"acc": float(res["acc,none"]), "acc_norm": float(res["acc_norm,none"]), "n": len(samples),
            "lls": lls, "seconds": seconds}


def run_harness_task(model, tokenizer, task: str, limit: int | None = None, batch_size: int = 32,
                     include_path: str | None = None) -> dict:
    """Run one of lm-eval's tasks on the in-memory model (``offsite eval --backend lm-eval`` for
    tasks offsite does not ship): a registered task name, a task in ``include_path`` (a folder of
    task YAML files), or a task YAML file. The result is read by the task's own name (a YAML file's
    ``task:``, not its path). A registered task downloads its data from the Hugging Face Hub; every
    failure is a one-line OffsiteError (DataUnavailable where the data could not be fetched)."""
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from offsite.errors import DataUnavailable

    folders = []
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise OffsiteError(f"--include-path {include_path}: no such folder")
        folders.append(str(include_path))
    name = task
    if Path(task).suffix.lower() in (".yaml", ".yml"):
        name = yaml_task_name(task)
        folders.insert(0, str(Path(task).parent))
    try:
        manager = TaskManager(include_path=folders or None)
    except Exception as e:  # noqa: BLE001 - a broken YAML in a folder: one line, not a traceback
        raise OffsiteError(f"lm-eval could not index the task folder(s) {', '.join(folders)} ({_first_line(e)})") \
            from e
    if name not in manager.all_tasks:
        where = f" nor in {', '.join(folders)}" if folders else ""
        raise OffsiteError(f"lm-eval knows no task {name!r} (not among its {len(manager.all_tasks)} registered "
                           f"tasks{where}); pass a task YAML file, or its folder as --include-path")
    # a task of the user's folders reads what its YAML names; only the harness's own may need the Hub
    local = bool(folders) and name in TaskManager(include_path=folders, include_defaults=False).all_tasks
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit, num_fewshot=0,
                                      bootstrap_iters=100, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0)
    except Exception as e:  # noqa: BLE001 - the harness raises anything; the user gets one line
        if not local and _looks_like_download(e):
            raise DataUnavailable(f"lm-eval could not fetch the data of its task {name!r} ({_first_line(e)}); "
                                  "the harness's registered tasks download their data from the Hugging Face "
                                  "Hub") from e
        raise OffsiteError(f"lm-eval could not run task {name!r} ({_first_line(e)})") from e
    results = (out or {}).get("results", {})
    if name not in results:
        raise OffsiteError(f"lm-eval returned no result named {name!r} (it returned {', '.join(results) or 'none'})")
    metrics = {}
    for key, value in results[name].items():
        if not isinstance(value, (int, float)) or "," not in key:
            continue
        metric, _, _filter = key.partition(",")
        metrics[metric] = float(value)
    n = out.get("n-samples", {}).get(name, {}).get("effective")
    if n is not None:
        metrics["n"] = int(n)
    return metrics


def yaml_task_name(path) -> str:
    """The ``task:`` name of an lm-eval task YAML file (its ``include:`` files followed)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    p = Path(path)
    if not p.is_file():
        raise OffsiteError(f"{p}: no such file")
    try:
        cfg = load_yaml(p, resolve_func=False)
    except Exception as e:  # noqa: BLE001 - yaml errors, include cycles, unreadable files
        raise OffsiteError(f"{p}: not a readable lm-eval task YAML ({_first_line(e)})") from e
    name = cfg.get("task")
    if not isinstance(name, str) or not name:
        what = f"a group ({cfg['group']!r}); pass its folder as --include-path and the group's name as --task" \
            if "group" in cfg else "no 'task:' name"
        raise OffsiteError(f"{p} has {what}")
    return name


def _first_line(e: BaseException) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:300]


def _looks_like_download(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        w in text for w in ("huggingface", "hub", "connection", "offline", "resolve", "max retries", "network"))


def lm_eval_parity(model, tokenizer, docs: Sequence[Doc], batch_size: int = 32,
                   max_length: int | None = None) -> dict:
    """Compare ``score_mc`` with lm-eval on ``docs``; ``ok`` is True when they agree.

    Agreement: identical per-document ``acc`` decisions except where lm-eval's own top two choices
    are within 1e-4 nats (a tie at fp32 noise), and aggregate acc / acc_norm within 0.1 points.
    """
    docs = list(docs)
    t0 = time.perf_counter()
    ours = score_mc(model, tokenizer, docs, batch_size=batch_size, progress=False, max_length=max_length,
                    return_details=True)
    ours_s = time.perf_counter() - t0
    theirs = run_lm_eval(model, tokenizer, docs, batch_size=batch_size, max_length=max_length)
    diff, mismatches, ties = 0.0, [], 0
    for d, det, tl in zip(docs, ours["details"], theirs["lls"]):
        tl = np.array(tl)
        diff = max(diff, float(np.max(np.abs(np.array(det["lls"]) - tl))))
        if det["pred"] != int(np.argmax(tl)):
            top = np.sort(tl)[-2:]
            if top[1] - top[0] < 1e-4:
                ties += 1
            else:
                mismatches.append(d.id)
    ok = (not mismatches and abs(ours["acc"] - theirs["acc"]) <= TOLERANCE_ACC + ties / len(docs)
          and abs(ours["acc_norm"] - theirs["acc_norm"]) <= TOLERANCE_ACC + ties / len(docs))
    return {"ok": ok, "n": len(docs), "acc_ours": ours["acc"], "acc_lm_eval": theirs["acc"],
            "acc_norm_ours": ours["acc_norm"], "acc_norm_lm_eval": theirs["acc_norm"],
            "max_abs_diff": diff, "mismatched_ids": mismatches, "ties": ties,
            "seconds_ours": ours_s, "seconds_lm_eval": theirs["seconds"]}
