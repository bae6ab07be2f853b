"""bench/paper.py on a tiny model with fixture tasks: every cell runs once, finished cells are
skipped, cached emulators and adapters are reused, and a newly registered method joins."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_tokenizer, tiny_model

from bench import paper
from offsite.experiment import benchmark
from offsite.emulator import registry as emulator_mod  # the package import registers the built-in methods
from offsite.data.tasks import Doc
from offsite.emulator import Method, keep_blocks, split_layers
from offsite.errors import OffsiteError
from offsite.experiment.recipe import Recipe
from offsite.tune import TrainingData


DOCS = {
    "arc_easy": [Doc(f"q{i}", f"Question: what is {i} plus {i}?\nAnswer:",
                     [str(2 * i), str(2 * i + 1), str(i), "none"], 0) for i in range(6)],
    "text": [("The quick brown fox jumps over the lazy dog. " * 4 + f"Story {i}.") for i in range(3)],
}
TRAIN = {
    "arc_easy": TrainingData("qa", [(d.context, " " + d.target) for d in DOCS["arc_easy"]] * 2, "arc_easy"),
    "text": TrainingData("text", ["Once upon a time there was a tiny model. " * 5] * 3, "text"),
    "webqs": TrainingData("qa", [(f"Question: who wrote book {i}?\nAnswer:", f" author {i}") for i in range(12)],
                          "webqs"),  # the owner's public pairs, for the floor
}
BUDGET = benchmark.Budget(eval_limit=4, train_limit=8, text_train_limit=2, text_block=64, max_length=128,
                      lr=1e-3, full_ft_lr=1e-3, batch_size=4, micro_batch_size=4)
UNIFORM = [Recipe(method="uniform", options={"keep": 2}, adapter_layers=(1, 1))]


class Counting:
    """Hooks that count what the benchmark actually does."""

    def __init__(self, details: bool = False):
        self.loads = self.trains = 0
        self.evals: list[str] = []
        self.details = details  # return per-document predictions, as the real hook does

    def hooks(self):
        from offsite.eval import evaluate

        def load(name):
            self.loads += 1
            return tiny_model("llama", 6), make_tokenizer()

        def data(task, budget):
            self.trains += 1
            d = TRAIN[task]
            limit = budget.text_train_limit if task == "text" else budget.train_limit
            return TrainingData(d.kind, d.items[:limit], d.source)

        def ev(model, tok, task, limit, batch_size, progress):
            self.evals.append(task)
            return evaluate(model, tok, task, docs=DOCS[task], limit=limit, batch_size=batch_size, progress=False,
                            return_details=self.details)

        return benchmark.Hooks(load_model=load, train_data=data, evaluate=ev, display_name=lambda n: n)


@pytest.fixture
def builds(monkeypatch):
    calls = []
    real = benchmark.build_emulator

    def counting(method, *a, **k):
        calls.append(method)
        return real(method, *a, **k)

    monkeypatch.setattr(benchmark, "build_emulator", counting)
    return calls


def run(tmp_path, counter, methods=("uniform",), recipes=UNIFORM, **kw):
    kw.setdefault("budget", BUDGET)
    kw.setdefault("ceiling", False)  # tested on their own below
    kw.setdefault("floor", False)
    kw.setdefault("probe", False)
    return paper.run_benchmark("tiny", ["arc_easy", "text"], list(methods) if methods else None,
                               results_path=tmp_path / "res.json", cache=tmp_path / "cache",
                               recipes=recipes, hooks=counter.hooks(), progress=False,
                               log=lambda *_: None, command="test", **kw)


def cells(path):
    return {(r["task"], r["method"], r["row"]) for r in json.loads(Path(path).read_text())["records"]}


def test_runs_every_cell_once_then_skips_and_reuses_the_cache(tmp_path, builds):
    c = Counting()
    out = run(tmp_path, c, full_ft=True)
    expected = {(t, m, r) for t in ("arc_easy", "text")
                for m, r in [(None, "full_zs"), (None, "full_ft"), ("uniform", "emu_zs"),
                             ("uniform", "emu_ft"), ("uniform", "plugin")]}
    assert cells(tmp_path / "res.json") == expected
    assert builds == ["uniform"] and c.loads == 1 and c.trains == 2 and len(c.evals) == 10
    data = json.loads((tmp_path / "res.json").read_text())
    assert out.pop("failures") == [] and data == json.loads(json.dumps(out))
    assert data["meta"]["budget"]["eval_limit"] == 4 and data["meta"]["runs"][0]["command"] == "test"
    recs = data["records"]
    plug = [r for r in recs if r["row"] == "plugin" and r["task"] == "arc_easy" and r["metric"] == "acc"][0]
    assert plug["setting"] == {"adapter_layers": [1, 1], "keep": 2} and plug["n"] == 4
    assert plug["middle_params"] > 0 and plug["original_middle_params"] == 2 * plug["middle_params"]
    assert plug["train_examples"] == 8 and plug["train_seconds"] is not None
    shared = [r for r in recs if r["row"] == "full_zs"]
    assert shared and all(r["method"] is None and r["setting"] is None for r in shared)

    # everything done: nothing is loaded, built, trained or evaluated, the records stay as they are
    c2 = Counting()
    run(tmp_path, c2, full_ft=True)
    assert (c2.loads, c2.trains, c2.evals, builds) == (0, 0, [], ["uniform"])
    assert json.loads((tmp_path / "res.json").read_text())["records"] == recs

    # lose two cells: only those are evaluated again, with the cached emulator and adapter, and the
    # re-applied adapter gives the emulator exactly the numbers the freshly tuned one gave
    key = lambda r: (r["task"], r["row"], r["metric"])  # noqa: E731
    before = {key(r): r["value"] for r in recs}
    assert abs(before["text", "emu_ft", "ppl"] - before["text", "emu_zs", "ppl"]) > 1e-3  # tuning mattered
    kept = [r for r in recs if r["row"] not in ("emu_ft", "plugin")]
    (tmp_path / "res.json").write_text(json.dumps({"meta": data["meta"], "records": kept}))
    c3 = Counting()
    run(tmp_path, c3, full_ft=True)
    assert (c3.trains, c3.evals, builds) == (0, ["arc_easy", "arc_easy", "text", "text"], ["uniform"])
    again = json.loads((tmp_path / "res.json").read_text())["records"]
    assert {key(r): r["value"] for r in again} == pytest.approx(before, abs=1e-6)
    assert len(json.loads((tmp_path / "res.json").read_text())["meta"]["runs"]) == 2


def test_a_new_budget_is_refused_for_the_same_file(tmp_path):
    run(tmp_path, Counting(), full_ft=False)
    with pytest.raises(OffsiteError, match="another budget .*eval_limit: 4 there, 3 now"):
        run(tmp_path, Counting(), budget=benchmark.Budget(**{**BUDGET.__dict__, "eval_limit": 3}))


def test_task_subsets_run_apart_merge_into_one_file_that_a_rerun_finds_complete(tmp_path):
    def run_tasks(tasks, name, **kw):
        return paper.run_benchmark("tiny", tasks, ["uniform"], budget=kw.pop("budget", BUDGET),
                                   results_path=tmp_path / name, cache=tmp_path / "cache", recipes=UNIFORM,
                                   hooks=Counting().hooks(), progress=False, log=lambda *_: None,
                                   command=f"test {name}", full_ft=False, ceiling=False, floor=False, probe=False, **kw)

    run_tasks(["arc_easy"], "a.json")
    run_tasks(["text"], "b.json")
    a_cells, b_cells = cells(tmp_path / "a.json"), cells(tmp_path / "b.json")
    before = json.loads((tmp_path / "a.json").read_text())["records"]
    logged = []
    benchmark.merge_results(tmp_path / "a.json", [tmp_path / "b.json", tmp_path / "b.json"], log=logged.append)
    merged = json.loads((tmp_path / "a.json").read_text())
    assert cells(tmp_path / "a.json") == a_cells | b_cells
    assert merged["records"][:len(before)] == before  # the target's own cells are kept as they were
    assert len(merged["records"]) == len(before) + len(json.loads((tmp_path / "b.json").read_text())["records"])
    assert [r["command"] for r in merged["meta"]["runs"]] == ["test a.json", "test b.json"]
    assert "4 cells added" in logged[0] and "0 cells added, 4 already" in logged[1]
    # a rerun over both tasks finds nothing left to do
    c = Counting()
    paper.run_benchmark("tiny", ["arc_easy", "text"], ["uniform"], budget=BUDGET, results_path=tmp_path / "a.json",
                        cache=tmp_path / "cache", recipes=UNIFORM, hooks=c.hooks(), progress=False,
                        log=lambda *_: None, command="rerun", full_ft=False, ceiling=False, floor=False, probe=False)
    assert (c.loads, c.evals) == (0, [])
    # into a new file; another budget is refused and nothing is written
    benchmark.merge_results(tmp_path / "new.json", [tmp_path / "b.json"], log=lambda *_: None)
    assert cells(tmp_path / "new.json") == b_cells
    run_tasks(["text"], "c.json", budget=benchmark.Budget(**{**BUDGET.__dict__, "eval_limit": 3}))
    with pytest.raises(OffsiteError, match="another budget .*eval_limit: 3 there, 4 in"):
        benchmark.merge_results(tmp_path / "new.json", [tmp_path / "c.json"], log=lambda *_: None)
    assert cells(tmp_path / "new.json") == b_cells


@dataclass
class DummyOptions:
    pass


def _dummy_build(model, tokenizer, name, adapter_layers, opts):
    from offsite.models import num_blocks

    _, middle, _ = split_layers(num_blocks(model.config), adapter_layers)
    return keep_blocks(model, tokenizer, name, adapter_layers, middle[:1], "dummy", {})


def test_a_newly_registered_method_joins_without_changes(tmp_path, monkeypatch, builds):
    dummy = Method("dummy", "keep the first middle block", DummyOptions, _dummy_build,
                   bench_settings=[{"adapter_layers": [1, 1]}])
    monkeypatch.setattr(emulator_mod, "METHODS", {"uniform": emulator_mod.METHODS["uniform"]})
    run(tmp_path, Counting(), full_ft=False)  # uniform only, before dummy exists
    emulator_mod.register(dummy)
    c = Counting()
    run(tmp_path, c, methods=None, full_ft=False)  # every registered method
    got = cells(tmp_path / "res.json")
    assert {(t, "dummy", r) for t in ("arc_easy", "text") for r in ("emu_zs", "emu_ft", "plugin")} <= got
    assert builds == ["uniform", "dummy"] and len(c.evals) == 6  # Full ZS and uniform were not redone
    recs = json.loads((tmp_path / "res.json").read_text())["records"]
    mp = {r["method"]: r["middle_params"] for r in recs if r["row"] == "emu_zs"}
    assert mp["dummy"] * 2 == mp["uniform"]  # one kept block against two: recorded for size matching


def _broken_build(model, tokenizer, name, adapter_layers, opts):
    raise OffsiteError("needs an artifact that is not there")


def test_a_failing_method_is_skipped_and_the_others_go_on(tmp_path, monkeypatch):
    broken = Method("broken", "always fails", DummyOptions, _broken_build)
    monkeypatch.setattr(emulator_mod, "METHODS", {"uniform": emulator_mod.METHODS["uniform"], "broken": broken})
    out = run(tmp_path, Counting(), methods=None, full_ft=False)
    assert out["failures"] == ['broken {"adapter_layers": [2, 2]} (arc_easy): needs an artifact that is not there']
    got = cells(tmp_path / "res.json")
    assert ("text", "uniform", "plugin") in got and not any(m == "broken" for _, m, _ in got)


def test_method_recipes_defaults_and_checks(monkeypatch):
    uniform = emulator_mod.get_method("uniform")
    [r] = benchmark.method_recipes(uniform, lambda: None)
    assert r == Recipe(method="uniform", options={"keep": 8}) and r.setting() == {"adapter_layers": [2, 2], "keep": 8}
    plain = Method("plain", "", DummyOptions, _dummy_build)
    assert [r.setting() for r in benchmark.method_recipes(plain, lambda: None)] == [{"adapter_layers": [2, 2]}]
    calls = Method("calls", "", DummyOptions, _dummy_build, bench_settings=lambda cfg: [{"adapter_layers": "3,1"}])
    monkeypatch.setitem(emulator_mod.METHODS, "calls", calls)
    assert benchmark.method_recipes(calls, lambda: "cfg") == [Recipe(method="calls", adapter_layers=(3, 1))]
    bad = Method("bad", "", DummyOptions, _dummy_build, bench_settings=[{"adapter_layers": [2, 2], "kep": 3}])
    monkeypatch.setitem(emulator_mod.METHODS, "bad", bad)
    with pytest.raises(OffsiteError, match="option 'kep' is not one of bad's"):
        benchmark.method_recipes(bad, lambda: None)
    # a grid's recipes for a method replace its benchmark recipes; the other methods keep theirs
    kd = emulator_mod.get_method("kd")
    assert benchmark.chosen_recipes(uniform, UNIFORM, lambda: None) == UNIFORM
    assert benchmark.chosen_recipes(kd, UNIFORM, lambda: None) == [Recipe(method="kd", options={"keep": 8})]


def test_grid_files_toml_json_and_one_recipe(tmp_path):
    (tmp_path / "g.toml").write_text('[[recipe]]\nmethod = "uniform"\nadapter_layers = [1, 1]\n'
                                     '[recipe.options]\nkeep = 2\n\n[[recipe]]\nmethod = "kd"\n')
    (tmp_path / "g.json").write_text(json.dumps([{"method": "uniform", "adapter_layers": [1, 1], "options": {"keep": 2}}]))
    (tmp_path / "one.toml").write_text(UNIFORM[0].to_toml())
    grid = benchmark.load_grids([tmp_path / "g.toml", tmp_path / "g.json", tmp_path / "one.toml"])
    assert grid == [UNIFORM[0], Recipe(method="kd"), UNIFORM[0], UNIFORM[0]]
    assert benchmark.load_grids(None) == []
    (tmp_path / "tuned.toml").write_text('[[recipe]]\nmethod = "uniform"\n[recipe.tuning]\nseed = 3\n')
    with pytest.raises(OffsiteError, match="tuning come from the budget"):
        benchmark.load_grids([tmp_path / "tuned.toml"])
    (tmp_path / "typo.toml").write_text('[[recipe]]\nmethod = "uniform"\n[recipe.options]\nkep = 2\n')
    with pytest.raises(OffsiteError, match="typo.toml, recipe 1: option 'kep'"):
        benchmark.load_grids([tmp_path / "typo.toml"])
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(OffsiteError, match="non-empty list of recipes"):
        benchmark.load_grids([tmp_path / "empty.json"])


def test_results_file_names_carry_a_non_default_budget():
    assert paper.default_results_path("smollm2-135m", benchmark.Budget()).name == "paper-smollm2.json"
    small = benchmark.Budget(eval_limit=50, train_limit=None)
    assert paper.default_results_path("smollm2-135m", small).name == "paper-smollm2-e50-tall.json"
    other = benchmark.Budget(lr=3e-4)
    assert paper.default_results_path("my-model", other).name == f"paper-my-model-{other.digest()[:6]}.json"


def test_cli_plan_and_readme_table(tmp_path, capsys):
    hooks = Counting().hooks()
    (tmp_path / "grid.toml").write_text('[[recipe]]\nmethod = "uniform"\nadapter_layers = [1, 1]\n'
                                        '[recipe.options]\nkeep = 2\n')
    args = ["--model", "tiny", "--tasks", "arc_easy", "--methods", "uniform", "--recipes", str(tmp_path / "grid.toml"),
            "--eval-limit", "4", "--train-limit", "8", "--text-train-limit", "2", "--batch-size", "4",
            "--lr", "1e-3", "--full-ft-lr", "1e-3", "--results", str(tmp_path / "r.json"),
            "--cache", str(tmp_path / "c"), "--no-ceiling", "--no-floor", "--no-probe"]
    assert paper.main(args + ["--plan"], hooks=hooks) == 0
    assert "0 of 5 cells done" in capsys.readouterr().out
    assert paper.main(args + ["--no-full-ft"], hooks=hooks) == 0
    assert "### tiny · uniform (adapter 1,1, keep=2)" in capsys.readouterr().out
    assert paper.main(args + ["--readme-table"], hooks=hooks) == 0
    out = capsys.readouterr().out
    assert "| full model | 100% | Full ZS |" in out and "| uniform (adapter 1,1, keep=2) |" in out
    assert "Produced by `python bench/paper.py --model tiny" in out
    assert paper.main(args + ["--methods", "nope"], hooks=hooks) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err


def test_a_cached_emulator_built_with_other_options_is_refused(tmp_path):
    # the cache is keyed by the setting as written; a default that changed since must not be reused
    run(tmp_path, Counting(), full_ft=False)
    side = next((tmp_path / "cache" / "tiny" / "emulators" / "uniform").glob("*.build.json"))
    info = json.loads(side.read_text())
    assert info["options"]["keep"] == 2 and info["seconds"] >= 0
    (tmp_path / "res.json").unlink()
    info["options"]["keep"] = 3  # as if the option had resolved otherwise when it was built
    side.write_text(json.dumps(info))
    out = run(tmp_path, Counting(), full_ft=False)  # a failing cell is reported, the others go on
    assert out["failures"] and all("built with other options (keep: 3 then, 2 now" in f
                                             for f in out["failures"])
    assert {r["method"] for r in out["records"]} == {None}
    del info["options"]  # a cache from before options were recorded is still used
    side.write_text(json.dumps(info))
    assert run(tmp_path, Counting(), full_ft=False)["failures"] == []


def test_ceiling_transfer_and_probe_cells(tmp_path, monkeypatch):
    # a task the tiny model learns in a few steps (the answer is always " y", which it scores below
    # " x" untuned), given under two task names; the emulator keeps the whole middle, so its
    # Plug-in is the ceiling: transfer 1 on each task and on their average, probe cosine 1
    import offsite.data.text as text
    from offsite.eval import evaluate

    docs = [Doc(f"d{i}", f"Question {i}: which fruit?\nAnswer:", ["y", "x"] if i % 2 else ["x", "y"],
                0 if i % 2 else 1) for i in range(40)]
    train = TrainingData("qa", [(f"Question {i}: which fruit?\nAnswer:", " y") for i in range(80)], "fruit")
    # the owner's public pairs teach the other answer: the floor stays below the ceiling
    public = TrainingData("qa", [(f"Question {i}: which fruit?\nAnswer:", " x") for i in range(200)], "public")
    monkeypatch.setattr(text, "public_text", lambda part: ["The quick brown fox jumps over the lazy dog. " * 40] * 4)
    trains = []

    def data(task, budget):
        trains.append(task)
        return public if task in ("webqs", "squad") else train

    hooks = benchmark.Hooks(load_model=lambda name: (tiny_model("llama", 6, seed=1), make_tokenizer()),
                        train_data=data, display_name=lambda n: n,
                        evaluate=lambda model, tok, task, limit, bs, progress: evaluate(
                            model, tok, task, docs=docs, limit=limit, batch_size=bs, progress=False,
                            return_details=True))
    budget = benchmark.Budget(eval_limit=None, train_limit=80, epochs=3, lr=2e-2, batch_size=8, micro_batch_size=8,
                          max_length=64)
    recipes = [Recipe(method="uniform", options={"keep": 3}, adapter_layers=(2, 1))]
    go = lambda: paper.run_benchmark("tiny", ["arc_easy", "sciq"], ["uniform"], budget,  # noqa: E731
                                     full_ft=False, results_path=tmp_path / "r.json", cache=tmp_path / "c",
                                     recipes=recipes, hooks=hooks, progress=False,
                                     log=lambda *_: None, command="test")
    go()
    recs = json.loads((tmp_path / "r.json").read_text())["records"]
    acc = {(r["task"], r["row"]): r["value"] for r in recs if r["metric"] == "acc"}
    for task in ("arc_easy", "sciq"):
        assert acc[task, "ceiling"] == acc[task, "plugin"]
        assert acc[task, "ceiling"] - acc[task, "full_zs"] >= 0.3
    transfer = {r["task"]: r for r in recs if r["metric"] == "transfer"}
    assert set(transfer) == {"arc_easy", "sciq", "avg2"}
    assert all(t["row"] == "plugin" and t["method"] == "uniform" for t in transfer.values())
    assert transfer["avg2"]["value"] == pytest.approx(1.0) and transfer["avg2"]["tasks"] == ["arc_easy", "sciq"]
    [cos] = [r for r in recs if r["row"] == "probe" and r["metric"] == "grad_cos"]
    assert cos["value"] == pytest.approx(1.0, abs=1e-6) and cos["task"] == "text"
    n_trains = len(trains)
    assert sorted(trains) == ["arc_easy", "sciq", "squad", "webqs"]  # once per task and public source
    floor = {r["task"]: r for r in recs if r["row"] == "floor" and r["metric"] == "acc"}
    assert floor["arc_easy"]["floor_source"] == "webqs" and floor["sciq"]["floor_source"] == "squad"
    assert all(f["train_examples"] == 80 for f in floor.values())  # as many pairs as the task's examples
    assert all(acc[t, "floor"] < acc[t, "ceiling"] for t in ("arc_easy", "sciq"))
    beyond = {r["task"]: r for r in recs if r["metric"] == "transfer_beyond_floor"}
    assert set(beyond) == {"arc_easy", "sciq", "avg2"}  # Plug-in = ceiling: all of it
    assert all(r["value"] == pytest.approx(1.0) and r["row"] == "plugin" for r in beyond.values())

    # everything done: a rerun trains nothing, the transfer records are not duplicated
    go()
    again = json.loads((tmp_path / "r.json").read_text())["records"]
    assert len(trains) == n_trains and len(again) == len(recs)

    # the report shows the ceiling row and the transfer line
    from offsite.experiment.report import build_report, report_markdown

    md = report_markdown(build_report([("r.json", {"meta": {}, "records": again})]))
    assert "Ceiling" in md and "transfer" in md and "| Floor (adapter tuned on the full model on public pairs) |" in md
    assert "| transfer beyond the floor (Plug-in − Floor) / (Ceiling − Floor) | 1.00 ± 0.00 | 1.00 ± 0.00 | 1.00 ± 0.00 |" in md
