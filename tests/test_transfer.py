"""The transfer probe, the adapter ceiling and the transfer ratio (tiny random models)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from offsite.bundle import load_emulator, save_emulator
from offsite.emulator import build_emulator
from offsite.errors import OffsiteError
from offsite.models.families import get_blocks
from offsite.probe import ProbeOptions, attach_probe, probe, probe_records
from offsite.eval.paired import paired
from offsite.experiment.stats import paired_seeds, transfer, transfer_seeds
from offsite.data.tokenize import tokenize_text
from offsite.train import causal_lm_loss, collate

TEXT = ["The quick brown fox jumps over the lazy dog. " * 8, "A stitch in time saves nine, they say. " * 8,
        "To be or not to be, that is the question. " * 8, "All that glitters is not gold, nor silver. " * 8]


def _examples(tok, n=4, block=48):
    return tokenize_text(tok, TEXT, block)[:n]


# --- statistics ------------------------------------------------------------------------------


def test_paired_difference_matches_hand_computation():
    mean, se = paired([1, 0, 1, 1], [0, 0, 1, 0])
    # d = 1, 0, 0, 1: mean .5, sample variance 1/3, se = sqrt(1/3 / 4)
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 12))


def test_transfer_matches_a_hand_computed_case():
    zs = [0, 0, 0, 0, 1]
    ceil = [1, 1, 1, 0, 1]
    plug = [1, 0, 1, 0, 1]
    t = transfer([plug], [zs], [ceil])
    # a = 1,0,1,0,0 (mean .4); b = 1,1,1,0,0 (mean .6); T = 2/3; a - T b = 1/3,-2/3,1/3,0,0
    d = [1 / 3, -2 / 3, 1 / 3, 0, 0]
    var = sum((x - sum(d) / 5) ** 2 for x in d) / 4
    assert t["value"] == pytest.approx(2 / 3)
    assert t["stderr"] == pytest.approx(math.sqrt(var / 5) / 0.6)
    assert t["ceiling_gain"] == pytest.approx(0.6) and t["n"] == 5
    assert (t["plugin_gain"], t["plugin_gain_stderr"]) == pytest.approx(paired(plug, zs))  # 0.4, paired


def test_transfer_is_one_when_the_plugin_is_the_ceiling_and_none_without_a_gain():
    zs, ceil = [0, 1, 0, 0], [1, 1, 0, 1]
    t = transfer([ceil], [zs], [ceil])
    assert t["value"] == pytest.approx(1.0) and t["stderr"] == pytest.approx(0.0)
    assert transfer([zs], [zs], [zs])["value"] is None


def test_transfer_over_tasks_averages_numerator_and_denominator():
    t = transfer([[1, 1], [0, 0, 1]], [[0, 0], [0, 0, 0]], [[1, 1], [1, 1, 1]])
    assert t["value"] == pytest.approx(((1 + 1 / 3) / 2) / 1.0)
    with pytest.raises(ValueError):
        transfer([[1]], [[0, 1]], [[1]])


def test_paired_seeds_adds_the_seed_variance_to_the_documents():
    a = [[1, 1, 0, 1], [0, 1, 0, 1]]  # two seeds on the same four documents
    b = [0, 1, 0, 0]  # seed-independent (Full ZS)
    mean, se = paired_seeds(a, b)
    # seed-averaged a = .5, 1, 0, 1: d = .5, 0, 0, 1 (mean .375); per seed: .5, .25
    d = [0.5, 0, 0, 1]
    var_doc = sum((x - 0.375) ** 2 for x in d) / 3 / 4
    assert mean == pytest.approx(0.375)
    assert se == pytest.approx(math.sqrt(var_doc + ((0.5 - 0.375) ** 2 + (0.25 - 0.375) ** 2) / 2))
    # one seed: the paired standard error alone
    assert paired_seeds([a[0]], b) == pytest.approx(paired(a[0], b))
    with pytest.raises(ValueError):
        paired_seeds(a, [[0, 1, 0, 0]] * 3)  # three seeds against two


def test_transfer_seeds_is_the_transfer_of_seed_means_with_a_wider_interval():
    zs = [0, 0, 0, 0, 1, 1]
    ceil = [[1, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1]]
    plug = [[1, 0, 1, 0, 1, 1], [0, 0, 0, 0, 1, 0]]
    t = transfer_seeds(plug, zs, ceil)
    avg = lambda rows: [sum(c) / len(rows) for c in zip(*rows)]  # noqa: E731
    one = transfer([avg(plug)], [zs], [avg(ceil)])
    assert t["value"] == pytest.approx(one["value"]) and t["seeds"] == 2
    assert t["per_seed"] == pytest.approx([transfer([p], [zs], [c])["value"] for p, c in zip(plug, ceil)])
    assert t["stderr"] > one["stderr"] and t["plugin_gain_stderr"] > one["plugin_gain_stderr"]
    assert transfer_seeds([zs, zs], zs, [zs, zs])["value"] is None  # no gain, no ratio


# --- the probe -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_probe_is_one_for_the_full_middle(tok):
    model = tiny_model("llama", 6)
    emu = build_emulator("uniform", model, tok, "tiny", (2, 1), keep=3)
    f = probe(model, emu, _examples(tok), ProbeOptions(micro_batch_size=2))
    for group in ("all", "bottom", "top", "block0", "block1", "block5"):
        assert f["grad_cos"][group] == pytest.approx(1.0, abs=1e-6)
        assert f["grad_norm_ratio"][group] == pytest.approx(1.0, abs=1e-6)
    assert set(f["grad_cos"]) == {"all", "bottom", "top", "block0", "block1", "block5"}


def _direct_grad(model, block_ids, examples, pad_id):
    """The adapter's mean-token gradient by plain autograd on one batch of every example."""
    model.zero_grad()
    params = [p for i in block_ids for p in get_blocks(model)[i].parameters()]
    loss_sum, n = causal_lm_loss(model, collate(examples, pad_id=pad_id))
    grads = torch.autograd.grad(loss_sum / n, params)
    return torch.cat([g.flatten() for g in grads]).double()


