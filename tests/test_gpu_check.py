"""benchmarks/gpu_check.sh, the prepared device check, in its CPU-quick variant: every line runs
except the CUDA calls. Step 1 makes its venv with --reuse-packages (the packages of this test's
interpreter, the project installed --no-deps), so it downloads nothing; the default path
installs '.[dev]' from the index."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="gpu_check.sh is a bash script")
def test_the_quick_cpu_check_runs_every_step_and_reports_it(tmp_path):
    report = tmp_path / "report.txt"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    command = ["bash", str(SCRIPT), "--reuse-packages", "--workdir", str(tmp_path / "work")]
    command += ["--report", str(report), "--device", "cpu", "--quick", "--backbone", "resnet18"]
    command += ["--runtime", "torch"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    text = report.read_text(encoding="utf-8")
    assert text in result.stdout  # printed and written, the same report
    assert "RESULT: all steps passed" in text
    for number in range(1, 7):
        assert re.search(rf"^\[ok\] {number} ", text, re.MULTILINE), text
    assert "venv seeing" in text and str(tmp_path / "work" / "venv") in text  # step 1 made its own venv
    assert "128 PNG tiles" in text and "128 JPEG tiles" in text  # step 2
    rows = re.findall(r"^\s+fp32 (PNG|JPEG)\s*\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", text, re.M)
    assert [row[0] for row in rows] == ["PNG", "JPEG"] and all(float(v) > 0 for r in rows for v in r[1:])
    cosine = float(re.search(r"worst cosine ([\d.]+) at (\S+)", text).group(1))  # step 4
    assert 0.999 <= cosine <= 1.0 + 1e-9
    assert "load_checkpoint(..., device='cpu'): parameters on ['cpu']" in text  # step 5
    assert re.search(r"3 epochs on cpu in run_\d{8}_\d{6}: 3 epoch checkpoints", text)
    assert re.search(r"^\s+(\d+) bags vs \1 of the plain run", text, re.M)  # step 6

    figures = json.loads(report.with_suffix(".json").read_text(encoding="utf-8"))
    assert all(figures[f"step{n}"]["ok"] for n in range(2, 7))
    bench = figures["step3"]["fp32_jpeg"]
    assert bench["format"] == "jpg" and bench["n_tiles"] == 16 and bench["decode_limit"] > 0
    assert figures["step4"]["tiles"] == 16
    run_dir = Path(figures["step5"]["run_dir"])
    assert {"config.json", "best_model.pt", "checkpoint_epoch_3.pt"} <= {p.name for p in run_dir.iterdir()}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="gpu_check.sh is a bash script")
def test_a_failed_install_is_reported_and_stops_the_check(tmp_path):
    report = tmp_path / "report.txt"
    env = {**os.environ, "PYTHON": str(tmp_path / "no-such-python")}
    result = subprocess.run(
        ["bash", str(SCRIPT), "--reuse-packages", "--workdir", str(tmp_path / "w"), "--report", str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    text = report.read_text(encoding="utf-8")
    assert "[FAILED] 1 install: python -m venv failed" in text and "RESULT: FAILED steps 1" in text
