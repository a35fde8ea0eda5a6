"""Patient-level K-fold cross-validation (``python -m clam.train --folds K``) and the evaluation of
its fold models and their ensemble (``python -m clam.evaluate --checkpoint PARENT_RUN``).

Every fold k has three patient-disjoint parts: **test** (fold k's patients, never seen while
training or selecting the model), **validation** (a label-stratified ``--val_fraction`` of the
other folds' patients: it picks the epoch and drives early stopping) and **train** (the rest).
Every reported figure comes from the test parts; the validation AUC is shown beside them only to
make its optimism visible.

Layout of a cross-validation run (the parent run folder)::

    run_YYYYMMDD_HHMMSS/
        splits.csv              slide_id, patient_id, label, fold (the fold that tests the patient),
                                fold_1..fold_K (train / val / test in each fold); reusable with --splits
        fold_1/ ... fold_K/     each a normal training run (config.json, checkpoint_epoch_N.pt, best_model.pt,
                                split.csv with its three parts)
        oof_predictions.csv     one row per patient: from its own fold's selected model (best validation loss,
                                or the last epoch without validation), CLAM's and the baseline's probabilities
        oof_predictions_slide.csv   the same per slide
        summary.csv             per fold: test AUC, balanced accuracy, loss, the baseline's test AUC, the
                                validation AUC that selected the epoch; mean; std
        summary.json            the same, plus the pooled held-out AUC (CLAM and baseline) with bootstrap CIs
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clam.checkpoints import saved_baseline
from clam.eval_config import EvaluateConfig
from clam.folds import fold_splits, make_folds, read_folds, write_folds
from clam.inference import (
    aggregate_patients,
    baseline_values,
    ensemble_rows,
    load_model,
    per_level_metrics,
    predict,
    probability_values,
    write_table,
)
from clam.metrics import DEFAULT_N_BOOTSTRAP, auc_with_ci, epoch_metrics, format_auc, format_number, roc_auc
from clam.run_files import (
    BEST_NAME,
    CONFUSION_PNG,
    FOLD_PREFIX,
    METRICS_JSON,
    OOF_PATIENTS,
    OOF_SLIDES,
    PATIENT_PREDICTIONS,
    PREDICTIONS,
    ROC_PNG,
    SPLITS_FILE,
    SUMMARY_CSV,
    SUMMARY_JSON,
    baseline_column,
    default_runs_dir,
    fold_dirs,
    fold_name,
    make_output_dir,
    make_run_dir,
    probability_column,
    read_run_config,
    selected_checkpoint,
    write_json,
)
from clam.splits import TrainValSplit
from clam.train_config import TrainConfig
from clam.training import load_bags, train
from clam.training_report import render_training_report
from feature_extraction.errors import PipelineError

if TYPE_CHECKING:
    from clam.evaluation import EvaluationResult

log = logging.getLogger(__name__)
METRICS = ("test_auc", "test_balanced_accuracy", "test_loss", "baseline_test_auc", "val_auc")


# ---------------------------------------------------------------- training


def cross_validate(config: TrainConfig, n_bootstrap: int = DEFAULT_N_BOOTSTRAP) -> Path:
    """Train one run per fold in a new parent run folder and summarise them on the folds' test parts
    (module docstring).

    Folds come from ``config.splits`` if given, else ``config.folds`` seeded by ``config.seed``.
    Returns the parent run folder."""
    if config.resume:
        raise PipelineError(
            "--resume continues one fold's run: pass that fold's checkpoint without --folds/--splits."
        )
    bags = load_bags(config)
    folds, splits = _folds(config, bags.records)
    n_folds = max(folds.values())
    parent = make_run_dir(config.output_dir or default_runs_dir())
    write_folds(parent / SPLITS_FILE, bags.records, folds, splits)
    log.info(
        f"cross-validation: {n_folds} folds of {len(folds)} patients -> {parent}\n"
        "each fold: test = its own patients (never seen in training or model selection); "
        + (
            "validation = a share of the other folds' patients (picks the epoch); train = the rest"
            if any(s.val for s in splits.values())
            else "no validation part: the last epoch is used; train = the rest"
        )
    )
    fold_config = replace(config, folds=n_folds, splits=str(parent / SPLITS_FILE))

    rows, slides = [], []
    for fold in range(1, n_folds + 1):
        log.info(f"---- fold {fold}/{n_folds}")
        fold_dir = train(fold_config, split=splits[fold], run_dir=parent / fold_name(fold))
        checkpoint = selected_checkpoint(fold_dir)
        fold_slides, names = _fold_predictions(checkpoint, fold, splits[fold], config.device)
        rows.append(_fold_row(fold, fold_dir, checkpoint, splits[fold], fold_slides, names, config.n_classes))
        slides += fold_slides
    patients = [{"fold": folds[row["patient_id"]], **row} for row in aggregate_patients(slides, names)]
    _write_rows(parent / OOF_SLIDES, slides)
    _write_rows(parent / OOF_PATIENTS, patients)
    summary = summarize_folds(rows, patients, names, config.n_classes, n_bootstrap, config.seed)
    summary.update(
        {
            "run_dir": str(parent),
            "n_folds": n_folds,
            "seed": config.seed,
            "splits_file": SPLITS_FILE,
            "splits_from": config.splits,
            "val_fraction": config.val_fraction,
        }
    )
    write_json(parent / SUMMARY_JSON, summary)
    _write_rows(parent / SUMMARY_CSV, rows + [{"fold": stat, **summary[stat]} for stat in ("mean", "std")])
    page = render_training_report(parent)  # links each fold's own page
    log.info(summary_text(summary) + (f"\ntraining report: {page}" if page else ""))
    return parent


def _folds(config: TrainConfig, records) -> tuple[dict[str, int], dict[int, TrainValSplit]]:
    """(patient_id -> test fold, the parts of every fold): from --splits, else drawn for --folds."""
    splits = None
    if config.splits:
        folds, splits = read_folds(Path(config.splits), records)
        n_folds = max(folds.values())
        if config.folds and config.folds != n_folds:
            raise PipelineError(
                f"--folds {config.folds} but {config.splits} has {n_folds} folds; drop --folds."
            )
        if splits is None:
            log.info(
                f"{config.splits} lists test folds only: each fold's validation part is drawn from the "
                f"other folds' patients (--val_fraction {config.val_fraction}, --seed {config.seed})"
            )
    else:
        folds = make_folds(records, config.folds, config.seed)
    if splits is None:
        splits = fold_splits(records, folds, config.val_fraction, config.seed)
    return folds, splits


def _fold_predictions(
    checkpoint: Path, fold: int, split: TrainValSplit, device: str
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The rows of oof_predictions_slide.csv of one fold's test part, from its selected model: CLAM's
    probabilities and the baseline's (empty: no baseline for this fold, its training bags held one class)."""
    loaded = load_model(checkpoint, device)
    names = loaded.class_names
    baseline = saved_baseline(loaded.checkpoint)
    rows = [
        {
            "slide_id": p.record.slide_id,
            "patient_id": p.record.patient_id,
            "fold": fold,
            "label": p.record.label,
            **probability_values(names, p.probs),
            **baseline_values(names, baseline, p),
        }
        for p in predict(loaded, split.test, 0, False)
    ]
    return rows, names


