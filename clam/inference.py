"""Inference: a checkpoint's model rebuilt (``load_model``), run on bags (``predict``), and its
prediction tables (one row per slide, per patient, or the fold models' ensemble).

The tables' columns are clam.run_files': ``prob_<class>`` for the model's probabilities and
``baseline_prob_<class>`` for the pooled baseline's (clam.baselines) on the same bags.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from clam.bag_dataset import BagDataset
from clam.baselines import PooledBaseline
from clam.checkpoints import SavedRun, model_from_checkpoint, saved_run
from clam.data import BagRecord
from clam.loading import plan_loading
from clam.metrics import summarize
from clam.run_files import SLIDE_ID_COLUMNS, baseline_column, probability_column
from feature_extraction.atomic import atomic_write_text
from feature_extraction.runtime import resolve_device


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode on ``device``, and what it was trained on
    (``saved``: the checkpoint's description of its run, read by clam.checkpoints)."""

    model: torch.nn.Module
    checkpoint: dict[str, Any]
    path: Path
    device: torch.device
    saved: SavedRun

    @property
    def args(self) -> dict[str, Any]:
        return self.saved.args

    @property
    def cache(self) -> dict[str, Any]:
        """The feature cache's configuration as the checkpoint records it."""
        return self.saved.cache

    @property
    def cache_key(self) -> str | None:
        return self.saved.cache_key

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.saved.class_names

    @property
    def n_classes(self) -> int:
        return self.saved.n_classes

    @property
    def feature_dim(self) -> int:
        return self.saved.feature_dim

    @property
    def is_clam_state_dict(self) -> bool:
        """Weights of mahmoodlab/CLAM (a bare state dict): no cache, class names, epoch or split."""
        return self.saved.is_clam_state_dict


@dataclass(frozen=True)
class SlidePrediction:
    record: BagRecord
    probs: np.ndarray  # (C,)
    attention: np.ndarray  # (K, N), K = 1 (CLAM-SB) or C (CLAM-MB)
    attention_raw: np.ndarray  # (K, N)
    # "mean" / "max" of the bag's raw features, (D,)
    pooled: dict[str, np.ndarray] = field(default_factory=dict)


def load_model(checkpoint_path: str | Path, device: str | torch.device = "auto") -> LoadedModel:
    """Rebuild the checkpoint's model for inference."""
    path = Path(checkpoint_path)
    resolved = resolve_device(device)
    model, checkpoint = model_from_checkpoint(path, resolved)
    return LoadedModel(
        model=model, checkpoint=checkpoint, path=path, device=resolved, saved=saved_run(checkpoint)
    )


def predict(
    loaded: LoadedModel, records: Sequence[BagRecord], num_workers: int = 0, progress: bool = True
) -> Iterator[SlidePrediction]:
    """Run the model on every instance of each bag, one bag per forward pass, in record order."""
    total_bytes = sum(r.n_instances for r in records) * loaded.feature_dim * 4
    plan = plan_loading(total_bytes, "no", num_workers, loaded.device)
    dataset = BagDataset(records, sample_tiles=0, seed=0, train=False, in_memory=False, progress=False)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=plan.num_workers,
        pin_memory=loaded.device.type == "cuda",
    )
    loaded.model.eval()
    with torch.inference_mode():
        for features, _, index in tqdm(
            loader, total=len(dataset), desc="evaluating", unit="slide", disable=not progress, leave=False
        ):
            output = loaded.model(features.to(loaded.device)[None])
            yield SlidePrediction(
                record=records[int(index)],
                probs=output.probs[0].float().cpu().numpy(),
                attention=output.attention[0].float().cpu().numpy(),
                attention_raw=output.attention_raw[0].float().cpu().numpy(),
                pooled={
                    "mean": features.double().mean(dim=0).numpy(),
                    "max": features.double().amax(dim=0).numpy(),
                },
            )


# ---------------------------------------------------------------- prediction tables


def probability_values(class_names: Sequence[str], probs: Sequence[float]) -> dict[str, float]:
    """The ``prob_<class>`` columns of one row."""
    return {probability_column(n): float(p) for n, p in zip(class_names, probs)}


def baseline_values(
    class_names: Sequence[str], baseline: PooledBaseline | None, prediction: SlidePrediction
) -> dict[str, float | None]:
    """The ``baseline_prob_<class>`` columns of one slide: the baseline's probabilities on every
    instance of the bag, as the model's (None without a baseline)."""
    if baseline is None:
        return {baseline_column(n): None for n in class_names}
    probs = baseline.probs(prediction.pooled[baseline.pool][None])[0]
    return {baseline_column(n): float(p) for n, p in zip(class_names, probs)}


