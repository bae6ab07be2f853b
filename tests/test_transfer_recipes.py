"""bench/transfer_recipes.py: collecting its records into transfer (per ceiling, over tasks, beyond
the floor), the tables it writes into docs/transfer.md, and the owner-side treatments it runs through
offsite's own code (the floor's adapter shipped, the emulator built around it, the correction)."""


import pytest
import torch

from conftest import tiny_model

from bench import transfer_recipes as recipes


def _record(kind, plugin=None, zs=None, task="arc_easy", **extra):
    r = {"kind": kind, "layers": [2, 2], "frac": 1.0 if kind.endswith("keep=26") else 0.5, **extra}
    if plugin is not None:
        r[f"plugin_{task}"], r[f"plugin_pred_{task}"] = sum(plugin) / len(plugin), plugin
        r[f"emu_ft_{task}"] = 0.25
    if zs is not None:
        r[f"emu_zs_{task}"], r[f"emu_zs_pred_{task}"] = sum(zs) / len(zs), zs
    return r


def test_collect_computes_transfer_per_ceiling_and_keeps_recipes_without_records(tmp_path, monkeypatch):
    import argparse
    import json

    results, records = tmp_path / "r.json", tmp_path / "r.records.jsonl"
    monkeypatch.setattr(recipes, "RESULTS", results)
    monkeypatch.setattr(recipes, "RECORDS", records)
    old = {"model": "m", "task": "arc_easy", "method": "prune:width=511", "setting": {"adapter_layers": [2, 2]},
           "middle_fraction": 0.5,
           "row": "plugin", "metric": "acc", "value": 0.5, "n": 4}
    stale = {**old, "method": "uniform:keep=13", "value": 0.1}  # re-measured below: replaced
    results.write_text(json.dumps({"meta": {}, "records": [old, stale]}))
    # 40 documents (each pattern ten times), so that the ceilings' gains are above noise
    zs, ceil, ceil_bottom, plug = [0, 0, 1, 0] * 10, [1, 1, 1, 0] * 10, [1, 0, 1, 0] * 10, [1, 0, 1, 0] * 10
    lines = [_record("uniform:keep=26", plugin=ceil, zs=zs), _record("uniform:keep=26", plugin=ceil_bottom, tune="bottom"),
             _record("uniform:keep=13", plugin=plug), _record("uniform:keep=13", plugin=plug, tune="bottom"),
             _record("uniform:keep=8", plugin=[1, 0, 1, 0], task="tiny", zs=[0, 0, 1, 0]),
             _record("uniform:keep=26", plugin=[1, 1, 1, 0], task="tiny", zs=[0, 0, 1, 0])]
    records.write_text("".join(json.dumps(r) + "\n" for r in lines))
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- begin generated: tiny-recipes (x) -->\n<!-- end generated: tiny-recipes -->\n"
                   "<!-- begin generated: recipes (x) -->\n<!-- end generated: recipes -->\n")
    recipes.cmd_collect(argparse.Namespace(task="arc_easy", limit=4, plot=None, frontier=None, privacy_utility=None,
                                           doc=str(doc)))
    tiny_block, main_block = doc.read_text().split("<!-- begin generated: recipes")
    assert "on the first 4 tiny documents" in tiny_block and "uniform:keep=13" not in tiny_block
    assert "arc_easy documents" in main_block and "`uniform:keep=13`" in main_block
    out = json.loads(results.read_text())["records"]
    assert old in out and stale not in out
    # 4 documents: the ceiling's gain (+0.5) is under two standard errors, so no transfer is claimed
    [small] = [r for r in out if r["metric"] == "transfer" and r["task"] == "tiny"]
    assert small["value"] is None and small["ceiling_gain"] == 0.5
    assert {r["n"] for r in out if r["task"] == "tiny" and r["metric"] == "acc"} == {4}  # its own size
    t = {r["method"]: r["value"] for r in out if r["metric"] == "transfer" and r["task"] == "arc_easy"}
    # (Plug-in - Full ZS) / (ceiling - Full ZS), against the ceiling tuned the same way
    assert t == {"uniform:keep=13": 0.5, "uniform:keep=13 +tune=bottom": 1.0}
    assert {r["method"] for r in out if r["row"] == "ceiling"} == {"uniform:keep=26", "uniform:keep=26 +tune=bottom"}


