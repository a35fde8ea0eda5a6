"""Evaluation of one checkpoint on a cohort: predictions, metrics with their uncertainty, figures
and attention maps, written into ``<run folder>/eval_<timestamp>/`` (or ``--output_dir``):

    predictions.csv           one row per slide: ids, true label, probability of each class, prediction
    predictions_patient.csv   one row per patient: the mean of its slides' probabilities
    metrics.json              per slide and per patient: AUC with its 95% bootstrap CI, accuracy,
                              balanced accuracy, sensitivity, specificity, F1, confusion matrix, n
    roc.png                   ROC curves with their bootstrap bands (per slide | per patient)
    confusion_matrix.png      confusion matrices (per slide | per patient)
    attention/                per-slide attention scores, top/bottom-k montages, heatmaps (clam.heatmaps)
    report.html               one page with all of the above (clam.eval_report)

The cohort comes from clam.cohort, the model and its predictions from clam.inference, the leakage
check from clam.leakage, the figures from clam.figures; the files' names are clam.run_files'.
Every instance of every bag is used (no subsampling). A cross-validation run is evaluated by
``clam.crossval.evaluate_folds``, which calls ``evaluate`` for each fold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from clam import heatmaps
from clam.checkpoints import saved_baseline
from clam.cohort import Cohort, cohort_bags
from clam.eval_config import ALL, NONE, EvaluateConfig
from clam.eval_report import write_eval_report
from clam.figures import plot_confusion, plot_roc
from clam.inference import (
    LoadedModel,
    SlidePrediction,
    aggregate_patients,
    load_model,
    per_level_metrics,
    predict,
    slide_row,
    write_table,
)
from clam.leakage import check_leakage
from clam.metrics import format_auc, format_number
from clam.run_files import (
    ATTENTION_DIR,
    BEST_NAME,
    CONFUSION_PNG,
    METRICS_JSON,
    PATIENT_PREDICTIONS,
    PREDICTIONS,
    ROC_PNG,
    baseline_column,
    make_output_dir,
    write_json,
)
from feature_extraction.bags import read_bag
from feature_extraction.errors import PipelineError
from feature_extraction.layout import SPLITS, default_data_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    output_dir: Path
    metrics: dict[str, Any]
    slides: list[dict[str, Any]]
    patients: list[dict[str, Any]]


def evaluate(config: EvaluateConfig) -> EvaluationResult:
    """Evaluate the checkpoint file ``config.checkpoint``; write predictions, metrics, figures and
    attention maps (module docstring)."""
    if config.split not in SPLITS:
        raise PipelineError(f"unknown split {config.split!r}: use one of {', '.join(SPLITS)}")
    loaded = _load(config)
    if loaded.is_clam_state_dict:
        settings = loaded.saved.model_config
        log.info(
            f"{loaded.path} is a bare CLAM state dict; model from its tensor shapes: "
            + ", ".join(f"{k} {settings[k]}" for k in ("model_type", "model_size", "in_dim", "n_classes"))
        )
    cohort = cohort_bags(config, loaded)
    leakage = check_leakage(loaded.path, cohort.records)
    if leakage["message"]:
        log.info(leakage["message"])
    selected = _attention_selection(config.attention, cohort)
    output_dir = _output_dir(config, loaded)
    log.info(f"evaluating {loaded.path} on {len(cohort.records)} slides ({cohort.cache_dir}) -> {output_dir}")
    slides = _predict(config, loaded, cohort, selected, output_dir / ATTENTION_DIR)
    patients = aggregate_patients(slides, loaded.class_names)
    write_table(output_dir / PREDICTIONS, slides)
    write_table(output_dir / PATIENT_PREDICTIONS, patients)
    metrics: dict[str, Any] = {}
    if config.metrics:
        metrics = _metrics(config, loaded, cohort, slides, patients, leakage)
        write_json(output_dir / METRICS_JSON, metrics)
        plot_roc(
            output_dir / ROC_PNG,
            {"per slide": slides, "per patient": patients},
            metrics,
            config.n_bootstrap,
            config.seed,
        )
        plot_confusion(output_dir / CONFUSION_PNG, metrics)
        log.info(summary_table(metrics))
        log.info(f"report: {write_eval_report(output_dir)}")
    log.info(f"results: {output_dir}")
    return EvaluationResult(output_dir, metrics, slides, patients)


def _load(config: EvaluateConfig) -> LoadedModel:
    if config.checkpoint is None:
        raise PipelineError(
            "no checkpoint to evaluate: pass one (python -m clam.evaluate picks the newest run)."
        )
    if Path(config.checkpoint).is_dir():
        raise PipelineError(
            f"{config.checkpoint} is a folder, not a checkpoint file: name its {BEST_NAME} "
            "(the parent folder of a cross-validation run is evaluated by "
            "clam.crossval.evaluate_folds, as python -m clam.evaluate --checkpoint does)."
        )
    return load_model(config.checkpoint, config.device)


def _predict(
    config: EvaluateConfig, loaded: LoadedModel, cohort: Cohort, selected: set[str], attention_dir: Path
) -> list[dict[str, Any]]:
    """predictions.csv's rows; the attention maps of the ``selected`` slides on the way."""
    baseline = saved_baseline(loaded.checkpoint)
    data_dir = _image_dir(config)
    slides, index_rows = [], []
    for prediction in predict(loaded, cohort.records, config.num_workers, config.progress):
        slides.append(slide_row(prediction, loaded.class_names, baseline))
        if prediction.record.slide_id in selected:
            index_rows.append(_explain(prediction, loaded.class_names, attention_dir, data_dir, config.top_k))
    if index_rows:
        heatmaps.write_index(attention_dir, index_rows)
    return slides


