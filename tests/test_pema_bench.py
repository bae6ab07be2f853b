"""bench/pema.py's merge of per-task results files and its markdown table (docs/results.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import pema as bench
from offsite.errors import OffsiteError



def _file(tmp_path: Path, task: str, em: dict[str, float]) -> Path:
    setting = {"train_pairs": 10, "eval_docs": 5}
    recs = [{"model": "m", "task": task, "method": "x", "setting": setting, "row": row, "metric": "exact_match",
             "value": v, "stderr": 0.01, "n": 5} for row, v in em.items()]
    recs += [{"model": "m", "task": task, "method": "pema", "setting": setting, "row": "train_pema",
              "metric": "seconds", "value": 12.4},
             {"model": "m", "task": task, "method": "lora", "setting": setting, "row": "train_lora",
              "metric": "peak_mem_mb", "value": 2048.0}]
    path = tmp_path / f"{task}.json"
    path.write_text(json.dumps({"meta": {"command": f"python bench/pema.py --tasks {task}"}, "records": recs}))
    return path


def test_merge_joins_tasks_and_keeps_each_command(tmp_path):
    a = _file(tmp_path, "webqs", {"full_zs": 0.0, "pema": 0.02, "full_lora": 0.125})
    b = _file(tmp_path, "nq_open", {"full_zs": 0.024})
    out = tmp_path / "all.json"
    bench.merge([str(a), str(b)], str(out))
    data = json.loads(out.read_text())
    assert [r["command"] for r in data["meta"]["runs"]] == ["python bench/pema.py --tasks webqs",
                                                           "python bench/pema.py --tasks nq_open"]
    assert {r["task"] for r in data["records"]} == {"webqs", "nq_open"}
    assert len(data["records"]) == 5 + 3


def test_merge_refuses_a_task_twice(tmp_path):
    a = _file(tmp_path, "webqs", {"full_zs": 0.0})
    with pytest.raises(OffsiteError, match="repeats task"):
        bench.merge([str(a), str(a)], str(tmp_path / "all.json"))
    assert not (tmp_path / "all.json").exists()


def test_table_has_one_row_per_task_with_its_numbers(tmp_path):
    a = _file(tmp_path, "webqs", {"full_zs": 0.0, "pema": 0.02, "full_lora": 0.125})
    text = bench.table(json.loads(a.read_text())["records"])
    row = [line for line in text.splitlines() if line.startswith("| webqs")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[:4] == ["webqs (10 / 5)", "0.0 ± 1.0", "2.0 ± 1.0", "12.5 ± 1.0"]
    assert cells[5] == "12" and cells[8] == "2048" and cells[4] == "–"