def test_probe_equals_direct_autograd_on_a_dropped_middle(tok):
    model = tiny_model("llama", 6, seed=3)
    emu = build_emulator("uniform", model, tok, "tiny", (2, 1), keep=1)
    ex = _examples(tok)
    next(model.parameters()).requires_grad_(False)  # a mix of flags, to see them restored
    flags = [p.requires_grad for p in model.parameters()]
    f = probe(model, emu, ex, ProbeOptions(micro_batch_size=3))
    assert [p.requires_grad for p in model.parameters()] == flags  # micro-batches that do not divide 4
    g_emu = _direct_grad(emu.model, [0, 1, 3], ex, tok.pad_token_id)  # stack: 0, 1, kept, 5
    g_full = _direct_grad(model, [0, 1, 5], ex, tok.pad_token_id)
    cos = float(g_emu @ g_full / (g_emu.norm() * g_full.norm()))
    assert f["grad_cos"]["all"] == pytest.approx(cos, abs=1e-5)
    assert f["grad_norm_ratio"]["all"] == pytest.approx(float(g_emu.norm() / g_full.norm()), rel=1e-5)
    assert f["grad_cos"]["all"] < 0.999  # a dropped middle changes the gradient
    assert not emu.model.training


def test_probe_figures_survive_a_bundle_round_trip(tok, tmp_path, monkeypatch):
    import offsite.data.text as text

    monkeypatch.setattr(text, "public_text", lambda part: TEXT)
    model = tiny_model("llama", 6)
    emu = build_emulator("uniform", model, tok, "tiny", (1, 1), keep=2)
    figures = attach_probe(model, emu, ProbeOptions(sequences=2, block_size=32))
    save_emulator(emu, tmp_path / "emu")
    loaded = load_emulator(tmp_path / "emu")
    assert loaded.report["probe"]["grad_cos"] == pytest.approx(figures["grad_cos"])
    assert json.loads((tmp_path / "emu" / "manifest.json").read_text())["report"]["probe"]["sequences"] == 2
    recs = probe_records(figures, {"model": "tiny", "task": "text"})
    assert {r["metric"] for r in recs} >= {"grad_cos", "grad_norm_ratio", "grad_cos.top", "grad_cos.block0"}
    assert all(r["row"] == "probe" for r in recs)


