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

import csv
import math
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from feature_extraction.atomic import atomic_output, atomic_write_json
from feature_extraction.errors import PipelineError

from clam.checkpoints import BEST_NAME, CONFIG_NAME, checkpoint_name, make_run_dir
from clam.data import BagRecord
from clam.metrics import DEFAULT_N_BOOTSTRAP, auc_with_ci, epoch_metrics, roc_auc
from clam.splits import TrainValSplit, assign_patient_folds, patient_labels, train_val_split
from clam.train import TrainConfig, _json_safe, default_output_dir, load_bags, train

SPLITS_FILE = "splits.csv"
SPLITS_COLUMNS = ("slide_id", "patient_id", "label", "fold")
FOLD_PREFIX = "fold_"
METRICS = ("test_auc", "test_balanced_accuracy", "test_loss", "baseline_test_auc", "val_auc")


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


def fold_column(fold: int) -> str:
    return f"{FOLD_PREFIX}{fold}"


def fold_splits(records: Sequence[BagRecord], folds: Mapping[str, int], val_fraction: float,
                seed: int) -> dict[int, TrainValSplit]:
    """The three patient-disjoint parts of every fold k: test = fold k's patients; val = a
    label-stratified ``val_fraction`` of the other folds' patients (seeded by seed and k); train =
    the rest. ``val_fraction`` 0: no validation part (the fold's last epoch is used)."""
    splits = {}
    for fold in range(1, max(folds.values()) + 1):
        rest = [r for r in records if folds[r.patient_id] != fold]
        test = [r for r in records if folds[r.patient_id] == fold]
        splits[fold] = train_val_split(rest, val_fraction, seed * 1000 + fold, test=test)
    return splits


def write_folds(path: Path, records: Sequence[BagRecord], folds: Mapping[str, int],
                splits: Mapping[int, TrainValSplit]) -> None:
    """splits.csv: ``fold`` is the fold whose test part holds the patient; ``fold_k`` its part
    (train, val or test) in fold k."""
    sets = {fold: {r.slide_id: name for name, part in split.parts() for r in part} for fold, split in splits.items()}
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*SPLITS_COLUMNS, *(fold_column(k) for k in sorted(splits))])
        for r in sorted(records, key=lambda r: (folds[r.patient_id], r.patient_id, r.slide_id)):
            writer.writerow([r.slide_id, r.patient_id, r.label, folds[r.patient_id],
                             *(sets[k][r.slide_id] for k in sorted(splits))])


