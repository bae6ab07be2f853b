"""A bounded run of bench/fuzz_bundles.py: seeded corruptions of tiny emulator and adapter bundles
(full and LoRA, raw and with every digest recomputed), each loaded in its own process. None may
raise anything but offsite's own error, hang, or load a changed model without saying so."""

from __future__ import annotations


import pytest

from bench import fuzz_bundles



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return fuzz_bundles.make_world(tmp_path_factory.mktemp("fuzz"))


def test_corrupted_bundles_are_refused_or_harmless(world, tmp_path):
    (tmp_path / "work").mkdir()
    out = fuzz_bundles.fuzz(world, cases=5, seed=1, timeout=20, work=tmp_path / "work", log=lambda *a: None)
    total = {k: sum(c[k] for c in out["counts"].values()) for k in fuzz_bundles.OUTCOMES}
    assert sum(total.values()) == 5 * 3 * 2
    assert total["other_exception"] == total["hang"] == total["silent_change"] == 0, out["examples"]
    assert total["project_error"] > 0
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
    identity, fingerprint = fuzz_bundles.load("emulator", d, world)
    assert fingerprint != original[1] and identity != original[0]
    assert fuzz_bundles.classify({"status": "ok", "value": (identity, fingerprint)}, "redigested", original) \
        == "new_identity"
    assert fuzz_bundles.classify({"status": "ok", "value": (original[0], fingerprint)}, "redigested", original) \
        == "silent_change"


def test_each_load_is_timed_and_isolated():
    import os
    import time

    assert fuzz_bundles.in_child(lambda: time.sleep(30), timeout=0.5) == {"status": "hang"}
    assert fuzz_bundles.in_child(lambda: os.kill(os.getpid(), 9), timeout=10)["status"] == "other_exception"
    assert fuzz_bundles.in_child(lambda: {}["x"], timeout=10)["type"] == "KeyError"
    assert fuzz_bundles.in_child(lambda: [1, 2], timeout=10) == {"status": "ok", "value": [1, 2]}
