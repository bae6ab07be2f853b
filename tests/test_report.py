"""`offsite report` on synthetic records: table numbers, gap, averages, JSON round trip, PNGs."""

from __future__ import annotations

import json
import math

import pytest

from offsite.cli import main
from offsite.errors import OffsiteError
from offsite.experiment.report import build_report, load_results, readme_table, report_files, report_markdown

SETTING = {"adapter_layers": [2, 2], "keep": 8}
# (row, task) -> (value, stderr) for the method block
VALUES = {
    ("emu_zs", "arc_easy"): (0.40, 0.02), ("emu_zs", "piqa"): (0.60, 0.03), ("emu_zs", "sciq"): (0.70, 0.04),
    ("emu_ft", "arc_easy"): (0.45, 0.02), ("emu_ft", "piqa"): (0.62, 0.03), ("emu_ft", "sciq"): (0.74, 0.04),
    ("plugin", "arc_easy"): (0.55, 0.02), ("plugin", "piqa"): (0.68, 0.03), ("plugin", "sciq"): (0.80, 0.04),
    ("emu_zs", "text"): (40.0, 1.0), ("emu_ft", "text"): (30.0, 1.0), ("plugin", "text"): (20.0, 0.5),
}
SHARED = {
    ("full_zs", "arc_easy"): (0.50, 0.02), ("full_zs", "piqa"): (0.66, 0.03), ("full_zs", "sciq"): (0.78, 0.04),
    ("full_ft", "arc_easy"): (0.58, 0.02), ("full_ft", "piqa"): (0.70, 0.03),  # no Full FT on sciq
    ("full_zs", "text"): (18.0, 0.5),
}


def rec(row, task, value, stderr, method="uniform", setting=SETTING, metric=None, **extra):
    metric = metric or ("ppl" if task == "text" else "acc")
    return {"model": "tiny", "task": task, "method": method, "setting": setting, "row": row, "metric": metric,
            "value": value, "stderr": stderr, "n": 100, **extra}


def results(path, records, meta=None):
    path.write_text(json.dumps({"meta": meta or {"command": "test", "machine": "m"}, "records": records}))
    return path


@pytest.fixture
def bench_file(tmp_path):
    recs = [rec(r, t, v, s, middle_params=1000, original_middle_params=3000) for (r, t), (v, s) in VALUES.items()]
    recs += [rec(r, t, v + 0.01, s, metric="acc_norm") for (r, t), (v, s) in VALUES.items() if t != "text"]
    recs += [rec(r, t, v, s, method=None, setting=None) for (r, t), (v, s) in SHARED.items()]
    recs.append({"model": "tiny", "task": "arc_easy", "row": "eval_ours", "metric": "questions_per_s", "value": 9.0})
    return results(tmp_path / "bench.json", recs)


def test_table_numbers_gap_and_average(bench_file):
    report = build_report([(str(bench_file), load_results(bench_file))])
    assert len(report["blocks"]) == 1
    b = report["blocks"][0]
    assert b["method"] == "uniform" and b["setting"] == SETTING and b["middle_params"] == 1000
    assert b["tasks"] == ["piqa", "arc_easy", "sciq", "text"]  # the papers' order
    assert b["metrics"]["arc_easy"] == "acc" and b["metrics"]["text"] == "ppl"
    assert list(b["rows"]) == ["full_zs", "emu_zs", "emu_ft", "plugin", "full_ft"]
    # the shared baselines fill the block's Full ZS / Full FT rows; acc, not acc_norm
    assert b["rows"]["full_zs"]["arc_easy"]["value"] == 0.50
    assert b["rows"]["emu_ft"]["piqa"] == {"value": 0.62, "stderr": 0.03, "n": 100}
    # gap = Plug-in - Emulator FT with independent errors
    assert b["gap"]["arc_easy"]["value"] == pytest.approx(0.10)
    assert b["gap"]["arc_easy"]["stderr"] == pytest.approx(math.hypot(0.02, 0.02))
    assert b["gap"]["text"]["value"] == pytest.approx(-10.0)
    # average only over accuracy tasks present in every row: sciq has no Full FT, text is ppl
    avg = b["average"]
    assert avg["tasks"] == ["piqa", "arc_easy"] and avg["left_out"] == ["sciq"]
    assert avg["rows"]["plugin"]["value"] == pytest.approx((0.55 + 0.68) / 2)
    assert avg["rows"]["plugin"]["stderr"] == pytest.approx(math.hypot(0.02, 0.03) / 2)
    assert avg["rows"]["full_ft"]["value"] == pytest.approx((0.58 + 0.70) / 2)
    assert avg["gap"]["value"] == pytest.approx((0.55 + 0.68) / 2 - (0.45 + 0.62) / 2)
    # summary for the privacy-utility picture
    s = report["summary"]["tiny"]
    assert s["tasks"] == ["piqa", "arc_easy"]
    assert s["points"][0]["rows"]["emu_ft"]["value"] == pytest.approx((0.45 + 0.62) / 2)
    assert s["reference"]["full_zs"]["value"] == pytest.approx((0.50 + 0.66) / 2)
    md = report_markdown(report)
    assert "| Plug-in | 68.0 ± 3.0 | 55.0 ± 2.0 | 80.0 ± 4.0 | 61.5 ± 1.8 | 20.00 ± 0.50 |" in md
    assert "| gap (Plug-in − Emulator FT) | +6.0 ± 4.2 | +10.0 ± 2.8 | +6.0 ± 5.7 | +8.0 ± 2.5 | -10.00 ± 1.12 |" in md
    assert "Average over piqa, arc_easy" in md and "left out: sciq" in md
    assert "1 records of other kinds" in md