def test_probe_refuses_another_model_and_bad_options(tok):
    model = tiny_model("llama", 6)
    emu = build_emulator("uniform", model, tok, "tiny", (1, 1), keep=2)
    with pytest.raises(OffsiteError, match="built from a model of 6 blocks"):
        probe(tiny_model("llama", 4), emu, _examples(tok))
    with pytest.raises(OffsiteError, match="sequences must be >= 1"):
        probe(model, emu, _examples(tok), ProbeOptions(sequences=0))


# --- offsite run: the ceiling row and the transfer record --------------------------------------


def _qa_world(monkeypatch, tok, n_layers=6):
    """A task the tiny model learns in a few steps: the answer is always ' y', which this random model
    scores below ' x' untuned (Full ZS 0), so the ceiling has a gain to transfer."""
    import offsite.data.text as text
    import offsite.eval as ev
    import offsite.experiment.run as run_mod
    from offsite.data.tasks import Doc
    from offsite.tune import TrainingData

    docs = [Doc(id=f"d{i}", context=f"Question {i}: which fruit?\nAnswer:",
                choices=["y", "x"] if i % 2 else ["x", "y"], gold=0 if i % 2 else 1)
            for i in range(40)]
    monkeypatch.setattr(ev, "load_task", lambda name, part: docs)
    monkeypatch.setattr(text, "public_text", lambda part: TEXT * 8)  # 16 probe blocks of 256 bytes
    monkeypatch.setattr(run_mod, "task_data", lambda task: TrainingData(
        "qa", [(f"Question {i}: which fruit?\nAnswer:", " y") for i in range(80)], source=task))
    monkeypatch.setattr(run_mod, "load_model", lambda name: (tiny_model("llama", n_layers, seed=1), tok))
    return docs


def _recipe(keep: int, **kw):
    """A recipe of layer drop to ``keep`` middle blocks, (2, 1) adapter blocks, tuned 30 steps at lr 2e-2."""
    from dataclasses import asdict

    from offsite.experiment.recipe import Recipe
    from offsite.train import TrainConfig

    cfg = TrainConfig(lr=2e-2, max_steps=30, batch_size=8, micro_batch_size=8, checkpoint_every=None, progress=False)
    return Recipe(options={"keep": keep}, adapter_layers=(2, 1), tuning=asdict(cfg), **kw)


def test_run_ceiling_equals_plugin_for_the_full_middle_and_transfer_is_one(tok, tmp_path, monkeypatch):
    from offsite.experiment.run import run

    _qa_world(monkeypatch, tok)
    res = run("tiny", "arc_easy", _recipe(3), tmp_path / "r",
              eval_limit=None, text_docs=0, log=lambda *a: None)
    acc = {r["row"]: r["value"] for r in res.records if r["metric"] == "acc"}
    assert acc["ceiling"] == acc["plugin"]
    assert acc["ceiling"] - acc["full_zs"] >= 0.3  # the task was learned: a gain to transfer
    [t] = [r for r in res.records if r["metric"] == "transfer"]
    assert t["row"] == "plugin" and t["task"] == "arc_easy"
    assert t["value"] == pytest.approx(1.0) and t["stderr"] == pytest.approx(0.0)
    probe_cos = [r for r in res.records if r["row"] == "probe" and r["metric"] == "grad_cos"]
    assert probe_cos and probe_cos[0]["value"] == pytest.approx(1.0, abs=1e-6)
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert any(r["metric"] == "transfer" for r in saved["records"])
    table = (tmp_path / "r" / "table.md").read_text()
    assert "Ceiling" in table and "transfer" in table and "1.00" in table
    gain = 100 * (acc["plugin"] - acc["full_zs"])
    assert f"| Plug-in − Full ZS (paired) | {gain:+.1f} ± " in table
    assert json.loads((tmp_path / "r" / "emulator" / "manifest.json").read_text())["report"]["probe"]


