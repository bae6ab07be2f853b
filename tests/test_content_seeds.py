"""bench/content_seeds.py: the content benchmark as a grid of cells over run_cell, on a tiny model."""

from __future__ import annotations

import json
from dataclasses import replace

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


def test_each_adapter_layout_is_measured_against_its_own_ceiling(grid):
    every = Recipe.from_dict({"options": {"keep": 1}, "adapter_layers": [2, 1]})
    bottom = Recipe.from_dict({"options": {"keep": 1}, "adapter_layers": [2, 1], "tuning": {"blocks": "bottom"}})
    cs.run_grid(grid, [every, bottom], [1])
    got = cs.read_cells(grid)
    assert sorted(got["ceiling"]) == ["2,1 all", "2,1 bottom"]  # the bottom blocks tuned on the full model apart
    own = {lay: got["ceiling"][lay][1].correct["quiz"] for lay in got["ceiling"]}
    res = cs.collect(grid)
    for rec in (r for r in res["records"] if r["row"] == "plugin"):
        zs = got["full_zs"].correct["quiz"]
        gain = sum(own[cs.layout_of(rec["spec"])]) / len(zs) - sum(zs) / len(zs)
        assert rec["transfer"]["ceiling_gain"] == pytest.approx(gain)
    assert list(res["layouts"]) == ["2,1 bottom"] and "Adapter 2,1 bottom (its own ceiling and floors)" in res["head"]
    # a reference layout measures every recipe against that one ceiling (bench/data_privacy.py)
    ref = cs.collect(grid, reference="2,1 all")
    assert len({r["transfer"]["ceiling_gain"] for r in ref["records"] if r["row"] == "plugin"}) == 1


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


def test_the_distilled_row_runs_in_the_grid_and_is_collected(grid, tmp_path):
    """--rows distilled: each cell adds a distilled Plug-in, keyed by its spec; collect gives a record of it."""
    from offsite.distilled_plugin import DistillSpec

    grid.distill = DistillSpec("Question: {text}\nAnswer:", ("bookstore", "library"), examples=16)
    recipe = Recipe.from_dict({"options": {"keep": 1}, "adapter_layers": [2, 1]})
    cs.run_grid(grid, [recipe], [1], cs.CELL_ROWS + ("distilled",), floors=False)
    rows = sorted(p.name.split("-")[0] for p in (grid.out / "rows").iterdir())
    assert rows == ["ceiling", "distilled", "emu_ft", "emu_zs", "full_zs", "plugin"]
    lab, cache = cs.cell_of(grid, recipe.with_seed(1))
    row = cache.read("distilled")
    assert row.extra["distill"]["examples"] == 16 and row.extra["train_examples"] == 16
    assert len(row.correct["quiz"]) == len(grid.eval.docs)
    # another spec is another row; the grid's other rows keep their keys
    other = cs.cell_of(replace(grid, distill=DistillSpec("Q: {text}\nA:", ("bookstore", "library"), examples=16)),
                       recipe.with_seed(1))[1]
    assert other.path("distilled") != cache.path("distilled") and other.path("plugin") == cache.path("plugin")
    res = cs.collect(grid)
    assert [r["row"] for r in res["records"]] == ["plugin", "proxy", "distilled"]
    rec = res["records"][2]
    assert rec["seeds"] == [1] and rec["plugin"] == [sum(row.correct["quiz"]) / len(row.correct["quiz"])]
    assert rec["distill"]["template"] == "Question: {text}\nAnswer:" and len(rec["distill"]["label_shares"]) == 1
    assert "| distilled |" in cs.table(res)
    cs.plot_frontier(res["records"], tmp_path / "frontier.png", "quiz")
    assert (tmp_path / "frontier.png").stat().st_size > 0


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


