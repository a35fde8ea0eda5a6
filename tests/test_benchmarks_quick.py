"""The scale benchmarks measured for real, in their --quick modes (a small slide, a tiny cache), so CI
runs their measuring code and not only their canned main() (tests/test_benchmarks_cli.py).
bench_fixed_costs --quick (about 80 s on 2 cores) is left out: it times the same CLIs that the
end-to-end tests run, and its main() is covered with canned timings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"


def run_quick(script: str, tmp_path: Path, *options: str) -> str:
    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE.read_text(encoding="utf-8"), encoding="utf-8")
    before = PAGE.stat().st_mtime_ns
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(page), *options],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert page.read_text(encoding="utf-8") == PAGE.read_text(encoding="utf-8")  # printed only
    assert PAGE.stat().st_mtime_ns == before
    return result.stdout


@pytest.mark.slow
def test_bench_wsi_quick_builds_a_pyramidal_slide_and_measures_it(tmp_path):
    out = run_quick(
        "bench_wsi.py", tmp_path, "--slide_dir", str(tmp_path / "slides"), "--workdir", str(tmp_path / "w")
    )
    assert "## Whole slides" in out and "OpenSlide vendor `generic-tiff`" in out
    assert "| whole slide end to end" in out and "| tile folder end to end" in out
    assert list((tmp_path / "slides").glob("*.tiff"))  # built, and kept for the next run


@pytest.mark.slow
def test_bench_train_scale_quick_streams_a_cache_and_measures_it(tmp_path):
    out = run_quick("bench_train_scale.py", tmp_path, "--root", str(tmp_path / "scale"))
    assert "## Training at scale" in out
    assert "raw sequential read" in out and "training epoch" in out and "float16" in out