def test_run_reads_rows_from_its_cache_and_writes_every_note_to_results(tok, tmp_path, monkeypatch):
    """``run(..., cache=DIR)``: a second run of the same cell reads every row from the cache (no
    training, the same numbers); results.json's notes are the lines table.md prints."""
    import offsite.experiment.cell as cell_mod
    from offsite.experiment.run import run

    _qa_world(monkeypatch, tok)
    trained = []
    for name in ("tune_ceiling", "tune_to_dir"):
        real = getattr(cell_mod, name)
        monkeypatch.setattr(cell_mod, name, lambda *a, _real=real, _name=name, **k: (trained.append(_name), _real(*a, **k))[1])
    kw = dict(eval_limit=None, text_docs=0, probe=False, floor=False,
              cache=tmp_path / "rows", log=lambda *a: None)
    first = run("tiny", "arc_easy", _recipe(1), tmp_path / "a", **kw)
    assert trained == ["tune_to_dir", "tune_ceiling"]  # the adapter on the emulator, then the ceiling
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "rows").iterdir()) == [
        "ceiling", "emu_ft", "emu_zs", "full_zs", "plugin"]
    second = run("tiny", "arc_easy", _recipe(1), tmp_path / "b", **kw)
    assert trained == ["tune_to_dir", "tune_ceiling"]  # nothing trained again
    values = lambda res: [(r["row"], r["metric"], r["value"]) for r in res.records]  # noqa: E731
    assert values(second) == values(first) and second.notes == first.notes
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    table = (tmp_path / "b" / "table.md").read_text()
    assert saved["notes"] == [line[2:] for line in table.splitlines() if line.startswith("* ")]
    assert any(n.startswith("transfer") for n in saved["notes"]) or any(
        r["metric"] == "transfer" for r in saved["records"])


def test_run_floor_row_and_transfer_beyond_it(tok, tmp_path, monkeypatch):
    """The floor: the same adapter tuned on the full model on as many of the owner's public pairs.
    Here they teach the other answer, so the floor stays at Full ZS and the full middle's Plug-in
    carries all of what only the task's data teaches (transfer beyond the floor 1)."""
    import offsite.experiment.run as run_mod
    from offsite.experiment.run import run
    from offsite.tune import TrainingData

    _qa_world(monkeypatch, tok)
    asked = []

    def public(task):
        asked.append(task)
        return TrainingData("qa", [(f"Question {i}: which fruit?\nAnswer:", " x") for i in range(200)], source=task)

    monkeypatch.setattr(run_mod, "task_data", public)
    own = TrainingData("qa", [(f"Question {i}: which fruit?\nAnswer:", " y") for i in range(80)], source="mine")
    res = run("tiny", "arc_easy", _recipe(3), tmp_path / "r",
              eval_limit=None, text_docs=0, probe=False, train_data=own, log=lambda *a: None)
    assert asked == ["webqs"]  # arc_easy's inputs are bare questions: WebQuestions pairs
    acc = {r["row"]: r for r in res.records if r["metric"] == "acc"}
    assert acc["floor"]["floor_source"] == "webqs" and acc["floor"]["train_examples"] == 80  # as many as the data owner's
    assert acc["floor"]["value"] == acc["full_zs"]["value"] < acc["ceiling"]["value"] == acc["plugin"]["value"]
    [beyond] = [r for r in res.records if r["metric"] == "transfer_beyond_floor"]
    assert beyond["row"] == "plugin" and beyond["value"] == pytest.approx(1.0) and beyond["stderr"] == pytest.approx(0.0)
    table = (tmp_path / "r" / "table.md").read_text()
    assert "| Floor (adapter tuned on the full model on public pairs) |" in table
    assert "| transfer beyond the floor (Plug-in − Floor) / (Ceiling − Floor) | 1.00 ± 0.00 |" in table
    assert any("80 public webqs pairs" in n for n in res.notes)
    assert not any(n.startswith("WARNING") for n in res.notes)  # the Plug-in gains: no harm to warn of
    # a harmful Plug-in: the warning leads the notes of the table and of results.json
    monkeypatch.setattr(run_mod, "harm_note", lambda scores, task: f"the Plug-in is worse on {task}")
    res = run("tiny", "arc_easy", _recipe(3), tmp_path / "harm",
              eval_limit=None, text_docs=0, probe=False, ceiling=False, floor=False, train_data=own,
              log=lambda *a: None)
    assert res.notes[0] == "WARNING: the Plug-in is worse on arc_easy"
    assert "* WARNING: the Plug-in is worse on arc_easy" in (tmp_path / "harm" / "table.md").read_text()
    assert json.loads((tmp_path / "harm" / "results.json").read_text())["notes"][0].startswith("WARNING")
    # the floor's source: shaped like the task's inputs, never the task itself
    with pytest.raises(OffsiteError, match="the floor's public pairs .* are the task being tuned"):
        run("tiny", "arc_easy", _recipe(3, floor_source="arc_easy"), tmp_path / "r2",
            log=lambda *a: None)
    with pytest.raises(OffsiteError, match="--no-floor"):
        run("tiny", "arc_easy", _recipe(3, floor_source="squad"), tmp_path / "r3", floor=False,
            log=lambda *a: None)
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()