def explain(config: EvaluateConfig) -> Path:
    """Only the attention maps of the chosen slides (``python -m clam.attention``); returns the folder."""
    loaded = _load(config)
    cohort = cohort_bags(config, loaded)
    selected = _attention_selection(config.attention, cohort)
    records = [r for r in cohort.records if r.slide_id in selected]
    output_dir = _output_dir(config, loaded)
    data_dir = _image_dir(config)
    rows = [
        _explain(p, loaded.class_names, output_dir, data_dir, config.top_k)
        for p in predict(loaded, records, config.num_workers, config.progress)
    ]
    heatmaps.write_index(output_dir, rows)
    return output_dir


def _image_dir(config: EvaluateConfig) -> Path | None:
    """Where the maps look for tile images: the cohort folder (None for bags from a labels CSV
    without --data_dir; the maps then use the slide folder recorded in each bag)."""
    if config.labels_csv is not None and config.data_dir is None:
        return None
    return Path(config.data_dir or default_data_dir(config.split))


def _explain(
    prediction: SlidePrediction, names: Sequence[str], out_dir: Path, data_dir: Path | None, top_k: int
) -> dict[str, Any]:
    record = prediction.record
    # For its tile names, coordinates and attributes; the features were read by the loader.
    bag = read_bag(record.path)
    slide = heatmaps.slide_attention(
        record.slide_id,
        record.patient_id,
        record.label,
        prediction.probs,
        prediction.attention,
        prediction.attention_raw,
        bag.tile_names,
        bag.coords,
        names,
        bag.typed_attrs,
    )
    return heatmaps.explain_slide(out_dir, slide, data_dir, top_k)


def _attention_selection(attention: str | tuple[str, ...], cohort: Cohort) -> set[str]:
    """Slide ids to draw maps for; PipelineError naming any id that is not in the cohort."""
    known = {r.slide_id for r in cohort.records}
    if attention == NONE:
        return set()
    if attention == ALL:
        return known
    unknown = sorted(set(attention) - known)
    if unknown:
        raise PipelineError(
            f"slides {unknown} are not among the {len(known)} evaluated slides, e.g. "
            f"{', '.join(sorted(known)[:3])}. Slide ids are <class folder>__<patient folder>."
        )
    return set(attention)


