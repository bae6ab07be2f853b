"""The data owner's side of privacy: membership inference and canary exposure against a tuned
adapter (offsite.privacy.membership, offsite.privacy.canary, ``offsite privacy --side data``)."""

from __future__ import annotations

import functools
import json
import math
import random

import numpy as np
import pytest

from offsite.errors import OffsiteError
from offsite.privacy import canary
from offsite.privacy.membership import min_k, roc_auc, tpr_at_fpr, with_interval


def _auc_pairs(m, n):
    return np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in m for b in n])


def test_auc_is_the_pairwise_win_rate():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m, n = rng.integers(0, 6, 30).astype(float), rng.integers(0, 6, 25).astype(float)  # many ties
        assert roc_auc(m, n) == pytest.approx(_auc_pairs(m, n))
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0


def test_tpr_at_low_fpr():
    n = np.arange(200, dtype=float)  # 1 % of 200: two non-members may score above the threshold
    m = np.array([197.5, 198.5, 199.5, 10.0])
    assert tpr_at_fpr(m, n, 0.01) == pytest.approx(0.75)  # threshold: the 3rd highest non-member, 197
    assert tpr_at_fpr(np.array([199.5, 10.0]), np.arange(50, dtype=float), 0.01) == 0.5  # < 100: no false positive
    iv = with_interval(m, n, roc_auc, bootstrap=200)
    assert iv["ci95"][0] <= iv["value"] <= iv["ci95"][1]


def test_min_k_takes_the_least_likely_tokens():
    lp = np.array([-0.1, -5.0, -0.2, -3.0, -0.3])
    assert min_k(lp, 0.2) == -5.0 and min_k(lp, 0.4) == pytest.approx(-4.0) and min_k(lp, 1.0) == pytest.approx(lp.mean())


@pytest.mark.parametrize("row", [{"prompt": "a", "completion": " b"}, {"text": "a b"},
                                 {"context": "a", "choices": ["x", "y"], "answer": "x"}])
def test_plant_inserts_each_secret_its_repetitions_in_the_files_format(row, tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(row) + "\n" for _ in range(30)))
    rec = canary.plant(src, tmp_path / "c.jsonl", seed=1)
    lines = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(lines) == 30 + 2 * (1 + 4 + 16) == rec["rows"]
    assert json.loads((tmp_path / "c.jsonl.canaries.json").read_text()) == rec
    for c in rec["canaries"]:
        hits = [x for x in lines if c["prefix"] in json.dumps(x) and c["secret"] in json.dumps(x)]
        assert len(hits) == c["reps"] and all(set(h) == set(row) for h in hits)
        assert 100000 <= int(c["secret"]) <= 999999
    assert len({c["name"] for c in rec["canaries"]}) == 6
    with pytest.raises(OffsiteError):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"question": "q", "answers": ["a"]}) + "\n")
        canary.plant(bad, tmp_path / "bad2.jsonl")


def test_exposure_estimate_from_the_sampled_rank(monkeypatch):
    rec = {"space": {"lo": 100000, "hi": 999999},
           "canaries": [{"name": "A B", "prefix": "p", "secret": "123456", "reps": 1}]}

    def rigged(ahead):
        def lp(model, tok, prefix, numbers, bs):
            # the secret first; `ahead` candidates more likely than it, the rest less
            return np.array([0.0] + [1.0] * ahead + [-1.0] * (len(numbers) - 1 - ahead))
        return lp

    for ahead, bits in ((0, math.log2(100)), (99, 0.0), (9, math.log2(100 / 10))):
        monkeypatch.setattr(canary, "_completion_logprob", rigged(ahead))
        row = canary.exposure(None, None, rec, samples=99)[0]
        assert row["candidates_at_least_as_likely"] == ahead and row["exposure_bits"] == pytest.approx(bits)
    assert row["max_bits_space"] == pytest.approx(math.log2(900000))


