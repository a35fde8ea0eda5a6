"""`torchrun --nproc_per_node 2 -m feature_extraction.embed`: two processes share the slides, no slide is
embedded twice, and the cache equals a one-process run's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from random_data import FAST, ROOT

from feature_extraction.bags import read_bag
from feature_extraction.embed import embed_cohort
from feature_extraction.manifest import read_manifest


def _torchrun() -> str | None:
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.is_file() else shutil.which("torchrun")


def _cohort(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for folder, prefix in (("EGFR_positive", "P"), ("EGFR_negative", "N")):
        for patient in range(4):
            for i in range(1 + patient % 3):
                path = root / folder / f"{prefix}{patient}" / f"tile_x{i * 32}_y0.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((rng.integers(0, 90, (32, 32, 3)) + 150).astype(np.uint8)).save(path)
    return root


@pytest.mark.slow
@pytest.mark.skipif(_torchrun() is None, reason="torchrun is not installed")
def test_two_processes_under_torchrun_build_the_cache_of_one(tmp_path):
    data = _cohort(tmp_path / "train")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            _torchrun(),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "feature_extraction.embed",
            "--data_dir",
            str(data),
            "--features_dir",
            str(tmp_path / "two"),
            "--backbone",
            "resnet18",
            "--weights",
            "random",
            "--runtime",
            "torch",
            "--num_workers",
            "0",
            "--batch_size",
            "2",
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    per_rank = [int(n) for n in re.findall(r"slides: (\d+) embedded", result.stdout)]
    assert len(per_rank) == 2 and sum(per_rank) == 8, result.stdout  # every slide embedded exactly once

    single = embed_cohort(replace(FAST, batch_size=2), data, features_dir=tmp_path / "one")
    two = tmp_path / "two" / single.cache_dir.name
    assert sorted(p.name for p in two.glob("*.h5")) == sorted(p.name for p in single.cache_dir.glob("*.h5"))
    for path in single.cache_dir.glob("*.h5"):
        expected, got = read_bag(path), read_bag(two / path.name)
        assert got.tile_names == expected.tile_names and np.array_equal(got.coords, expected.coords)
        np.testing.assert_allclose(got.features, expected.features, rtol=1e-4, atol=1e-5)
    strip = [
        row.__class__(**{**row.__dict__, "file": row.file.name}) for row in read_manifest(single.cache_dir)
    ]
    assert [row.__class__(**{**row.__dict__, "file": row.file.name}) for row in read_manifest(two)] == strip
    assert not [p for p in two.rglob("*") if p.suffix in (".tmp", ".lock")]