def test_collect_averages_transfer_over_tasks_and_tabulates_them():
    from offsite.experiment.stats import transfer

    zs, ceil, plug = {"a": [0, 0, 1, 0] * 10, "b": [0, 1, 0, 0] * 10}, {"a": [1, 1, 1, 0] * 10, "b": [1, 1, 1, 0] * 10}, \
        {"a": [1, 0, 1, 0] * 10, "b": [1, 1, 0, 0] * 10}
    lines = [r for task in ("a", "b") for r in (
        _record("uniform:keep=26", plugin=ceil[task], zs=zs[task], task=task, tune="bottom"),
        _record("uniform:keep=8", plugin=plug[task], task=task, tune="bottom", cv=["webqs", 32, 1.0, 4], cv_norm=True))]
    out = recipes.collect_records(lines, limit=40)
    per_task = {r["task"]: r for r in out if r["metric"] == "transfer"}
    assert set(per_task) == {"a", "b", "avg2"}
    assert per_task["a"]["value"] == 0.5 and per_task["b"]["value"] == 0.5
    want = transfer([plug["a"], plug["b"]], [zs["a"], zs["b"]], [ceil["a"], ceil["b"]])
    assert per_task["avg2"]["value"] == want["value"] and per_task["avg2"]["tasks"] == ["a", "b"]
    table = recipes.tasks_markdown(out)
    assert "| a | 25.0 | 75.0 | 25.0 | 50.0 | +25.0 | 0.50 ± " in table
    assert "**average of 2**" in table and f"**{want['value']:.2f} ± {want['stderr']:.2f}**" in table


def test_fill_replaces_only_between_its_markers():
    doc = "intro\n<!-- begin generated: tasks (by a command) -->\nold\nlines\n<!-- end generated: tasks -->\nrest\n"
    assert recipes.fill(doc, "tasks", "| new |\n") == (
        "intro\n<!-- begin generated: tasks (by a command) -->\n| new |\n<!-- end generated: tasks -->\nrest\n")
    assert recipes.fill(doc, "recipes", "x") == doc  # no markers of that name: unchanged


def test_matched_source_takes_each_task_from_its_own_run():
    """``+correction=matched``: SciQ from the run with SQuAD pairs, other tasks from the WebQuestions
    run; its average pools exactly those runs' predictions."""
    from offsite.experiment.stats import transfer

    zs, ceil = [0, 0, 1, 0] * 10, [1, 1, 1, 0] * 10
    web, squad = [1, 0, 1, 0] * 10, [1, 1, 1, 0] * 10
    cv = lambda src: dict(tune="bottom", cv=[src, 32, 1.0, 4], cv_norm=True)  # noqa: E731
    lines = [r for task in ("arc_easy", "sciq") for r in (
        _record("uniform:keep=26", plugin=ceil, zs=zs, task=task, tune="bottom"),
        _record("uniform:keep=8", plugin=web, task=task, **cv("webqs")))]
    lines.append(_record("uniform:keep=8", plugin=squad, task="sciq", **cv("squad")))
    out = recipes.collect_records(lines, limit=40)
    matched = {r["task"]: r for r in out if r["metric"] == "transfer" and "+correction=matched" in r["method"]}
    assert matched["arc_easy"]["value"] == 0.5 and matched["sciq"]["value"] == 1.0
    want = transfer([web, squad], [zs, zs], [ceil, ceil])
    assert matched["avg2"]["value"] == want["value"] and matched["avg2"]["tasks"] == ["arc_easy", "sciq"]
    table = recipes.tasks_markdown(out)
    assert table.count("+correction=matched") == 1 and "| sciq | 25.0 | 75.0 | 25.0 | 75.0 |" in table


