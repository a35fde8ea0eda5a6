"""Leakage: which evaluated slides (or other slides of their patients) the checkpoint's run trained
or validated on, from the ``split.csv`` of its run folder (or, for a cross-validation fold, the
parent's ``splits.csv``). Such metrics are optimistic. A ``test`` set (held out by the run) is not
leakage; without a split file the check is skipped, with a note.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clam.data import BagRecord
from clam.run_files import SPLIT_FILE, SPLITS_FILE, fold_name, fold_number

# Sets of a run's split.csv whose slides the run learnt from (train) or chose its best epoch and
# stopped on (val): evaluating on them is leakage. Any other set (a held-out "test") is not.
LEAKAGE_SETS = ("train", "val")
N_LEAKAGE_EXAMPLES = 5


def run_split_sets(checkpoint_path: Path) -> tuple[Path | None, list[dict[str, str]] | None, str | None]:
    """(split file, its rows as dicts with slide_id, patient_id, set, why not) for a checkpoint.

    The split file is ``split.csv`` of the checkpoint's run folder; for a cross-validation fold
    folder ``fold_K`` without one, the parent's ``splits.csv`` gives it (fold K validated, the
    others trained). Rows are None, with the reason, when there is none or it cannot be read."""
    run_dir = Path(checkpoint_path).parent
    path = run_dir / SPLIT_FILE
    parent_file = run_dir.parent / SPLITS_FILE
    fold = fold_number(run_dir.name)
    if path.is_file():
        column = "set"
    elif fold is not None and parent_file.is_file():
        path, column = parent_file, "fold"
    else:
        path = None
    if path is not None:
        try:
            rows = _csv_rows(path, ("slide_id", column))
            if column == "fold":  # the parent's folds: its fold_K column names each part; an older
                for row in rows:  # two-part file means fold K validated this model, the others trained it
                    row["set"] = row.get(fold_name(fold)) or ("val" if int(row["fold"]) == fold else "train")
        except (OSError, ValueError, csv.Error, UnicodeDecodeError) as error:
            return path, None, f"the split file {path} cannot be read ({error})"
        return (
            path,
            [
                {"slide_id": r["slide_id"], "patient_id": r.get("patient_id") or "", "set": r["set"]}
                for r in rows
            ],
            None,
        )
    return (
        None,
        None,
        (
            f"there is no {SPLIT_FILE} next to {checkpoint_path} (a checkpoint copied out of its run "
            "folder, or weights trained elsewhere), so which slides it was trained on is unknown"
        ),
    )


def _csv_rows(path: Path, needed: Sequence[str]) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} has no column {', '.join(missing)}")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def check_leakage(checkpoint_path: Path, records: Sequence[BagRecord]) -> dict[str, Any]:
    """Which of ``records`` the checkpoint's run trained (``train``) or validated (``val``) on, by
    slide id and by patient id (another slide of a patient it saw is leakage too).

    Returns metrics.json's ``leakage``: ``checked``, ``split_file``, ``n_slides`` and
    ``n_patients`` (evaluated slides and patients affected, over train and val), ``by_set`` (per
    set of the split file that overlaps, and always train and val: ``n_slides``,
    ``n_slides_same_id``, ``n_patients``, ``counts_as_leakage``, example ``slide_ids`` and ``patient_ids``)
    and ``message`` (a ``WARNING:`` line, a note when not checked, None when clean)."""
    split_file, rows, reason = run_split_sets(Path(checkpoint_path))
    n_eval_patients = len({r.patient_id for r in records})
    result: dict[str, Any] = {
        "checked": rows is not None,
        "split_file": str(split_file) if split_file else None,
        "leakage_sets": list(LEAKAGE_SETS),
        "n_evaluated_slides": len(records),
        "n_evaluated_patients": n_eval_patients,
        "n_slides": None,
        "n_patients": None,
        "by_set": {},
        "reason": reason,
        "message": None,
    }
    if rows is None:
        result["message"] = (
            f"note: not checked for leakage: {reason}. Make sure the evaluated slides were not "
            "used to train or validate it."
        )
        return result
    slides_by_set: dict[str, set[str]] = {}
    patients_by_set: dict[str, set[str]] = {}
    for row in rows:
        slides_by_set.setdefault(row["set"], set()).add(row["slide_id"])
        if row["patient_id"]:
            patients_by_set.setdefault(row["set"], set()).add(row["patient_id"])
    leaked: dict[str, BagRecord] = {}
    for name in sorted(set(slides_by_set) | set(LEAKAGE_SETS), key=lambda n: (n not in LEAKAGE_SETS, n)):
        same_id = [r for r in records if r.slide_id in slides_by_set.get(name, ())]
        hit = [
            r
            for r in records
            if r.slide_id in slides_by_set.get(name, ()) or r.patient_id in patients_by_set.get(name, ())
        ]
        if name not in LEAKAGE_SETS and not hit:
            continue
        patients = sorted({r.patient_id for r in hit})
        result["by_set"][name] = {
            "counts_as_leakage": name in LEAKAGE_SETS,
            "n_slides": len(hit),
            "n_slides_same_id": len(same_id),
            "n_patients": len(patients),
            "slide_ids": sorted(r.slide_id for r in hit)[:N_LEAKAGE_EXAMPLES],
            "patient_ids": patients[:N_LEAKAGE_EXAMPLES],
        }
        if name in LEAKAGE_SETS:
            leaked.update((r.slide_id, r) for r in hit)
    result["n_slides"] = len(leaked)
    result["n_patients"] = len({r.patient_id for r in leaked.values()})
    if leaked:
        result["message"] = _leakage_message(result)
    return result


def _leakage_message(leakage: dict[str, Any]) -> str:
    parts = []
    for name, title in (("train", "training set"), ("val", "validation set (chose the best epoch)")):
        found = leakage["by_set"][name]
        if found["n_slides"]:
            by_patient = found["n_slides"] - found["n_slides_same_id"]
            extra = (
                f", {by_patient} of them only by patient id (another slide of that patient)"
                if by_patient
                else ""
            )
            parts.append(f"{found['n_slides']} slides / {found['n_patients']} patients in its {title}{extra}")
    examples = sorted({s for name in LEAKAGE_SETS for s in leakage["by_set"][name]["slide_ids"]})[
        :N_LEAKAGE_EXAMPLES
    ]
    return (
        f"WARNING: leakage: {leakage['n_slides']} of the {leakage['n_evaluated_slides']} evaluated slides "
        f"({leakage['n_patients']} of {leakage['n_evaluated_patients']} patients) were used by this model's run "
        f"({leakage['split_file']}): {'; '.join(parts)}; e.g. {', '.join(examples)}. These metrics are optimistic, "
        "not a held-out estimate: evaluate on slides the run never saw (e.g. the external test cohort)."
    )
