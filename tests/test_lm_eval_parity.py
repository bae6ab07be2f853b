"""Parity of offsite.eval.mc.score_mc with lm-evaluation-harness on the same docs and model."""

from __future__ import annotations

import json

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


def test_harness_task_from_a_yaml_file_or_include_path(tok, tmp_path):  # noqa: F811
    """A task YAML file and --include-path both run, the result read by the task's own name (not
    the path); an unknown name, a missing folder or a broken task are one-line errors that do not
    blame the Hub."""
    from offsite.errors import DataUnavailable, OffsiteError
    from offsite.eval.lm_eval_bridge import run_harness_task, write_task

    m = _llama(len(tok))
    write_task(DOCS, tmp_path / "tasks", "my_quiz")
    yaml = tmp_path / "tasks" / "my_quiz.yaml"
    by_path = run_harness_task(m, tok, str(yaml), batch_size=4)
    by_name = run_harness_task(m, tok, "my_quiz", batch_size=4, include_path=str(tmp_path / "tasks"))
    assert by_path["n"] == by_name["n"] == len(DOCS)
    assert by_path["acc"] == pytest.approx(by_name["acc"])
    for call, words in [
        (lambda: run_harness_task(m, tok, "no_such_task_xyz", include_path=str(tmp_path / "tasks")),
         ["no_such_task_xyz", "--include-path"]),
        (lambda: run_harness_task(m, tok, "my_quiz", include_path=str(tmp_path / "nope")), ["no such folder"]),
        (lambda: run_harness_task(m, tok, str(tmp_path / "nope.yaml")), ["no such file"]),
    ]:
        with pytest.raises(OffsiteError) as e:
            call()
        assert "\n" not in str(e.value) and "Hub" not in str(e.value)
        assert all(w in str(e.value) for w in words), str(e.value)
    cfg = json.loads(yaml.read_text())
    cfg.update(task="broken_quiz", dataset_kwargs={"data_files": {"test": str(tmp_path / "gone.jsonl")}})
    (tmp_path / "broken.yaml").write_text(json.dumps(cfg))
    with pytest.raises(OffsiteError) as e:
        run_harness_task(m, tok, str(tmp_path / "broken.yaml"))
    assert not isinstance(e.value, DataUnavailable) and "broken_quiz" in str(e.value) and "\n" not in str(e.value)