def test_a_run_on_more_documents_is_its_own_recipe_against_its_own_ceiling(monkeypatch):
    """A run scored on more documents than the default is named so, and compared with the Full ZS
    and ceiling scored on as many documents (never with those of the default documents)."""
    monkeypatch.setattr(recipes, "DEFAULT_LIMIT", 40)
    zs, ceil, plug = [0, 0, 1, 0], [1, 1, 1, 0], [1, 0, 1, 0]
    cv = dict(tune="bottom", cv=["webqs", 32, 1.0, 4], cv_norm=True)
    lines = [_record("uniform:keep=26", plugin=ceil * 10, zs=zs * 10, tune="bottom"),
             _record("uniform:keep=8", plugin=plug * 10, **cv),
             # on 80 documents the ceiling gains less and the same Plug-in carries all of it
             _record("uniform:keep=26", plugin=[1, 0, 1, 0] * 20, zs=zs * 20, tune="bottom"),
             _record("uniform:keep=8", plugin=plug * 20, **cv)]
    out = recipes.collect_records(lines, limit=40)
    t = {r["method"]: r for r in out if r["metric"] == "transfer"}
    name = "uniform:keep=8 +tune=bottom +correction=webqs n=32 every 4 steps (norm-matched)"
    assert t[name]["value"] == 0.5 and t[name]["n"] == 40
    assert t[name + " [first 80 docs]"]["value"] == 1.0 and t[name + " [first 80 docs]"]["n"] == 80
    assert {r["method"] for r in out if r["row"] == "ceiling"} == {
        "uniform:keep=26 +tune=bottom", "uniform:keep=26 +tune=bottom [first 80 docs]"}
    head = recipes.markdown(out, "arc_easy").splitlines()[0]
    assert "on the first 40 arc_easy documents" in head and "on the first 80, where the recipe's name says so" in head
    assert recipes.more_docs(name + " [first 80 docs]") and not recipes.more_docs(name)


def test_methods_table_says_which_recipe_clears_the_bar(monkeypatch):
    monkeypatch.setattr(recipes, "BAR", {"transfer": 0.7, "tasks": ("a",), "gap": 5.0})
    zs, ceil = [0, 0, 1, 0] * 10, [1, 1, 1, 0] * 10
    cv = lambda kind: dict(tune="bottom", cv=["webqs", 32, 1.0, 4], cv_norm=True)  # noqa: E731
    lines = [r for task in ("a", "b") for r in (
        _record("uniform:keep=26", plugin=ceil, zs=zs, task=task, tune="bottom"),
        _record("uniform:keep=8", plugin=ceil, task=task, **cv("")),  # carries all of the ceiling's gain
        _record("kd:keep=8", plugin=[1, 0, 1, 0] * 10, task=task, **cv("")))]  # half of it
    lines.append({"kind": "kd:keep=8", "layers": [2, 2], "frac": 0.5, "probe_text": {"all": 0.3, "bottom": 0.2, "top": 0.4}})
    out = recipes.collect_records(lines, limit=40)
    table = recipes.methods_markdown(out, n_tasks=2)
    [uniform] = [line for line in table.splitlines() if line.startswith("| `uniform")]
    [kd] = [line for line in table.splitlines() if line.startswith("| `kd")]
    assert "**1.00 ± 0.00**" in uniform and uniform.endswith("| – / – | yes |")
    assert "**0.50 ± " in kd and kd.endswith("| 0.30 / – | no |")  # the emulator's probe, from its own line
    assert recipes.methods_markdown(out, n_tasks=6).count("\n") == 1  # no recipe measured on six tasks


