"""The baseline every reviewer asks for first: logistic regression on pooled bag features.

Each bag becomes one vector, the mean (or the maximum) of its instances; scikit-learn's
``StandardScaler`` then ``LogisticRegression`` (L2, ``C=1``, balanced class weights) is fitted on
the training bags. It takes a second or two, and when CLAM scores clearly below it on the same
validation bags, CLAM failed to learn something a linear model finds: a bug to explain, not noise.

The fitted baseline is stored in every checkpoint (``baseline``: plain lists), so
``clam.evaluate`` scores it on an external cohort beside CLAM without refitting.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

POOLS = ("mean", "max")
C_REGULARISATION = 1.0
CLEARLY_WORSE_AUC = 0.1  # CLAM this far below the baseline's validation AUC ...
MIN_SLIDES_TO_WARN = 10  # ... on at least this many validation slides ends the run with a warning


def describe(pool: str) -> str:
    return f"logistic regression on {pool}-pooled features"


def pool_bags(bags: Iterable[Any], pool: str = "mean") -> np.ndarray:
    """(bags, D) float64: the mean or maximum over each bag's instances (arrays or tensors)."""
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r}: use one of {POOLS}")
    rows = []
    for bag in bags:
        x = np.asarray(bag, dtype=np.float64)
        rows.append(x.mean(axis=0) if pool == "mean" else x.max(axis=0))
    return np.stack(rows) if rows else np.zeros((0, 0))


@dataclass(frozen=True)
class PooledBaseline:
    """A fitted pooled logistic regression, as plain arrays: ``probs(X)`` needs no scikit-learn."""

    pool: str
    classes: tuple[int, ...]  # the class indices seen in training, the columns of coef
    n_classes: int
    center: np.ndarray  # (D,) StandardScaler mean_
    scale: np.ndarray  # (D,) StandardScaler scale_
    coef: np.ndarray  # (1, D) for two classes, else (len(classes), D)
    intercept: np.ndarray

    def probs(self, pooled: np.ndarray) -> np.ndarray:
        """(bags, n_classes) class probabilities for pooled features, as sklearn's predict_proba."""
        z = (np.asarray(pooled, dtype=np.float64) - self.center) / self.scale
        logits = z @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:  # binary: sigmoid of one score
            positive = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            seen = np.stack([1.0 - positive, positive], axis=1)
        else:
            logits = logits - logits.max(axis=1, keepdims=True)
            seen = np.exp(logits)
            seen /= seen.sum(axis=1, keepdims=True)
        out = np.zeros((len(z), self.n_classes))
        out[:, list(self.classes)] = seen
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "method": describe(self.pool),
            "pool": self.pool,
            "classes": [int(c) for c in self.classes],
            "n_classes": self.n_classes,
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PooledBaseline:
        return cls(
            str(data["pool"]),
            tuple(int(c) for c in data["classes"]),
            int(data["n_classes"]),
            np.asarray(data["center"], dtype=np.float64),
            np.asarray(data["scale"], dtype=np.float64),
            np.asarray(data["coef"], dtype=np.float64),
            np.asarray(data["intercept"], dtype=np.float64),
        )


def fit_baseline(
    pooled: np.ndarray, labels: Sequence[int], n_classes: int, pool: str = "mean", seed: int = 0
) -> PooledBaseline | None:
    """Fit the baseline; None when the training bags hold fewer than two classes."""
    y = np.asarray(labels, dtype=int)
    if len(np.unique(y)) < 2:
        return None
    scaler = StandardScaler().fit(pooled)
    model = LogisticRegression(C=C_REGULARISATION, class_weight="balanced", max_iter=5000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a separable training set converges slowly; the fit is still usable
        model.fit(scaler.transform(pooled), y)
    return PooledBaseline(
        pool,
        tuple(int(c) for c in model.classes_),
        n_classes,
        scaler.mean_.astype(np.float64),
        scaler.scale_.astype(np.float64),
        model.coef_.astype(np.float64),
        model.intercept_.astype(np.float64),
    )


def comparison(
    clam_auc: float | None, baseline_auc: float | None, n_slides: int, pool: str = "mean"
) -> str | None:
    """The warning to end a run with when CLAM is clearly worse than the baseline, else None."""
    if clam_auc is None or baseline_auc is None or n_slides < MIN_SLIDES_TO_WARN:
        return None
    if clam_auc > baseline_auc - CLEARLY_WORSE_AUC:
        return None
    return (
        f"CLAM's validation AUC ({clam_auc:.3f}) is {baseline_auc - clam_auc:.3f} below the baseline's "
        f"({describe(pool)}: {baseline_auc:.3f}) on the same {n_slides} validation slides. CLAM failed to learn "
        "what a linear model finds in these bags. Check that --feature_norm is standard, try more "
        "--num_epochs or another --learning_rate, and look at the per-epoch losses in config.json "
        "(docs/training.md, 'The baseline')."
    )