def slide_row(
    prediction: SlidePrediction, class_names: Sequence[str], baseline: PooledBaseline | None
) -> dict[str, Any]:
    """One row of predictions.csv (the baseline's columns only when there is a baseline)."""
    record = prediction.record
    predicted = int(np.argmax(prediction.probs))
    return {
        "slide_id": record.slide_id,
        "patient_id": record.patient_id,
        "class_folder": record.class_folder,
        "label": record.label,
        "label_name": class_names[record.label],
        **probability_values(class_names, prediction.probs),
        "predicted": predicted,
        "predicted_name": class_names[predicted],
        "n_tiles": prediction.attention.shape[-1],
        **({} if baseline is None else baseline_values(class_names, baseline, prediction)),
    }


def aggregate_patients(slides: Sequence[dict[str, Any]], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per patient: the mean probability of each class over its slides, argmax prediction.

    ``slides`` are rows of predictions.csv (as dicts); patients are listed in first-seen order."""
    columns = [probability_column(name) for name in class_names]
    # The baseline's probabilities, where the rows carry them: averaged the same way (None when missing).
    baseline_columns = [
        baseline_column(name) for name in class_names if slides and baseline_column(name) in slides[0]
    ]
    patients: dict[str, list[dict[str, Any]]] = {}
    for row in slides:
        patients.setdefault(str(row["patient_id"]), []).append(row)
    out = []
    for patient_id, rows in patients.items():
        probs = np.mean([[float(r[c]) for c in columns] for r in rows], axis=0)
        predicted = int(np.argmax(probs))
        out.append(
            {
                "patient_id": patient_id,
                "n_slides": len(rows),
                "slide_ids": ";".join(str(r["slide_id"]) for r in rows),
                "label": int(rows[0]["label"]),
                "label_name": class_names[int(rows[0]["label"])],
                **{c: float(p) for c, p in zip(columns, probs)},
                "predicted": predicted,
                "predicted_name": class_names[predicted],
                **{
                    c: None
                    if any(r[c] in (None, "") for r in rows)
                    else float(np.mean([float(r[c]) for r in rows]))
                    for c in baseline_columns
                },
            }
        )
    return out


def ensemble_rows(
    models_slides: Sequence[Sequence[dict[str, Any]]], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """predictions.csv rows of the ensemble of several models (each a list of rows of the same
    slides in the same order): the mean of their probabilities, argmax prediction; and, when every
    model's rows carry the baseline's probabilities, the mean of those as the baseline ensemble."""
    columns = [probability_column(n) for n in class_names]
    baseline_columns = [baseline_column(n) for n in class_names]
    with_baseline = all(
        slides and all(slides[0].get(c) not in (None, "") for c in baseline_columns)
        for slides in models_slides
    )
    rows = []
    for i, row in enumerate(models_slides[0]):
        probs = np.mean([[float(slides[i][c]) for c in columns] for slides in models_slides], axis=0)
        predicted = int(np.argmax(probs))
        baseline = (
            np.mean([[float(slides[i][c]) for c in baseline_columns] for slides in models_slides], axis=0)
            if with_baseline
            else []
        )
        rows.append(
            {
                **{k: row[k] for k in SLIDE_ID_COLUMNS},
                **{c: float(p) for c, p in zip(columns, probs)},
                "predicted": predicted,
                "predicted_name": class_names[predicted],
                **{c: float(p) for c, p in zip(baseline_columns, baseline)},
            }
        )
    return rows


def level_metrics(
    rows: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    n_bootstrap: int,
    seed: int,
    column=probability_column,
) -> dict[str, Any]:
    """``clam.metrics.summarize`` of prediction rows (predictions.csv or predictions_patient.csv as
    dicts): their labels and the probabilities in ``column(class name)`` columns."""
    names = list(class_names)
    y_true = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    probs = np.array([[float(r[column(n)]) for n in names] for r in rows], dtype=np.float64).reshape(
        -1, len(names)
    )
    return summarize(y_true, probs, len(names), n_bootstrap, seed, names)


def per_level_metrics(
    slides: Sequence[dict[str, Any]],
    patients: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    n_bootstrap: int,
    seed: int,
    column=probability_column,
) -> dict[str, dict[str, Any]]:
    """``level_metrics`` per slide and per patient, with the same bootstrap: metrics.json's
    ``per_slide`` and ``per_patient``."""
    return {
        "per_slide": level_metrics(slides, class_names, n_bootstrap, seed, column),
        "per_patient": level_metrics(patients, class_names, n_bootstrap, seed, column),
    }


def write_table(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """A CSV with the keys of the first row as header (probabilities with 6 decimals)."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())