def test_matched_source_takes_the_run_on_the_most_documents(monkeypatch):
    monkeypatch.setattr(recipes, "DEFAULT_LIMIT", 40)
    zs, ceil = [0, 0, 1, 0], [1, 1, 1, 0]
    cv = lambda src: dict(tune="bottom", cv=[src, 32, 1.0, 4], cv_norm=True)  # noqa: E731
    lines = [r for task in ("arc_easy", "sciq") for r in (
        _record("uniform:keep=26", plugin=ceil * 10, zs=zs * 10, task=task, tune="bottom"),
        _record("uniform:keep=8", plugin=[1, 0, 1, 0] * 10, task=task, **cv("webqs")))]
    lines += [_record("uniform:keep=8", plugin=ceil * 10, task="sciq", **cv("squad")),
              _record("uniform:keep=26", plugin=ceil * 20, zs=zs * 20, tune="bottom"),  # ARC-Easy on 80 documents
              _record("uniform:keep=8", plugin=[1, 1, 1, 0] * 5 + [1, 0, 1, 0] * 15, **cv("webqs"))]
    out = recipes.collect_records(lines, limit=40)
    matched = {r["task"]: r for r in out if r["metric"] == "transfer" and "+correction=matched" in r["method"]}
    assert matched["arc_easy"]["n"] == 80 and matched["arc_easy"]["value"] == 0.625  # (10/80 + 20/80) / (40/80)
    assert matched["sciq"]["value"] == 1.0 and matched["avg2"]["n"] == 120
    table = recipes.tasks_markdown(out)
    assert "| arc_easy | 25.0 | 75.0 | 25.0 | 56.2 |" in table  # Full ZS and ceiling on the same 80 documents
    # a recipe whose WebQuestions run was scored only on more documents is matched all the same
    every2 = dict(tune="bottom", cv=["webqs", 32, 1.0, 2], cv_norm=True)
    lines += [_record("uniform:keep=8", plugin=ceil * 20, **every2),
              _record("uniform:keep=8", plugin=ceil * 10, task="sciq", **{**every2, "cv": ["squad", 32, 1.0, 2]})]
    out = recipes.collect_records(lines, limit=40)
    [avg] = [r for r in out if r["task"] == "avg2" and "matched" in r["method"] and "every 2" in r["method"]]
    assert avg["value"] == 1.0 and avg["n"] == 120


def test_a_floor_is_scored_against_the_ceiling_and_never_is_one():
    """``--train-task``: the same tuning on other data (a floor) is its own recipe, ``+data=SOURCE``,
    and its transfer is taken against the ceiling tuned on the task itself."""
    zs, ceil = [0, 0, 1, 0] * 10, [1, 1, 1, 0] * 10
    floor = [1, 0, 1, 0] * 10
    lines = [_record("uniform:keep=26", plugin=floor, tune="bottom", train_task="webqs"),  # before the ceiling
             _record("uniform:keep=26", plugin=ceil, zs=zs, tune="bottom")]
    out = recipes.collect_records(lines, limit=40)
    assert {r["method"] for r in out if r["row"] == "ceiling"} == {"uniform:keep=26 +tune=bottom"}
    [t] = [r for r in out if r["metric"] == "transfer"]
    assert t["method"] == "uniform:keep=26 +tune=bottom +data=webqs" and t["value"] == 0.5


