"""bench/paired.py: paired differences of Plug-in accuracy from the paper benchmark's cache, on a
tiny model with fixture documents."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_paper_bench import BUDGET, DOCS, Counting, paper

from offsite.errors import OffsiteError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
_spec = importlib.util.spec_from_file_location("paired_bench", ROOT / "bench" / "paired.py")
paired = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paired)

SETTING = {"adapter_layers": [1, 1], "keep": 2}


def test_paired_mean_and_error():
    m, se = paired.paired([1, 0, 1, 1], [0, 0, 1, 0])
    assert m == pytest.approx(0.5) and se == pytest.approx((1 / 3) ** 0.5 / 2)
    # a constant difference has no error; independent errors would have been large
    assert paired.paired([1, 1, 0, 0], [0, 0, -1, -1]) == (1.0, 0.0)
    m, se = paired.average([(0.1, 0.03), (-0.3, 0.04)])
    assert m == pytest.approx(-0.1) and se == pytest.approx(0.025)
    with pytest.raises(ValueError):
        paired.paired([1, 0], [1])


def test_rescored_plugin_matches_the_table_and_a_retuned_adapter_reproduces_it(tmp_path):
    c = Counting()
    paper.run_benchmark("tiny", ["arc_easy"], ["uniform"], results_path=tmp_path / "res.json",
                        cache=tmp_path / "cache", settings_override={"uniform": [SETTING]}, hooks=c.hooks(),
                        progress=False, log=lambda *_: None, command="test", budget=BUDGET, full_ft=False)
    table = json.loads((tmp_path / "res.json").read_text())["records"]
    b = paired._Bench("tiny", BUDGET, None, tmp_path / "cache", c.hooks(), 32, False, lambda *_: None)
    entries = [paired.FULL, ("plugin", "uniform", SETTING)]
    docs = DOCS["arc_easy"][:BUDGET.eval_limit]
    scores = [paired.score_entry(b, e, "arc_easy", docs=docs, log=lambda *_: None) for e in entries]
    recs = paired.combine(b, entries, ["arc_easy"], table)
    acc = {r["method"]: r for r in recs if r["row"] in ("full_zs", "plugin")}
    assert acc[None]["matches_results_file"] and acc["uniform"]["matches_results_file"]
    diff = [r for r in recs if r["row"] == "paired_diff" and r["task"] == "arc_easy"][0]
    assert diff["method"] == "uniform" and diff["vs"]["method"] is None  # Plug-in minus Full ZS
    assert diff["value"] == pytest.approx(scores[1]["acc"] - scores[0]["acc"])
    assert [r["task"] for r in recs if r["row"] == "paired_diff"] == ["arc_easy", "avg1"]

    # lose the tuned adapter and the cached scores: --tune tunes it again, to the table's accuracy
    adapter = b.adapter_dir("uniform", SETTING, "arc_easy")
    first = {f.name: load_file(str(f)) for f in adapter.glob("*.safetensors")}
    assert first
    shutil.rmtree(adapter)
    paired.details_path(b, entries[1], "arc_easy").unlink()
    with pytest.raises(OffsiteError, match="pass --tune"):
        paired.score_entry(b, entries[1], "arc_easy", docs=docs, log=lambda *_: None)
    again = paired.score_entry(b, entries[1], "arc_easy", tune=True, docs=docs, log=lambda *_: None)
    assert again["correct"] == scores[1]["correct"]
    retuned = {f.name: load_file(str(f)) for f in adapter.glob("*.safetensors")}
    assert retuned.keys() == first.keys()
    for name, tensors in first.items():
        assert tensors.keys() == retuned[name].keys()
        assert all(torch.equal(t, retuned[name][k]) for k, t in tensors.items())

    # a table that disagrees with the re-scored documents is refused
    wrong = [dict(r, value=r["value"] + 0.25) if r["row"] == "plugin" else r for r in table]
    with pytest.raises(OffsiteError, match="differs from the results file"):
        paired.combine(b, entries, ["arc_easy"], wrong)
