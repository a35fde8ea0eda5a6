"""Patient-level, label-stratified, seeded splits of bags.

A patient's bags (a plain and a ``_cnn`` slide, say) always land on the same side. Both the
train/validation split and K-fold assignment start from the same seeded per-label shuffle of
patients, so a split is a pure function of (patients, labels, seed).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clam.data import BagRecord
from clam.run_files import SPLIT_COLUMNS
from feature_extraction.atomic import atomic_output
from feature_extraction.errors import PipelineError


@dataclass(frozen=True)
class TrainValSplit:
    """Patient-disjoint parts of one run: ``train`` fits the model, ``val`` picks the best epoch and
    drives early stopping, ``test`` (a cross-validation fold's held-out patients) is never seen
    by training or selection: the run records it in split.csv and ignores it otherwise."""

    train: tuple[BagRecord, ...]
    val: tuple[BagRecord, ...]
    test: tuple[BagRecord, ...] = ()

    def parts(self) -> tuple[tuple[str, tuple[BagRecord, ...]], ...]:
        return (("train", self.train), ("val", self.val), ("test", self.test))


def patient_labels(records: Sequence[BagRecord]) -> dict[str, int]:
    """patient_id -> label; raises PipelineError when a patient's bags disagree."""
    labels: dict[str, int] = {}
    for record in records:
        if labels.setdefault(record.patient_id, record.label) != record.label:
            raise PipelineError(f"patient {record.patient_id} has bags of two labels; fix the labels first.")
    return labels


def shuffled_patients_by_label(labels: Mapping[str, int], seed: int) -> dict[int, list[str]]:
    """For each label, its patients in a seeded random order (independent of input order)."""
    by_label: dict[int, list[str]] = {}
    for patient in sorted(labels):
        by_label.setdefault(labels[patient], []).append(patient)
    rng = np.random.default_rng(seed)
    return {
        label: [patients[i] for i in rng.permutation(len(patients))]
        for label, patients in sorted(by_label.items())
    }


def assign_patient_folds(labels: Mapping[str, int], n_folds: int, seed: int) -> dict[str, int]:
    """patient_id -> fold in 0..n_folds-1: disjoint, each label dealt round-robin so every fold
    gets its share of every label and fold sizes differ by at most one patient per label."""
    if n_folds < 2:
        raise PipelineError(f"{n_folds} folds: use at least 2.")
    folds: dict[str, int] = {}
    start = 0
    for patients in shuffled_patients_by_label(labels, seed).values():
        for i, patient in enumerate(patients):
            folds[patient] = (start + i) % n_folds
        start = (start + len(patients)) % n_folds  # the next label fills the folds this one left short
    return folds


def train_val_split(
    records: Sequence[BagRecord], val_fraction: float, seed: int, test: Sequence[BagRecord] = ()
) -> TrainValSplit:
    """Put round(val_fraction x patients) of each label's patients (at least one when the label has
    two or more, never all) and all their bags in validation; ``val_fraction`` 0 means none.
    ``test`` (bags held out before this split) is passed through unchanged."""
    if not 0.0 <= val_fraction < 1.0:
        raise PipelineError(f"--val_fraction {val_fraction}: use a value in [0, 1).")
    val_patients: set[str] = set()
    if val_fraction > 0:
        for patients in shuffled_patients_by_label(patient_labels(records), seed).values():
            n_val = min(max(round(val_fraction * len(patients)), 1), len(patients) - 1)
            val_patients.update(patients[:n_val])
    return TrainValSplit(
        train=tuple(r for r in records if r.patient_id not in val_patients),
        val=tuple(r for r in records if r.patient_id in val_patients),
        test=tuple(test),
    )


def write_split(path: Path, split: TrainValSplit) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SPLIT_COLUMNS)
        for name, records in split.parts():
            for r in records:
                writer.writerow([r.slide_id, r.patient_id, r.label, name])


def read_split(path: Path, records: Sequence[BagRecord]) -> TrainValSplit:
    """The split saved in ``path`` applied to ``records``; every record must be listed."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            sides = {row["slide_id"]: row["set"] for row in csv.DictReader(handle)}
    except (OSError, KeyError) as error:
        raise PipelineError(
            f"cannot read the split file {path} ({error}); resume needs the run folder "
            "the checkpoint was written in."
        ) from error
    unknown = [r.slide_id for r in records if r.slide_id not in sides]
    if unknown:
        raise PipelineError(
            f"split file {path} does not list {len(unknown)} of the bags, e.g. {unknown[0]}; "
            "the cohort changed since this run started. Start a new run instead of resuming."
        )
    return TrainValSplit(
        *(tuple(r for r in records if sides[r.slide_id] == name) for name in ("train", "val", "test"))
    )