def test_data_side_end_to_end(tiny_dir, tmp_path, capsys):
    """Plant canaries, tune without DP until the adapter overfits, attack: the JSON holds every
    target and attack, and the tuned models' members have lower loss than the non-members."""
    from offsite.cli import main

    d, _ = _planted_and_tuned(tiny_dir, tmp_path, steps=40)
    common = ["privacy", "--side", "data", "--model", str(tiny_dir), "--emulator", d("emu"), "--tuned-adapter",
              d("ad"), "--data", d("c.jsonl"), "--heldout", d("held.jsonl"), "--bootstrap", "100"]
    assert main(common + ["--json", d("out.json"), "--canaries", d("c.jsonl.canaries.json"),
                          "--canary-samples", "20"]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    # tune held out a tenth of the 82 rows (40 + 42 canary rows) for validation; the canaries are measured apart
    assert out["dp"] is None and 25 < out["members"] < 40 and out["nonmembers"] == 40
    assert set(out["membership"]) == {"plugged", "emulator", "before"}
    assert set(out["membership"]["plugged"]["attacks"]) == {"loss", "loss_ref", "min_k"}
    assert set(out["membership"]["before"]["attacks"]) == {"loss", "min_k"}
    for target in ("plugged", "emulator"):
        ml = out["membership"][target]["mean_loss"]
        assert ml["members"] < ml["nonmembers"]
        a = out["membership"][target]["attacks"]["loss_ref"]["auc"]
        assert 0 <= a["ci95"][0] <= a["value"] <= a["ci95"][1] <= 1
    assert set(out["canaries"]["by_repetition"]["plugged"]) == {"1", "4", "16"}
    assert "TPR at 1% FPR" in capsys.readouterr().out
    assert main(common + ["--json", d("out2.json"), "--heldout", d("train.jsonl")]) == 2  # members as non-members
    assert "also training rows" in capsys.readouterr().err


def test_cli_data_side_needs_its_inputs(tmp_path, capsys):
    from offsite.cli import main

    assert main(["privacy"]) == 2 and "--emulator DIR is required" in capsys.readouterr().err
    assert main(["privacy", "--side", "data", "--emulator", str(tmp_path), "--data", "x.jsonl"]) == 2
    assert "needs --tuned-adapter" in capsys.readouterr().err
    assert main(["privacy", "--side", "data", "--plant-canaries", str(tmp_path / "o.jsonl")]) == 2
    assert "needs --data" in capsys.readouterr().err


def _planted_and_tuned(tiny_dir, tmp_path, steps: int = 6):
    """A training file with canaries, its non-members, an emulator of the tiny model and an adapter tuned on it."""
    from offsite.cli import main

    r = random.Random(0)

    def row(i):
        return {"prompt": f"Item {i} colour:", "completion": " " + r.choice(["red", "blue", "green", "black"])}

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(40)))
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(100, 140)))
    d = lambda name: str(tmp_path / name)  # noqa: E731
    assert main(["privacy", "--side", "data", "--data", d("train.jsonl"), "--plant-canaries", d("c.jsonl")]) == 0
    assert main(["emulate", "--model", str(tiny_dir), "--keep", "1", "--no-probe", "--out", d("emu")]) == 0
    assert main(["tune", "--emulator", d("emu"), "--data", d("c.jsonl"), "--out", d("ad"), "--max-steps", str(steps),
                 "--batch-size", "8", "--lr", "3e-3"]) == 0
    return d, ["privacy", "--side", "data", "--model", str(tiny_dir), "--emulator", d("emu"), "--data", d("c.jsonl"),
               "--heldout", d("held.jsonl"), "--bootstrap", "50", "--canaries", d("c.jsonl.canaries.json"),
               "--canary-samples", "20"]


