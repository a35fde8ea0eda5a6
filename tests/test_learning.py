"""CLAM learns whatever the scale of the features: per-dimension standardisation, and the pooled
logistic-regression baseline every run is compared with."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from random_data import cohort_slides, transform_cache, write_random_cache

from clam.bag_dataset import feature_statistics
from clam.baselines import PooledBaseline, comparison, fit_baseline, pool_bags
from clam.checkpoints import model_from_checkpoint, read_checkpoint
from clam.model import ModelConfig, model_from_config
from clam.run_record import RunState
from clam.train import TrainConfig, train
from clam.training import compare_with_baseline
from feature_extraction.bags import read_bag


def quick(tmp_path: Path, cache: Path, **overrides) -> TrainConfig:
    return TrainConfig(
        **{
            "features_dir": str(cache),
            "num_epochs": 3,
            "output_dir": str(tmp_path / "runs"),
            "progress": False,
            **overrides,
        }
    )


@pytest.fixture
def cache(tmp_path) -> Path:
    slides = cohort_slides(24, "train", seed=3)
    return write_random_cache(tmp_path / "features", slides, feature_dim=16)


# ---------------------------------------------------------------- statistics


def test_streamed_statistics_equal_those_of_all_instances_at_once():
    rng = np.random.default_rng(0)
    bags = [rng.normal(1000.0, 3.0, size=(n, 5)).astype(np.float32) for n in (1, 7, 40, 3)]
    stats = feature_statistics(iter(bags))
    everything = np.concatenate(bags).astype(np.float64)
    np.testing.assert_allclose(stats.mean, everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, everything.std(axis=0), rtol=1e-9)
    assert (stats.n_instances, stats.n_bags, stats.n_constant) == (51, 4, 0)


def test_constant_dimensions_are_left_unscaled():
    bags = [np.column_stack([np.full(6, 7.0), np.arange(6.0), np.zeros(6)]) for _ in range(3)]
    stats = feature_statistics(bags)
    assert stats.std[0] == 1.0 and stats.std[2] == 1.0 and stats.n_constant == 2
    assert stats.std[1] == pytest.approx(np.arange(6.0).std())
    zeros = feature_statistics([np.zeros((4, 3))])
    assert np.all(zeros.std == 1.0) and np.all(zeros.mean == 0.0)


def test_the_model_standardises_inside_and_keeps_the_statistics_in_its_state_dict():
    torch.manual_seed(0)
    model = model_from_config(ModelConfig(in_dim=6, feature_norm="standard")).eval()
    assert {"feature_norm.mean", "feature_norm.std"} <= set(model.state_dict())
    x = torch.randn(1, 9, 6)
    mean, std = torch.linspace(-3, 3, 6), torch.linspace(0.5, 2, 6)
    reference = model(x).probs
    model.feature_norm.set_statistics(mean, std)
    np.testing.assert_allclose(model(x * std + mean).probs.detach(), reference.detach(), atol=1e-6)
    plain = model_from_config(ModelConfig(in_dim=6))
    assert not any(k.startswith("feature_norm") for k in plain.state_dict())  # CLAM's own key layout
    with pytest.raises(ValueError):
        model.feature_norm.set_statistics(mean, torch.zeros(6))


# ---------------------------------------------------------------- learning across scales


def test_training_on_features_scaled_x30_offset_30_learns_as_on_the_originals(tmp_path, cache):
    """Standardised, x30 + 30 trains exactly as x1; with CLAM's raw features it does not."""
    scaled = transform_cache(cache, tmp_path / "scaled" / cache.name, lambda f, _: f * 30 + 30)
    runs = {}
    for name, folder in (("original", cache), ("scaled", scaled)):
        run = train(quick(tmp_path / name, folder))
        runs[name] = json.loads((run / "config.json").read_text())
    original, rescaled = runs["original"]["metrics"], runs["scaled"]["metrics"]
    for a, b in zip(original, rescaled):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3, abs=1e-4)
        assert b["val_auc"] == pytest.approx(a["val_auc"], abs=1e-6)
    assert runs["scaled"]["feature_norm"]["method"] == "standard"
    assert runs["scaled"]["feature_norm"]["mean_range"][0] > 20  # the statistics are the scaled ones
    raw = train(quick(tmp_path / "raw", scaled, feature_norm="none"))
    raw_metrics = json.loads((raw / "config.json").read_text())["metrics"]
    assert raw_metrics[0]["train_loss"] > 2 * original[0]["train_loss"]  # what main did: a wandering loss


def test_statistics_come_from_the_training_bags_only(tmp_path, cache):
    run = train(quick(tmp_path, cache, num_epochs=1))
    model, checkpoint = model_from_checkpoint(run / "best_model.pt")
    split = (run / "split.csv").read_text().splitlines()[1:]
    train_ids = [line.split(",")[0] for line in split if line.endswith(",train")]
    assert 0 < len(train_ids) < len(split)
    expected = feature_statistics(read_bag(cache / f"{s}.h5").features for s in train_ids)
    np.testing.assert_allclose(model.feature_norm.mean.numpy(), expected.mean, rtol=1e-5)
    np.testing.assert_allclose(model.feature_norm.std.numpy(), expected.std, rtol=1e-5)
    assert checkpoint["model_config"]["feature_norm"] == "standard"
    assert checkpoint["args"]["feature_norm"] == "standard"


