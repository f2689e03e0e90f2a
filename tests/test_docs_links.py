"""The documentation's links resolve: every relative Markdown link (and its #anchor, for a Markdown
target), every `docs/...md`-style file reference in backticks, and no maintainer's absolute paths
in the docs' commands (docs/README.md lists the placeholders to use instead)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "runs", "node_modules", ".pytest_cache"}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
TICKED_MD = re.compile(r"`((?:\.\./|[\w.-]+/)*[\w.-]+\.md)(?:#[\w-]+)?`")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def markdown_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(REPO).parts))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M)}


def broken_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())  # code blocks hold commands, not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
            continue  # a URL (http:, mailto:) or a site path, not a file of this repository
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file) if file else path
        if not resolved.exists():
            broken.append(f"{target} (no {resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor})")
    for ref in TICKED_MD.findall(text):
        if ref.startswith(("../shared/", "shared/")) or "/" not in ref:
            continue  # the shared data and house plan live beside the repository, not in it
        if not ((REPO / ref).exists() or (path.parent / ref).exists()):
            broken.append(f"`{ref}`")
    return broken


def test_the_scan_sees_the_docs():
    files = {p.relative_to(REPO).as_posix() for p in markdown_files()}
    assert {"README.md", "docs/README.md", "docs/training.md", "models/default/MODEL_CARD.md"} <= files


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_the_checker_finds_a_broken_link(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Top part\n")
    page = tmp_path / "docs" / "b.md"
    page.write_text("[ok](a.md#top-part) [gone](quality.md) [anchor](a.md#nowhere) see `docs/quality.md`\n"
                    "```\n[in code](nowhere.md)\n```\n[web](https://example.org/x.md)\n")
    assert broken_links(page) == ["quality.md (no docs/quality.md)", "a.md#nowhere (no heading #nowhere)",
                                  "`docs/quality.md`"]


def test_every_doc_is_in_the_index():
    index = (REPO / "docs" / "README.md").read_text()
    missing = [p.name for p in (REPO / "docs").glob("*.md") if p.name != "README.md" and f"]({p.name})" not in index]
    assert missing == []


def test_no_maintainer_paths_in_the_docs():
    """Commands use placeholders (docs/README.md, 'Paths in the commands'), not one machine's folders."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    found = [f"{p.relative_to(REPO)}:{n}" for p in pages for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"(?<![\w.])/(work|home|root|Users|mnt/[a-z])/", line)]
    assert found == []
