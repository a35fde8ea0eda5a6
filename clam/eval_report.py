"""``report.html``: one page per evaluation folder, from the files on disk alone (no model, no features).

The page of an evaluation (``clam.evaluation.evaluate``) holds: a header (checkpoint, cohort,
feature cache key, encoder and weights, with a banner when they were random, the date and the
tool's version), the leakage warning, the metrics per slide and per patient with the AUC's CI
and the baseline beside CLAM, the ROC and confusion figures, a per-slide table (sortable by
probability, error and label, filterable) and a section per slide: prediction, truth, the
top/bottom-k montage, the heatmap and a link to the attention CSV.

The page of a cross-validation evaluation (``clam.crossval.evaluate_folds``) holds the
ensemble's metrics and figures, the run's own pooled held-out estimate (its summary.json), a
table of the folds linking to each fold's page, and the per-slide table of the ensemble, each
slide linking to its section in the folds' pages.

Everything is read from: metrics.json, predictions.csv, roc.png, confusion_matrix.png,
attention/index.csv and the per-slide files it names, the checkpoint run's config.json (or the
cache's cache.json) for the encoder, and for a cross-validation run its summary.json.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from clam.metrics import format_number
from clam.report_html import anchor, auc_text, href, image, relative_link, write_page
from clam.run_files import (
    ATTENTION_DIR,
    ATTENTION_INDEX,
    CONFIG_NAME,
    CONFUSION_PNG,
    METRICS_JSON,
    PREDICTIONS,
    ROC_PNG,
    SUMMARY_JSON,
    attention_files,
    baseline_column,
    probability_column,
)
from feature_extraction.cache import CACHE_JSON
from feature_extraction.errors import PipelineError

REPORT_HTML = "report.html"
METRIC_ROWS = (
    ("n", "n"),
    ("AUC [95% CI]", "auc"),
    ("accuracy", "accuracy"),
    ("balanced accuracy", "balanced_accuracy"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("F1", "f1"),
)


def is_evaluation_dir(path: Path) -> bool:
    """A folder that ``clam.evaluate`` wrote: metrics.json and predictions.csv."""
    return (Path(path) / METRICS_JSON).is_file() and (Path(path) / PREDICTIONS).is_file()


def is_crossval_evaluation(metrics: dict[str, Any]) -> bool:
    return "ensemble" in metrics and "folds" in metrics


def write_eval_report(eval_dir: Path, folds: bool = True) -> Path:
    """Write ``eval_dir/report.html`` (for a cross-validation evaluation, with ``folds`` each fold's
    page first); returns its path. A PipelineError names a file that is missing or cannot be read."""
    eval_dir = Path(eval_dir)
    metrics = read_json(eval_dir / METRICS_JSON)
    if not is_crossval_evaluation(metrics):
        return write_page(eval_dir / REPORT_HTML, "eval_report.html", **evaluation_context(eval_dir, metrics))
    for name in metrics["folds"] if folds else ():
        if is_evaluation_dir(eval_dir / name):
            write_eval_report(eval_dir / name)
    return write_page(eval_dir / REPORT_HTML, "eval_crossval.html", **crossval_context(eval_dir, metrics))


# ---------------------------------------------------------------- reading the files


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(
            f"{path} is missing: is {Path(path).parent} an evaluation folder (python -m clam.evaluate writes one)?"
        ) from None
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path} cannot be read ({error}); evaluate again to rewrite it.") from error
    if not isinstance(value, dict):
        raise PipelineError(f"{path} does not hold a JSON object; evaluate again to rewrite it.")
    return value


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV's rows; [] when the file is missing (an evaluation without attention maps)."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        return []
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise PipelineError(f"{path} cannot be read ({error}); evaluate again to rewrite it.") from error


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def encoder(metrics: dict[str, Any], eval_dir: Path) -> dict[str, Any]:
    """The feature extraction the model was trained on: the ``cache`` of the checkpoint run's
    config.json, else the cache folder's cache.json; ``{}`` when neither can be found (a bare CLAM
    state dict, or a run folder moved away)."""
    candidates = []
    if metrics.get("checkpoint"):
        run_dir = Path(metrics["checkpoint"]).parent
        candidates += [run_dir / CONFIG_NAME, eval_dir.parent / CONFIG_NAME]
    for path in candidates:
        try:
            cache = json.loads(path.read_text(encoding="utf-8")).get("cache") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if cache.get("backbone") and cache.get("cache_key") in (None, metrics.get("cache_key")):
            return {**cache, "source": str(path)}
    if metrics.get("cache_dir"):
        path = Path(metrics["cache_dir"]) / CACHE_JSON
        try:
            return {**json.loads(path.read_text(encoding="utf-8")), "source": str(path)}
        except (OSError, ValueError):
            pass
    return {}


# ---------------------------------------------------------------- what the pages show


def header(metrics: dict[str, Any], eval_dir: Path, title: str) -> dict[str, Any]:
    found = encoder(metrics, eval_dir)
    weights = str(found.get("weights") or "")
    return {
        "title": title,
        "checkpoint": metrics.get("checkpoint"),
        "epoch": metrics.get("epoch"),
        "checkpoint_format": metrics.get("checkpoint_format"),
        "cohort": metrics.get("data_dir") or metrics.get("labels_csv"),
        "split": metrics.get("split"),
        "cache_key": metrics.get("cache_key") or found.get("cache_key"),
        "cache_dir": metrics.get("cache_dir"),
        "encoder": {
            key: found.get(key) for key in ("backbone", "feature_dim", "input_size", "max_tiles", "source")
        },
        "weights": weights,
        "weights_random": weights == "random" or bool(found.get("weights_random")),
        "created": metrics.get("created"),
        "class_names": metrics.get("class_names") or [],
    }


def metrics_table(levels: dict[str, dict[str, Any]], baseline: dict[str, Any] | None, name: str) -> dict:
    """The metrics per slide and per patient, ``name`` (CLAM or its ensemble) beside the baseline."""
    columns = []
    for level in ("per_slide", "per_patient"):
        columns.append((f"{level[4:]}: {name}", levels.get(level)))
        if baseline and baseline.get(level):
            columns.append((f"{level[4:]}: baseline", baseline[level]))
    rows = []
    for title, key in METRIC_ROWS:
        cells = []
        for _, values in columns:
            value = (values or {}).get(key)
            cells.append(
                str(value)
                if key == "n" and value is not None
                else (auc_text(value) if key == "auc" else format_number(value))
            )
        rows.append({"title": title, "cells": cells})
    notes = sorted(
        {
            f"{label}: {reason}"
            for label, values in columns
            for reason in ((values or {}).get("undefined") or {}).values()
        }
    )
    return {"columns": [c[0] for c in columns], "rows": rows, "notes": notes}


def slide_rows(rows: list[dict[str, str]], names: list[str]) -> list[dict[str, Any]]:
    """predictions.csv as the per-slide table's rows: the score (the positive class's probability
    for two classes, else the predicted class's), the error (1 - probability of the true class)."""
    out = []
    for order, row in enumerate(rows):
        probs = [_float(row.get(probability_column(n))) for n in names]
        label = int(row["label"]) if str(row.get("label", "")).lstrip("-").isdigit() else None
        label = label if label is not None and 0 <= label < len(names) else None
        predicted = int(row["predicted"]) if str(row.get("predicted", "")).isdigit() else None
        score = probs[1] if len(names) == 2 else (probs[predicted] if predicted is not None else None)
        error = None if label is None or probs[label] is None else 1.0 - probs[label]
        baseline = [_float(row.get(baseline_column(n))) for n in names]
        out.append(
            {
                "id": row["slide_id"],
                "anchor": anchor(row["slide_id"]),
                "order": order,
                "patient": row.get("patient_id", ""),
                "truth": names[label] if label is not None else "unknown",
                "predicted": names[predicted] if predicted is not None else row.get("predicted_name", ""),
                "correct": label is not None and label == predicted,
                "score": score,
                "error": error,
                "probs": list(zip(names, probs)),
                "baseline": list(zip(names, baseline)) if any(b is not None for b in baseline) else [],
                "n_tiles": row.get("n_tiles", ""),
            }
        )
    return out


