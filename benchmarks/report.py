"""docs/benchmarks.md: each benchmark script owns one ``## `` section and replaces only that."""

from __future__ import annotations

import math
import os
import platform
import re
from pathlib import Path

from feature_extraction.runtime import available_cores


def write_section(path: Path, section: str, text: str) -> None:
    """Replace (or append) the ``section`` heading's block of ``path``, leaving other sections alone."""
    text = text.rstrip("\n") + "\n\n"  # one blank line before the next section
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = (
        pattern.sub(lambda _: text, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    )
    path.write_text(new.rstrip("\n") + "\n", encoding="utf-8")


def publish(text: str, section: str, out: Path, write: bool) -> None:
    """Print a script's section; with ``write`` (its --write flag) also replace it in ``out``."""
    print(text)
    if write:
        write_section(out, section, text)
        print(f"wrote the {section} section of {out}")


def machine() -> str:
    """The CPU model and the cores this process may use, after the GPU's name when there is one."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {available_cores()} cores"
    return f"{torch.cuda.get_device_name(0)}; {text}" if torch.cuda.is_available() else text


def load_average() -> float:
    """The 1-minute load average (NaN where the system has none): every section quotes it, since
    these machines are shared and their seconds are read against it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