def test_transfer_beyond_the_floor_by_hand():
    from offsite.experiment.run import transfer_record

    scores = {"plugin": {"t": [1, 1, 0, 0, 1, 1, 1, 1]}, "floor": {"t": [0, 0, 0, 0, 1, 1, 1, 1]},
              "ceiling": {"t": [1] * 8}, "full_zs": {"t": [0] * 8}}
    rec = transfer_record(scores, "t", {"model": "m"}, floor=True)
    # a = plugin - floor, b = ceiling - floor: T = 0.25 / 0.5; se = sd(a - T b) / (sqrt(8) * 0.5)
    assert rec["metric"] == "transfer_beyond_floor" and rec["value"] == pytest.approx(0.5)
    assert rec["stderr"] == pytest.approx(math.sqrt(1 / 7) / math.sqrt(8) / 0.5)
    assert rec["ceiling_gain"] == pytest.approx(0.5)
    scores["floor"]["t"] = [1, 1, 1, 1, 1, 1, 1, 0]  # the ceiling within noise of the floor: nothing to report
    assert transfer_record(scores, "t", {"model": "m"}, floor=True) is None
    assert transfer_record(scores, "t", {"model": "m"})["metric"] == "transfer"


def test_run_without_ceiling_writes_no_transfer(tok, tmp_path, monkeypatch):
    from offsite.experiment.run import run

    _qa_world(monkeypatch, tok)
    res = run("tiny", "arc_easy", _recipe(1), tmp_path / "r",
              eval_limit=None, text_docs=0, ceiling=False, probe=False, log=lambda *a: None)
    rows = {r["row"] for r in res.records}
    assert "ceiling" not in rows and "probe" not in rows
    assert not any(r["metric"] == "transfer" for r in res.records)
    assert any("--no-ceiling" in n for n in res.notes)


def test_harm_note_only_beyond_two_standard_errors():
    from offsite.harm import harm_note

    zs = [1] * 40 + [0] * 10
    worse = [0] * 20 + [1] * 20 + [0] * 10  # 20 documents lost: far beyond noise
    note = harm_note({"plugin": {"t": worse}, "full_zs": {"t": zs}}, "t")
    assert note and "40.0" in note and "below Full ZS on t" in note
    slightly = [0] + [1] * 39 + [0] * 10  # one document lost: noise
    assert harm_note({"plugin": {"t": slightly}, "full_zs": {"t": zs}}, "t") is None
    assert harm_note({"plugin": {"t": zs}, "full_zs": {"t": worse}}, "t") is None  # better: no warning
    assert harm_note({"full_zs": {"t": zs}}, "t") is None  # not multiple choice: no per-document scores