def attention_maps(eval_dir: Path, slide_id: str, index: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The montage, heatmap and CSV of one slide in ``attention/``, as links (None: not drawn)."""
    folder = Path(eval_dir) / ATTENTION_DIR
    files = index.get(slide_id) or attention_files(slide_id)
    csv_name = files.get("scores_csv") or ""
    return {
        "montage": image(eval_dir, f"{ATTENTION_DIR}/{files['topk_png']}") if files.get("topk_png") else None,
        "heatmap": image(eval_dir, f"{ATTENTION_DIR}/{files['heatmap_png']}")
        if files.get("heatmap_png")
        else None,
        "csv": href(f"{ATTENTION_DIR}/{csv_name}") if csv_name and (folder / csv_name).is_file() else None,
        "note": files.get("note") or "",
        "mapped": slide_id in index or (folder / csv_name).is_file(),
    }


def leakage_notes(leakage: dict[str, Any] | None) -> dict[str, Any]:
    """The leakage box: ``warning`` when the evaluated slides overlap the run's train/val parts,
    ``note`` when that could not be checked."""
    leakage = leakage or {}
    leaked = bool(leakage.get("n_slides")) or bool(leakage.get("folds_with_leakage"))
    message = leakage.get("message") or ""
    if message.startswith("WARNING: "):
        message = message[len("WARNING: ") :]
    return {"warning": message if leaked else "", "note": "" if leaked else message}


def evaluation_context(eval_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    names = list(metrics.get("class_names") or [])
    slides = slide_rows(read_rows(eval_dir / PREDICTIONS), names)
    index = {row["slide_id"]: row for row in read_rows(eval_dir / ATTENTION_DIR / ATTENTION_INDEX)}
    for slide in slides:
        slide.update(attention_maps(eval_dir, slide["id"], index))
    checkpoint = Path(str(metrics.get("checkpoint") or "checkpoint"))
    baseline = metrics.get("baseline")
    return {
        "header": header(metrics, eval_dir, f"Evaluation of {checkpoint.parent.name}/{checkpoint.name}"),
        "leakage": leakage_notes(metrics.get("leakage")),
        "metrics": metrics_table(metrics, baseline, "CLAM"),
        "baseline": baseline,
        "left_out": metrics.get("left_out") or [],
        "figures": _figures(eval_dir),
        "slides": slides,
        "score_name": _score_name(names),
        "n_patients": len({s["patient"] for s in slides}),
        "n_mapped": sum(1 for s in slides if s["mapped"]),
    }


def _score_name(names: list[str]) -> str:
    return f"P({names[1]})" if len(names) == 2 else "P(predicted)"


def _figures(eval_dir: Path) -> list[dict[str, Any]]:
    shown = [("ROC curves", ROC_PNG), ("Confusion matrices", CONFUSION_PNG)]
    return [{"title": title, "image": image(eval_dir, name), "name": name} for title, name in shown]


def crossval_context(eval_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The page of a cross-validation evaluation: the ensemble, the folds, the run's pooled estimate."""
    names = list(metrics.get("class_names") or [])
    folds = []
    first: dict[str, Any] = {}
    for name, fold in metrics["folds"].items():
        fold_dir = eval_dir / name
        fold_metrics = read_json(fold_dir / METRICS_JSON) if is_evaluation_dir(fold_dir) else {}
        first = first or fold_metrics
        folds.append(_fold_row(name, fold, fold_dir, eval_dir))
    slides = slide_rows(read_rows(eval_dir / PREDICTIONS), names)
    for slide in slides:
        slide["fold_links"] = [
            {"name": f["name"], "href": f"{f['report']}#{slide['anchor']}"}
            for f in folds
            if f["report"] and slide["id"] in f["mapped"]
        ]
    run_dir = Path(str(metrics.get("run_dir") or eval_dir.parent))
    title = f"Cross-validation evaluation of {run_dir.name} ({len(folds)} folds)"
    first_dir = eval_dir / next(iter(metrics["folds"]), "")
    return {
        # The cohort and the encoder are the folds' (one cohort, one cache); the checkpoints are in the table.
        "header": {**header(first, first_dir, title), "checkpoint": None, "created": metrics.get("created")},
        "run_dir": str(run_dir),
        "leakage": leakage_notes(metrics.get("leakage")),
        "metrics": metrics_table(metrics["ensemble"], metrics.get("baseline"), "ensemble"),
        "ensemble_method": metrics["ensemble"].get("method", ""),
        "pooled": _pooled_oof(run_dir, eval_dir),
        "folds": folds,
        "figures": [f for f in _figures(eval_dir) if f["image"]],
        "slides": slides,
        "score_name": _score_name(names),
        "n_patients": len({s["patient"] for s in slides}),
    }


def _fold_row(name: str, fold: dict[str, Any], fold_dir: Path, eval_dir: Path) -> dict[str, Any]:
    baseline = fold.get("baseline") or {}
    leakage = fold.get("leakage") or {}
    mapped = {row["slide_id"] for row in read_rows(fold_dir / ATTENTION_DIR / ATTENTION_INDEX)}
    return {
        "name": name,
        "checkpoint": fold.get("checkpoint"),
        "epoch": fold.get("epoch"),
        "slide_auc": (fold.get("per_slide") or {}).get("auc"),
        "patient_auc": (fold.get("per_patient") or {}).get("auc"),
        "balanced_accuracy": format_number((fold.get("per_patient") or {}).get("balanced_accuracy")),
        "baseline_auc": (baseline.get("per_patient") or {}).get("auc"),
        "leaked": leakage.get("n_slides"),
        "checked": leakage.get("checked"),
        "report": href(f"{name}/{REPORT_HTML}") if (fold_dir / REPORT_HTML).is_file() else None,
        "folder": relative_link(fold_dir, eval_dir),
        "mapped": mapped,
    }


def _pooled_oof(run_dir: Path, eval_dir: Path) -> dict[str, Any] | None:
    """The run's own held-out estimate (summary.json's pooled_oof), when its summary can be found."""
    for path in (run_dir / SUMMARY_JSON, eval_dir.parent / SUMMARY_JSON):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        pooled = summary.get("pooled_oof") or {}
        return {
            "file": str(path),
            "n_patients": pooled.get("n_patients"),
            "auc": pooled.get("auc"),
            "baseline_auc": pooled.get("baseline_auc"),
            "val_auc_mean": (summary.get("validation_selected") or {}).get("auc_mean"),
        }
    return None