def read_folds(path: Path, records: Sequence[BagRecord]) -> tuple[dict[str, int], dict[int, TrainValSplit] | None]:
    """(patient_id -> test fold, the parts of every fold) from a splits file.

    Three-part files (``fold_k`` columns, as --folds writes) give every part; a two-part file
    (``fold`` only) gives the test folds, and the parts are None: the caller draws each fold's
    validation part from the other folds' patients with --val_fraction and --seed."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
        listed = [(row["patient_id"], int(row["fold"])) for row in rows]
    except (OSError, KeyError, ValueError, csv.Error) as error:
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
    folds = {r.patient_id: folds[r.patient_id] for r in records}
    if not any(c.startswith(FOLD_PREFIX) for c in columns):
        return folds, None
    return folds, _read_parts(path, rows, columns, records, folds)


def _read_parts(path: Path, rows: list[dict[str, str]], columns: list[str], records: Sequence[BagRecord],
                folds: Mapping[str, int]) -> dict[int, TrainValSplit]:
    n_folds = max(folds.values())
    absent = [fold_column(k) for k in range(1, n_folds + 1) if fold_column(k) not in columns]
    if absent:
        raise PipelineError(f"splits file {path} lacks the columns {', '.join(absent)}; a three-part splits file "
                            "names every fold's part of every slide.")
    by_slide = {row["slide_id"]: row for row in rows}
    splits = {}
    for fold in range(1, n_folds + 1):
        parts: dict[str, list[BagRecord]] = {"train": [], "val": [], "test": []}
        for r in records:
            row = by_slide.get(r.slide_id)
            part = (row or {}).get(fold_column(fold), "").strip()
            if part not in parts:
                raise PipelineError(f"splits file {path}: slide {r.slide_id} has {fold_column(fold)} = {part!r}; "
                                    "expected train, val or test (every slide of the cohort must be listed).")
            if (part == "test") != (folds[r.patient_id] == fold):
                raise PipelineError(f"splits file {path}: slide {r.slide_id} is {part!r} in fold {fold} but its "
                                    f"patient's test fold is {folds[r.patient_id]}; a patient is tested in its own fold only.")
            parts[part].append(r)
        split = TrainValSplit(*(tuple(parts[name]) for name in ("train", "val", "test")))
        for name, part in split.parts():
            for other, other_part in split.parts():
                shared = {r.patient_id for r in part} & {r.patient_id for r in other_part}
                if name < other and shared:
                    raise PipelineError(f"splits file {path}: patient {sorted(shared)[0]} is in both {name} and "
                                        f"{other} of fold {fold}; a patient's bags belong together.")
        if not split.train:
            raise PipelineError(f"splits file {path}: fold {fold} has no training slides.")
        splits[fold] = split
    return splits


# ---------------------------------------------------------------- training


def cross_validate(config: TrainConfig, log: Callable[[str], None] = print,
                   n_bootstrap: int = DEFAULT_N_BOOTSTRAP) -> Path:
    """Train one run per fold in a new parent run folder and summarise them on the folds' test parts
    (module docstring).

    Folds come from ``config.splits`` if given, else ``config.folds`` seeded by ``config.seed``.
    Returns the parent run folder."""
    from clam.evaluate import aggregate_patients, baseline_column, load_model, predict, probability_column, saved_baseline

    if config.resume:
        raise PipelineError("--resume continues one fold's run: pass that fold's checkpoint without --folds/--splits.")
    bags = load_bags(config, log)
    splits = None
    if config.splits:
        folds, splits = read_folds(Path(config.splits), bags.records)
        n_folds = max(folds.values())
        if config.folds and config.folds != n_folds:
            raise PipelineError(f"--folds {config.folds} but {config.splits} has {n_folds} folds; drop --folds.")
        if splits is None:
            log(f"{config.splits} lists test folds only: each fold's validation part is drawn from the other "
                f"folds' patients (--val_fraction {config.val_fraction}, --seed {config.seed})")
    else:
        n_folds = config.folds
        folds = make_folds(bags.records, n_folds, config.seed)
    if splits is None:
        splits = fold_splits(bags.records, folds, config.val_fraction, config.seed)
    parent = make_run_dir(config.output_dir or default_output_dir())
    write_folds(parent / SPLITS_FILE, bags.records, folds, splits)
    log(f"cross-validation: {n_folds} folds of {len(folds)} patients -> {parent}\n"
        "each fold: test = its own patients (never seen in training or model selection); "
        + ("validation = a share of the other folds' patients (picks the epoch); train = the rest"
           if any(s.val for s in splits.values()) else "no validation part: the last epoch is used; train = the rest"))
    fold_config = replace(config, folds=n_folds, splits=str(parent / SPLITS_FILE))

    rows, slides = [], []
    for fold in range(1, n_folds + 1):
        split = splits[fold]
        log(f"---- fold {fold}/{n_folds}")
        fold_dir = train(fold_config, log=log, split=split, run_dir=parent / f"{FOLD_PREFIX}{fold}")
        checkpoint = selected_checkpoint(fold_dir)
        loaded = load_model(checkpoint, config.device)
        names = loaded.class_names
        baseline = saved_baseline(loaded.checkpoint)
        fold_slides = []
        for p in predict(loaded, split.test, 0, False):
            row = {"slide_id": p.record.slide_id, "patient_id": p.record.patient_id, "fold": fold,
                   "label": p.record.label, **{probability_column(n): float(v) for n, v in zip(names, p.probs)}}
            # The baseline's probabilities on every instance of the bag, as CLAM's (empty: no baseline
            # for this fold, its training bags held one class).
            probs = [None] * len(names) if baseline is None else baseline.probs(p.pooled[baseline.pool][None])[0]
            row.update({baseline_column(n): None if v is None else float(v) for n, v in zip(names, probs)})
            fold_slides.append(row)
        rows.append(_fold_row(fold, fold_dir, checkpoint, split, fold_slides, names, config.n_classes))
        slides += fold_slides
    patients = [{"fold": folds[row["patient_id"]], **row} for row in aggregate_patients(slides, names)]
    _write_rows(parent / "oof_predictions_slide.csv", slides)
    _write_rows(parent / "oof_predictions.csv", patients)
    summary = summarize_folds(rows, patients, names, config.n_classes, n_bootstrap, config.seed)
    summary.update({"run_dir": str(parent), "n_folds": n_folds, "seed": config.seed, "splits_file": SPLITS_FILE,
                    "splits_from": config.splits, "val_fraction": config.val_fraction})
    atomic_write_json(parent / "summary.json", _json_safe(summary))
    _write_rows(parent / "summary.csv", rows + [{"fold": stat, **summary[stat]} for stat in ("mean", "std")])
    log(summary_text(summary))
    return parent


def selected_checkpoint(fold_dir: Path) -> Path:
    """The model a fold's test part is scored with: best_model.pt (lowest validation loss) when the
    fold had a validation part, else the last epoch's checkpoint."""
    import json

    info = json.loads((fold_dir / CONFIG_NAME).read_text())
    if info["data"].get("n_val_bags"):
        return fold_dir / BEST_NAME
    return fold_dir / checkpoint_name(int(info["epoch"]))


