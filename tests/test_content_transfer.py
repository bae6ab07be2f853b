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


def test_recipe_names():
    assert ct.recipe_name("--method uniform --keep 13 --tune-blocks bottom") == "uniform-keep-13-tune-blocks-bottom"
    assert ct.recipe_name("--method gradmatch --keep 13") == "gradmatch-keep-13"
    with pytest.raises(OffsiteError, match="offsite run's arguments"):
        ct.recipe_name("  ")
