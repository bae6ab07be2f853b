"""One budget type for `offsite run` and bench/paper.py (offsite.experiment.budget): the presets, the identity
that keys results files and caches, and the benchmark's flags on top of a preset."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from bench import paper
from offsite.experiment.budget import NOT_IDENTITY, PRESETS, Budget, preset
from offsite.errors import OffsiteError
from offsite.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def test_identity_leaves_out_what_does_not_change_a_result():
    b = Budget()
    assert set(b.identity()) == set(asdict(b)) - set(NOT_IDENTITY)
    # the digest is the one results files and caches were keyed by before these fields joined the type
    assert b.digest() == hashlib.sha256(json.dumps(b.identity(), sort_keys=True).encode()).hexdigest()[:10]
    for name in NOT_IDENTITY:
        other = replace(b, **{name: {"full_ft": True}.get(name, 7)})
        assert other.digest() == b.digest() and other.tag() == ""
    assert replace(b, seed=43).digest() != b.digest()


def test_the_benchmark_results_file_names_the_paper_preset():
    """bench/results/paper-smollm2.json was written under the benchmark's default budget: the
    unified type reads it back as the ``paper`` preset (so its cells are reused, not refused)."""
    meta = json.loads((ROOT / "bench/results/paper-smollm2.json").read_text())["meta"]["budget"]
    assert Budget.from_identity(meta) == PRESETS["paper"] == Budget()
    with pytest.raises(OffsiteError, match="unknown field"):
        Budget.from_identity({**meta, "warp": 9})


def test_presets_train_as_before():
    """What `offsite run` trained with before the presets became budgets (the demo's table is unchanged)."""
    demo = PRESETS["demo"].train_config()
    assert demo == TrainConfig(epochs=2, batch_size=8, micro_batch_size=8, schedule="linear", warmup_ratio=0.0,
                               checkpoint_every=20)
    gpu = PRESETS["gpu"]
    assert gpu.train_config() == TrainConfig(lr=2e-5, epochs=5, batch_size=32, micro_batch_size=32,
                                             schedule="linear", checkpoint_every=100)
    assert gpu.full_ft and not PRESETS["demo"].full_ft
    assert (PRESETS["quick"].eval_limit, PRESETS["quick"].text_docs, PRESETS["demo"].text_docs) == (100, 4, 8)
    assert PRESETS["demo"].train_limit is None  # offsite run tunes on the whole train split
    assert Budget().train_config("text").max_length == Budget().text_block
    assert Budget().tune_settings(lr=3e-3).train.lr == 3e-3
    with pytest.raises(OffsiteError, match="unknown preset"):
        preset("fast")


def test_training_data_is_the_first_train_limit_examples(monkeypatch):
    from offsite.experiment import budget as budget_mod
    from offsite.tune import TrainingData

    items = [(f"q{i}", f" a{i}") for i in range(10)]
    monkeypatch.setattr(budget_mod, "task_data", lambda task: TrainingData("qa", items, source=task))
    assert Budget(train_limit=3).training_data("arc_easy").items == items[:3]
    assert Budget(train_limit=None).training_data("arc_easy").items == items


def test_paper_flags_change_the_preset_they_start_from():
    parse = paper.build_parser().parse_args
    assert paper.budget_from_args(parse([])) == Budget()
    b = paper.budget_from_args(parse(["--preset", "demo", "--eval-limit", "50"]))
    assert b == replace(PRESETS["demo"], eval_limit=50)
    b = paper.budget_from_args(parse(["--train-limit", "all", "--batch-size", "4"]))
    assert (b.train_limit, b.batch_size, b.micro_batch_size) == (None, 4, 4)
    assert paper.budget_from_args(parse(["--preset", "gpu"])).tag()  # its own results file