def test_reference_cache_gives_the_numbers_of_an_uncached_run(tiny_dir, tmp_path, monkeypatch):
    """--reference-cache: the untuned models' scores and the untuned canary exposure are computed once,
    then read; the results are identical to a run without the cache, to the last bit."""
    import offsite.privacy.canary as canary_mod
    import offsite.privacy.membership as membership_mod
    from offsite.cli import main

    d, common = _planted_and_tuned(tiny_dir, tmp_path)
    calls = {"logprobs": 0, "exposure": 0}
    real_lp, real_exp = membership_mod.token_logprobs, canary_mod.exposure

    @functools.wraps(real_lp)
    def counted_lp(*a, **k):
        calls["logprobs"] += 1
        return real_lp(*a, **k)

    @functools.wraps(real_exp)
    def counted_exp(*a, **k):
        calls["exposure"] += 1
        return real_exp(*a, **k)

    monkeypatch.setattr(membership_mod, "token_logprobs", counted_lp)
    monkeypatch.setattr(canary_mod, "exposure", counted_exp)
    outs = []
    for i, cache in enumerate([None, "ref", "ref"]):
        calls.update(logprobs=0, exposure=0)
        assert main(common + ["--tuned-adapter", d("ad"), "--json", d(f"out{i}.json")]
                    + (["--reference-cache", d(cache)] if cache else [])) == 0
        outs.append((dict(calls), json.loads((tmp_path / f"out{i}.json").read_text())))
    # without the cache, or filling it: four models on two sets (plugged, full, tuned and shipped emulator),
    # the canaries under two models (each canary scored with token_logprobs too); from it: half of each
    (c0, r0), (c1, r1), (c2, r2) = outs
    assert c0 == c1 and c0["exposure"] == 2 and c2["exposure"] == 1
    n_canaries = len(json.loads((tmp_path / "c.jsonl.canaries.json").read_text())["canaries"])
    assert c0["logprobs"] == 8 + 2 * n_canaries and c2["logprobs"] == 4 + n_canaries
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "ref").iterdir()) == ["exposure"] + ["logprobs"] * 4
    for r in (r0, r1, r2):
        r.pop("command")
    assert r0 == r1 == r2
    # a damaged cache file is named, not silently recomputed
    next((tmp_path / "ref").glob("exposure-*")).write_text("{")
    assert main(common + ["--tuned-adapter", d("ad"), "--json", d("out3.json"), "--reference-cache", d("ref")]) == 2


def test_a_federations_members_are_each_owners_training_part(tiny_dir, tmp_path, capsys):
    """A federation's adapter (offsite federate run's manifest) is attacked with the shards it was tuned
    on: the members are each data owner's training share; without --shards it is refused, as is
    --shards on an adapter tuned alone."""
    import dataclasses

    from offsite.bundle import load_adapter, save_adapter
    from offsite.cli import main
    from offsite.tune import file_data, split_validation

    d, common = _planted_and_tuned(tiny_dir, tmp_path)
    bundle = load_adapter(d("ad"))
    cfg = {"clients": 2, "val_fraction": 0.2, "seed": 3, "max_length": 64}
    save_adapter(dataclasses.replace(bundle, training={"federated_rounds": 2, "config": cfg}), d("fed"))
    rows = (tmp_path / "c.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "shards").mkdir()
    for i, part in enumerate((rows[:50], rows[50:])):
        (tmp_path / "shards" / f"client-{i}.jsonl").write_text("".join(part))
    assert main(common + ["--tuned-adapter", d("fed"), "--json", d("f.json"), "--shards", d("shards")]) == 0
    trained = [x for i in range(2) for x in split_validation(file_data(d(f"shards/client-{i}.jsonl")).items, 0.2, 3)[0]
               if "access code" not in x[0]]
    assert json.loads((tmp_path / "f.json").read_text())["members"] == len(trained)
    capsys.readouterr()
    assert main(common + ["--tuned-adapter", d("fed"), "--json", d("g.json")]) == 2
    assert "federation's adapter: pass --shards" in capsys.readouterr().err
    assert main(common + ["--tuned-adapter", d("ad"), "--json", d("g.json"), "--shards", d("shards")]) == 2
    assert "--shards applies to a federation's adapter" in capsys.readouterr().err