def _fold_row(
    fold: int,
    fold_dir: Path,
    checkpoint: Path,
    split: TrainValSplit,
    slides: Sequence[dict[str, Any]],
    names: Sequence[str],
    n_classes: int,
) -> dict[str, Any]:
    """One fold: the test part's slide-level numbers from the selected model, the validation AUC
    that selected it (optimistic: the same patients chose the epoch), and the baseline's test AUC."""
    info = read_run_config(fold_dir)
    epoch = info["best_epoch"] if checkpoint.name == BEST_NAME else info["epoch"]
    selected = next((row for row in info["metrics"] if row["epoch"] == epoch), {})
    y = np.array([int(s["label"]) for s in slides], dtype=np.int64)
    probs = np.array([[float(s[probability_column(n)]) for n in names] for s in slides]).reshape(
        -1, len(names)
    )
    test = epoch_metrics(y, probs, n_classes)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).mean()) if len(y) else None
    baseline_auc = None
    base_columns = [baseline_column(n) for n in names]
    if slides and all(s[c] is not None for s in slides for c in base_columns):
        baseline_auc = roc_auc(y, np.array([[s[c] for c in base_columns] for s in slides]), n_classes)[0]
    notes = dict(test.get("notes") or {})
    return {
        "fold": fold,
        "n_train_patients": len({r.patient_id for r in split.train}),
        "n_val_patients": len({r.patient_id for r in split.val}),
        "n_test_patients": len({r.patient_id for r in split.test}),
        "n_test_bags": len(split.test),
        "selected_epoch": epoch,
        "selection": "lowest validation loss" if split.val else "last epoch (no validation part)",
        "test_auc": test["auc"],
        "test_balanced_accuracy": test["balanced_accuracy"],
        "test_loss": loss,
        "baseline_test_auc": baseline_auc,
        "val_auc": selected.get("val_auc"),
        "note": "; ".join(f"test: {v}" for v in notes.values()),
    }


