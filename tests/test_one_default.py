"""One name and one default per setting: the owner's correction period (optimizer steps between
the model owner's corrections) is defined once, :data:`offsite.assist.RECIPE_EVERY`; every command
reads it, and no second literal default appears in the package, the Makefile or the README."""

from __future__ import annotations

import re
from pathlib import Path

from offsite.assist import RECIPE_EVERY, AssistOptions
from offsite.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SECOND_LITERAL = re.compile(
    r"\bassist[_-]every\s*[= ]\s*\d"  # assist_every=4, --assist-every 4
    r"|\bevery\s*=\s*\d"  # every=4
    r"|\bevery\s+\d+\s+(?:optimizer\s+)?steps\b"  # "a correction every 4 steps"
    r"|\bRECIPE_EVERY\s*=\s*\d")


def _literals(text: str) -> list[str]:
    return [m.group(0) for m in SECOND_LITERAL.finditer(text)]


def test_the_grep_sees_a_second_literal():
    assert _literals("AssistOptions(every=4)\n--assist-every 2\nassist_every = 4\nevery 4 steps") == [
        "every=4", "assist-every 2", "assist_every = 4", "every 4 steps"]
    assert not _literals("rl_every=1, eval_every=2, every 10th example, every=steps + 1, --assist-every N")


def test_the_correction_period_has_one_literal_in_the_package():
    found = {p.relative_to(ROOT).as_posix(): hits for p in sorted((ROOT / "src" / "offsite").rglob("*.py"))
             if (hits := _literals(p.read_text(encoding="utf-8")))}
    assert found == {"src/offsite/assist.py": [f"RECIPE_EVERY = {RECIPE_EVERY}"]}


def test_the_makefile_and_readme_use_the_cli_default():
    for name in ("Makefile", "README.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert not re.search(r"--assist-every[ =]\d", text), name


def test_every_command_reads_the_one_default():
    parser = build_parser()
    tune = parser.parse_args(["tune", "--emulator", "e", "--task", "arc_easy", "--out", "o", "--assist", "http://x"])
    assert tune.assist_every == RECIPE_EVERY
    run = parser.parse_args(["run", "--assist-every", "--preset", "quick"])
    assert run.assist_every == RECIPE_EVERY and run.preset == "quick"
    assert parser.parse_args(["run", "--assist-every", "2"]).assist_every == 2
    assert not hasattr(parser.parse_args(["run"]), "assist_every")
    assert not AssistOptions().on  # the Python API's default: no correction, the papers' protocol