def test_data_privacy_protocols_have_their_own_recipes_and_names(grid):
    """alone, assist and federated cells at each epsilon: distinct names (folders, attack files), the
    owner in the loop as the package's recipe, and the federation's steps matched to the alone cell's."""
    from types import SimpleNamespace

    from bench import data_privacy as dpb
    from offsite.assist import RECIPE_EVERY

    eps = [float("inf"), 8.0, 3.0, 1.0]
    names = {dpb.cell_name(p, dpb.recipe_at(e, 1, p)) for p in dpb.PROTOCOLS for e in eps}
    assert len(names) == len(dpb.PROTOCOLS) * len(eps)
    alone, assist = dpb.recipe_at(8.0, 1), dpb.recipe_at(8.0, 1, "assist")
    assert assist.tuning == {"blocks": "bottom", "seed": 1} and assist.assist_options().every == RECIPE_EVERY
    assert assist.dp == alone.dp == {"epsilon": 8.0} and not dpb.recipe_at(float("inf"), 1, "assist").dp
    assert cs.emulator_dir(assist) == cs.emulator_dir(alone)  # the same emulator, shared
    assert dpb.protocol_of(assist.to_dict()) == "assist" and dpb.protocol_of(alone.to_dict()) == "alone"
    # the federated cell runs on the alone recipe; only its name and folder differ
    assert dpb.recipe_at(8.0, 1, "federated") == alone
    assert dpb.attack_path(grid, "federated", alone) != dpb.attack_path(grid, "alone", alone)
    with pytest.raises(SystemExit, match="unknown protocol"):
        dpb.recipe_at(8.0, 1, "pooled")
    # the owner in the loop tunes with the owner's correction, and its rows are its own
    grid_recipe = Recipe.from_dict({"options": {"keep": 1}, "adapter_layers": [2, 1]}).with_seed(1)
    with_owner = Recipe.from_dict({**grid_recipe.to_dict(), "tuning": {"blocks": "bottom", "seed": 1},
                                   "assist": {"every": 2}})
    cs.ensure_emulator(grid, grid_recipe)
    (lab, cache), (lab_a, cache_a) = cs.cell_of(grid, grid_recipe), cs.cell_of(grid, with_owner)
    assert lab.assistant is None and lab_a.assistant is not None and lab.adapter_dir != lab_a.adapter_dir
    assert cache.path("plugin") != cache_a.path("plugin") and cache.path("full_zs") == cache_a.path("full_zs")
    # 1,000 rows and the 42 canary rows, a tenth held out: 938 rows, 118 steps at batch 8 -> 4 rounds x 7 x 4 owners
    assert dpb.federation_steps(SimpleNamespace(data=SimpleNamespace(items=list(range(1042)))), 1) == (4, 7)


