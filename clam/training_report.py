"""What a training run shows a person: ``training.html`` and ``curves.png`` in its run folder, and
the TensorBoard scalars of ``--tensorboard``.

``write_training_report(run_dir)`` reads only files on disk (config.json with its per-epoch
``metrics``, split.csv) and writes both files atomically, so it re-renders any run folder, old or
new, finished or not, without the model or the features. A cross-validation parent folder gets a
page of its folds, each linking to its own page. ``render_training_report`` is what training
calls at its end: a page that cannot be rendered is a warning, never a lost run.

The page is a Jinja2 template (``clam/templates/training.html``, autoescaped: every path,
argument and name is text) with no script and nothing from the network; ``curves.png`` is linked
relatively, so the folder can be moved, zipped or shared whole.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clam.metrics import format_auc
from clam.report_html import write_page
from clam.run_files import (
    BEST_NAME,
    CONFIG_NAME,
    CURVES_PNG,
    SPLIT_FILE,
    SPLITS_FILE,
    SUMMARY_CSV,
    SUMMARY_JSON,
    TENSORBOARD_DIR,
    TRAINING_HTML,
    fold_number,
    read_run_config,
)
from feature_extraction.atomic import atomic_output
from feature_extraction.errors import PipelineError

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
PART_NAMES = {"train": "training", "val": "validation", "test": "held-out test (this fold's patients)"}
# (key in a metrics row without the train_/val_ prefix, panel title)
CURVES = (("loss", "loss"), ("auc", "ROC AUC"), ("balanced_accuracy", "balanced accuracy"))
TABLE_COLUMNS = ("loss", "auc", "balanced_accuracy", "inst_acc")
CURVES_DPI = 100
INSTALL_TENSORBOARD = "pip install tensorboard (or pip install 'clam-egfr[tensorboard]')"


# ---------------------------------------------------------------- the page


def write_training_report(run_dir: Path) -> Path:
    """Write ``training.html`` (and, for a single run, ``curves.png``) in ``run_dir`` from its files;
    returns the page's path. A cross-validation parent folder gets the page of its folds.
    Raises PipelineError when ``run_dir`` is neither kind of run folder."""
    run_dir = Path(run_dir)
    if _fold_folders(run_dir) and (run_dir / SPLITS_FILE).is_file():
        return write_page(run_dir / TRAINING_HTML, TRAINING_HTML, **_folds_context(run_dir))
    config = _read_config(run_dir)
    history = list(config.get("metrics") or [])
    _plot_curves(run_dir / CURVES_PNG, history, config.get("best_epoch"), _baseline(config).get("val_auc"))
    return write_page(run_dir / TRAINING_HTML, TRAINING_HTML, **_run_context(run_dir, config, history))


def render_training_report(run_dir: Path) -> Path | None:
    """``write_training_report`` as training calls it: a failure is logged as a warning (the
    checkpoints are already saved) and gives None. A fold's page refreshes its parent's page of
    folds when there is one (after a --resume of that fold)."""
    try:
        page = write_training_report(run_dir)
        parent = Path(run_dir).parent
        if fold_number(Path(run_dir).name) and (parent / TRAINING_HTML).is_file():
            write_training_report(parent)
        return page
    except Exception as error:  # a page is never worth a run: any failure becomes a warning
        log.warning(
            f"could not write the training report in {run_dir} ({type(error).__name__}: {error}); the "
            f"run and its checkpoints are saved. Re-render it with `python -m clam.report {run_dir}`."
        )
        return None


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_NAME
    try:
        return read_run_config(run_dir)
    except FileNotFoundError:
        raise PipelineError(
            f"{run_dir} holds no {CONFIG_NAME}: it is not a training run folder (or its first epoch has not "
            "been saved yet). Pass a run_YYYYMMDD_HHMMSS folder of `python -m clam.train`."
        ) from None
    except (OSError, ValueError) as error:
        raise PipelineError(
            f"cannot read {path} ({error}); the page is written from it. Restore the file, or pass another run."
        ) from error


def _baseline(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("baseline") or {}


def _run_context(run_dir: Path, config: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    data, cache = config.get("data") or {}, config.get("cache") or {}
    class_names = data.get("class_names") or []
    has_val = any("val_loss" in row for row in history)
    best_epoch = config.get("best_epoch")
    args = config.get("args") or {}
    return {
        "kind": "run",
        "title": run_dir.name,
        "run_dir": str(run_dir),
        "status": config.get("status", "unknown"),
        "epochs": config.get("epoch"),
        "num_epochs": args.get("num_epochs"),
        "best_epoch": best_epoch,
        "best_loss": config.get("best_loss"),
        "monitored": "validation loss" if has_val else "training loss (no validation part)",
        "best_row": next((row for row in history if row.get("epoch") == best_epoch), {}),
        "history": history,
        "sides": ("train", "val") if has_val else ("train",),
        "columns": TABLE_COLUMNS,
        "has_curves": (run_dir / CURVES_PNG).is_file(),
        "args": args,
        "split": _split_summary(run_dir / SPLIT_FILE, class_names),
        "class_names": class_names,
        "cache": cache,
        "random_weights": str(cache.get("weights", "")).lower() == "random",
        "baseline": _baseline(config),
        "model": config.get("model") or {},
        "n_parameters": config.get("n_parameters"),
        "feature_norm": (config.get("feature_norm") or {}).get("description"),
        "imbalance": (config.get("imbalance") or {}).get("description"),
        "versions": config.get("versions") or {},
        "updated": config.get("updated", "unknown"),
        "links": _links(run_dir),
        "parent_page": _parent_page(run_dir),
    }


def _links(run_dir: Path) -> list[str]:
    names = [CONFIG_NAME, SPLIT_FILE, BEST_NAME]
    found = [name for name in names if (run_dir / name).is_file()]
    return found + ([f"{TENSORBOARD_DIR}/"] if (run_dir / TENSORBOARD_DIR).is_dir() else [])


def _parent_page(run_dir: Path) -> str | None:
    """The relative link to the page of folds, for a fold of a cross-validation run."""
    parent = run_dir.parent
    if fold_number(run_dir.name) and (parent / SPLITS_FILE).is_file():
        return f"../{TRAINING_HTML}"
    return None


def _split_summary(path: Path, class_names: list[str]) -> dict[str, Any]:
    """Patients and slides of each class in each part of split.csv (train, val, and a fold's test)."""
    if not path.is_file():
        return {"note": f"no {SPLIT_FILE} in this run folder", "rows": [], "classes": class_names}
    counts: dict[str, dict[str, tuple[set[str], int]]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                label = int(row["label"])
                part, patient = row["set"], row["patient_id"]
            except (KeyError, TypeError, ValueError):
                raise PipelineError(
                    f"{path}, line {line}: expected the columns slide_id, patient_id, label (an integer) and "
                    "set, as clam.train writes them. Restore the run's split.csv."
                ) from None
            name = class_names[label] if 0 <= label < len(class_names) else str(label)
            patients, slides = counts.setdefault(part, {}).get(name, (set(), 0))
            patients.add(patient)
            counts[part][name] = (patients, slides + 1)
    classes = list(class_names) + sorted({n for c in counts.values() for n in c} - set(class_names))
    rows = []
    for part in [p for p in PARTS if p in counts] + sorted(set(counts) - set(PARTS)):
        cells = [counts[part].get(name, (set(), 0)) for name in classes]
        rows.append(
            {
                "part": PART_NAMES.get(part, part),
                "cells": [(len(patients), slides) for patients, slides in cells],
                "total": (len(set().union(*(p for p, _ in cells))), sum(s for _, s in cells)),
            }
        )
    return {"note": None, "rows": rows, "classes": classes}


# ---------------------------------------------------------------- a cross-validation parent


def _fold_folders(parent: Path) -> list[Path]:
    found = [p for p in parent.iterdir() if p.is_dir() and fold_number(p.name)] if parent.is_dir() else []
    return sorted((p for p in found if (p / CONFIG_NAME).is_file()), key=lambda p: fold_number(p.name) or 0)


def _folds_context(parent: Path) -> dict[str, Any]:
    summary = _read_summary(parent / SUMMARY_JSON)
    tested = {row.get("fold"): row for row in summary.get("folds", [])}
    folds = []
    for folder in _fold_folders(parent):
        config = _read_config(folder)
        best = next(
            (r for r in config.get("metrics") or [] if r.get("epoch") == config.get("best_epoch")), {}
        )
        folds.append(
            {
                "name": folder.name,
                "page": f"{folder.name}/{TRAINING_HTML}",
                "curves": f"{folder.name}/{CURVES_PNG}" if (folder / CURVES_PNG).is_file() else None,
                "status": config.get("status", "unknown"),
                "epochs": config.get("epoch"),
                "best_epoch": config.get("best_epoch"),
                "val_auc": best.get("val_auc"),
                "baseline_val_auc": _baseline(config).get("val_auc"),
                "test_auc": tested.get(fold_number(folder.name), {}).get("test_auc"),
                "updated": config.get("updated", "unknown"),
                "version": (config.get("versions") or {}).get("clam", "unknown"),
            }
        )
    pooled = summary.get("pooled_oof") or {}
    return {
        "kind": "folds",
        "title": parent.name,
        "run_dir": str(parent),
        "folds": folds,
        "pooled_auc": format_auc(pooled["auc"], undefined="undefined") if pooled.get("auc") else None,
        "pooled_patients": pooled.get("n_patients"),
        "links": [n for n in (SPLITS_FILE, SUMMARY_CSV, SUMMARY_JSON) if (parent / n).is_file()],
        "updated": max((f["updated"] for f in folds), default="unknown"),
        "version": folds[0]["version"] if folds else "unknown",
    }


def _read_summary(path: Path) -> dict[str, Any]:
    """summary.json of a finished cross-validation, or {} (while its folds still train)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise PipelineError(
            f"cannot read {path} ({error}); restore it, or delete it to leave it out."
        ) from error


# ---------------------------------------------------------------- curves.png


def _plot_curves(
    path: Path, history: list[dict[str, Any]], best_epoch: int | None, baseline_val_auc: float | None
) -> None:
    """Loss, AUC and balanced accuracy per epoch, training and validation; the best epoch marked
    (a dotted line), the baseline's validation AUC as a dashed line. Undefined values are gaps."""
    # matplotlib is imported here, not at the top: clam.train imports this module and must start fast.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = np.array([row.get("epoch", i + 1) for i, row in enumerate(history)], dtype=float)
    fig = Figure(figsize=(13.5, 3.8), layout="constrained")
    for ax, (key, title) in zip(fig.subplots(1, len(CURVES)), CURVES):
        for side, colour, label in (("train", "tab:blue", "training"), ("val", "tab:orange", "validation")):
            values = np.array([_number(row.get(f"{side}_{key}")) for row in history], dtype=float)
            if len(values) and not np.isnan(values).all():
                ax.plot(epochs, values, marker="o", markersize=3, color=colour, label=label)
        if key == "auc" and not math.isnan(_number(baseline_val_auc)):
            ax.axhline(baseline_val_auc, color="tab:green", linestyle="--", label="baseline (validation)")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key != "loss":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an old run without this figure draws nothing to label
            ax.legend(fontsize="small")
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=CURVES_DPI)


def _number(value: Any) -> float:
    """A plotted value: a finite number, else NaN (a gap in the line)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.nan
    return float(value)


# ---------------------------------------------------------------- TensorBoard


class ScalarLog:
    """The scalars of each epoch, for TensorBoard (``--tensorboard``); without a writer, nothing."""

    def __init__(self, writer=None) -> None:
        self._writer = writer

    def epoch(self, row: dict[str, Any], learning_rate: float | None = None) -> None:
        """Every number of a metrics row as ``train/<name>`` or ``val/<name>`` (loss, auc,
        balanced_accuracy, ...) at step ``epoch``, and the learning rate."""
        if self._writer is None:
            return
        step = int(row["epoch"])
        for key, value in row.items():
            side, _, name = key.partition("_")
            if side in ("train", "val") and name and not math.isnan(_number(value)):
                self._writer.add_scalar(f"{side}/{name}", float(value), step)
        if learning_rate is not None:
            self._writer.add_scalar("learning_rate", float(learning_rate), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def require_tensorboard() -> None:
    """Raise PipelineError, saying what to install, unless TensorBoard logging is possible."""
    try:
        # Imported here: tensorboard is an optional dependency, only --tensorboard needs it.
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as error:
        raise PipelineError(
            f"--tensorboard needs the tensorboard package, which cannot be imported here ({error}). "
            f"Install it: {INSTALL_TENSORBOARD}; or run without --tensorboard (training.html and "
            "curves.png are written in the run folder either way)."
        ) from None


@contextlib.contextmanager
def scalar_log(run_dir: Path, enabled: bool) -> Iterator[ScalarLog]:
    """A ScalarLog writing under ``run_dir/tensorboard`` when ``enabled`` (a resumed run adds its
    epochs there, in a new event file), else one that writes nothing."""
    if not enabled:
        yield ScalarLog()
        return
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter  # optional dependency, checked just above

    scalars = ScalarLog(SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR)))
    try:
        yield scalars
    finally:
        scalars.close()