def _fold_row(fold: int, fold_dir: Path, checkpoint: Path, split: TrainValSplit, slides: Sequence[dict[str, Any]],
              names: Sequence[str], n_classes: int) -> dict[str, Any]:
    """One fold: the test part's slide-level numbers from the selected model, the validation AUC
    that selected it (optimistic: the same patients chose the epoch), and the baseline's test AUC."""
    import json

    from clam.evaluate import probability_column

    info = json.loads((fold_dir / CONFIG_NAME).read_text())
    epoch = info["best_epoch"] if checkpoint.name == BEST_NAME else info["epoch"]
    selected = next((row for row in info["metrics"] if row["epoch"] == epoch), {})
    y = np.array([int(s["label"]) for s in slides], dtype=np.int64)
    probs = np.array([[float(s[probability_column(n)]) for n in names] for s in slides]).reshape(-1, len(names))
    test = epoch_metrics(y, probs, n_classes)
    loss = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).mean()) if len(y) else None
    baseline_auc = None
    base_columns = [f"baseline_{probability_column(n)}" for n in names]
    if slides and all(s[c] is not None for s in slides for c in base_columns):
        baseline_auc = roc_auc(y, np.array([[s[c] for c in base_columns] for s in slides]), n_classes)[0]
    notes = dict(test.get("notes") or {})
    return {"fold": fold, "n_train_patients": len({r.patient_id for r in split.train}),
            "n_val_patients": len({r.patient_id for r in split.val}),
            "n_test_patients": len({r.patient_id for r in split.test}), "n_test_bags": len(split.test),
            "selected_epoch": epoch, "selection": "lowest validation loss" if split.val else "last epoch (no validation part)",
            "test_auc": test["auc"], "test_balanced_accuracy": test["balanced_accuracy"], "test_loss": loss,
            "baseline_test_auc": baseline_auc, "val_auc": selected.get("val_auc"),
            "note": "; ".join(f"test: {v}" for v in notes.values())}


