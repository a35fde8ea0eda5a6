"""benchmarks/bench_learning.py end to end in its --quick configuration (one difficulty, 2 folds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_learning.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_learning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_benchmark_prints_the_table_and_writes_only_when_asked(tmp_path, capsys):
    bench = load_script()
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n## Training\n\nkept\n")
    argv = ["--quick", "--difficulties", "medium", "--folds", "2", "--weights", "random",
            "--workdir", str(tmp_path / "work"), "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert out.read_text() == "# Benchmarks\n\n## Training\n\nkept\n"  # no --write: printed only
    assert "RANDOM BACKBONE WEIGHTS" in printed
    table = [line for line in printed.splitlines() if line.startswith("| medium")]
    models = [line.split(" | ")[2] for line in table]
    assert models[:5] == ["CLAM-SB", "CLAM-MB", "attention-MIL (CLAM-SB, bag_weight 1.0)",
                          "mean-pool logistic regression", "max-pool logistic regression"]
    assert len(table) == 10  # and the five feature-scale rows
    assert all("slides)" in line for line in table[:3]) and "| n/a |" in table[3]
    assert "Targets:" in printed and "Localisation AUC at least 0.9" in printed

    # A second run reuses the cohort and its cache and writes its section beside the others.
    assert bench.main(argv + ["--write"]) == 0
    text = out.read_text()
    assert "## Training\n\nkept\n" in text and text.count("## Learning") == 1
    assert "measured when the cache was built" in text
