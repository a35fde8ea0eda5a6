"""Every relative link of README.md and docs/ leads somewhere: the file exists and its #anchor is
a heading of that file (GitHub's anchors: lower case, punctuation dropped, spaces to hyphens)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from docs_text import FENCE, ROOT, doc_files

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, in_block = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if FENCE.match(line):
            in_block = not in_block
            continue
        if not in_block:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            target = match.group(1)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked
                found.append((number, target))
    return found


LINKS = [(path, number, target) for path in doc_files() for number, target in links(path)]


@pytest.mark.parametrize(
    "path, number, target", LINKS, ids=[f"{p.relative_to(ROOT)}:{n} {t}" for p, n, t in LINKS]
)
def test_link_resolves(path: Path, number: int, target: str):
    file_part, _, fragment = target.partition("#")
    destination = (path.parent / file_part).resolve() if file_part else path
    where = f"{path.relative_to(ROOT)}:{number}: {target}"
    assert destination.exists(), f"{where}: {destination} does not exist"
    if fragment:
        assert destination.suffix == ".md", f"{where}: an anchor into a file that is not markdown"
        assert fragment in anchors(destination), (
            f"{where}: no heading of {destination.relative_to(ROOT)} has the anchor #{fragment}; "
            f"it has {sorted(anchors(destination))}"
        )


def test_the_common_tasks_of_the_index_link_to_sections():
    index = ROOT / "docs" / "index.md"
    text = index.read_text(encoding="utf-8")
    assert "## Common tasks" in text
    tasks = text.split("## Common tasks", 1)[1]
    targets = [t for n, t in links(index) if f"({t})" in tasks]
    assert len(targets) >= 7 and all("#" in t for t in targets)


def test_slugs_follow_github():
    assert (
        slug("Tile folders from slides: `python -m feature_extraction.tile_slides`")
        == "tile-folders-from-slides-python--m-feature_extractiontile_slides"
    )
    assert slug("Leakage: slides the model has seen") == "leakage-slides-the-model-has-seen"
    assert (
        slug("Speed (this 2-core development machine, median of 5)")
        == "speed-this-2-core-development-machine-median-of-5"
    )
