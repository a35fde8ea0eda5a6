"""The project's markdown pages, for the tests that read them (commands, links)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^\s*```+\s*(\S*)")


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and the other markdown files at the root, every page under docs/, and the README of
    each top-level folder (train/, test/, ...)."""
    files = sorted(root.glob("*.md")) + sorted((root / "docs").rglob("*.md"))
    files += sorted(root.glob("*/README.md"))
    return [f for f in files if not any(part.startswith(".") for part in f.relative_to(root).parts)]
