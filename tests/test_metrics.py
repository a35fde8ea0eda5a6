"""clam.metrics: every number equals scikit-learn's, the bootstrap CI is seeded and contains the
AUC, and undefined values (one class present, absent classes) are None with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    recall_score,
    roc_auc_score,
)

from clam.metrics import (
    DEFAULT_N_BOOTSTRAP,
    auc_with_ci,
    classification_metrics,
    roc_auc,
    roc_band,
    stratified_bootstrap_indices,
    summarize,
)


def binary_data(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return y, np.stack([1 - score, score], axis=1)


def test_binary_summary_equals_sklearn():
    y, probs = binary_data()
    pred = probs.argmax(axis=1)
    result = summarize(y, probs, 2, n_bootstrap=200)
    assert result["n"] == len(y)
    assert result["n_per_class"] == {
        "EGFR_negative": int((y == 0).sum()),
        "EGFR_positive": int((y == 1).sum()),
    }
    assert result["auc"]["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert result["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert result["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert result["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert result["f1"] == pytest.approx(f1_score(y, pred, pos_label=1))
    assert result["confusion_matrix"]["matrix"] == confusion_matrix(y, pred).tolist()
    assert result["undefined"] == {}


def test_default_bootstrap_has_1000_seeded_resamples_and_contains_the_auc():
    y, probs = binary_data(seed=1)
    first = auc_with_ci(y, probs, 2, seed=7)
    assert first.n_bootstrap == DEFAULT_N_BOOTSTRAP >= 1000
    assert first.ci_low < first.auc < first.ci_high
    assert auc_with_ci(y, probs, 2, seed=7) == first  # same seed, same interval
    other = auc_with_ci(y, probs, 2, seed=8)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)
    assert other.auc == first.auc


def test_the_interval_matches_a_plain_sklearn_bootstrap():
    # The fast resample AUC must be exactly roc_auc_score on the same resamples.
    y, probs = binary_data(n=40, seed=2)
    estimate = auc_with_ci(y, probs, 2, n_bootstrap=300, seed=3)
    aucs = [roc_auc_score(y[rows], probs[rows, 1]) for rows in stratified_bootstrap_indices(y, 300, 3)]
    assert (estimate.ci_low, estimate.ci_high) == pytest.approx(tuple(np.quantile(aucs, [0.025, 0.975])))


def test_stratified_resamples_keep_the_class_counts():
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    samples = stratified_bootstrap_indices(y, 50, seed=0)
    assert samples.shape == (50, len(y))
    for rows in samples:
        assert np.bincount(y[rows], minlength=3).tolist() == [7, 3, 5]
    assert len({tuple(rows) for rows in samples}) > 1


def test_one_class_present_is_reported_not_raised():
    y = np.ones(6, dtype=int)
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.3, 0.7], [0.45, 0.55], [0.9, 0.1]])
    result = summarize(y, probs, 2)
    assert (
        result["auc"]["auc"] is None and result["auc"]["ci_low"] is None and result["auc"]["ci_high"] is None
    )
    assert "only one class present (EGFR_positive)" in result["auc"]["reason"]
    assert result["specificity"] is None and "specificity" in result["undefined"]
    assert result["sensitivity"] == pytest.approx(4 / 6)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["confusion_matrix"]["matrix"] == [[0, 0], [2, 4]]
    assert roc_band(y, probs[:, 1], positive=1) is None


def test_multiclass_auc_is_the_macro_one_vs_rest_auc():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 45)
    probs = rng.dirichlet([1, 1, 1], 45) + np.eye(3)[y] * 0.5
    probs /= probs.sum(axis=1, keepdims=True)
    result = summarize(y, probs, 3, n_bootstrap=200)
    assert result["auc"]["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert result["auc"]["ci_low"] <= result["auc"]["auc"] <= result["auc"]["ci_high"]
    for c in range(3):
        assert result["auc"]["per_class"][f"class_{c}"] == pytest.approx(roc_auc_score(y == c, probs[:, c]))
    pred = probs.argmax(axis=1)
    assert result["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert result["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    specificity = [recall_score(y != c, pred != c) for c in range(3)]
    assert result["specificity"] == pytest.approx(np.mean(specificity))
    assert np.array(result["confusion_matrix"]["matrix"]).shape == (3, 3)


def test_an_absent_class_makes_the_macro_auc_undefined_but_keeps_the_others():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 30)  # class 2 never occurs
    probs = rng.dirichlet([1, 1, 1], 30)
    auc, reason = roc_auc(y, probs, 3)
    assert auc is None and "class_2" in reason
    estimate = auc_with_ci(y, probs, 3, n_bootstrap=50)
    assert estimate.per_class["class_2"] is None and estimate.per_class["class_0"] is not None
    metrics = classification_metrics(y, probs.argmax(axis=1), 3)
    assert metrics["per_class"]["class_2"]["sensitivity"] is None
    assert "sensitivity" in metrics["undefined"]


def test_roc_band_encloses_the_curve_on_average():
    y, probs = binary_data(n=80, seed=6)
    band = roc_band(y, probs[:, 1], positive=1, n_bootstrap=300, seed=0)
    assert band.auc == pytest.approx(roc_auc_score(y, probs[:, 1]))
    assert (band.tpr_low <= band.tpr_high).all()
    assert band.tpr_low[0] >= 0 and band.tpr_high[-1] == pytest.approx(1.0)
    curve = np.interp(band.grid, band.fpr, band.tpr)
    inside = (band.tpr_low - 1e-9 <= curve) & (curve <= band.tpr_high + 1e-9)
    assert inside.mean() > 0.9