def summarize_folds(rows: Sequence[dict[str, Any]], patients: Sequence[dict[str, Any]], class_names: Sequence[str],
                    n_classes: int, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1) of each metric over the folds where it is defined,
    and the pooled patient-level AUC over every fold's test part, CLAM's and the baseline's, with
    their bootstrap CIs."""
    from clam.evaluate import probability_column

    mean, std = {}, {}
    for metric in METRICS:
        values = np.array([r[metric] for r in rows if r[metric] is not None and math.isfinite(r[metric])], dtype=float)
        mean[metric] = float(values.mean()) if len(values) else None
        std[metric] = float(values.std(ddof=1)) if len(values) > 1 else None
    y_true = [int(p["label"]) for p in patients]

    def pooled(prefix: str) -> dict[str, Any] | None:
        columns = [f"{prefix}{probability_column(n)}" for n in class_names]
        if not patients or any(p.get(c) is None for p in patients for c in columns):
            return None  # the baseline was not fitted in some fold (its training bags held one class)
        probs = np.array([[float(p[c]) for c in columns] for p in patients])
        return auc_with_ci(y_true, probs, n_classes, n_bootstrap, seed, class_names=class_names).to_dict()

    return {"folds": list(rows), "mean": mean, "std": std,
            "std_note": "sample standard deviation (ddof 1) over folds with a value",
            "pooled_oof": {"level": "patient (mean of its slides' probabilities)", "n_patients": len(patients),
                           "patients": "every patient once, from the test part of its own fold: never seen by "
                                       "the model that scored it, in training or in model selection",
                           "auc": pooled(""), "baseline_auc": pooled("baseline_")},
            "validation_selected": {
                "auc_mean": mean.get("val_auc"),
                "note": "mean over folds of the validation AUC at the selected epoch: the same patients chose "
                        "the epoch, so it is optimistic; report the pooled test AUC"},
            "class_names": list(class_names)}


def summary_text(summary: dict[str, Any]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["per fold, on its test part (patients never used to train or select that fold's model):",
             f"{'fold':<6}{'epoch':>6}{'test AUC':>10}{'bal.acc':>9}{'loss':>8}{'baseline':>10}{'val AUC':>9}  note"]
    for r in summary["folds"]:
        lines.append(f"{r['fold']:<6}{r['selected_epoch']!s:>6}{fmt(r['test_auc']):>10}"
                     f"{fmt(r['test_balanced_accuracy']):>9}{fmt(r['test_loss']):>8}{fmt(r['baseline_test_auc']):>10}"
                     f"{fmt(r['val_auc']):>9}  {r['note']}")
    for stat in ("mean", "std"):
        s = summary[stat]
        lines.append(f"{stat:<12}{fmt(s['test_auc']):>10}{fmt(s['test_balanced_accuracy']):>9}{fmt(s['test_loss']):>8}"
                     f"{fmt(s['baseline_test_auc']):>10}{fmt(s['val_auc']):>9}")
    pooled = summary["pooled_oof"]

    def auc_line(auc: dict[str, Any] | None, what: str) -> str:
        if auc is None:
            return f"{what}: not available"
        ci = "" if auc["ci_low"] is None else f" (95% CI {auc['ci_low']:.3f}-{auc['ci_high']:.3f})"
        return f"{what}: {fmt(auc['auc'])}{ci}" + (f" ({auc['reason']})" if auc["reason"] else "")

    lines.append(auc_line(pooled["auc"], f"pooled held-out AUC over {pooled['n_patients']} patients (each from its "
                                         "own fold's test part), CLAM"))
    lines.append(auc_line(pooled.get("baseline_auc"), "the same patients, mean-pool logistic regression baseline"))
    if summary["mean"].get("val_auc") is not None:
        lines.append(f"validation AUC at the selected epochs (optimistic: those patients chose the epoch): "
                     f"mean {fmt(summary['mean']['val_auc'])}")
    elif all(r["val_auc"] is None for r in summary["folds"]):
        lines.append("no validation part (--val_fraction 0): each fold's last epoch was used")
    return "\n".join(lines)


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from clam.evaluate import write_table

    write_table(path, [{k: ("" if v is None else v) for k, v in row.items()} for row in rows])


# ---------------------------------------------------------------- evaluation of the fold models


def is_crossval_run(path: Path) -> bool:
    """A parent run folder of ``--folds``: splits.csv and fold_*/best_model.pt."""
    return path.is_dir() and (path / SPLITS_FILE).is_file() and any(path.glob(f"{FOLD_PREFIX}*/{BEST_NAME}"))


def fold_checkpoints(parent: Path) -> list[Path]:
    """Each fold's selected model (``selected_checkpoint``), in fold order."""
    found = sorted(parent.glob(f"{FOLD_PREFIX}*/{BEST_NAME}"), key=lambda p: int(p.parent.name[len(FOLD_PREFIX):]))
    if not found:
        raise PipelineError(f"{parent} has no {FOLD_PREFIX}K/{BEST_NAME}; is it a --folds run?")
    return [selected_checkpoint(p.parent) for p in found]


def evaluate_folds(config, log: Callable[[str], None] = print):
    """Evaluate each fold's best model (a subfolder per fold) and their ensemble, the mean probability
    of the fold models (predictions.csv, predictions_patient.csv and metrics.json at the top)."""
    from clam.evaluate import (EvaluationResult, aggregate_patients, evaluate, level_metrics, probability_column,
                               write_table)

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
        return level_metrics(rows, names, config.n_bootstrap, config.seed)

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