def test_data_privacy_grid_of_protocols_collects_one_row_per_protocol_and_epsilon(grid, tmp_path, monkeypatch):
    """The data owner alone, the owner in the loop and a federation (its Flower run replaced by the
    model owner's bundle of a perturbed adapter: tests/test_federated.py runs real ones) on a tiny
    model: every cell scored against the same Full ZS and ceiling, attacked, collected into one table;
    the untuned models' scores computed once for each set of members."""
    import numpy as np

    import offsite.federated.run as fedrun
    from bench import data_privacy as dpb
    from offsite.bundle import load_adapter
    from offsite.privacy.canary import canary_record_path, plant
    from offsite.tune import split_validation

    planted, heldout = tmp_path / "train_c.jsonl", tmp_path / "held.jsonl"
    write_jsonl(tmp_path / "train_ctx.jsonl", [{"context": r["question"], "choices": r["choices"], "answer": r["answer"]}
                                               for r in mc_rows(16, 0)])
    plant(tmp_path / "train_ctx.jsonl", planted, per_rep=1)
    write_jsonl(heldout, [{"context": r["question"], "choices": r["choices"], "answer": r["answer"]}
                          for r in mc_rows(10, 500)])
    grid.data, grid.root = file_data(str(planted)), tmp_path / "dp"
    monkeypatch.setattr(dpb, "RUNS", tmp_path / "dp")
    monkeypatch.setattr(dpb, "prepare", lambda name: (grid, planted, canary_record_path(planted), heldout))
    monkeypatch.setattr(dpb, "RECIPE", {"method": "uniform", "options": {"keep": 1}, "adapter_layers": [2, 1]})
    monkeypatch.setattr(dpb, "ASSIST", {"tuning": {"blocks": "bottom"},
                                        "assist": {"every": 2, "source": str(tmp_path / "public.jsonl"), "examples": 4}})
    runs = []

    def federation(cfg, shards, **kw):  # the model owner's final bundle, as a finished Flower run leaves it
        from offsite.federated.run import finished_state
        from offsite.federated.server import Owner

        runs.append(cfg)
        owner = Owner(cfg)
        rng = np.random.default_rng(0)
        owner.global_arrays = [a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype) for a in owner.initial]
        owner.done = cfg.rounds
        owner.finish(None)
        return finished_state(cfg)

    monkeypatch.setattr(fedrun, "run_simulation", federation)
    inf = float("inf")
    dpb.run_task("quiz", [inf], 1, ["alone", "assist"])
    dpb.run_task("quiz", [inf, 8.0], 1, ["federated"])
    cfg = runs[0]
    assert len(runs) == 2 and cfg.clients == 4 and cfg.secagg and cfg.rounds == 4 and cfg.seed == 1 and cfg.lr == 1e-4
    assert runs[0].dp_epsilon == 0 and runs[1].dp_epsilon == 8.0
    assisted = load_adapter(grid.out / "adapters" / cs.slug(dpb.recipe_at(inf, 1, "assist")))
    assert assisted.training["assist"]["corrections"] > 0  # the owner was in the loop
    # finished work is kept: a rerun runs no federation, tunes nothing and attacks nothing
    before = sorted(p.name for p in grid.out.rglob("*"))
    dpb.run_task("quiz", [inf, 8.0], 1, ["federated"])
    dpb.run_task("quiz", [inf], 1, ["assist", "alone"])
    assert len(runs) == 2 and sorted(p.name for p in grid.out.rglob("*")) == before
    res = dpb.task_results("quiz")
    assert [(r["protocol"], r["epsilon"]) for r in res["rows"]] == [
        ("alone", inf), ("assist", inf), ("federated", inf), ("federated", 8.0)]
    alone, assist, fed, fed8 = res["rows"]
    assert fed8["dp"]["unit"] == "data owner" and fed8["dp"]["epsilon"] <= 8.0 and fed["dp"] is None
    # every row measured against the one ceiling (no DP, the data owner alone)
    assert all(r["transfer"]["seeds"] == [1] for r in res["rows"]) and res["ceiling"]["seeds"] == [1]
    # the federation's members: each owner's training part of its shard (canaries apart)
    shards = [file_data(str(grid.out / "shards" / f"client-{i}.jsonl")).items for i in range(4)]
    assert sum(map(len, shards)) == len(grid.data.items)
    trained = [x for items in shards for x in split_validation(items, 0.1, 1)[0] if "access code" not in x[0]]
    assert fed["members"] == fed8["members"] == len(trained) and alone["members"] == assist["members"]
    # the reference cache: the full model and the shipped emulator scored once per set (alone's members,
    # the federation's members, the non-members), the untuned model's canary exposure once
    cached = sorted(p.name.split("-")[0] for p in (grid.out / "reference").iterdir())
    assert cached == ["exposure"] + ["logprobs"] * 6
    text = dpb.table([res])
    assert "| quiz | assist | ∞ |" in text and "| quiz | federated | 8 (0.025) per owner |" in text
    # rows written before the grid had protocols read as the data owner alone
    old = {**res, "rows": [{k: v for k, v in alone.items() if k != "protocol"}]}
    assert "| quiz | alone | ∞ |" in dpb.table([old])
    dpb.plot([res, old], tmp_path / "img" / "dp.png")
    assert (tmp_path / "img" / "dp.png").stat().st_size > 0
