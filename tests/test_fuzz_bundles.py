"""A bounded run of bench/fuzz_bundles.py: seeded corruptions of tiny emulator and adapter bundles
(full and LoRA, raw and with every digest recomputed) and forgeries of each attack class, each loaded
in its own process. None may raise anything but offsite's own error (printed as one clean line), hang,
load a changed model without saying so, change the full model outside the emulator's adapter blocks,
or give a plugged model non-finite logits."""

from __future__ import annotations


import pytest

from bench import fuzz_bundles



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fuzz_bundles.make_world(tmp_path_factory.mktemp("fuzz"))


def test_corrupted_bundles_are_refused_or_harmless(world, tmp_path):
    (tmp_path / "work").mkdir()
    out = fuzz_bundles.fuzz(world, cases=5, seed=1, timeout=20, work=tmp_path / "work", log=lambda *a: None,
                            attack_cases=3)
    total = {k: sum(c[k] for c in out["counts"].values()) for k in (*fuzz_bundles.OUTCOMES, "multi_line")}
    assert sum(total[k] for k in fuzz_bundles.OUTCOMES) == 5 * 3 * 2 + 3 * len(fuzz_bundles.ATTACKS)
    assert all(total[k] == 0 for k in (*fuzz_bundles.FAILURES, "multi_line")), out["examples"]
    assert total["project_error"] > 0
    assert {cell for cell, _ in out["counts"]} >= set(fuzz_bundles.ATTACKS)
    assert not list((tmp_path / "work").iterdir())


def test_a_forged_but_redigested_emulator_is_a_new_identity(world, tmp_path):
    """Editing an emulator's config.json (rms_norm_eps) and recomputing every digest loads, but as
    another emulator: its digest, which adapters name, is not the original's."""
    import json
    import shutil

    original = fuzz_bundles.load("emulator", world["root"] / "emulator", world)
    d = tmp_path / "emu"
    shutil.copytree(world["root"] / "emulator", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5
    (d / "config.json").write_text(json.dumps(cfg))
    fuzz_bundles.redigest(d)
    identity, fingerprint, escaped, finite = fuzz_bundles.load("emulator", d, world)
    assert not escaped and finite
    assert fingerprint != original[1] and identity != original[0]
    assert fuzz_bundles.classify({"status": "ok", "value": (identity, fingerprint)}, "redigested", original) \
        == "new_identity"
    assert fuzz_bundles.classify({"status": "ok", "value": (original[0], fingerprint)}, "redigested", original) \
        == "silent_change"


def test_scope_escapes_and_non_finite_models_are_counted(world, tmp_path):
    """A load that changed the full model outside the emulator's adapter blocks is a scope escape, one
    whose model gives non-finite logits is counted as such; a forged split is refused on one line."""
    original = fuzz_bundles.load("adapter-full", world["root"] / "adapter-full", world)
    assert fuzz_bundles.classify({"status": "ok", "value": (original[0], original[1], True, True)}, "forged",
                                 original) == "scope_escape"
    assert fuzz_bundles.classify({"status": "ok", "value": ("x", "y", False, False)}, "forged",
                                 original) == "non_finite_plugged"
    import random
    import shutil

    d = tmp_path / "ad"
    shutil.copytree(world["root"] / "adapter-full", d)
    what = fuzz_bundles.attack_scope(random.Random(0), d, "full", world)
    fuzz_bundles.redigest(d)
    result = fuzz_bundles.in_child(lambda: fuzz_bundles.load("adapter-full", d, world), timeout=20)
    assert result["status"] == "project_error" and result["one_line"], (what, result)


def test_each_load_is_timed_and_isolated():
    import os
    import time

    def bare(result):
        result.pop("rss_mb", None)
        return result

    assert fuzz_bundles.in_child(lambda: time.sleep(30), timeout=0.5) == {"status": "hang"}
    assert fuzz_bundles.in_child(lambda: os.kill(os.getpid(), 9), timeout=10)["status"] == "other_exception"
    assert fuzz_bundles.in_child(lambda: {}["x"], timeout=10)["type"] == "KeyError"
    assert bare(fuzz_bundles.in_child(lambda: [1, 2], timeout=10)) == {"status": "ok", "value": [1, 2]}
    grown = fuzz_bundles.in_child(lambda: len(bytearray(200 << 20)), timeout=10)
    assert grown["value"] == 200 << 20 and grown["rss_mb"] >= 150, grown
