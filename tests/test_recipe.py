"""Recipes as data (offsite.experiment.recipe): one type read from TOML, JSON or ``offsite run``'s
flags, one printer that writes it back, and a run that reproduces from the recipe it wrote."""

from __future__ import annotations

import json

import pytest

from offsite.cli import build_parser, main, run_recipe
from offsite.cli_args import tune_settings
from offsite.errors import OffsiteError
from offsite.experiment.recipe import Recipe, load_grid
from offsite.train import TrainConfig

FULL = {"method": "uniform", "adapter_layers": [2, 1], "floor_source": "squad", "options": {"keep": 13},
        "tuning": {"blocks": "bottom", "lr": 3e-5, "seed": 2, "checkpoint_every": None},
        "assist": {"every": 2, "source": "squad"}, "dp": {"epsilon": 8.0, "clip": 0.5}}


def test_the_printer_writes_what_the_reader_reads(tmp_path):
    recipe = Recipe.from_dict(FULL)
    toml = tmp_path / "r.toml"
    toml.write_text(recipe.to_toml())
    assert Recipe.load(toml) == recipe
    assert 'checkpoint_every = "none"' in recipe.to_toml()  # TOML has no null
    js = tmp_path / "r.json"
    js.write_text(json.dumps(recipe.to_dict()))
    assert Recipe.load(js) == recipe
    assert Recipe().to_dict() == {"method": "uniform", "adapter_layers": [2, 2]}  # only what differs is written
    assert recipe.with_seed(5).seed == 5 and recipe.seed == 2


def test_a_recipe_builds_the_settings_the_flags_build():
    argv = ["run", "--keep", "13", "--tune-blocks", "bottom", "--lr", "3e-5", "--seed", "2", "--batch-size", "4",
            "--assist-every", "--floor-source", "squad", "--dp-epsilon", "8"]
    args = build_parser().parse_args(argv)
    args.argv = argv
    recipe = run_recipe(args)
    base = TrainConfig(epochs=2.0, micro_batch_size=8)
    assert recipe.tune_settings(base) == tune_settings(args, base)
    assert recipe.tune_settings(base).train.micro_batch_size == 4  # a batch size caps the micro-batch
    assert recipe.options == {"keep": 13} and recipe.floor_source == "squad"
    assert recipe.assist_options().on and recipe.dp == {"epsilon": 8.0, "clip": 1.0, "accountant": "rdp"}


@pytest.mark.parametrize("data, words", [
    ({"options": {"kd_steps": 5}}, ["not one of uniform's", "belongs to kd"]),
    ({"method": "nope"}, ["unknown method 'nope'"]),
    ({"tuning": {"lrr": 1}}, ["unknown [tuning] key 'lrr'"]),
    ({"tuning": {"blocks": "middle"}}, ["unknown adapter blocks"]),
    ({"assist": {"every": -1}}, ["assist every"]),
    ({"dp": {"clip": 1.0}}, ["[dp] needs epsilon"]),
    ({"seed": 1}, ["unknown key 'seed'"]),
    ({"adapter_layers": [1]}, ["adapter_layers"]),
    ({"tuning": 3}, ["[tuning] must be a table"]),
])
def test_a_bad_recipe_is_refused_in_one_line(data, words):
    with pytest.raises(OffsiteError) as err:
        Recipe.from_dict(data)
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_a_bad_recipe_file_is_refused(tmp_path, capsys):
    (tmp_path / "r.toml").write_text("method = \n")
    (tmp_path / "r.yaml").write_text("method: uniform\n")
    for path, words in ((tmp_path / "r.toml", "not a readable recipe"), (tmp_path / "r.yaml", ".toml or .json"),
                        (tmp_path / "none.toml", "no such recipe file")):
        assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_recipes_record_setting_and_a_grid_of_recipes(tmp_path):
    # the setting that keys a cell in results files: layout and options, then blocks and assist
    # where they are not the defaults
    assert Recipe(options={"keep": 8}).setting() == {"adapter_layers": [2, 2], "keep": 8}
    owner = Recipe(adapter_layers=(2, 1), tuning={"blocks": "bottom", "seed": 3}, assist={"every": 4}).setting()
    assert owner["blocks"] == "bottom" and owner["assist"]["every"] == 4 and "seed" not in owner
    (tmp_path / "g.toml").write_text('[[recipe]]\nmethod = "kd"\n[recipe.options]\nkeep = 8\n\n'
                                     '[[recipe]]\nadapter_layers = [1, 1]\n')
    assert load_grid(tmp_path / "g.toml") == [Recipe(method="kd", options={"keep": 8}), Recipe(adapter_layers=(1, 1))]
    (tmp_path / "one.json").write_text(json.dumps(Recipe(options={"keep": 4}).to_dict()))
    assert load_grid(tmp_path / "one.json") == [Recipe(options={"keep": 4})]
    (tmp_path / "bad.json").write_text(json.dumps({"recipe": [{"method": "nope"}]}))
    with pytest.raises(OffsiteError, match="bad.json, recipe 1: unknown method 'nope'"):
        load_grid(tmp_path / "bad.json")


def test_a_recipe_file_and_recipe_flags_do_not_mix(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text(Recipe(options={"keep": 4}).to_toml())
    assert main(["run", str(path), "--keep", "8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "given both by" in err and "options" in err and len(err.strip().splitlines()) == 1


def test_a_run_reproduces_from_the_recipe_it_wrote(tmp_path):
    """``offsite run`` writes ``<out>/recipe.toml``; ``offsite run <out>/recipe.toml`` gives the same rows."""
    from conftest import make_tokenizer, tiny_model
    from test_own_task import mc_rows, write_jsonl

    tok = make_tokenizer()
    tiny_model("llama", 6, seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "train.jsonl", mc_rows(16))
    write_jsonl(tmp_path / "quiz.jsonl", mc_rows(8, start=100))
    common = ["--model", tmp_path / "model", "--data", tmp_path / "train.jsonl", "--eval-data", tmp_path / "quiz.jsonl",
              "--preset", "quick", "--no-probe", "--no-floor", "--no-ceiling", "--text-docs", "0"]
    first = ["run", *common, "--keep", "1", "--lr", "1e-2", "--batch-size", "4", "--max-steps", "3", "--seed", "3",
             "--out", tmp_path / "a"]
    assert main([str(a) for a in first]) == 0
    recipe = Recipe.load(tmp_path / "a" / "recipe.toml")
    assert recipe.options == {"keep": 1} and recipe.tuning == {"lr": 1e-2, "batch_size": 4, "max_steps": 3, "seed": 3}
    assert main([str(a) for a in ["run", tmp_path / "a" / "recipe.toml", *common, "--out", tmp_path / "b"]]) == 0

    def rows(run):
        saved = json.loads((tmp_path / run / "results.json").read_text())
        return saved["meta"]["recipe"], [(r["row"], r["metric"], r["value"]) for r in saved["records"]]
    assert rows("a") == rows("b")


def test_every_recipe_shown_in_the_docs_reads():
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shown = [(p.name, m.group(1)) for p in sorted((root / "docs").glob("*.md"))
             for m in re.finditer(r"```toml\n(.*?)```", p.read_text(), re.S)]
    assert shown, "docs/protocol.md shows a recipe file"
    for page, text in shown:
        Recipe.from_dict(tomllib.loads(text), page)
