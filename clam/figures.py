"""The evaluation's figures: ROC curves with their bootstrap bands, and confusion matrices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from clam.metrics import format_auc, roc_band
from clam.run_files import probability_column
from feature_extraction.atomic import atomic_output

FIGURE_DPI = 110


def plot_roc(
    path: Path, levels: dict[str, list[dict]], metrics: dict[str, Any], n_bootstrap: int, seed: int
) -> None:
    """One panel per level: the ROC of the positive class (or one-vs-rest per class) with its
    pointwise 95% bootstrap band; the AUC and its CI (from ``metrics``) are in the legend
    (for more than two classes, the macro AUC and its CI are in the panel's title)."""
    class_names = metrics["class_names"]
    positives = [1] if len(class_names) == 2 else list(range(len(class_names)))
    fig = Figure(figsize=(5.4 * len(levels), 6.0 if len(positives) == 1 else 6.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(levels)))
    band_alpha = 0.2 if len(positives) == 1 else 0.1  # overlapping bands of several classes stay readable
    colours = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown"]
    for ax, (title, rows) in zip(axes, levels.items()):
        y_true = np.array([int(r["label"]) for r in rows])
        auc = metrics["per_" + title.split()[-1]]["auc"]
        drawn = 0
        for colour_index, positive in enumerate(positives):
            scores = np.array([float(r[probability_column(class_names[positive])]) for r in rows])
            band = roc_band(y_true, scores, positive, n_bootstrap, seed)
            if band is None:
                continue
            colour = colours[colour_index % len(colours)]
            label = (
                f"AUC {format_auc(auc)}"
                if len(positives) == 1
                else f"{class_names[positive]} vs rest: AUC {band.auc:.3f}"
            )
            ax.fill_between(
                band.grid, band.tpr_low, band.tpr_high, color=colour, alpha=band_alpha, linewidth=0
            )
            ax.step(band.fpr, band.tpr, where="post", color=colour, linewidth=2, label=label)
            drawn += 1
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
        if drawn == 0:
            ax.text(
                0.5, 0.55, "ROC undefined:\nonly one class present", ha="center", va="center", fontsize=12
            )
        else:
            shade = colours[0] if len(positives) == 1 else "0.5"
            ax.plot([], [], color=shade, alpha=0.3, linewidth=8, label="95% bootstrap band")
        counts = ", ".join(f"{(y_true == c).sum()} {class_names[c]}" for c in range(len(class_names)))
        macro = "" if len(positives) == 1 else f"\nmacro one-vs-rest AUC {format_auc(auc)}"
        ax.set_title(f"{title} (n={len(rows)}: {counts}){macro}", fontsize=10)
        positive_name = class_names[1] if len(class_names) == 2 else "each class"
        ax.set_xlabel("1 - specificity (false positive rate)")
        ax.set_ylabel(f"sensitivity (true positive rate, {positive_name})")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8.5)
    fig.suptitle("ROC curves with 95% bootstrap confidence bands", fontsize=11)
    _save_figure(fig, path)


def plot_confusion(path: Path, metrics: dict[str, Any]) -> None:
    """sklearn's ConfusionMatrixDisplay per level (counts, rows = true class)."""
    levels = {"per slide": metrics["per_slide"], "per patient": metrics["per_patient"]}
    names = metrics["class_names"]
    side = max(4.4, 1.3 * len(names) + 2.2)
    fig = Figure(figsize=(side * len(levels), side + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(levels)))
    for ax, (title, summary) in zip(axes, levels.items()):
        matrix = np.array(summary["confusion_matrix"]["matrix"])
        ConfusionMatrixDisplay(matrix, display_labels=names).plot(
            ax=ax, cmap="Blues", colorbar=False, values_format="d", text_kw={"fontsize": 14}
        )
        accuracy = summary["accuracy"]
        ax.set_title(
            f"{title} (n={summary['n']}, accuracy {accuracy:.3f})"
            if accuracy is not None
            else f"{title} (n={summary['n']})",
            fontsize=10,
        )
        if len(names) > 2 or max(len(n) for n in names) > 12:
            ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle("Confusion matrices (rows: true class, columns: predicted class)", fontsize=11)
    _save_figure(fig, path)


def _save_figure(fig: Figure, path: Path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
