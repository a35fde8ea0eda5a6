"""Classification metrics through scikit-learn, and bootstrap confidence intervals for the AUC.

Conventions: ``y_true`` holds integer labels in ``range(n_classes)``; ``probs`` is (n, n_classes)
with rows summing to 1. For two classes, class 1 is the positive class (EGFR_positive):
sensitivity is its recall, specificity the recall of class 0, F1 its F1. For more classes,
the top-level values are macro averages over classes (one-vs-rest) and ``per_class`` holds
each class's own. A value that is undefined on the data (e.g. an AUC with one class present)
is ``None`` with the reason under ``undefined``; nothing here raises on such data.

``format_number`` and ``format_auc`` are the one way numbers and AUCs with their CI are written
in the lines the commands print.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    recall_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.metrics import (
    auc as auc_from_curve,
)

from feature_extraction.layout import CLASS_NAMES

DEFAULT_N_BOOTSTRAP = 1000
DEFAULT_CONFIDENCE = 0.95


def format_number(value: float | None, missing: str = "-") -> str:
    """Three decimals; ``missing`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return f"{value:.3f}"


def format_auc(auc: dict[str, Any], brackets: bool = False, undefined: str = "undefined") -> str:
    """An AUC (``AucEstimate.to_dict()``) with its CI: ``0.812 (95% CI 0.701-0.905)``, or with
    ``brackets`` ``0.812 [0.701, 0.905]``; without a CI the AUC alone; ``undefined`` when there is none."""
    if auc["auc"] is None:
        return undefined
    if auc["ci_low"] is None:
        return f"{auc['auc']:.3f}"
    if brackets:
        return f"{auc['auc']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]"
    return f"{auc['auc']:.3f} (95% CI {auc['ci_low']:.3f}-{auc['ci_high']:.3f})"


def default_class_names(n_classes: int) -> list[str]:
    if n_classes == 2:
        return list(CLASS_NAMES)
    return [f"class_{c}" for c in range(n_classes)]


def stratified_bootstrap_indices(y_true: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n) row indices, each row resampled with replacement *within* each class.

    Stratified like pROC's default: every resample keeps the class counts of the data, so an
    AUC is defined on every resample and no resample is thrown away."""
    y_true = np.asarray(y_true)
    rng = np.random.default_rng(seed)
    samples = np.empty((n_bootstrap, len(y_true)), dtype=np.int64)
    start = 0
    for label in np.unique(y_true):
        members = np.flatnonzero(y_true == label)
        samples[:, start : start + len(members)] = rng.choice(members, size=(n_bootstrap, len(members)))
        start += len(members)
    return samples


@dataclass(frozen=True)
class AucEstimate:
    """ROC AUC with a percentile bootstrap confidence interval; ``auc`` is None when undefined."""

    auc: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    n_bootstrap: int
    seed: int
    method: str
    per_class: dict[str, float | None] = field(default_factory=dict)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def roc_auc(y_true: Sequence[int], probs: np.ndarray, n_classes: int) -> tuple[float | None, str | None]:
    """ROC AUC (binary: of class 1's probability; more classes: macro one-vs-rest), or (None, reason)."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    present = set(np.unique(y_true).tolist())
    if len(present) < 2:
        return None, f"{_presence(present, n_classes)}, so the ROC AUC is undefined"
    if n_classes == 2:
        return float(roc_auc_score(y_true, probs[:, 1])), None
    missing = sorted(set(range(n_classes)) - present)
    if missing:
        names = default_class_names(n_classes)
        return None, (
            f"classes {[names[c] for c in missing]} are absent, so the macro one-vs-rest AUC over "
            f"{n_classes} classes is undefined; see per_class for the classes present"
        )
    return float(
        roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(n_classes)))
    ), None


def auc_with_ci(
    y_true: Sequence[int],
    probs: np.ndarray,
    n_classes: int,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    class_names: Sequence[str] | None = None,
) -> AucEstimate:
    """AUC and its percentile CI over ``n_bootstrap`` seeded, class-stratified resamples."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    names = list(class_names or default_class_names(n_classes))
    auc, reason = roc_auc(y_true, probs, n_classes)
    per_class = _per_class_auc(y_true, probs, n_classes, names) if n_classes > 2 else {}
    low = high = None
    if auc is not None and n_bootstrap > 0:
        aucs = np.array(
            [
                _resample_auc(y_true[rows], probs[rows], n_classes)
                for rows in stratified_bootstrap_indices(y_true, n_bootstrap, seed)
            ]
        )
        alpha = (1.0 - confidence) / 2.0
        low, high = (float(v) for v in np.quantile(aucs, [alpha, 1.0 - alpha]))
    method = "percentile bootstrap, class-stratified resamples" + (
        "" if n_classes == 2 else "; AUC = macro average of one-vs-rest AUCs"
    )
    return AucEstimate(auc, low, high, confidence, n_bootstrap, seed, method, per_class, reason)


@dataclass(frozen=True)
class RocBand:
    """One ROC curve (``positive`` vs rest) and its pointwise bootstrap band on an FPR grid."""

    positive: int
    fpr: np.ndarray
    tpr: np.ndarray
    grid: np.ndarray
    tpr_low: np.ndarray
    tpr_high: np.ndarray
    auc: float


def roc_band(
    y_true: Sequence[int],
    scores: np.ndarray,
    positive: int,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    grid_points: int = 101,
) -> RocBand | None:
    """ROC of ``scores`` for ``positive`` vs the rest with a bootstrap band; None if one side is empty."""
    is_positive = (np.asarray(y_true) == positive).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if is_positive.min() == is_positive.max():
        return None
    fpr, tpr, _ = roc_curve(is_positive, scores)
    grid = np.linspace(0.0, 1.0, grid_points)
    curves = []
    for rows in stratified_bootstrap_indices(is_positive, n_bootstrap, seed):
        boot_fpr, boot_tpr, _ = roc_curve(is_positive[rows], scores[rows])
        curves.append(np.interp(grid, boot_fpr, boot_tpr))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.array(curves), [alpha, 1.0 - alpha], axis=0) if curves else (grid, grid)
    return RocBand(positive, fpr, tpr, grid, low, high, float(roc_auc_score(is_positive, scores)))


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], n_classes: int, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, sensitivity, specificity, F1 and the confusion matrix (JSON-ready)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    names = list(class_names or default_class_names(n_classes))
    labels = list(range(n_classes))
    undefined: dict[str, str] = {}
    with warnings.catch_warnings():
        # Undefined values are detected below and reported with a reason instead.
        warnings.simplefilter("ignore", category=UndefinedMetricWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
        f1 = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
        balanced = balanced_accuracy_score(y_true, y_pred)
    # Specificity of class c = recall of "not c" = TN / (TN + FP), from sklearn's per-class matrices.
    per_class_cm = multilabel_confusion_matrix(y_true, y_pred, labels=labels)
    negatives = per_class_cm[:, 0, 0] + per_class_cm[:, 0, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        specificity = np.where(negatives > 0, per_class_cm[:, 0, 0] / np.maximum(negatives, 1), np.nan)
    present = np.unique(y_true)
    if len(present) < 2:
        undefined["balanced_accuracy"] = (
            f"{_presence(set(present.tolist()), n_classes)}: the value is the recall of that class alone"
        )
    if n_classes == 2:
        sensitivity, spec, f1_value = recall[1], recall[0], f1[1]
        if np.isnan(sensitivity):
            undefined["sensitivity"] = (
                f"no {names[1]} cases, so sensitivity (recall of {names[1]}) is undefined"
            )
        if np.isnan(spec):
            undefined["specificity"] = (
                f"no {names[0]} cases, so specificity (recall of {names[0]}) is undefined"
            )
        if np.isnan(f1_value):
            undefined["f1"] = f"no {names[1]} cases and none predicted, so F1 of {names[1]} is undefined"
    else:
        sensitivity, spec, f1_value = (_nanmean(v) for v in (recall, specificity, f1))
        absent = [names[c] for c in labels if np.isnan(recall[c])]
        if absent:
            undefined["sensitivity"] = (
                f"classes {absent} are absent; macro averages are over the other classes"
            )
    return {
        "n": int(len(y_true)),
        "n_per_class": {names[c]: int((y_true == c).sum()) for c in labels},
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else None,
        "balanced_accuracy": _none_if_nan(balanced),
        "sensitivity": _none_if_nan(sensitivity),
        "specificity": _none_if_nan(spec),
        "f1": _none_if_nan(f1_value),
        "per_class": {
            names[c]: {
                "sensitivity": _none_if_nan(recall[c]),
                "specificity": _none_if_nan(specificity[c]),
                "f1": _none_if_nan(f1[c]),
            }
            for c in labels
        },
        "confusion_matrix": {
            "labels": names,
            "rows": "true class",
            "columns": "predicted class",
            "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        },
        "undefined": undefined,
    }


def summarize(
    y_true: Sequence[int],
    probs: np.ndarray,
    n_classes: int,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every metric of ``classification_metrics`` on argmax predictions, plus ``auc`` with its CI."""
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    result = classification_metrics(y_true, y_pred, n_classes, class_names)
    estimate = auc_with_ci(y_true, probs, n_classes, n_bootstrap, seed, class_names=class_names)
    result["auc"] = estimate.to_dict()
    if estimate.reason:
        result["undefined"]["auc"] = estimate.reason
    return result


def _resample_auc(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    # roc_curve + trapezoid is what roc_auc_score computes (binary; macro OvR is the mean of
    # the binary AUCs), without its input validation, which dominates the cost of 1,000 calls.
    columns = [1] if n_classes == 2 else range(n_classes)
    return float(np.mean([auc_from_curve(*roc_curve(y_true == c, probs[:, c])[:2]) for c in columns]))


def _per_class_auc(
    y_true: np.ndarray, probs: np.ndarray, n_classes: int, names: list[str]
) -> dict[str, float | None]:
    out = {}
    for c in range(n_classes):
        is_c = y_true == c
        out[names[c]] = float(roc_auc_score(is_c, probs[:, c])) if 0 < is_c.sum() < len(y_true) else None
    return out


def _presence(present: set, n_classes: int) -> str:
    names = default_class_names(n_classes)
    if not present:
        return "no cases"
    only = ", ".join(names[c] if 0 <= c < n_classes else str(c) for c in sorted(present))
    return f"only one class present ({only})"


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _none_if_nan(value) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


def epoch_metrics(y_true: Sequence[int], probs: np.ndarray, n_classes: int) -> dict[str, Any]:
    """The per-epoch numbers of training: ``auc``, ``balanced_accuracy`` and ``accuracy`` of argmax
    predictions; an undefined value is None with its reason in ``notes`` (nothing raises)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(y_true) == 0:
        return {"auc": None, "balanced_accuracy": None, "accuracy": None, "notes": {"all": "no cases"}}
    auc, reason = roc_auc(y_true, probs, n_classes)
    y_pred = probs.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # "y_pred contains classes not in y_true"
        balanced = balanced_accuracy_score(y_true, y_pred)
    return {
        "auc": auc,
        "balanced_accuracy": _none_if_nan(balanced),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "notes": {"auc": reason} if reason else {},
    }
