"""Patient-level K-fold cross-validation (``python -m clam.train --folds K``) and the evaluation of
its fold models and their ensemble (``python -m clam.evaluate --checkpoint PARENT_RUN``).

Layout of a cross-validation run (the parent run folder)::

    run_YYYYMMDD_HHMMSS/
        splits.csv              slide_id, patient_id, label, fold (1..K); reusable with --splits
        fold_1/ ... fold_K/     each a normal training run (config.json, checkpoint_epoch_N.pt, best_model.pt, split.csv)
        oof_predictions.csv     one row per patient: its fold's best model's mean probability over its slides
        oof_predictions_slide.csv   the same per slide
        summary.csv             per fold: validation AUC, balanced accuracy and loss at the best epoch; mean; std
        summary.json            the same, plus the pooled out-of-fold AUC with its bootstrap CI
"""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from feature_extraction.atomic import atomic_output, atomic_write_json
from feature_extraction.errors import PipelineError

from clam.checkpoints import BEST_NAME, CONFIG_NAME, make_run_dir
from clam.data import BagRecord
from clam.metrics import DEFAULT_N_BOOTSTRAP, auc_with_ci, summarize
from clam.splits import TrainValSplit, assign_patient_folds, patient_labels
from clam.train import TrainConfig, _json_safe, default_output_dir, load_bags, train

SPLITS_FILE = "splits.csv"
SPLITS_COLUMNS = ("slide_id", "patient_id", "label", "fold")
FOLD_PREFIX = "fold_"
METRICS = ("val_auc", "val_balanced_accuracy", "val_loss")


# ---------------------------------------------------------------- folds


def make_folds(records: Sequence[BagRecord], n_folds: int, seed: int) -> dict[str, int]:
    """patient_id -> fold in 1..n_folds: disjoint, label-stratified, seeded (clam.splits.assign_patient_folds).

    Raises PipelineError when a class has fewer patients than folds (a fold would lack it)."""
    labels = patient_labels(records)
    if n_folds < 2:
        raise PipelineError(f"--folds {n_folds}: use at least 2.")
    counts = {label: sum(1 for v in labels.values() if v == label) for label in sorted(set(labels.values()))}
    short = {label: n for label, n in counts.items() if n < n_folds}
    if short:
        raise PipelineError(f"--folds {n_folds} is more than the number of patients of class(es) "
                            f"{', '.join(f'{label} ({n} patients)' for label, n in short.items())}: every fold "
                            f"needs a patient of each class. Use --folds {min(counts.values())} or fewer.")
    return {patient: fold + 1 for patient, fold in assign_patient_folds(labels, n_folds, seed).items()}


def write_folds(path: Path, records: Sequence[BagRecord], folds: Mapping[str, int]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SPLITS_COLUMNS)
        for r in sorted(records, key=lambda r: (folds[r.patient_id], r.patient_id, r.slide_id)):
            writer.writerow([r.slide_id, r.patient_id, r.label, folds[r.patient_id]])


def read_folds(path: Path, records: Sequence[BagRecord]) -> dict[str, int]:
    """patient_id -> fold from a splits file; every record's patient must be listed, in one fold."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        listed = [(row["patient_id"], int(row["fold"])) for row in rows]
    except (OSError, KeyError, ValueError) as error:
        raise PipelineError(f"cannot read the splits file {path} ({error}); it needs the columns "
                            f"{', '.join(SPLITS_COLUMNS)} as written by --folds.") from error
    folds: dict[str, int] = {}
    for patient, fold in listed:
        if folds.setdefault(patient, fold) != fold:
            raise PipelineError(f"splits file {path} puts patient {patient} in two folds; a patient's bags belong together.")
    missing = sorted({r.patient_id for r in records} - set(folds))
    if missing:
        raise PipelineError(f"splits file {path} does not list {len(missing)} patients of the cohort, e.g. "
                            f"{missing[0]}; it was made for another cohort. Run --folds K without --splits.")
    used = sorted({folds[r.patient_id] for r in records})
    if len(used) < 2 or used != list(range(1, len(used) + 1)):
        raise PipelineError(f"splits file {path} has folds {used} for this cohort; expected 1..K with K >= 2.")
    return {r.patient_id: folds[r.patient_id] for r in records}


def fold_split(records: Sequence[BagRecord], folds: Mapping[str, int], fold: int) -> TrainValSplit:
    """Fold ``fold``'s patients validate; all the others train."""
    return TrainValSplit(train=tuple(r for r in records if folds[r.patient_id] != fold),
                         val=tuple(r for r in records if folds[r.patient_id] == fold))


# ---------------------------------------------------------------- training


