"""The README is a short front door, and the documentation cites only what the repository holds:
README.md stays under 8,000 characters and links every docs/ page once; every relative link in
README.md and docs/*.md reaches a file (and its #anchor, a heading of that file); no tracked file
cites the FACTS file that lives outside the repository (docs/background.md holds those facts)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
README_LIMIT = 8000
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
# Spelled in two parts so that this file does not match itself.
OUTSIDE_CITATION = re.compile(rb"FACTS" + rb"(\.md|\s*\xc2\xa7)")


def _prose(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings (repeats get GitHub's ``-1``, ``-2`` suffix)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(text):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def dead_links(doc: Path) -> list[str]:
    """``target`` of every relative link in ``doc`` whose file or heading does not exist."""
    bad = []
    for line in _prose(doc.read_text()):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                bad.append(f"{target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                bad.append(f"{target} (no heading #{anchor})")
    return bad


def _docs() -> list[Path]:
    return sorted((ROOT / "docs").glob("*.md"))


def test_readme_is_short() -> None:
    size = len(README.read_text())
    assert size < README_LIMIT, (
        f"README.md has {size:,} characters (limit {README_LIMIT:,}); move detail to docs/"
    )


@pytest.mark.parametrize("doc", [README, *_docs()], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    assert not dead_links(doc), f"{doc.relative_to(ROOT)}: dead links {dead_links(doc)}"


def test_readme_links_every_docs_page_once() -> None:
    targets = [
        t.partition("#")[0] for line in _prose(README.read_text()) for t in LINK.findall(line)
    ]
    counts = {p.name: targets.count(f"docs/{p.name}") for p in _docs()}
    wrong = {name: n for name, n in counts.items() if n != 1}
    assert not wrong, f"README.md must link each docs/ page once; links per page: {wrong}"


def test_no_file_cites_a_file_outside_the_repository() -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    citing = [
        name.decode()
        for name in files
        if name
        and (ROOT / name.decode()).is_file()
        and OUTSIDE_CITATION.search((ROOT / name.decode()).read_bytes())
    ]
    assert not citing, (
        f"{citing} cite the FACTS file, which is not in the repository; cite "
        "docs/background.md#<section> instead"
    )


def test_the_checks_catch_what_they_guard(tmp_path: Path) -> None:
    """The slugger and link checker behave as GitHub does on a sample page."""
    assert slug("Concept -> file map") == "concept---file-map"
    assert slug("GPU kernels on CPU under Triton's interpreter") == (
        "gpu-kernels-on-cpu-under-tritons-interpreter"
    )
    (tmp_path / "a.md").write_text("# Top\n## Same\n## Same\n```\n# not a heading\n```\n")
    assert anchors((tmp_path / "a.md").read_text()) == {"top", "same", "same-1"}
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#same-1) [gone](missing.md) [bad](a.md#not-a-heading) [web](https://x.org)\n"
        "```\n[in code](nowhere.md)\n```\n"
    )
    assert dead_links(page) == [
        "missing.md (no such file)",
        "a.md#not-a-heading (no heading #not-a-heading)",
    ]
    assert OUTSIDE_CITATION.search(("see FACTS" + " §4").encode())
    assert OUTSIDE_CITATION.search(b"see FACTS" + b".md")
    assert not OUTSIDE_CITATION.search(b"docs/background.md#importance-scores")
