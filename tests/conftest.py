"""Shared pytest fixtures. Test data is made by code: tile cohorts by
``feature_extraction.example_cohort``, feature bags by ``tests/random_data.py``."""

from __future__ import annotations

import os

import pytest

# The backbone and the trainer share 2 cores with everything else: one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _per_user_cache(tmp_path_factory):
    """The per-user cache (ONNX exports, calibrations; feature_extraction.user_cache) of the whole
    session is a temporary folder, shared by its tests and their subprocesses, never the user's own."""
    from feature_extraction.user_cache import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("user_cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """A tiny example cohort (read-only: copy it before changing it): train with 4 patients
    (6 slides, plain and ``_cnn`` folders) and test with 2 patients, 4 tiles of 64 x 64 each.

    Returns the ``CohortSummary``; ``summary.split_dirs["train"]`` is a ``--data_dir``."""
    from feature_extraction.example_cohort import build_example_cohort

    return build_example_cohort(
        tmp_path_factory.mktemp("tiny_cohort"),
        seed=0,
        n_train_patients=4,
        n_test_patients=2,
        tiles_per_slide=4,
        tile_size=64,
    )


@pytest.fixture(scope="session")
def trained_on_tiny_cohort(tiny_cohort, tmp_path_factory):
    """clam.train (2 epochs) on the tiny example cohort's train split, random backbone weights: (root,
    run folder). Shared by the evaluation tests; a test that evaluates it writes into its own output_dir
    or accepts the eval_* folders of the others."""
    from clam.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_run")
    run_dir = train(
        TrainConfig(
            data_dir=str(tiny_cohort.split_dirs["train"]),
            features_dir=str(root / "features"),
            weights="random",
            num_epochs=2,
            num_workers=0,
            device="cpu",
            progress=False,
            output_dir=str(root / "runs"),
        )
    )
    return root, run_dir