def test_without_full_ft_the_average_uses_every_task(tmp_path):
    recs = [rec(r, t, v, s) for (r, t), (v, s) in VALUES.items()]
    recs += [rec(r, t, v, s, method=None, setting=None) for (r, t), (v, s) in SHARED.items() if r == "full_zs"]
    path = results(tmp_path / "r.json", recs)
    b = build_report([(str(path), load_results(path))])["blocks"][0]
    assert "full_ft" not in b["rows"]
    assert b["average"]["tasks"] == ["piqa", "arc_easy", "sciq"]
    assert b["average"]["rows"]["emu_zs"]["value"] == pytest.approx((0.40 + 0.60 + 0.70) / 3)


def test_blocks_per_method_and_setting_and_baselines_only_from_their_own_file(tmp_path):
    a = [rec(r, t, v, s) for (r, t), (v, s) in VALUES.items() if t == "arc_easy"]
    a += [rec("full_zs", "arc_easy", 0.5, 0.02, method=None, setting=None)]
    other = {"adapter_layers": [2, 2], "keep": 4}
    b = [rec(r, "arc_easy", v - 0.05, s, setting=other) for (r, t), (v, s) in VALUES.items() if t == "arc_easy"]
    b += [rec(r, "arc_easy", v, s, method="kd") for (r, t), (v, s) in VALUES.items() if t == "arc_easy"]
    b += [rec("full_zs", "arc_easy", 0.9, 0.02, method=None, setting=None)]  # another budget's baseline
    pa, pb = results(tmp_path / "a.json", a), results(tmp_path / "b.json", b)
    report = build_report([(str(pa), load_results(pa)), (str(pb), load_results(pb))])
    labels = [x["label"] for x in report["blocks"]]
    assert labels == ["kd (adapter 2,2, keep=8)", "uniform (adapter 2,2, keep=4)", "uniform (adapter 2,2, keep=8)"]
    full_zs = {x["label"]: x["rows"]["full_zs"]["arc_easy"]["value"] for x in report["blocks"]}
    assert full_zs == {"kd (adapter 2,2, keep=8)": 0.9, "uniform (adapter 2,2, keep=4)": 0.9,
                       "uniform (adapter 2,2, keep=8)": 0.5}
    assert len(report["summary"]["tiny"]["points"]) == 3


def test_json_round_trip_and_pngs(bench_file, tmp_path):
    out = tmp_path / "out"
    report, written = report_files([bench_file], out)
    names = sorted(p.name for p in written)
    assert names == ["bars-tiny-uniform-adapter-2-2-keep-8.png", "privacy-utility-tiny.png",
                     "report.json", "report.md"]
    for p in written:
        assert p.stat().st_size > 1000
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (out / "report.md").read_text() == report_markdown(report)


def test_readme_table(bench_file):
    data = load_results(bench_file)
    md = readme_table(build_report([(str(bench_file), data)]))
    assert "| full model | 100% | Full ZS | 66.0 ± 3.0 | 50.0 ± 2.0 | 78.0 ± 4.0 | 58.0 ± 1.8 | 18.00 ± 0.50 |" in md
    assert "| uniform (adapter 2,2, keep=8) | 1,000 (33%) | Emulator ZS |" in md
    assert "Produced by `test`. Machine: m." in md


def test_cli_report(bench_file, tmp_path, capsys):
    assert main(["report", str(bench_file), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "### tiny · uniform (adapter 2,2, keep=8)" in out
    assert (tmp_path / "o" / "report.json").exists() and not list((tmp_path / "o").glob("*.png"))


def test_bad_input(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(OffsiteError, match="not a results file"):
        load_results(tmp_path / "x.json")
    with pytest.raises(OffsiteError, match="does not exist"):
        load_results(tmp_path / "missing.json")
    (tmp_path / "y.json").write_text(json.dumps({"meta": {}, "records": [{"row": "plugin", "task": "piqa"}]}))
    with pytest.raises(OffsiteError, match="record 0 .* lacks model, metric, value"):
        load_results(tmp_path / "y.json")
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_exclude_leaves_out_settings_with_an_option_value(tmp_path, capsys):
    old = {"adapter_layers": [2, 2], "alpha": 0.5, "stage1_steps": 100}
    new = {"adapter_layers": [2, 2], "alpha": 0.5}
    recs = [rec(r, "arc_easy", v, s, method="scaleot", setting=st)
            for st in (old, new) for (r, t), (v, s) in VALUES.items() if t == "arc_easy"]
    recs.append(rec("full_zs", "arc_easy", 0.5, 0.02, method=None, setting=None))
    path = results(tmp_path / "s.json", recs)
    labels = lambda rep: [b["label"] for b in rep["blocks"]]  # noqa: E731
    assert len(labels(build_report([(str(path), load_results(path))]))) == 2
    rep = build_report([(str(path), load_results(path))], exclude=[("stage1_steps", 100)])
    assert labels(rep) == ["scaleot (adapter 2,2, alpha=0.5)"]
    assert any("left out by stage1_steps=100" in n for n in rep["notes"])
    assert main(["report", str(path), "--no-plots", "--exclude", "stage1_steps=100"]) == 0
    out = capsys.readouterr().out
    assert "alpha=0.5, stage1_steps=100" not in out and "scaleot (adapter 2,2, alpha=0.5)" in out
    assert main(["report", str(path), "--no-plots", "--exclude", "stage1_steps"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