def cross_validate(config: TrainConfig, log: Callable[[str], None] = print,
                   n_bootstrap: int = DEFAULT_N_BOOTSTRAP) -> Path:
    """Train one run per fold in a new parent run folder and summarise them (module docstring).

    Folds come from ``config.splits`` if given, else ``config.folds`` seeded by ``config.seed``.
    Returns the parent run folder."""
    from clam.evaluate import aggregate_patients, load_model, predict, probability_column

    if config.resume:
        raise PipelineError("--resume continues one fold's run: pass that fold's checkpoint without --folds/--splits.")
    bags = load_bags(config, log)
    if config.splits:
        folds = read_folds(Path(config.splits), bags.records)
        n_folds = max(folds.values())
        if config.folds and config.folds != n_folds:
            raise PipelineError(f"--folds {config.folds} but {config.splits} has {n_folds} folds; drop --folds.")
    else:
        n_folds = config.folds
        folds = make_folds(bags.records, n_folds, config.seed)
    parent = make_run_dir(config.output_dir or default_output_dir())
    write_folds(parent / SPLITS_FILE, bags.records, folds)
    log(f"cross-validation: {n_folds} folds of {len(folds)} patients -> {parent}")
    fold_config = replace(config, folds=n_folds, splits=str(parent / SPLITS_FILE))

    rows, slides = [], []
    for fold in range(1, n_folds + 1):
        split = fold_split(bags.records, folds, fold)
        log(f"---- fold {fold}/{n_folds}")
        fold_dir = train(fold_config, log=log, split=split, run_dir=parent / f"{FOLD_PREFIX}{fold}")
        rows.append(_fold_row(fold, fold_dir, split))
        loaded = load_model(fold_dir / BEST_NAME, config.device)
        names = loaded.class_names
        for p in predict(loaded, split.val, 0, False):
            slides.append({"slide_id": p.record.slide_id, "patient_id": p.record.patient_id, "fold": fold,
                           "label": p.record.label,
                           **{probability_column(n): float(v) for n, v in zip(names, p.probs)}})
    patients = [{"fold": folds[row["patient_id"]], **row} for row in aggregate_patients(slides, names)]
    _write_rows(parent / "oof_predictions_slide.csv", slides)
    _write_rows(parent / "oof_predictions.csv", patients)
    summary = summarize_folds(rows, patients, names, config.n_classes, n_bootstrap, config.seed)
    summary.update({"run_dir": str(parent), "n_folds": n_folds, "seed": config.seed, "splits_file": SPLITS_FILE,
                    "splits_from": config.splits})
    atomic_write_json(parent / "summary.json", _json_safe(summary))
    _write_rows(parent / "summary.csv", rows + [{"fold": stat, **summary[stat]} for stat in ("mean", "std")])
    log(summary_text(summary))
    return parent


def _fold_row(fold: int, fold_dir: Path, split: TrainValSplit) -> dict[str, Any]:
    """The fold's validation numbers at its best epoch, from its config.json."""
    import json

    info = json.loads((fold_dir / CONFIG_NAME).read_text())
    best = next((row for row in info["metrics"] if row["epoch"] == info["best_epoch"]), {})
    notes = best.get("val_notes") or {}
    return {"fold": fold, "n_train_patients": len({r.patient_id for r in split.train}),
            "n_val_patients": len({r.patient_id for r in split.val}), "n_val_bags": len(split.val),
            "best_epoch": info["best_epoch"], **{m: best.get(m) for m in METRICS},
            "note": "; ".join(str(v) for v in notes.values())}


