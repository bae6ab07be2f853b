"""bench/transfer_recipes.py, which now only collects the historical records: transfer (per
ceiling, over tasks, beyond the floor), the tables it writes into docs/transfer.md, the records file
itself collecting into what docs/transfer.md shows, and the removed measuring commands refused."""

import pytest

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


def test_the_records_file_still_collects_into_the_docs_tables(tmp_path, monkeypatch):
    """The historical records collect into the committed results and exactly the tables
    docs/transfer.md shows (no run adds lines any more: what is there must keep regenerating)."""
    import argparse
    import json

    committed_results = json.loads(recipes.RESULTS.read_text())["records"]
    results = tmp_path / "transfer-recipes.json"
    results.write_bytes(recipes.RESULTS.read_bytes())
    monkeypatch.setattr(recipes, "RESULTS", results)
    doc = tmp_path / "transfer.md"
    committed = (recipes.ROOT / "docs" / "transfer.md").read_text()
    doc.write_text(committed.replace("| **average of 6** |", "| stale |"))  # a table to put back
    recipes.cmd_collect(argparse.Namespace(task="arc_easy", limit=recipes.DEFAULT_LIMIT, plot=None, frontier=None,
                                           privacy_utility=None, doc=str(doc)))
    assert doc.read_text() == committed
    # the same records (their order follows set iteration, so it varies with the hash seed)
    key = lambda records: sorted(json.dumps(r, sort_keys=True) for r in records)  # noqa: E731
    assert key(json.loads(results.read_text())["records"]) == key(committed_results)


@pytest.mark.parametrize("command", ["run", "diagnose"])
def test_the_removed_commands_say_where_their_code_is(command, capsys):
    assert recipes.main([command, "uniform:keep=13"]) == 2
    err = capsys.readouterr().err
    assert "removed on 2026-12-07" in err and recipes.REMOVED in err and "bench/content_seeds.py" in err
    assert recipes.REMOVED in recipes.__doc__ and "run_cell" in recipes.__doc__


def test_main_collects_with_its_flags(tmp_path, monkeypatch):
    import json

    results, records = tmp_path / "r.json", tmp_path / "r.records.jsonl"
    monkeypatch.setattr(recipes, "RESULTS", results)
    monkeypatch.setattr(recipes, "RECORDS", records)
    lines = [_record("uniform:keep=26", plugin=[1, 1, 1, 0] * 10, zs=[0, 0, 1, 0] * 10, task="sciq"),
             _record("uniform:keep=8", plugin=[1, 0, 1, 0] * 10, task="sciq")]
    records.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert recipes.main(["collect", "--task", "sciq", "--limit", "40"]) == 0
    out = json.loads(results.read_text())
    assert out["meta"]["command"] == "python bench/transfer_recipes.py collect"
    assert "first 40 evaluation documents" in out["notes"][0]
    [t] = [r for r in out["records"] if r["metric"] == "transfer"]
    assert (t["method"], t["task"], t["value"]) == ("uniform:keep=8", "sciq", 0.5)
