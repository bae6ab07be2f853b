"""bench/content_seeds.py: the content benchmark as a grid of cells over run_cell, on a tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import make_tokenizer, tiny_model
from test_own_task import mc_rows, write_jsonl

from bench import content_seeds as cs
from offsite.data.own import load_own_task
from offsite.experiment.cell import public_pairs_of
from offsite.experiment.recipe import Recipe
from offsite.tune import file_data


@pytest.fixture
def grid(tmp_path, monkeypatch):
    tok = make_tokenizer()
    tiny_model("llama", 6, seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", mc_rows(16))
    write_jsonl(tmp_path / "eval.jsonl", mc_rows(12, start=100))
    write_jsonl(tmp_path / "public.jsonl", mc_rows(16, start=300))
    monkeypatch.setattr(cs, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(cs, "MODEL", str(tmp_path / "model"))
    data = file_data(str(tmp_path / "train.jsonl"))
    floors = {"public": public_pairs_of(file_data(str(tmp_path / "public.jsonl")), len(data.items))}
    return cs.Task("quiz", load_own_task(str(tmp_path / "eval.jsonl")), data, floors, None,
                   [str(tmp_path / "public.jsonl")])


def test_a_second_recipe_reuses_the_rows_it_shares(grid):
    cs.run_grid(grid, [Recipe.from_dict({"options": {"keep": 1}, "adapter_layers": [2, 1]})], [1])
    rows = sorted(p.name.split("-")[0] for p in (grid.out / "rows").iterdir())
    assert rows == ["ceiling", "emu_ft", "emu_zs", "floor", "full_zs", "plugin"]
    cs.run_grid(grid, [Recipe.from_dict({"options": {"keep": 2}, "adapter_layers": [2, 1]})], [1])
    rows = sorted(p.name.split("-")[0] for p in (grid.out / "rows").iterdir())
    # the second emulator adds its own three rows; Full ZS, the ceiling and the floor are read
    assert rows == ["ceiling", "emu_ft", "emu_ft", "emu_zs", "emu_zs", "floor", "full_zs", "plugin", "plugin"]
    assert json.loads((grid.out / "cells.json").read_text()).keys() == {
        "uniform keep=1 layers=2-1 seed=1", "uniform keep=2 layers=2-1 seed=1"}


def test_collect_gives_a_record_per_recipe_and_row_with_its_seeds(grid, tmp_path, monkeypatch):
    recipe = Recipe.from_dict({"options": {"keep": 1}, "adapter_layers": [2, 1]})
    cs.run_grid(grid, [recipe], [1, 2])
    res = cs.collect(grid)
    assert [(r["recipe"], r["row"], r["seeds"]) for r in res["records"]] == [
        ("uniform keep=1 layers=2-1", "plugin", [1, 2]), ("uniform keep=1 layers=2-1", "proxy", [1, 2])]
    plug = res["records"][0]
    assert plug["spec"] == recipe.to_dict() and 0 < plug["middle_share"] < 1
    assert len(plug["plugin"]) == 2 and res["ceiling"]["seeds"] == [1, 2] and res["floors"]["public"]["seeds"] == [1, 2]
    # the proxy with an emulator change of zero is Full ZS's prediction
    full = cs.read_cells(grid)["full_zs"]
    same = [[0.0] * len(x) for x in full.choices["quiz"]]
    assert cs.proxy(full.choices["quiz"], same, same, [d.gold for d in grid.eval.docs], None) == full.correct["quiz"]
    # records written before the grid stay, under "earlier", and are rendered after the new ones
    results = tmp_path / "old.json"
    results.write_text(json.dumps({"full_zs": 0.5, "ceiling": {"seeds": [1], "acc": [0.7]}, "records": [
        {**{k: plug[k] for k in ("task", "row", "seeds", "plugin", "emu_ft", "plugin_minus_full_zs", "stderr")},
         "recipe": "uniform_keep=13", "middle_share": 0.5}]}))
    res["earlier"] = cs.earlier_of(results)
    text = cs.table(res)
    assert "`uniform keep=1 layers=2-1`" in text and "`uniform_keep=13`" in text
    assert text.index("uniform keep=1") < text.index("Measured before") < text.index("uniform_keep=13")


def test_collect_refuses_a_task_with_nothing_run(grid):
    with pytest.raises(SystemExit, match="nothing measured"):
        cs.collect(grid)


def test_data_privacy_grid_measures_each_epsilon_and_collects(grid, tmp_path, monkeypatch):
    """bench/data_privacy.py on a tiny model: the non-private cell and a DP one, their attacks, the table."""
    from bench import data_privacy as dpb
    from offsite.privacy.canary import canary_record_path, plant

    def context_rows(n, start):  # the content tasks' multiple-choice form, which canaries go into
        return [{"context": r["question"], "choices": r["choices"], "answer": r["answer"]} for r in mc_rows(n, start)]
    planted, heldout = tmp_path / "train_c.jsonl", tmp_path / "held.jsonl"
    write_jsonl(tmp_path / "train_ctx.jsonl", context_rows(16, 0))
    plant(tmp_path / "train_ctx.jsonl", planted, per_rep=1)
    write_jsonl(heldout, context_rows(10, 500))
    grid.data, grid.root = file_data(str(planted)), tmp_path / "dp"
    monkeypatch.setattr(dpb, "RUNS", tmp_path / "dp")
    monkeypatch.setattr(dpb, "prepare", lambda name: (grid, planted, canary_record_path(planted), heldout))
    monkeypatch.setattr(dpb, "RECIPE", {"method": "uniform", "options": {"keep": 1}, "adapter_layers": [2, 1]})
    dpb.run_task("quiz", [float("inf"), 8.0], 1)
    rows = sorted(p.name.split("-")[0] for p in (grid.out / "rows").iterdir())
    # the DP cell adds its own Emulator FT and Plug-in; Emulator ZS, Full ZS, ceiling and floor are shared
    assert rows == ["ceiling", "emu_ft", "emu_ft", "emu_zs", "floor", "full_zs", "plugin", "plugin"]
    res = dpb.task_results("quiz")
    assert [r["epsilon"] for r in res["rows"]] == [float("inf"), 8.0]
    assert res["rows"][0]["dp"] is None and res["rows"][1]["dp"]["epsilon"] <= 8.0
    auc = res["rows"][1]["membership"]["emulator"]["loss_ref"]["auc"]
    assert 0 <= auc["ci95"][0] <= auc["value"] <= auc["ci95"][1] <= 1
    assert set(res["rows"][0]["canaries"]["plugged"]) == {"1", "4", "16"}
    text = dpb.table([res])
    assert text.count("| quiz |") == 2 and "| ∞ |" in text and "beyond the floor from" in text