def _output_dir(config: EvaluateConfig, loaded: LoadedModel) -> Path:
    if config.output_dir is not None:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        return Path(config.output_dir)
    return make_output_dir(loaded.path.parent, config.output_prefix)


def _metrics(
    config: EvaluateConfig,
    loaded: LoadedModel,
    cohort: Cohort,
    slides: list[dict],
    patients: list[dict],
    leakage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    names = list(loaded.class_names)
    return {
        "checkpoint": str(loaded.path),
        "checkpoint_format": loaded.saved.checkpoint_format,
        "epoch": loaded.saved.epoch,
        "model_config": loaded.saved.model_config or None,
        "cache_key": cohort.cache_key,
        "cache_dir": str(cohort.cache_dir),
        "data_dir": None if config.labels_csv else str(config.data_dir or default_data_dir(config.split)),
        "labels_csv": str(config.labels_csv) if config.labels_csv else None,
        "split": config.split,
        "class_names": names,
        "positive_class": names[1] if loaded.n_classes == 2 else None,
        "instances": "all instances of every bag (no subsampling)",
        "patient_aggregation": "mean of the patient's slide probabilities, then argmax",
        **per_level_metrics(slides, patients, names, config.n_bootstrap, config.seed),
        "left_out": cohort.left_out,
        "leakage": leakage,
        "baseline": _baseline_metrics(config, loaded, slides, patients),
        "created": datetime.now().isoformat(timespec="seconds"),
    }


def _baseline_metrics(
    config: EvaluateConfig, loaded: LoadedModel, slides: list[dict], patients: list[dict]
) -> dict[str, Any] | None:
    """The baseline's metrics on the same slides and patients as CLAM's, with the same bootstrap."""
    saved = loaded.saved.baseline
    names = list(loaded.class_names)
    if not slides or baseline_column(names[0]) not in slides[0]:
        return None
    return {
        "method": saved.get("method"),
        "fitted_on": "the run's training bags (as the model)",
        "instances": "every instance of each bag, pooled",
        "val_auc_at_training": saved.get("val_auc"),
        **per_level_metrics(slides, patients, names, config.n_bootstrap, config.seed, baseline_column),
    }


def summary_table(metrics: dict[str, Any]) -> str:
    """A short plain-text table of the headline numbers per slide and per patient."""
    header = f"{'level':<9}{'n':>5}  {'AUC [95% CI]':<22}{'accuracy':>9}{'bal.acc':>9}{'sens':>7}{'spec':>7}{'F1':>7}"
    lines = [header, "-" * len(header)]
    for level in ("per_slide", "per_patient"):
        m = metrics[level]
        auc_text = format_auc(m["auc"], brackets=True)
        keys = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1")
        numbers = [format_number(m[key]) for key in keys]
        lines.append(
            f"{level[4:]:<9}{m['n']:>5}  {auc_text:<22}{numbers[0]:>9}{numbers[1]:>9}{numbers[2]:>7}"
            f"{numbers[3]:>7}{numbers[4]:>7}"
        )
    notes = sorted(
        {reason for level in ("per_slide", "per_patient") for reason in metrics[level]["undefined"].values()}
    )
    baseline = metrics.get("baseline")
    if baseline:
        aucs = [
            f"{level[4:]} {format_auc(baseline[level]['auc'], brackets=True)}"
            for level in ("per_slide", "per_patient")
        ]
        lines.append(f"baseline, {baseline['method']}, same slides: AUC " + ", ".join(aucs))
    lines += [f"note: {note}" for note in notes]
    if metrics.get("left_out"):
        lines.append(
            f"note: {len(metrics['left_out'])} slides without a bag were not evaluated "
            "(metrics.json: left_out)"
        )
    leakage = metrics.get("leakage") or {}
    if leakage.get("n_slides"):
        lines.append(
            f"WARNING: {leakage['n_slides']} of these slides ({leakage['n_patients']} patients) were used to "
            "train or validate this model: the metrics are optimistic (metrics.json: leakage)"
        )
    return "\n".join(lines)