def summarize_folds(
    rows: Sequence[dict[str, Any]],
    patients: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    n_classes: int,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1) of each metric over the folds where it is defined,
    and the pooled patient-level AUC over every fold's test part, CLAM's and the baseline's, with
    their bootstrap CIs."""
    mean, std = {}, {}
    for metric in METRICS:
        values = np.array(
            [r[metric] for r in rows if r[metric] is not None and math.isfinite(r[metric])], dtype=float
        )
        mean[metric] = float(values.mean()) if len(values) else None
        std[metric] = float(values.std(ddof=1)) if len(values) > 1 else None
    y_true = [int(p["label"]) for p in patients]

    def pooled(column) -> dict[str, Any] | None:
        columns = [column(n) for n in class_names]
        if not patients or any(p.get(c) is None for p in patients for c in columns):
            return None  # the baseline was not fitted in some fold (its training bags held one class)
        probs = np.array([[float(p[c]) for c in columns] for p in patients])
        return auc_with_ci(y_true, probs, n_classes, n_bootstrap, seed, class_names=class_names).to_dict()

    return {
        "folds": list(rows),
        "mean": mean,
        "std": std,
        "std_note": "sample standard deviation (ddof 1) over folds with a value",
        "pooled_oof": {
            "level": "patient (mean of its slides' probabilities)",
            "n_patients": len(patients),
            "patients": "every patient once, from the test part of its own fold: never seen by "
            "the model that scored it, in training or in model selection",
            "auc": pooled(probability_column),
            "baseline_auc": pooled(baseline_column),
        },
        "validation_selected": {
            "auc_mean": mean.get("val_auc"),
            "note": "mean over folds of the validation AUC at the selected epoch: the same patients chose "
            "the epoch, so it is optimistic; report the pooled test AUC",
        },
        "class_names": list(class_names),
    }


def summary_text(summary: dict[str, Any]) -> str:
    fmt = format_number
    lines = [
        "per fold, on its test part (patients never used to train or select that fold's model):",
        f"{'fold':<6}{'epoch':>6}{'test AUC':>10}{'bal.acc':>9}{'loss':>8}{'baseline':>10}{'val AUC':>9}  note",
    ]
    for r in summary["folds"]:
        lines.append(
            f"{r['fold']:<6}{r['selected_epoch']!s:>6}{fmt(r['test_auc']):>10}"
            f"{fmt(r['test_balanced_accuracy']):>9}{fmt(r['test_loss']):>8}{fmt(r['baseline_test_auc']):>10}"
            f"{fmt(r['val_auc']):>9}  {r['note']}"
        )
    for stat in ("mean", "std"):
        s = summary[stat]
        lines.append(
            f"{stat:<12}{fmt(s['test_auc']):>10}{fmt(s['test_balanced_accuracy']):>9}{fmt(s['test_loss']):>8}"
            f"{fmt(s['baseline_test_auc']):>10}{fmt(s['val_auc']):>9}"
        )
    pooled = summary["pooled_oof"]

    def auc_line(auc: dict[str, Any] | None, what: str) -> str:
        if auc is None:
            return f"{what}: not available"
        return f"{what}: {format_auc(auc, undefined='-')}" + (f" ({auc['reason']})" if auc["reason"] else "")

    lines.append(
        auc_line(
            pooled["auc"],
            f"pooled held-out AUC over {pooled['n_patients']} patients (each from its "
            "own fold's test part), CLAM",
        )
    )
    lines.append(
        auc_line(pooled.get("baseline_auc"), "the same patients, mean-pool logistic regression baseline")
    )
    if summary["mean"].get("val_auc") is not None:
        lines.append(
            f"validation AUC at the selected epochs (optimistic: those patients chose the epoch): "
            f"mean {fmt(summary['mean']['val_auc'])}"
        )
    elif all(r["val_auc"] is None for r in summary["folds"]):
        lines.append("no validation part (--val_fraction 0): each fold's last epoch was used")
    return "\n".join(lines)


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_table(path, [{k: ("" if v is None else v) for k, v in row.items()} for row in rows])


# ---------------------------------------------------------------- evaluation of the fold models


def fold_checkpoints(parent: Path) -> list[Path]:
    """Each fold's selected model (``clam.run_files.selected_checkpoint``), in fold order."""
    found = fold_dirs(parent)
    if not found:
        raise PipelineError(f"{parent} has no {FOLD_PREFIX}K/{BEST_NAME}; is it a --folds run?")
    return [selected_checkpoint(fold_dir) for fold_dir in found]