@pytest.mark.parametrize("kind", ["zero", "constant", "identical"])
def test_degenerate_bags_train_and_predict_without_nan(tmp_path, cache, kind):
    def degenerate(features, slide_id):
        if kind == "zero":
            return np.zeros_like(features)
        if kind == "constant":
            return np.full_like(features, 4.0)
        return np.repeat(features[:1], len(features), axis=0)

    folder = transform_cache(cache, tmp_path / kind / cache.name, degenerate)
    run = train(quick(tmp_path, folder, num_epochs=2))
    info = json.loads((run / "config.json").read_text())
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]) for row in info["metrics"])
    model, _ = model_from_checkpoint(run / "best_model.pt")
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    probs = model(torch.from_numpy(read_bag(next(folder.glob("*.h5"))).features)).probs
    assert torch.isfinite(probs).all()


# ---------------------------------------------------------------- the baseline


def test_baseline_probabilities_match_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    for n_classes in (2, 3):
        y = np.arange(40) % n_classes
        x = rng.normal(size=(40, 7)) + y[:, None] * 0.8
        fitted = fit_baseline(x, y, n_classes)
        reference = make_pipeline(
            StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=5000)
        )
        reference.fit(x, y)
        np.testing.assert_allclose(fitted.probs(x), reference.predict_proba(x), atol=1e-6)
        again = PooledBaseline.from_dict(fitted.to_dict())
        np.testing.assert_allclose(again.probs(x), fitted.probs(x))
    assert fit_baseline(np.ones((4, 3)), [1, 1, 1, 1], 2) is None


def test_pooling():
    bags = [np.array([[1.0, 5.0], [3.0, -1.0]]), torch.tensor([[2.0, 2.0]])]
    np.testing.assert_array_equal(pool_bags(bags, "mean"), [[2.0, 2.0], [2.0, 2.0]])
    np.testing.assert_array_equal(pool_bags(bags, "max"), [[3.0, 5.0], [2.0, 2.0]])


def test_every_run_records_the_baseline_beside_clam(tmp_path, cache, caplog):
    caplog.set_level(logging.INFO)
    run = train(quick(tmp_path, cache))
    info = json.loads((run / "config.json").read_text())
    baseline = info["baseline"]
    assert baseline["method"] == "logistic regression on mean-pooled features"
    assert 0.0 <= baseline["val_auc"] <= 1.0 and baseline["n_val_bags"] == info["data"]["n_val_bags"]
    best = next(r for r in info["metrics"] if r["epoch"] == info["best_epoch"])
    assert baseline["clam_val_auc"] == best["val_auc"]
    assert any("validation AUC: CLAM" in line and "baseline" in line for line in caplog.messages)
    saved = read_checkpoint(run / "best_model.pt")["baseline"]
    fitted = PooledBaseline.from_dict(saved["params"])
    assert fitted.coef.shape == (1, 16) and saved["val_auc"] == baseline["val_auc"]


def test_a_clearly_worse_clam_ends_with_a_warning():
    state = RunState(best_epoch=2, history=[{"epoch": 1, "val_auc": 0.9}, {"epoch": 2, "val_auc": 0.7}])
    baseline = {"method": "logistic regression on mean-pooled features", "val_auc": 0.95}
    verdict = compare_with_baseline(state, baseline, n_val=12)
    assert verdict["clam_val_auc"] == 0.7 and "0.250 below" in verdict["warning"]
    assert "--feature_norm" in verdict["warning"]
    assert compare_with_baseline(state, baseline, n_val=9)["warning"] is None  # too few slides to tell
    assert comparison(0.9, 0.95, 20) is None and comparison(None, 0.95, 20) is None


def test_evaluation_reports_the_baseline_beside_clam_on_the_external_cohort(tmp_path):
    from clam.eval_config import EvaluateConfig
    from clam.evaluation import evaluate, summary_table
    from clam.metrics import auc_with_ci

    slides = cohort_slides(16, "train", seed=5) + cohort_slides(10, "test", with_cnn=False, seed=6)
    cache = write_random_cache(tmp_path / "features", slides, feature_dim=16)
    run = train(quick(tmp_path, cache))
    external = [s for s in slides if s.split == "test"]
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "slide_id,label,patient_id\n" + "".join(f"{s.slide_id},{s.label},{s.patient_id}\n" for s in external)
    )
    result = evaluate(
        EvaluateConfig(
            checkpoint=run / "best_model.pt",
            labels_csv=labels,
            features_dir=cache,
            output_dir=tmp_path / "eval",
            device="cpu",
            num_workers=0,
            n_bootstrap=50,
            attention="none",
            progress=False,
        )
    )
    baseline = result.metrics["baseline"]
    assert baseline["method"] == "logistic regression on mean-pooled features"
    assert (
        baseline["per_slide"]["n"] == len(external) and baseline["per_patient"]["auc"]["ci_low"] is not None
    )
    # The baseline's column is its fitted model applied to each bag's mean over every instance.
    saved = PooledBaseline.from_dict(read_checkpoint(run / "best_model.pt")["baseline"]["params"])
    expected = saved.probs(pool_bags(read_bag(cache / f"{s.slide_id}.h5").features for s in external))[:, 1]
    got = [row["baseline_prob_EGFR_positive"] for row in result.slides]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    y = [s.label for s in external]
    assert baseline["per_slide"]["auc"]["auc"] == pytest.approx(
        auc_with_ci(y, np.column_stack([1 - expected, expected]), 2, 0, 0).auc
    )
    assert "baseline, logistic regression on mean-pooled features, same slides: AUC slide" in summary_table(
        result.metrics
    )
    assert "baseline_prob_EGFR_positive" in (tmp_path / "eval" / "predictions_patient.csv").read_text()
