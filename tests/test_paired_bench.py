"""bench/paired.py: paired differences of Plug-in accuracy from the paper benchmark's cache, on a
tiny model with fixture documents."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_paper_bench import BUDGET, DOCS, UNIFORM, Counting, paper

from bench import paired
from offsite.experiment.benchmark import Bench
from offsite.errors import OffsiteError


SETTING = {"adapter_layers": [1, 1], "keep": 2}  # the record setting of UNIFORM[0]


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
                        cache=tmp_path / "cache", recipes=UNIFORM, hooks=c.hooks(),
                        progress=False, log=lambda *_: None, command="test", budget=BUDGET, full_ft=False)
    table = json.loads((tmp_path / "res.json").read_text())["records"]
    b = Bench("tiny", BUDGET, tmp_path / "cache", c.hooks(), 32, False, lambda *_: None)
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
    b.details_path(entries[1], "arc_easy").unlink()
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


def test_the_benchmark_keeps_the_documents_so_nothing_is_scored_again(tmp_path, monkeypatch):
    c = Counting(details=True)
    paper.run_benchmark("tiny", ["arc_easy", "text"], ["uniform"], results_path=tmp_path / "res.json",
                        cache=tmp_path / "cache", recipes=UNIFORM, hooks=c.hooks(),
                        progress=False, log=lambda *_: None, command="test", budget=BUDGET, full_ft=False)
    table = json.loads((tmp_path / "res.json").read_text())["records"]
    assert not any("details" in r for r in table)
    b = Bench("tiny", BUDGET, tmp_path / "cache", c.hooks(), 32, False, lambda *_: None)
    entries = [paired.FULL, ("plugin", "uniform", SETTING)]
    kept = [json.loads(b.details_path(e, "arc_easy").read_text()) for e in entries]
    assert not b.details_path(entries[1], "text").exists()  # perplexity has no documents to pair
    assert [k["n"] for k in kept] == [BUDGET.eval_limit] * 2

    def no_scoring(*a, **k):
        raise AssertionError("scored again")

    monkeypatch.setattr("offsite.eval.mc.score_mc", no_scoring)
    assert [paired.score_entry(b, e, "arc_easy", log=lambda *_: None) for e in entries] == kept
    recs = paired.combine(b, entries, ["arc_easy"], table)  # the kept predictions match the table
    assert all(r["matches_results_file"] for r in recs if r["row"] in ("full_zs", "plugin"))
    # and they are what a fresh scoring gives
    monkeypatch.undo()
    for e, k in zip(entries, kept):
        b.details_path(e, "arc_easy").unlink()
        again = paired.score_entry(b, e, "arc_easy", docs=DOCS["arc_easy"][:BUDGET.eval_limit], log=lambda *_: None)
        assert (again["ids"], again["correct"], again["acc"]) == (k["ids"], k["correct"], k["acc"])


def test_runs_of_two_seeds_are_compared_per_seed_and_pooled(tmp_path, capsys):
    import dataclasses

    entries = [paired.FULL, ("plugin", "uniform", SETTING)]
    runs, files = [], []
    for seed in (42, 43):
        budget = dataclasses.replace(BUDGET, seed=seed)
        c = Counting(details=True)
        files.append(tmp_path / f"res{seed}.json")
        paper.run_benchmark("tiny", ["arc_easy"], ["uniform"], results_path=files[-1], cache=tmp_path / "cache",
                            recipes=UNIFORM, hooks=c.hooks(), progress=False,
                            log=lambda *_: None, command="test", budget=budget, full_ft=False)
        b = Bench("tiny", budget, tmp_path / "cache", c.hooks(), 32, False, lambda *_: None)
        runs.append((b, json.loads(files[-1].read_text())["records"]))
    # Full ZS trains nothing: both seeds share its predictions; each seed has its own Plug-in
    assert runs[0][0].details_path(entries[0], "arc_easy") == runs[1][0].details_path(entries[0], "arc_easy")
    assert runs[0][0].details_path(entries[1], "arc_easy") != runs[1][0].details_path(entries[1], "arc_easy")
    recs = paired.combine_seeds(runs, entries, ["arc_easy"])
    diffs = {(str(r["seed"]), r["task"]): r for r in recs if r["row"] == "paired_diff"}
    assert set(diffs) == {(s, t) for s in ("42", "43", "[42, 43]") for t in ("arc_easy", "avg1")}
    for seed, (b, table) in zip(("42", "43"), runs):  # each seed's rows are that run's own comparison
        alone = [r for r in paired.combine(b, entries, ["arc_easy"], table) if r["row"] == "paired_diff"]
        assert diffs[seed, "arc_easy"]["value"] == pytest.approx(alone[0]["value"])
        assert diffs[seed, "arc_easy"]["label"].endswith(f", seed {seed}")
    pooled = diffs["[42, 43]", "arc_easy"]
    assert pooled["value"] == pytest.approx((diffs["42", "arc_easy"]["value"] + diffs["43", "arc_easy"]["value"]) / 2)
    assert pooled["label"].endswith("seeds 42+43 pooled")

    # through the command line; runs of other budgets are refused with one line
    out = tmp_path / "paired.json"
    (tmp_path / "grid.json").write_text(json.dumps([UNIFORM[0].to_dict()]))
    common = ["--tasks", "arc_easy", "--methods", "uniform", "--recipes", str(tmp_path / "grid.json"),
              "--cache", str(tmp_path / "cache"), "--combine-only", "--model", "tiny"]
    assert paired.main(common + ["--results", *map(str, files), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["meta"]["budget"]["seed"] == [42, 43] and len(written["records"]) == len(recs)
    table = paired.markdown(written["records"])
    assert "seeds 42+43 pooled" in table and "| accuracy (%) | seed |" in table
    acc = {(r["seed"], r["method"]): 100 * r["value"] for r in recs if r["row"] == "plugin"}
    mean_row = [line for line in table.splitlines() if line.startswith("|  | mean |")][-1]
    assert mean_row.endswith(f"| {(acc[42, 'uniform'] + acc[43, 'uniform']) / 2:.2f} |")
    other = tmp_path / "other.json"
    data = json.loads(files[1].read_text())
    data["meta"]["budget"]["eval_limit"] = 3
    other.write_text(json.dumps(data))
    capsys.readouterr()
    assert paired.main(common + ["--results", str(files[0]), str(other), "--out", str(out)]) == 2
    assert "one budget with different seeds" in capsys.readouterr().err
