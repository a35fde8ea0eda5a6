"""Bags and checkpoints written by an earlier main still load and give the same numbers.

``tests/fixtures/main_0d6f26e`` was written by the real CLIs of main at commit 0d6f26e:
``feature_extraction.example_cohort`` (6 train patients, 4 tiles of 64 px), ``feature_extraction.embed
--backbone resnet18 --weights random --runtime torch`` (the ``cache/`` folder), and ``clam.train
--num_epochs 2`` (``run/``: ``checkpoint_epoch_2.pt``, ``config.json``, ``split.csv``). ``expected.json``
holds, per slide, the coordinates, tile names and the positive-class probability that main computed.
Any change to the bag or checkpoint formats must keep reading these files, or upgrade them.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clam.checkpoints import model_from_checkpoint, saved_run
from clam.model import build_model
from clam.train import load_checkpoint  # the import the specification shows
from feature_extraction.bags import read_bag, validate_bag

FIXTURE = Path(__file__).parent / "fixtures" / "main_0d6f26e"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())["slides"]
CACHE_KEY = json.loads((FIXTURE / "cache" / "cache.json").read_text())["cache_key"]


@pytest.mark.parametrize("slide_id", sorted(EXPECTED))
def test_old_bags_read_and_validate(slide_id):
    path = FIXTURE / "cache" / f"{slide_id}.h5"
    summary = validate_bag(path, feature_dim=512, cache_key=CACHE_KEY)
    assert summary.n_instances == 4
    bag = read_bag(path)
    assert bag.features.shape == (4, 512) and bag.features.dtype == np.float32
    assert bag.coords.tolist() == EXPECTED[slide_id]["coords"]
    assert bag.tile_names == EXPECTED[slide_id]["tile_names"]
    assert bag.slide_id == slide_id
    assert bag.attrs["patient_id"] == EXPECTED[slide_id]["patient_id"]
    assert int(bag.attrs["label"]) == EXPECTED[slide_id]["label"]


def _probabilities(model) -> dict[str, float]:
    model.eval()
    out = {}
    with torch.inference_mode():
        for slide_id in EXPECTED:
            features = torch.from_numpy(read_bag(FIXTURE / "cache" / f"{slide_id}.h5").features)
            out[slide_id] = float(model(features[None]).probs[0, 1])
    return out


def test_old_checkpoint_rebuilds_the_same_model():
    model, checkpoint = model_from_checkpoint(FIXTURE / "run" / "checkpoint_epoch_2.pt", torch.device("cpu"))
    assert checkpoint["epoch"] == 2
    probs = _probabilities(model)
    for slide_id, expected in EXPECTED.items():
        assert probs[slide_id] == pytest.approx(expected["prob_positive"], abs=1e-5)


def test_old_checkpoint_describes_its_run():
    _, checkpoint = model_from_checkpoint(FIXTURE / "run" / "checkpoint_epoch_2.pt", torch.device("cpu"))
    saved = saved_run(checkpoint)
    assert saved.checkpoint_format == "clam.train" and not saved.is_clam_state_dict
    assert (
        saved.epoch == 2 and saved.class_names == ("EGFR_negative", "EGFR_positive") and saved.n_classes == 2
    )
    assert saved.feature_dim == 512 and saved.cache_key == CACHE_KEY
    assert saved.cache["backbone"] == "resnet18" and saved.args["num_epochs"] == 2
    assert saved.model_config["model_type"] == "clam_sb" and saved.baseline["method"]


def test_old_checkpoint_loads_with_the_spec_signature():
    path = FIXTURE / "run" / "checkpoint_epoch_2.pt"
    _, checkpoint = model_from_checkpoint(path, torch.device("cpu"))
    config = checkpoint["model_config"]
    model = build_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model, optimizer, epoch, loss = load_checkpoint(
        checkpoint_path=path, model=model, optimizer=optimizer, device="cpu"
    )
    assert epoch == 2 and loss == pytest.approx(checkpoint["loss"])
    assert optimizer.state_dict()["state"]
    probs = _probabilities(model)
    for slide_id, expected in EXPECTED.items():
        assert probs[slide_id] == pytest.approx(expected["prob_positive"], abs=1e-5)


@pytest.mark.slow
def test_old_run_evaluates_through_the_cli(tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "clam.evaluate",
            "--checkpoint",
            str(FIXTURE / "run" / "checkpoint_epoch_2.pt"),
            "--labels_csv",
            str(FIXTURE / "labels.csv"),
            "--features_dir",
            str(FIXTURE / "cache"),
            "--output_dir",
            str(out),
            "--device",
            "cpu",
            "--n_bootstrap",
            "50",
            "--attention",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with open(out / "predictions.csv", newline="") as handle:
        rows = {row["slide_id"]: row for row in csv.DictReader(handle)}
    assert set(rows) == set(EXPECTED)
    for slide_id, expected in EXPECTED.items():
        assert float(rows[slide_id]["prob_EGFR_positive"]) == pytest.approx(
            expected["prob_positive"], abs=1e-5
        )
