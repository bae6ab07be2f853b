"""bench/content_transfer.py's split of the review corpus (the content task ``sentiment`` of
offsite.data.content): films on one side only, labels balanced, the same files every time, rows the
own-task loader accepts; a malformed corpus is refused."""

import bz2
import csv
import io
import json

import pytest

from bench import content_transfer as ct
from offsite.data.content import sentiment_rows
from offsite.data.own import load_own_task
from offsite.errors import OffsiteError


def _corpus(path, films=40, per_film=40, columns=("category", "text", "movie_name", "has_plot_and_reviews")):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for f in range(films):
        w.writerow(["plot", f"plot of film {f}", f"film {f}", "True"][:len(columns)])
        for i in range(per_film):
            w.writerow([("fresh", "rotten")[i % 2], f"review {i} of film {f}", f"film {f}", "True"][:len(columns)])
        w.writerow(["fresh", "review 0 of film 0", f"film {f}", "True"][:len(columns)])  # a duplicate text
    path.write_bytes(bz2.compress(buf.getvalue().encode()))
    return path


SMALL = {"train": 100, "eval": 100}


def split_rows(path):
    return sentiment_rows({"task": path}, SMALL)


def test_split_is_disjoint_balanced_and_stable(tmp_path):
    rows = split_rows(_corpus(tmp_path / "rt.csv.bz2"))
    assert rows == split_rows(tmp_path / "rt.csv.bz2")
    film = {part: {r["context"].rsplit(" of ", 1)[1].split("\n")[0] for r in rows[part]} for part in rows}
    assert film["train"] and film["eval"] and not film["train"] & film["eval"]
    for part in ("train", "eval"):
        answers = [r["answer"] for r in rows[part]]
        assert len(answers) == 200 and answers.count("positive") == answers.count("negative") == 100
        assert len({r["context"] for r in rows[part]}) == 200  # duplicates dropped, no plots
        assert all(r["context"].startswith("Review: review ") and r["context"].endswith("\nSentiment:")
                   for r in rows[part])
    path = tmp_path / "rt_eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows["eval"]))
    task = load_own_task(path)
    assert task.kind == "mc" and len(task.docs) == 200


def test_too_few_reviews_and_wrong_columns_are_refused(tmp_path):
    with pytest.raises(OffsiteError, match="rotten texts, 100 needed"):
        split_rows(_corpus(tmp_path / "few.csv.bz2", films=4, per_film=10))
    with pytest.raises(OffsiteError, match="expected columns"):
        split_rows(_corpus(tmp_path / "cols.csv.bz2", columns=("category", "text")))


#: the recipes first measured, as offsite run's flags (bench/results/content-transfer.json's commands)
MEASURED = ["--method uniform --keep 13", "--method uniform --keep 8", "--method gradmatch --keep 13",
            "--method uniform --keep 13 --tune-blocks bottom", "--method uniform --keep 8 --tune-blocks bottom",
            "--method uniform --keep 8 --tune-blocks bottom --assist-every 2 --assist-pool 1500"]


def test_the_grid_is_the_recipes_measured_and_names_its_runs_by_label():
    import shlex

    from offsite.cli import build_parser, run_recipe

    def flags(line):
        args = build_parser().parse_args(["run", *shlex.split(line)])
        args.argv = ["run", *shlex.split(line)]
        return run_recipe(args)
    assert ct.recipes_of([]) == [flags(line) for line in MEASURED]
    assert [ct.run_name(r) for r in ct.recipes_of([])][3:] == [
        "uniform-keep-13-blocks-bottom", "uniform-keep-8-blocks-bottom",
        "uniform-keep-8-blocks-bottom-assist.every-2-assist.pool-1500"]


