"""The folds of a cross-validation run and their file, ``splits.csv``: made, written and read here.

``splits.csv`` has one row per slide: ``slide_id``, ``patient_id``, ``label``, ``fold`` (the fold
whose test part holds the patient) and ``fold_1`` .. ``fold_K`` (the slide's part, train, val or
test, in each fold). Every fold k has three patient-disjoint parts: test (fold k's patients),
validation (a label-stratified share of the other folds' patients) and train (the rest).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from clam.data import BagRecord
from clam.run_files import FOLD_PREFIX, SPLITS_COLUMNS, fold_name
from clam.splits import TrainValSplit, assign_patient_folds, patient_labels, train_val_split
from feature_extraction.atomic import atomic_output
from feature_extraction.errors import PipelineError


def make_folds(records: Sequence[BagRecord], n_folds: int, seed: int) -> dict[str, int]:
    """patient_id -> fold in 1..n_folds: disjoint, label-stratified, seeded (clam.splits.assign_patient_folds).

    Raises PipelineError when a class has fewer patients than folds (a fold would lack it)."""
    labels = patient_labels(records)
    if n_folds < 2:
        raise PipelineError(f"--folds {n_folds}: use at least 2.")
    counts = {label: sum(1 for v in labels.values() if v == label) for label in sorted(set(labels.values()))}
    short = {label: n for label, n in counts.items() if n < n_folds}
    if short:
        raise PipelineError(
            f"--folds {n_folds} is more than the number of patients of class(es) "
            f"{', '.join(f'{label} ({n} patients)' for label, n in short.items())}: every fold "
            f"needs a patient of each class. Use --folds {min(counts.values())} or fewer."
        )
    return {patient: fold + 1 for patient, fold in assign_patient_folds(labels, n_folds, seed).items()}


def fold_splits(
    records: Sequence[BagRecord], folds: Mapping[str, int], val_fraction: float, seed: int
) -> dict[int, TrainValSplit]:
    """The three patient-disjoint parts of every fold k: test = fold k's patients; val = a
    label-stratified ``val_fraction`` of the other folds' patients (seeded by seed and k); train =
    the rest. ``val_fraction`` 0: no validation part (the fold's last epoch is used)."""
    splits = {}
    for fold in range(1, max(folds.values()) + 1):
        rest = [r for r in records if folds[r.patient_id] != fold]
        test = [r for r in records if folds[r.patient_id] == fold]
        splits[fold] = train_val_split(rest, val_fraction, seed * 1000 + fold, test=test)
    return splits


def write_folds(
    path: Path, records: Sequence[BagRecord], folds: Mapping[str, int], splits: Mapping[int, TrainValSplit]
) -> None:
    """splits.csv: ``fold`` is the fold whose test part holds the patient; ``fold_k`` its part
    (train, val or test) in fold k."""
    sets = {
        fold: {r.slide_id: name for name, part in split.parts() for r in part}
        for fold, split in splits.items()
    }
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*SPLITS_COLUMNS, *(fold_name(k) for k in sorted(splits))])
        for r in sorted(records, key=lambda r: (folds[r.patient_id], r.patient_id, r.slide_id)):
            writer.writerow(
                [
                    r.slide_id,
                    r.patient_id,
                    r.label,
                    folds[r.patient_id],
                    *(sets[k][r.slide_id] for k in sorted(splits)),
                ]
            )


def read_folds(
    path: Path, records: Sequence[BagRecord]
) -> tuple[dict[str, int], dict[int, TrainValSplit] | None]:
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
        raise PipelineError(
            f"cannot read the splits file {path} ({error}); it needs the columns "
            f"{', '.join(SPLITS_COLUMNS)} as written by --folds."
        ) from error
    folds: dict[str, int] = {}
    for patient, fold in listed:
        if folds.setdefault(patient, fold) != fold:
            raise PipelineError(
                f"splits file {path} puts patient {patient} in two folds; a patient's bags belong together."
            )
    missing = sorted({r.patient_id for r in records} - set(folds))
    if missing:
        raise PipelineError(
            f"splits file {path} does not list {len(missing)} patients of the cohort, e.g. "
            f"{missing[0]}; it was made for another cohort. Run --folds K without --splits."
        )
    used = sorted({folds[r.patient_id] for r in records})
    if len(used) < 2 or used != list(range(1, len(used) + 1)):
        raise PipelineError(
            f"splits file {path} has folds {used} for this cohort; expected 1..K with K >= 2."
        )
    folds = {r.patient_id: folds[r.patient_id] for r in records}
    if not any(c.startswith(FOLD_PREFIX) for c in columns):
        return folds, None
    return folds, _read_parts(path, rows, columns, records, folds)


def _read_parts(
    path: Path,
    rows: list[dict[str, str]],
    columns: list[str],
    records: Sequence[BagRecord],
    folds: Mapping[str, int],
) -> dict[int, TrainValSplit]:
    n_folds = max(folds.values())
    absent = [fold_name(k) for k in range(1, n_folds + 1) if fold_name(k) not in columns]
    if absent:
        raise PipelineError(
            f"splits file {path} lacks the columns {', '.join(absent)}; a three-part splits file "
            "names every fold's part of every slide."
        )
    by_slide = {row["slide_id"]: row for row in rows}
    splits = {}
    for fold in range(1, n_folds + 1):
        parts: dict[str, list[BagRecord]] = {"train": [], "val": [], "test": []}
        for r in records:
            row = by_slide.get(r.slide_id)
            part = (row or {}).get(fold_name(fold), "").strip()
            if part not in parts:
                column = fold_name(fold)
                raise PipelineError(
                    f"splits file {path}: slide {r.slide_id} has {column} = {part!r}; "
                    "expected train, val or test (every slide of the cohort must be listed)."
                )
            if (part == "test") != (folds[r.patient_id] == fold):
                raise PipelineError(
                    f"splits file {path}: slide {r.slide_id} is {part!r} in fold {fold} but its "
                    f"patient's test fold is {folds[r.patient_id]}; a patient is tested in its own fold only."
                )
            parts[part].append(r)
        split = TrainValSplit(*(tuple(parts[name]) for name in ("train", "val", "test")))
        for name, part in split.parts():
            for other, other_part in split.parts():
                shared = {r.patient_id for r in part} & {r.patient_id for r in other_part}
                if name < other and shared:
                    raise PipelineError(
                        f"splits file {path}: patient {sorted(shared)[0]} is in both {name} and "
                        f"{other} of fold {fold}; a patient's bags belong together."
                    )
        if not split.train:
            raise PipelineError(f"splits file {path}: fold {fold} has no training slides.")
        splits[fold] = split
    return splits