def test_transfer_beyond_the_floor_of_the_owners_public_pairs():
    """A corrected recipe is also measured against the floor: the same tuning on the full model on
    the correction's public source, with no task data: (Plug-in − floor) / (ceiling − floor)."""
    zs, ceil = [0, 0, 0, 0] * 10, [1, 1, 1, 1] * 10
    floor, plug = [1, 1, 0, 0] * 10, [1, 1, 1, 0] * 10
    cv = dict(tune="bottom", cv=["webqs", 32, 1.0, 4], cv_norm=True)
    lines = [_record("uniform:keep=26", plugin=ceil, zs=zs, tune="bottom"),
             _record("uniform:keep=26", plugin=floor, tune="bottom", train_task="webqs"),
             _record("uniform:keep=8", plugin=plug, **cv),
             _record("uniform:keep=8", plugin=plug, **{**cv, "cv": ["squad", 32, 1.0, 4]})]  # no squad floor
    out = recipes.collect_records(lines, limit=40)
    t = {r["method"]: r for r in out if r["metric"] == "transfer"}
    beyond = {r["method"]: r for r in out if r["metric"] == "transfer_beyond_floor"}
    name = "uniform:keep=8 +tune=bottom +correction=webqs n=32 every 4 steps (norm-matched)"
    assert t[name]["value"] == 0.75 and beyond[name]["value"] == 0.5 and beyond[name]["floor"] == 0.5
    assert t["uniform:keep=26 +tune=bottom +data=webqs"]["value"] == 0.5  # the floor's own transfer
    assert set(beyond) == {name}
    # a recipe that starts from the floor's adapter is measured against the same floor, and is no ceiling
    start = _record("uniform:keep=8", plugin=plug, tune="bottom", start_floor=["webqs:40", 1.0])
    out = recipes.collect_records(lines + [start], limit=40)
    name = "uniform:keep=8 +tune=bottom +start=floor(webqs:40)"
    assert [r["value"] for r in out if r["metric"] == "transfer_beyond_floor" and r["method"] == name] == [0.5]
    assert {r["method"] for r in out if r["row"] == "ceiling"} == {"uniform:keep=26 +tune=bottom"}
    # a floor within noise of the ceiling leaves nothing beyond it to carry: no ratio, as offsite run has it
    near = [1] * 39 + [0]
    lines[1] = _record("uniform:keep=26", plugin=near, tune="bottom", train_task="webqs")
    [b] = [r for r in recipes.collect_records(lines, limit=40) if r["metric"] == "transfer_beyond_floor"]
    assert b["value"] is None and b["ceiling_gain"] == pytest.approx(1 / 40)
    assert recipes._transfer_cell(b) == "within noise"


def test_collect_keeps_old_records_a_new_line_does_not_remeasure(tmp_path, monkeypatch):
    """A probe-only line of a recipe whose runs were recorded before their lines were kept replaces
    only the probe it measures, not the recipe's accuracies and transfer."""
    import argparse
    import json

    results, records = tmp_path / "r.json", tmp_path / "r.records.jsonl"
    monkeypatch.setattr(recipes, "RESULTS", results)
    monkeypatch.setattr(recipes, "RECORDS", records)
    base = {"model": "m", "method": "uniform:keep=8", "setting": {"adapter_layers": [2, 2]}, "middle_fraction": 0.3}
    old = [{**base, "task": "arc_easy", "row": "plugin", "metric": "transfer", "value": -0.04, "stderr": 0.12},
           {**base, "task": "webqs", "row": "probe", "metric": "grad_cos", "value": 0.5}]
    results.write_text(json.dumps({"meta": {}, "records": old}))
    line = {"kind": "uniform:keep=8", "layers": [2, 2], "frac": 0.3, "probe_webqs": {"all": -0.015}}
    records.write_text(json.dumps(line) + "\n")
    recipes.cmd_collect(argparse.Namespace(task="arc_easy", limit=500, plot=None, frontier=None,
                                           privacy_utility=None, doc=None))
    out = json.loads(results.read_text())["records"]
    assert old[0] in out and old[1] not in out
    assert [r["value"] for r in out if r["row"] == "probe"] == [-0.015]