def test_run_takes_recipe_files_and_skips_finished_runs(tmp_path, monkeypatch):
    import offsite.experiment.run as run_mod
    from offsite.experiment.recipe import Recipe

    monkeypatch.setattr(ct, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(ct, "write_split", lambda folder: {"train": tmp_path / "t.jsonl", "eval": tmp_path / "e.jsonl"})
    monkeypatch.setattr("offsite.tune.file_data", lambda path: ("data", path))
    calls = []

    def fake_run(model, task, recipe, out, preset, overwrite, train_data, command):
        calls.append((model, task, recipe, out.name, preset, train_data, command))
        out.mkdir(parents=True)
        (out / "table.md").write_text("| table |\n")
    monkeypatch.setattr(run_mod, "run", fake_run)
    recipes = [Recipe(options={"keep": 8}, tuning={"seed": 2}), Recipe(method="gradmatch", options={"keep": 13})]
    (tmp_path / "a.toml").write_text(recipes[0].to_toml())
    (tmp_path / "b.json").write_text(json.dumps(recipes[1].to_dict()))
    argv = ["run", str(tmp_path / "a.toml"), str(tmp_path / "b.json")]
    assert ct.main(argv) == 0
    assert [c[2] for c in calls] == recipes and [c[3] for c in calls] == ["uniform-keep-8-seed-2", "gradmatch-keep-13"]
    assert calls[0][:2] == ("smollm2-135m", str(tmp_path / "e.jsonl")) and calls[0][4] == "paper"
    assert calls[0][5] == ("data", str(tmp_path / "t.jsonl")) and "a.toml" in calls[0][6]
    assert ct.main(argv) == 0 and len(calls) == 2  # finished: skipped
    (tmp_path / "bad.toml").write_text('method = "uniform"\n[tuning]\nlrr = 1\n')
    assert ct.main(["run", str(tmp_path / "a.toml"), str(tmp_path / "bad.toml"), "--overwrite"]) == 2
    assert len(calls) == 2  # every file is read before any run starts


def _finished_run(folder, eval_sha, meta):
    rows = {"full_zs": 0.775, "emu_ft": 0.663, "plugin": 0.812, "ceiling": 0.829, "floor": 0.772}
    records = [{"model": "m", "task": "rt_eval", "row": row, "metric": "acc", "value": v,
                "setting": {"adapter_layers": [2, 2], "keep": 13}} for row, v in rows.items()]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"meta": {**meta, "eval_data": {"sha256": eval_sha}},
                                                     "records": records}))
    (folder / "table.md").write_text("done\n")


def test_collect_reads_runs_with_and_without_their_recipe(tmp_path, monkeypatch):
    """Runs written since recipes became data carry ``meta.recipe`` (tagged ``recipe_spec``); the
    runs measured first carry only their command, and are collected all the same."""
    from offsite.data.content import content_paths
    from offsite.files import sha256_file

    monkeypatch.setattr(ct, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(ct, "RESULTS", tmp_path / "results")
    paths = content_paths(ct.TASK, tmp_path / "runs" / "data")
    for part in ("train", "eval"):
        paths[part].parent.mkdir(parents=True, exist_ok=True)
        paths[part].write_text(f'{{"part": "{part}"}}\n')
    sha = sha256_file(paths["eval"])
    spec = {"method": "gradmatch", "adapter_layers": [2, 2], "options": {"keep": 13}}
    _finished_run(tmp_path / "runs" / "gradmatch-keep-13", sha, {"command": "python bench/content_transfer.py run",
                                                                  "recipe": spec})
    _finished_run(tmp_path / "runs" / "uniform-keep-13-tune-blocks-bottom", sha,
                  {"command": "offsite run --method uniform --keep 13 --tune-blocks bottom"})
    assert ct.main(["collect"]) == 0
    out = json.loads((tmp_path / "results" / "content-transfer.json").read_text())["records"]
    tags = {(r["recipe"], r["command"], json.dumps(r.get("recipe_spec"))) for r in out}
    assert tags == {("gradmatch-keep-13", "python bench/content_transfer.py run", json.dumps(spec)),
                    ("uniform-keep-13-tune-blocks-bottom", "offsite run --method uniform --keep 13 --tune-blocks bottom",
                     "null")}
    table = (tmp_path / "results" / "content-transfer.md").read_text()
    assert "| `gradmatch-keep-13` | 77.5 | 66.3 | 81.2 | 82.9 | 77.2 | +14.9 |" in table
    assert "| `uniform-keep-13-tune-blocks-bottom` | 77.5 |" in table
