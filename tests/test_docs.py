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
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 120
    first_screen = "\n".join(lines[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    # the two parties and what crosses between them, at the top
    top = "\n".join(lines[:20])
    assert "model owner" in top and "data owner" in top and "adapter" in top
    # where it stands: a marked block of at most five sentences
    m = re.search(r"<!-- where-it-stands -->\n(.*?)<!-- /where-it-stands -->", text, re.S)
    assert m, "the where-it-stands block is missing"
    prose = re.sub(r"\(\[[^)]*\)[^)]*\)|`[^`]*`", "", m.group(1))  # links and code hold no sentence ends
    assert 1 <= len(re.findall(r"[.!?](\s|$)", prose)) <= 5


def test_readme_test_command_is_the_one_ci_runs():
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        assert "make test" in ci.read_text(encoding="utf-8")
    assert "make test" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^test:", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)


def test_docs_index_lists_every_page_as_guide_or_record():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    guide, record = index.split("## Research record")
    assert "## User's guide" in guide
    linked = lambda part: {m.group(1) for m in LINK.finditer(part)}  # noqa: E731
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert pages <= linked(guide) | linked(record), sorted(pages - linked(guide) - linked(record))
    assert {"protocol.md", "own-task.md", "data.md", "content.md", "results-format.md", "federated.md",
            "privacy.md", "methods.md"} <= linked(guide)
    assert {"results.md", "transfer.md"} <= linked(record) and not {"results.md", "transfer.md"} & linked(guide)


def test_docs_speak_for_themselves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "the issue" not in text, page.name
        assert "../shared" not in text and "/work/h-" not in text and "/work/main" not in text, page.name