def test_start_from_the_floor_ships_the_adapter_tuned_on_the_full_model(tokenizer, monkeypatch):
    """``--start-floor``: the emulator's bottom adapter blocks become those tuned on the full model on
    public pairs (the floor's tuning); its top blocks and the full model stay as they were."""
    import offsite.tune as tune_mod
    from offsite.emulator import build_emulator
    from offsite.experiment.cell import ceiling_emulator
    from offsite.train import TrainConfig
    from offsite.tune import TrainingData, TuneSettings

    pairs = TrainingData("qa", [(f"Question {i}: which fruit?\nAnswer:", " y") for i in range(16)], "webqs")
    monkeypatch.setattr(tune_mod, "task_data", lambda src: pairs)
    model = tiny_model("llama", 6, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emu = build_emulator("uniform", model, tokenizer, "tiny", (2, 1), keep=1)
    shipped = {k: v.clone() for k, v in emu.adapter_state().items()}
    settings = TuneSettings(blocks="bottom", train=TrainConfig(lr=1e-2, epochs=1, batch_size=4, micro_batch_size=4,
                                                               checkpoint_every=None, progress=False))
    recipes.start_from_floor(model, emu, "webqs:8", settings, (2, 1))
    full = ceiling_emulator(model, tokenizer, "tiny", (2, 1))
    floor = recipes.tune(model, full, TrainingData("qa", pairs.items[:8], "webqs"), settings).state
    now = emu.adapter_state()
    assert all(torch.equal(now[k], floor[k]) for k in floor)  # the floor's bottom blocks, deterministic
    assert any(not torch.equal(now[k], shipped[k]) for k in floor)
    top = [k for k in now if k.startswith("blocks.5.")]
    assert top and all(torch.equal(now[k], shipped[k]) for k in top)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_build_at_the_floor_distils_around_the_shipped_adapter_and_ships_it(tokenizer, tmp_path, monkeypatch):
    """``--build-at-floor``: the emulator is built with the floor's adapter in the full model (so
    ``gradmatch`` matches gradients there), ships that adapter, is cached apart from the one built
    around the original adapter, and leaves the full model as it was."""
    import offsite.emulator.gradmatch as gradmatch

    pairs = [(f"Question {i}: which fruit?\nAnswer:", " pear") for i in range(12)]
    monkeypatch.setattr(gradmatch, "source_pairs", lambda src: list(pairs))
    monkeypatch.setattr(recipes, "EMULATORS", tmp_path)
    model = tiny_model("llama", 6, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    floor = {f"blocks.{i}.{n}": p.detach() + 0.05 * torch.randn(p.shape, generator=g)
             for i in (0, 1) for n, p in model.model.layers[i].named_parameters()}
    recipe = recipes.historical_recipe("gradmatch:keep=1:gm_steps=2:gm_batch_size=2:gm_examples=8:gm_val_examples=2",
                                       layers="2,1")
    emu = recipes.build(recipe, model, tokenizer, at=("webqs:8", floor))
    shipped = emu.adapter_state()
    assert all(torch.allclose(shipped[k], floor[k]) for k in floor)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plain = recipes.build(recipe, model, tokenizer)
    assert not torch.allclose(plain.adapter_state()["blocks.0.self_attn.q_proj.weight"],
                              floor["blocks.0.self_attn.q_proj.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gradmatch_keep-1_gm_steps-2_gm_batch_size-2_gm_examples-8_gm_val_examples-2_2-1",
        "gradmatch_keep-1_gm_steps-2_gm_batch_size-2_gm_examples-8_gm_val_examples-2_2-1_floor-webqs-8"]
    again = recipes.build(recipe, model, tokenizer, at=("webqs:8", floor))  # from its cache
    assert all(torch.equal(again.adapter_state()[k], shipped[k]) for k in floor)


def test_more_epochs_is_its_own_recipe_against_a_ceiling_and_floor_of_as_many():
    """``--epochs``: a run of three epochs is named so and compared only with the ceiling and the
    floor tuned for as many epochs."""
    zs = [0, 0, 0, 0] * 10
    lines = [_record("uniform:keep=26", plugin=[1, 1, 0, 0] * 10, zs=zs, tune="bottom"),
             _record("uniform:keep=26", plugin=[1, 1, 1, 1] * 10, tune="bottom", epochs=3),
             _record("uniform:keep=26", plugin=[1, 0, 0, 0] * 10, tune="bottom", train_task="webqs"),
             _record("uniform:keep=26", plugin=[1, 1, 0, 0] * 10, tune="bottom", train_task="webqs", epochs=3),
             _record("uniform:keep=8", plugin=[1, 1, 1, 0] * 10, tune="bottom", epochs=3,
                     start_floor=["webqs:40", 1.0], built_at_floor=True)]
    out = recipes.collect_records(lines, limit=40)
    name = "uniform:keep=8 +tune=bottom +epochs=3 +start=floor(webqs:40) (emulator built there)"
    t = {(r["method"], r["metric"]): r["value"] for r in out if r["row"] == "plugin" and r["metric"] != "acc"}
    assert t[(name, "transfer")] == 0.75 and t[(name, "transfer_beyond_floor")] == 0.5
    assert t[("uniform:keep=26 +tune=bottom +epochs=3 +data=webqs", "transfer")] == 0.5
    assert {r["method"] for r in out if r["row"] == "ceiling"} == {"uniform:keep=26 +tune=bottom",
                                                                   "uniform:keep=26 +tune=bottom +epochs=3"}


def test_the_correction_runs_through_offsite_assist(tokenizer, monkeypatch):
    """``--correction SOURCE --correction-every K``: the data owner's tuning with the owner in the loop
    is offsite.assist's (one implementation of the correction); the full model and the shipped
    emulator the owner holds stay as they were, and the bundle records the corrections."""
    import offsite.tune as tune_mod
    from offsite.assist import AssistOptions
    from offsite.emulator import build_emulator
    from offsite.train import TrainConfig
    from offsite.tune import TrainingData, TuneSettings

    pairs = TrainingData("qa", [(f"Question {i}: which fruit?\nAnswer:", " y") for i in range(16)], "webqs")
    monkeypatch.setattr(tune_mod, "task_data", lambda src: pairs)
    model = tiny_model("llama", 6, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emu = build_emulator("uniform", model, tokenizer, "tiny", (2, 1), keep=1)
    settings = TuneSettings(blocks="bottom", train=TrainConfig(lr=1e-2, epochs=1, batch_size=4, micro_batch_size=4,
                                                               checkpoint_every=None, progress=False))
    data = TrainingData("qa", [(f"Question {i}: what colour?\nAnswer:", " red") for i in range(12)], "task")
    bundle = recipes.tune(model, emu, data, settings, AssistOptions(every=1, source="webqs", examples=4))
    assert bundle.training["assist"]["every"] == 1 and bundle.training["assist"]["corrections"] >= 2
    assert bundle.training["blocks"] == "bottom"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the historical flags become the recipe's [assist]; a static or multi-source correction is refused
    for source, every in (("webqs,squad", 4), ("webqs", 0)):
        with pytest.raises(SystemExit, match="one source and --correction-every"):
            recipes.historical_recipe("uniform:keep=8", correction=source, correction_every=every)
    assert not recipes.historical_recipe("uniform:keep=8", correction_every=4).assist_options().on
    recipe = recipes.historical_recipe("uniform:keep=8", correction="squad", correction_every=2, correction_n=32,
                                       correction_pool=2048)
    assert recipe.assist_options() == AssistOptions(every=2, source="squad", examples=32, pool=2048)


def _run_args(argv):
    """``run``'s arguments as the script's parser reads them (nothing run)."""
    import unittest.mock as mock

    got = {}
    with mock.patch.object(recipes, "cmd_run", lambda a: got.setdefault("a", a)), \
            mock.patch.object(recipes.torch, "set_num_threads", lambda n: None):
        assert recipes.main(["run", *argv]) == 0
    return got["a"]


@pytest.mark.parametrize("argv, keys", [
    (["uniform:keep=26", "--zs"], {"kind": "uniform:keep=26", "layers": [2, 2]}),
    (["gradmatch:keep=13:gm_output_weight=10", "--plug-bottom"],
     {"kind": "gradmatch:keep=13:gm_output_weight=10", "layers": [2, 2]}),
    (["scaleot:alpha=0.692308:beta=1.0", "--tune", "bottom", "--correction", "webqs", "--correction-every", "4",
      "--correction-n", "32", "--train-limit", "1000"],
     {"kind": "scaleot:alpha=0.692308:beta=1.0", "layers": [2, 2], "tune": "bottom", "cv": ["webqs", 32, 1.0, 4],
      "cv_norm": True}),
    (["uniform:keep=8", "--tune", "bottom", "--correction", "squad", "--correction-every", "2", "--correction-n", "32",
      "--correction-pool", "2048", "--epochs", "3", "--layers", "2,1"],
     {"kind": "uniform:keep=8", "layers": [2, 1], "tune": "bottom", "epochs": 3.0, "cv": ["squad", 32, 1.0, 2],
      "cv_norm": True, "cv_pool": 2048}),
])
def test_historical_names_read_into_a_recipe_and_back(argv, keys):
    """A run named the historical way becomes a Recipe in one place (historical_recipe), and its
    records line keeps the keys every earlier line has (so that collect names and pairs it as before)."""
    recipe = recipes.recipe_of(_run_args(argv))
    rec = recipes.recipe_record(recipe)
    assert {k: v for k, v in rec.items() if k != "recipe"} == keys
    assert rec["recipe"] == recipe.to_dict() and recipes.tuning_named(rec) == ""
    assert recipes.kind_of(recipe) == argv[0]  # a float option written as an integer prints back as written
    if "cv" in keys:  # a probe-only or zero-shot line names the emulator and its blocks only
        assert "cv" not in recipes.recipe_record(recipe, tuned=False)


def test_a_recipe_file_is_a_run_of_its_own_name(tmp_path):
    """``run RECIPE.toml``: the same Recipe as the historical name with its flags; tuning the names
    cannot say (``lr``) is named apart, and such a line's ceiling is one tuned the same way."""
    from offsite.experiment.recipe import Recipe

    path = tmp_path / "r.toml"
    path.write_text(Recipe(options={"keep": 8}, tuning={"blocks": "bottom"},
                           assist={"every": 4, "source": "webqs", "examples": 32}).to_toml())
    historical = ["uniform:keep=8", "--tune", "bottom", "--correction", "webqs", "--correction-every", "4",
                  "--correction-n", "32"]
    assert recipes.recipe_of(_run_args([str(path)])) == recipes.recipe_of(_run_args(historical))
    with pytest.raises(SystemExit, match="--tune is the recipe's"):
        recipes.recipe_of(_run_args([str(path), "--tune", "bottom"]))
    path.write_text(Recipe(options={"keep": 8}, floor_source="squad").to_toml())
    with pytest.raises(SystemExit, match="floor_source"):
        recipes.recipe_of(_run_args([str(path)]))
    zs, ceil, ceil_lr, plug = [0, 0, 1, 0] * 10, [1, 1, 1, 0] * 10, [1, 1, 1, 1] * 10, [1, 0, 1, 0] * 10
    lr = {"tuning": {"lr": 3e-5}}

    def line(keep, plugin, tuning=None, **extra):
        rec = recipes.recipe_record(Recipe(options={"keep": keep}, **(tuning or {})))
        return {**rec, **_record(rec["kind"], plugin=plugin, **extra)}
    lines = [line(26, ceil, zs=zs), line(26, ceil_lr, lr), line(8, plug, lr)]
    out = recipes.collect_records(lines, limit=40)
    t = {r["method"]: r["value"] for r in out if r["metric"] == "transfer"}
    # against the ceiling at lr 3e-5: (0.5 - 0.25) / (1 - 0.25), not the one at the default lr (0.5)
    assert t == {"uniform:keep=8 +lr=3e-05": pytest.approx(1 / 3)}
    assert {r["method"] for r in out if r["row"] == "ceiling"} == {"uniform:keep=26", "uniform:keep=26 +lr=3e-05"}


def test_a_bad_recipe_file_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipes.torch, "set_num_threads", lambda n: None)
    path = tmp_path / "r.toml"
    path.write_text('method = "uniform"\n[options]\nkd_steps = 5\n')
    assert recipes.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "belongs to kd" in err and len(err.strip().splitlines()) == 1
