"""The documentation lives in the repository: every link of README.md and docs/ points at a file that
exists here, the sources cite no design notes that are not in it, and the README stays a front door."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s#]*)(#[^)\s]*)?\)")


def broken_links(md: Path) -> list[str]:
    bad = []
    for m in LINK.finditer(md.read_text(encoding="utf-8")):
        target = m.group(1)
        if not target:
            continue  # a link to a heading of the same page
        if re.match(r"[a-z]+:", target):
            bad.append(f"{target} (outside the repository)")
        elif not (md.parent / target).exists():
            bad.append(f"{target} (missing)")
    return bad


def test_link_checker_sees_missing_and_outside_links(tmp_path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[a](there.md) [b](gone.md#x) [c](https://example.org) [d](#local)")
    assert broken_links(page) == ["gone.md (missing)", "https://example.org (outside the repository)"]


def test_every_doc_link_points_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = {p.relative_to(ROOT).as_posix(): broken_links(p) for p in pages}
    assert not {k: v for k, v in bad.items() if v}


def test_sources_cite_only_notes_in_the_repository():
    cited = [f"{p.relative_to(ROOT)}" for folder in ("src", "bench")
             for p in (ROOT / folder).rglob("*.py") if re.search(r"DESIGN\.md|papers\.md", p.read_text())]
    assert not cited


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150
    first_screen = "\n".join(lines[:40])
    assert "make demo" in first_screen and "make test" in first_screen