def evaluate_folds(config: EvaluateConfig) -> EvaluationResult:
    """Evaluate each fold's selected model of the cross-validation run ``config.checkpoint`` (a
    subfolder per fold) and their ensemble, the mean probability of the fold models
    (predictions.csv, predictions_patient.csv, metrics.json, roc.png, confusion_matrix.png and
    report.html at the top)."""
    # Imported here, not at the top: evaluation, its figures and its page need matplotlib and jinja2,
    # which clam.train (this module's other user) never needs.
    from clam.eval_report import write_eval_report
    from clam.evaluation import EvaluationResult, evaluate
    from clam.figures import plot_confusion, plot_roc

    parent = Path(config.checkpoint)
    if config.output_dir is not None:
        output_dir = Path(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    else:
        output_dir = make_output_dir(parent, config.output_prefix)
    results = {
        checkpoint.parent.name: evaluate(
            replace(config, checkpoint=checkpoint, output_dir=output_dir / checkpoint.parent.name)
        )
        for checkpoint in fold_checkpoints(parent)
    }
    names = next(iter(results.values())).metrics["class_names"]
    slides = ensemble_rows([r.slides for r in results.values()], names)
    patients = aggregate_patients(slides, names)
    write_table(output_dir / PREDICTIONS, slides)
    write_table(output_dir / PATIENT_PREDICTIONS, patients)
    metrics = {
        "run_dir": str(parent),
        "class_names": names,
        "ensemble": {
            "method": "mean probability of the fold models",
            **per_level_metrics(slides, patients, names, config.n_bootstrap, config.seed),
        },
        "baseline": _ensemble_baseline(slides, patients, names, config),
        "leakage": ensemble_leakage({name: r.metrics.get("leakage") for name, r in results.items()}),
        "folds": {
            name: {
                k: r.metrics.get(k)
                for k in ("checkpoint", "epoch", "per_slide", "per_patient", "baseline", "leakage")
            }
            for name, r in results.items()
        },
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    if metrics["leakage"]["folds_with_leakage"]:
        log.warning(metrics["leakage"]["message"])
    elif metrics["leakage"]["message"]:
        log.info(metrics["leakage"]["message"])
    write_json(output_dir / METRICS_JSON, metrics)
    levels, drawn = (
        {"per slide": slides, "per patient": patients},
        {**metrics["ensemble"], "class_names": names},
    )
    plot_roc(output_dir / ROC_PNG, levels, drawn, config.n_bootstrap, config.seed)
    plot_confusion(output_dir / CONFUSION_PNG, drawn)
    log.info(f"report: {write_eval_report(output_dir, folds=False)}")  # the folds' pages are written
    for name, r in [*((n, r.metrics) for n, r in results.items()), ("ensemble", metrics["ensemble"])]:
        log.info(f"{name}: per-patient AUC {format_number(r['per_patient']['auc']['auc'], 'undefined')}")
    log.info(f"results: {output_dir}")
    return EvaluationResult(output_dir, metrics, slides, patients)


def _ensemble_baseline(
    slides: list[dict[str, Any]], patients: list[dict[str, Any]], names: Sequence[str], config: EvaluateConfig
) -> dict[str, Any] | None:
    """The fold baselines' ensemble (the mean of their probabilities), on the same slides and with the
    same bootstrap as the models' ensemble; None when a fold has no baseline."""
    if not slides or baseline_column(names[0]) not in slides[0]:
        return None
    return {
        "method": "mean probability of the fold baselines (logistic regression on pooled features)",
        **per_level_metrics(slides, patients, names, config.n_bootstrap, config.seed, column=baseline_column),
    }


def ensemble_leakage(folds: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """metrics.json's ``leakage`` of an ensemble: every fold model that trained or validated on some
    of the evaluated slides (or their patients) leaks into the ensemble's predictions of them."""
    leaking = {
        name: leakage["n_slides"] for name, leakage in folds.items() if leakage and leakage.get("n_slides")
    }
    unchecked = [name for name, leakage in folds.items() if not (leakage and leakage.get("checked"))]
    message = None
    if leaking:
        message = (
            f"the ensemble is not a held-out estimate: fold models {', '.join(sorted(leaking))} trained or "
            f"validated on up to {max(leaking.values())} of the evaluated slides (or their patients). The "
            "cross-validation run's own held-out estimate is its summary.json (pooled_oof)."
        )
    elif unchecked:
        message = f"note: folds {', '.join(unchecked)} were not checked for leakage."
    return {
        "folds_with_leakage": sorted(leaking),
        "n_slides_by_fold": leaking,
        "unchecked": unchecked,
        "message": message,
    }
