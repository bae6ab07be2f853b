"""Parity of offsite.eval.mc.score_mc with lm-evaluation-harness on the same docs and model."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install lm_eval)")

from test_eval import DOCS, _llama, tok  # noqa: E402,F401  (fixture re-used)

from offsite.eval.lm_eval_bridge import lm_eval_parity  # noqa: E402


def test_parity_tiny_llama(tok):  # noqa: F811
    m = _llama(len(tok))
    r = lm_eval_parity(m, tok, DOCS, batch_size=4)
    assert r["ok"], r
    assert r["max_abs_diff"] < 1e-4 and r["n"] == len(DOCS)


@pytest.mark.slow
def test_parity_embedded_model_arc_easy():
    from offsite.data.tasks import load_task
    from offsite.errors import DataUnavailable

    try:
        from offsite.models import load_model
        model, tok_ = load_model("smollm2-135m")
        docs = load_task("arc_easy", "eval")[:100]
    except (ImportError, DataUnavailable) as e:
        pytest.skip(str(e))
    r = lm_eval_parity(model, tok_, docs)
    assert r["ok"], r


def test_cli_eval_with_the_harness_backend(tiny_dir, capsys):
    """`offsite eval --backend lm-eval` scores our documents with the harness: same numbers."""
    import json

    from offsite.cli import main
    from offsite.errors import DataUnavailable

    try:
        from offsite.data.tasks import load_task
        load_task("arc_easy", "eval")
    except DataUnavailable as e:
        pytest.skip(str(e))
    common = ["eval", "--model", str(tiny_dir), "--task", "arc_easy", "--limit", "6"]
    assert main(common + ["--backend", "lm-eval"]) == 0
    harness = json.loads(capsys.readouterr().out)
    assert main(common) == 0
    ours = json.loads(capsys.readouterr().out)
    assert harness["n"] == ours["n"] == 6
    assert harness["acc"] == pytest.approx(ours["acc"]) and harness["acc_norm"] == pytest.approx(ours["acc_norm"])
    assert main(["eval", "--model", str(tiny_dir), "--task", "no_such_task_xyz", "--backend", "lm-eval"]) == 2