def summarize_folds(rows: Sequence[dict[str, Any]], patients: Sequence[dict[str, Any]], class_names: Sequence[str],
                    n_classes: int, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1) of each metric over the folds where it is defined,
    and the pooled patient-level out-of-fold AUC with its bootstrap CI."""
    from clam.evaluate import probability_column

    mean, std = {}, {}
    for metric in METRICS:
        values = np.array([r[metric] for r in rows if r[metric] is not None and math.isfinite(r[metric])], dtype=float)
        mean[metric] = float(values.mean()) if len(values) else None
        std[metric] = float(values.std(ddof=1)) if len(values) > 1 else None
    y_true = [int(p["label"]) for p in patients]
    probs = np.array([[float(p[probability_column(n)]) for n in class_names] for p in patients])
    pooled = auc_with_ci(y_true, probs, n_classes, n_bootstrap, seed, class_names=class_names)
    return {"folds": list(rows), "mean": mean, "std": std, "std_note": "sample standard deviation (ddof 1) over folds with a value",
            "pooled_oof": {"level": "patient (mean of its slides' probabilities)", "n_patients": len(patients),
                           "auc": pooled.to_dict()},
            "class_names": list(class_names)}


def summary_text(summary: dict[str, Any]) -> str:
    lines = [f"{'fold':<6}{'best':>5}{'val AUC':>9}{'bal.acc':>9}{'loss':>8}  note"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in summary["folds"]:
        lines.append(f"{r['fold']:<6}{r['best_epoch']!s:>5}{fmt(r['val_auc']):>9}{fmt(r['val_balanced_accuracy']):>9}"
                     f"{fmt(r['val_loss']):>8}  {r['note']}")
    for stat in ("mean", "std"):
        s = summary[stat]
        lines.append(f"{stat:<11}{fmt(s['val_auc']):>9}{fmt(s['val_balanced_accuracy']):>9}{fmt(s['val_loss']):>8}")
    auc = summary["pooled_oof"]["auc"]
    ci = "" if auc["ci_low"] is None else f" (95% CI {auc['ci_low']:.3f}-{auc['ci_high']:.3f})"
    lines.append(f"pooled out-of-fold AUC over {summary['pooled_oof']['n_patients']} patients: {fmt(auc['auc'])}{ci}"
                 + (f" ({auc['reason']})" if auc["reason"] else ""))
    return "\n".join(lines)


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from clam.evaluate import write_table

    write_table(path, [{k: ("" if v is None else v) for k, v in row.items()} for row in rows])


# ---------------------------------------------------------------- evaluation of the fold models


def is_crossval_run(path: Path) -> bool:
    """A parent run folder of ``--folds``: splits.csv and fold_*/best_model.pt."""
    return path.is_dir() and (path / SPLITS_FILE).is_file() and any(path.glob(f"{FOLD_PREFIX}*/{BEST_NAME}"))


def fold_checkpoints(parent: Path) -> list[Path]:
    """fold_1/best_model.pt ... in fold order."""
    found = sorted(parent.glob(f"{FOLD_PREFIX}*/{BEST_NAME}"), key=lambda p: int(p.parent.name[len(FOLD_PREFIX):]))
    if not found:
        raise PipelineError(f"{parent} has no {FOLD_PREFIX}K/{BEST_NAME}; is it a --folds run?")
    return found


def evaluate_folds(config, log: Callable[[str], None] = print):
    """Evaluate each fold's best model (a subfolder per fold) and their ensemble, the mean probability
    of the fold models (predictions.csv, predictions_patient.csv and metrics.json at the top)."""
    from clam.evaluate import EvaluationResult, aggregate_patients, evaluate, probability_column, write_table

    parent = Path(config.checkpoint)
    output_dir = Path(config.output_dir or parent / f"{config.output_prefix}_{datetime.now():%Y%m%d_%H%M%S}")
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for checkpoint in fold_checkpoints(parent):
        name = checkpoint.parent.name
        results[name] = evaluate(replace(config, checkpoint=checkpoint, output_dir=output_dir / name), log)
    first = next(iter(results.values()))
    names = first.metrics["class_names"]
    columns = [probability_column(n) for n in names]
    slides = []
    for i, row in enumerate(first.slides):
        probs = np.mean([[float(r.slides[i][c]) for c in columns] for r in results.values()], axis=0)
        predicted = int(np.argmax(probs))
        slides.append({**{k: row[k] for k in ("slide_id", "patient_id", "class_folder", "label", "label_name")},
                       **{c: float(p) for c, p in zip(columns, probs)},
                       "predicted": predicted, "predicted_name": names[predicted]})
    patients = aggregate_patients(slides, names)
    write_table(output_dir / "predictions.csv", slides)
    write_table(output_dir / "predictions_patient.csv", patients)

    def level(rows):
        y = [int(r["label"]) for r in rows]
        p = np.array([[float(r[c]) for c in columns] for r in rows]).reshape(-1, len(names))
        return summarize(y, p, len(names), config.n_bootstrap, config.seed, names)

    metrics = {"run_dir": str(parent), "class_names": names,
               "ensemble": {"method": "mean probability of the fold models", "per_slide": level(slides),
                            "per_patient": level(patients)},
               "folds": {name: {k: r.metrics.get(k) for k in ("checkpoint", "epoch", "per_slide", "per_patient")}
                         for name, r in results.items()},
               "created": datetime.now().isoformat(timespec="seconds")}
    atomic_write_json(output_dir / "metrics.json", _json_safe(metrics))
    for name, r in [*((n, r.metrics) for n, r in results.items()), ("ensemble", metrics["ensemble"])]:
        auc = r["per_patient"]["auc"]["auc"]
        log(f"{name}: per-patient AUC {'undefined' if auc is None else f'{auc:.3f}'}")
    log(f"results: {output_dir}")
    return EvaluationResult(output_dir, metrics, slides, patients)
