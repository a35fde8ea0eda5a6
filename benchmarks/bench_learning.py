"""Learning: does CLAM find the few tiles that matter? Writes the ``## Learning`` section of docs/benchmarks.md.

    python benchmarks/bench_learning.py --write                      # the full benchmark (10-15 minutes on 2 cores)
    python benchmarks/bench_learning.py                              # the same, printed only
    python benchmarks/bench_learning.py --quick --variants witness5  # a smoke test (a minute), printed only

On the example cohort (``feature_extraction.example_cohort``, train split, 36 patients) in five
variants (``VARIANTS``), which separate the two knobs that make a cohort hard:

- the witness fraction alone, at the full-strength signal (strength 1) and no label noise: 20% (the
  easy preset with its witness fraction set to 0.20), 5% (2 of 40 tiles: "5% witness, full signal",
  the medium preset at strength 1) and 2% (2 of 100 tiles: "2% witness, full signal", the hard
  preset at strength 1 without label noise). The targets are checked on the last two;
- the subtler presets as they are: medium (5%, strength 0.6) and hard (2%, strength 0.35, 5% label
  noise), further rows with their own verdicts, not targets.

Each cohort is embedded once (ImageNet weights when they can be had, else random weights, which the
section says loudly), then 5-fold patient-level cross-validation (``clam.crossval``) with the same
folds for every model of a cohort:

- CLAM-SB and CLAM-MB with the defaults of ``clam.train``;
- attention-MIL: CLAM-SB without instance clustering (``bag_weight 1.0``);
- mean-pool logistic regression: the baseline every fold fits beside CLAM (``summary.json``);
- max-pool logistic regression: ``clam.baselines`` fitted here on each fold's training part.

Every AUC is the pooled patient-level AUC over the folds' held-out test parts, with its bootstrap
95% CI. The localisation AUC is, per truly positive slide of a test part, the ROC AUC of the
attention its fold's selected model gives each tile against the ground truth's witness tiles
(positive-class branch for CLAM-MB), averaged over the slides. On the "5% witness, full signal"
cohort CLAM-SB also runs on copies of the bags scaled x30 + 30 and x0.01, with the default
``--feature_norm standard`` and with ``--feature_norm none`` (CLAM's raw-feature behaviour).

Where CLAM-SB or CLAM-MB misses a target on a cohort whose features carry the signal, while it had not
fit its training bags by the last epoch, the same cross-validation is run once more with four times the
epochs (same folds, nothing else changed): a diagnostic row that says whether the training budget is
what the miss comes from. It is no target row: the targets are checked on the defaults.

Cohorts, caches and timings of the embedding are kept under ``--workdir`` (default
/tmp/bench_learning) and reused by the next run; the cross-validation runs are redone every time.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import load_average, machine, publish  # noqa: E402

from clam.metrics import format_auc, format_number  # noqa: E402
from clam.run_files import fold_dirs  # noqa: E402  (the fold folders of a cross-validation run, in order)
from feature_extraction.runtime import available_cores  # noqa: E402

SECTION = "## Learning"
DEFAULT_WORKDIR = Path("/tmp/bench_learning")
POSITIVE = 1  # class index of EGFR_positive
SCALES = (("x30 + 30", 30.0, 30.0), ("x0.01", 0.01, 0.0))
LOCALISATION_TARGET = 0.9
SEED = 0


@dataclass(frozen=True)
class Variant:
    """One cohort of the benchmark: an example-cohort preset with some of its knobs set otherwise.
    ``name`` is its folder in the workdir and its --variants choice, ``title`` its name in the table."""

    name: str
    title: str
    preset: str  # a key of feature_extraction.example_plan.DIFFICULTIES
    overrides: tuple[tuple[str, Any], ...] = ()  # build_example_cohort keyword arguments

    def knob(self, key: str) -> Any:
        """The value of one of the preset's knobs in this variant (signal_strength, label_noise, ...)."""
        from feature_extraction.example_plan import DIFFICULTIES as PRESETS

        return dict(self.overrides).get(key, getattr(PRESETS[self.preset], key))


VARIANTS = (
    # The target cohort has 20%; the easy preset draws 10-25%.
    Variant("easy", "easy preset", "easy", (("signal_fraction", 0.20),)),
    # The witness fraction alone: the medium and hard presets' slides at the full-strength signal.
    Variant(
        "witness5", "5% witness, full signal", "medium", (("signal_strength", 1.0), ("label_noise", 0.0))
    ),
    Variant("witness2", "2% witness, full signal", "hard", (("signal_strength", 1.0), ("label_noise", 0.0))),
    # The subtler presets as they are.
    Variant("medium", "medium preset", "medium"),
    Variant("hard", "hard preset", "hard"),
)
BY_NAME = {v.name: v for v in VARIANTS}
TARGET_VARIANTS = (
    "witness5",
    "witness2",
)  # "CLAM at least the best baseline at 5% and at 2% witness fraction"
LOCALISATION_VARIANT = "witness5"  # "localisation AUC of at least 0.9 at 5% witness fraction"
SCALE_VARIANT = "witness5"  # the feature-scale rows: where CLAM should learn, so equal AUCs mean something


@dataclass(frozen=True)
class Size:
    """The cohort and training sizes of a run: the full benchmark or the --quick smoke test."""

    n_patients: int
    tiles_per_slide: int | None  # None: the preset's
    tile_size: int
    epochs: int
    n_bootstrap: int


FULL = Size(n_patients=36, tiles_per_slide=None, tile_size=256, epochs=10, n_bootstrap=1000)
QUICK = Size(n_patients=10, tiles_per_slide=10, tile_size=64, epochs=2, n_bootstrap=100)


LOAD = {
    "start": load_average(),
    "max": load_average(),
}  # the 1-minute load average seen while running


def log_line(message: str) -> None:
    LOAD["max"] = max(LOAD["max"], load_average())
    print(message, flush=True)


@contextmanager
def quiet():
    """The clam package's progress lines (INFO) silenced; its warnings still show."""
    logger = logging.getLogger("clam")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------- the backbone weights


def pick_weights(backbone: str) -> tuple[str, str]:
    """("imagenet", source) when the ImageNet weights load here, else ("random", why not)."""
    from feature_extraction.backbones import load_backbone
    from feature_extraction.errors import PipelineError

    try:
        loaded = load_backbone(backbone, "imagenet")
        return "imagenet", loaded.weights_source
    except PipelineError as error:
        return "random", str(error).splitlines()[0]


# ---------------------------------------------------------------- cohorts and caches (kept in the workdir)


def cohort_params(variant: Variant, size: Size) -> dict[str, Any]:
    """The keyword arguments of build_example_cohort for ``variant`` (also the cache's identity: a cohort
    in the workdir built with other arguments is rebuilt)."""
    params: dict[str, Any] = {
        "seed": SEED,
        "n_train_patients": size.n_patients,
        "difficulty": variant.preset,
        "tile_size": size.tile_size,
    }
    if size.tiles_per_slide is not None:
        params["tiles_per_slide"] = size.tiles_per_slide
    params.update(variant.overrides)
    return params


def prepare(workdir: Path, variant: Variant, size: Size, weights: str, backbone: str) -> dict[str, Any]:
    """Build the cohort's train split and embed it, or reuse both from an earlier run with the same
    settings. Returns the cache folder, the ground truth and the seconds each step took (when built)."""
    from feature_extraction.embed import EmbedConfig, embed_cohort
    from feature_extraction.example_cohort import (
        build_example_cohort,
        load_ground_truth,
    )

    difficulty = variant.name  # the folder and the log's tag
    home = workdir / difficulty
    params = cohort_params(variant, size)
    record_path = home / "prepared.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("params") != params:
        if home.exists():
            shutil.rmtree(home)
        home.mkdir(parents=True)
        log_line(f"[{difficulty}] building the example cohort ({params})")
        started = time.perf_counter()
        summary = build_example_cohort(home / "cohort", splits=("train",), **params)
        record = {
            "params": params,
            "cohort_seconds": time.perf_counter() - started,
            "n_tiles": summary.n_tiles,
            "n_slides": summary.n_slides,
            "embed": {},
        }
        record_path.write_text(json.dumps(record, indent=1))
    started = time.perf_counter()
    report = embed_cohort(
        EmbedConfig(backbone=backbone, weights=weights, seed=SEED, progress=False),
        home / "cohort" / "train",
        "train",
        features_dir=home / "features",
    )
    wall = time.perf_counter() - started
    if report.failed:
        raise SystemExit(f"[{difficulty}] embedding failed for {report.failed}")
    if report.n_embedded:  # embedded now: record the time; a reused cache keeps the first run's
        record["embed"][weights] = {
            "seconds": wall,
            "n_tiles": report.n_tiles_embedded,
            "tiles_per_second": report.tiles_per_second,
            "runtime": report.runtime,
            "cache_dir": str(report.cache_dir),
        }
        record_path.write_text(json.dumps(record, indent=1))
    embed = dict(record["embed"].get(weights) or {"seconds": None})
    embed["reused"] = not report.n_embedded
    log_line(
        f"[{difficulty}] cache {report.cache_dir} ({'reused' if embed['reused'] else f'embedded in {wall:.0f} s'})"
    )
    return {
        "name": difficulty,
        "variant": variant,
        "home": home,
        "cache_dir": report.cache_dir,
        "truth": load_ground_truth(home / "cohort" / "train"),
        "cohort_seconds": record["cohort_seconds"],
        "embed": embed,
        "params": params,
    }


def witness_description(truth: dict[str, dict]) -> tuple[float, str]:
    """(mean witness fraction of the positive slides, "20.8% (5 of 24 tiles)")."""
    positives = [s for s in truth.values() if s["true_label"] == POSITIVE]
    fractions = [len(s["signal_tiles"]) / s["n_tiles"] for s in positives]
    counts = sorted({len(s["signal_tiles"]) for s in positives})
    tiles = sorted({s["n_tiles"] for s in positives})
    count = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    n = str(tiles[0]) if len(tiles) == 1 else f"{tiles[0]}-{tiles[-1]}"
    mean = float(np.mean(fractions))
    return mean, f"{100 * mean:.1f}% ({count} of {n} tiles)"


def scaled_cache(cache_dir: Path, dest: Path, a: float, b: float) -> Path:
    """A copy of the cache with every bag's features replaced by ``features * a + b``."""
    from feature_extraction.bags import read_attrs, read_bag, write_bag

    out = dest / cache_dir.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(cache_dir, out)
    for path in sorted(out.glob("*.h5")):
        bag = read_bag(path)
        write_bag(path, bag.features.astype(np.float64) * a + b, bag.coords, bag.tile_names, read_attrs(path))
    return out


# ---------------------------------------------------------------- cross-validation and what is read from it


def cross_validate_model(
    cache_dir: Path, out: Path, size: Size, folds: int, device: str, splits: Path | None, **overrides: Any
) -> tuple[Path, float]:
    """One ``clam.crossval`` run (the parent run folder) and its wall seconds."""
    from clam.crossval import cross_validate
    from clam.train import TrainConfig

    if out.exists():
        shutil.rmtree(out)
    config = TrainConfig(
        features_dir=str(cache_dir),
        folds=0 if splits else folds,
        splits=str(splits) if splits else None,
        num_epochs=size.epochs,
        seed=SEED,
        device=device,
        output_dir=str(out),
        progress=False,
        **overrides,
    )
    started = time.perf_counter()
    with quiet():
        parent = cross_validate(config, n_bootstrap=size.n_bootstrap)
    return parent, time.perf_counter() - started


def fold_parts(fold_dir: Path) -> dict[str, list[dict[str, str]]]:
    """fold_k/split.csv as {train, val, test: rows (slide_id, patient_id, label)}."""
    parts: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    with open(fold_dir / "split.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            parts[row["set"]].append(row)
    return parts


def summary_auc(parent: Path, key: str) -> dict[str, Any]:
    return json.loads((parent / "summary.json").read_text())["pooled_oof"][key]


def pooled_baseline(
    parent: Path, cache_dir: Path, pool: str, n_bootstrap: int
) -> tuple[dict[str, Any], float]:
    """Logistic regression on ``pool``-pooled features, fitted on each fold's training part and scored on
    its test part; the patient-level AUC (mean of a patient's slides) pooled over the folds, and the seconds
    (reading the bags, fitting and scoring)."""
    from clam.baselines import fit_baseline, pool_bags
    from clam.metrics import auc_with_ci
    from feature_extraction.bags import bag_path, read_bag

    started = time.perf_counter()
    by_patient: dict[str, list[float]] = {}
    labels: dict[str, int] = {}
    for fold_dir in fold_dirs(parent):
        parts = fold_parts(fold_dir)

        def pooled(rows):
            return pool_bags((read_bag(bag_path(cache_dir, r["slide_id"])).features for r in rows), pool)

        fitted = fit_baseline(
            pooled(parts["train"]), [int(r["label"]) for r in parts["train"]], 2, pool, SEED
        )
        if fitted is None:
            return {
                "auc": None,
                "ci_low": None,
                "ci_high": None,
                "reason": "a fold's training part held one class",
            }, 0.0
        for row, probs in zip(parts["test"], fitted.probs(pooled(parts["test"]))):
            by_patient.setdefault(row["patient_id"], []).append(float(probs[POSITIVE]))
            labels[row["patient_id"]] = int(row["label"])
    patients = sorted(by_patient)
    positive = np.array([np.mean(by_patient[p]) for p in patients])
    auc = auc_with_ci(
        [labels[p] for p in patients], np.column_stack([1 - positive, positive]), 2, n_bootstrap, SEED
    )
    return auc.to_dict(), time.perf_counter() - started


def localisation(parent: Path, cache_dir: Path, truth: dict[str, dict], device: str) -> dict[str, Any]:
    """Mean over the truly positive slides of every fold's test part of the ROC AUC of the attention
    scores (positive-class branch for CLAM-MB) against the witness-tile indicator."""
    from sklearn.metrics import roc_auc_score

    from clam.inference import load_model, predict
    from clam.run_files import selected_checkpoint
    from clam.splits import read_split
    from clam.train import TrainConfig
    from clam.training import load_bags
    from feature_extraction.bags import read_bag

    with quiet():
        bags = load_bags(TrainConfig(features_dir=str(cache_dir), progress=False))
    aucs, skipped = [], 0
    for fold_dir in fold_dirs(parent):
        split = read_split(fold_dir / "split.csv", bags.records)
        loaded = load_model(selected_checkpoint(fold_dir), device)
        for p in predict(loaded, split.test, 0, False):
            slide = truth[p.record.slide_id]
            if slide["true_label"] != POSITIVE:
                continue
            names = read_bag(p.record.path).tile_names
            rows = getattr(p.record, "rows", None)
            if rows is not None:
                names = [names[i] for i in rows]
            witness = set(slide["signal_tiles"])
            y = np.array([name in witness for name in names], dtype=int)
            if y.min() == y.max():  # all or no witness tiles among the bag's instances
                skipped += 1
                continue
            branch = p.attention[POSITIVE] if p.attention.shape[0] > 1 else p.attention[0]
            aucs.append(float(roc_auc_score(y, branch)))
    return {
        "mean": float(np.mean(aucs)) if aucs else None,
        "n": len(aucs),
        "skipped": skipped,
        "min": float(np.min(aucs)) if aucs else None,
    }


def feature_checks(cache_dir: Path, truth: dict[str, dict], folds: int) -> dict[str, Any]:
    """What the features themselves allow, from the ground truth; checks, not models of the table.

    ``tile_auc``: a tile-level logistic regression trained on the witness-tile labels (patient-grouped
    K-fold, every score out of fold) telling witness tiles from all others; ``localisation``: its scores
    localised like the attention (mean AUC within the truly positive slides). ``bag_auc``: the patient-level AUC (recorded labels, as in the table) of
    each slide's highest such tile score: what a model that had found the witness tiles could reach.
    ``small_norm`` and ``outlier``: label-free tile scores, localised like the attention (mean AUC over
    the truly positive slides): a smaller raw feature norm, and the norm of the standardised feature
    (statistics of all the cohort's tiles), i.e. how unusual a tile is."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from feature_extraction.bags import bag_path, read_bag

    x, y, groups, slides = [], [], [], []
    for slide_id, slide in truth.items():
        bag = read_bag(bag_path(cache_dir, slide_id))
        witness = set(slide["signal_tiles"])
        x.append(bag.features)
        y += [name in witness for name in bag.tile_names]
        groups += [slide["patient_id"]] * len(bag.tile_names)
        slides += [slide_id] * len(bag.tile_names)
    x, y, groups, slides = (
        np.concatenate(x).astype(np.float64),
        np.array(y, dtype=int),
        np.array(groups),
        np.array(slides),
    )
    out: dict[str, Any] = {"folds": folds, "tile_auc": None, "bag_auc": None, "localisation": None}
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    small_norm, outlier = [], []
    for slide_id, slide in truth.items():
        rows = slides == slide_id
        if slide["true_label"] != POSITIVE or y[rows].min() == y[rows].max():
            continue
        small_norm.append(roc_auc_score(y[rows], -np.linalg.norm(x[rows], axis=1)))
        outlier.append(roc_auc_score(y[rows], np.linalg.norm((x[rows] - mean) / std, axis=1)))
    out["small_norm"] = float(np.mean(small_norm)) if small_norm else None
    out["outlier"] = float(np.mean(outlier)) if outlier else None
    if y.sum() < folds or len(set(groups)) < folds:
        return out
    scores = np.zeros(len(y))
    for train_rows, test_rows in GroupKFold(n_splits=folds).split(x, y, groups):
        if len(set(y[train_rows])) < 2:
            return out
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
        )
        model.fit(x[train_rows], y[train_rows])
        scores[test_rows] = model.decision_function(x[test_rows])
    by_patient: dict[str, list[float]] = {}
    labels: dict[str, int] = {}
    located = []
    for slide_id, slide in truth.items():
        rows = slides == slide_id
        by_patient.setdefault(slide["patient_id"], []).append(float(scores[rows].max()))
        if slide["true_label"] == POSITIVE and y[rows].min() != y[rows].max():
            located.append(roc_auc_score(y[rows], scores[rows]))
        labels[slide["patient_id"]] = int(slide["recorded_label"])
    patients = sorted(by_patient)
    out["tile_auc"] = float(roc_auc_score(y, scores))
    out["localisation"] = float(np.mean(located)) if located else None
    out["bag_auc"] = float(
        roc_auc_score([labels[p] for p in patients], [np.mean(by_patient[p]) for p in patients])
    )
    return out


def training_facts(parent: Path) -> dict[str, Any]:
    """From the folds' config.json: the training AUC of the first and the last epoch (means over the folds),
    the number of epochs and the selected epochs."""
    first_train_auc, last_train_auc, selected, epochs = [], [], [], []
    for fold_dir in fold_dirs(parent):
        info = json.loads((fold_dir / "config.json").read_text())
        metrics = info.get("metrics") or []
        if metrics and metrics[-1].get("train_auc") is not None:
            last_train_auc.append(float(metrics[-1]["train_auc"]))
        if metrics and metrics[0].get("train_auc") is not None:
            first_train_auc.append(float(metrics[0]["train_auc"]))
        epochs.append(len(metrics))
        selected.append(info.get("best_epoch"))
    data = [json.loads((f / "config.json").read_text())["data"] for f in fold_dirs(parent)]
    return {
        "last_train_auc": float(np.mean(last_train_auc)) if last_train_auc else None,
        "first_train_auc": float(np.mean(first_train_auc)) if first_train_auc else None,
        "epochs": max(epochs) if epochs else None,
        "selected_epochs": selected,
        "n_val_patients": [d.get("n_val_patients") for d in data],
        "n_train_bags": [d.get("n_train_bags") for d in data],
    }


# ---------------------------------------------------------------- one cohort


CLAM_MODELS = (
    ("CLAM-SB", {"model_type": "clam_sb"}),
    ("CLAM-MB", {"model_type": "clam_mb"}),
    ("attention-MIL (CLAM-SB, bag_weight 1.0)", {"model_type": "clam_sb", "bag_weight": 1.0}),
)


def run_variant(
    prepared: dict[str, Any], size: Size, folds: int, device: str, with_scales: bool
) -> list[dict[str, Any]]:
    difficulty, cache_dir, truth = prepared["name"], prepared["cache_dir"], prepared["truth"]
    runs = prepared["home"] / "runs"
    rows: list[dict[str, Any]] = []
    splits = None
    first = None
    for name, overrides in CLAM_MODELS:
        key = name.split(" ")[0].lower()
        log_line(f"[{difficulty}] {name}: {folds}-fold cross-validation ...")
        parent, seconds = cross_validate_model(
            cache_dir, runs / key, size, folds, device, splits, **overrides
        )
        if splits is None:
            splits, first = parent / "splits.csv", parent
        rows.append(
            {
                "variant": difficulty,
                "model": name,
                "kind": "clam",
                "auc": summary_auc(parent, "auc"),
                "localisation": localisation(parent, cache_dir, truth, device),
                "seconds": seconds,
                "training": training_facts(parent),
            }
        )
        log_line(f"  {describe_row(rows[-1])}")
    # The baselines, on the same test parts as the first CLAM run.
    mean_auc = summary_auc(first, "baseline_auc")
    recomputed, mean_seconds = pooled_baseline(first, cache_dir, "mean", size.n_bootstrap)
    if mean_auc and recomputed["auc"] is not None and abs(mean_auc["auc"] - recomputed["auc"]) > 1e-6:
        log_line(
            f"  warning: the mean-pool baseline recomputed here ({recomputed['auc']:.4f}) differs from "
            f"summary.json's ({mean_auc['auc']:.4f})"
        )
    rows.append(
        {
            "variant": difficulty,
            "model": "mean-pool logistic regression",
            "kind": "baseline",
            "auc": mean_auc,
            "localisation": None,
            "seconds": mean_seconds,
            "recomputed_auc": recomputed["auc"],
        }
    )
    max_auc, max_seconds = pooled_baseline(first, cache_dir, "max", size.n_bootstrap)
    rows.append(
        {
            "variant": difficulty,
            "model": "max-pool logistic regression",
            "kind": "baseline",
            "auc": max_auc,
            "localisation": None,
            "seconds": max_seconds,
        }
    )
    for row in rows[-2:]:
        log_line(f"  {describe_row(row)}")
    prepared["splits"] = splits
    if with_scales:
        rows += run_scales(prepared, size, folds, device, splits)
    return rows


BUDGET_FACTOR = 4  # the diagnostic run's epochs, as a multiple of the benchmark's
FITTED = 0.9  # a training AUC at the last epoch from which CLAM counts as having fit its training bags


def run_budget_diagnostics(
    prepared: dict[str, Any],
    rows: list[dict[str, Any]],
    check: dict[str, Any],
    size: Size,
    folds: int,
    device: str,
) -> list[dict[str, Any]]:
    """On a target cohort, for each CLAM model that misses the target although the features carry the signal
    (best-tile bag AUC of the told tile classifier at least 0.9) and that had not fit its training bags by the
    last epoch (training AUC below FITTED): the same cross-validation (same folds, same everything) with
    BUDGET_FACTOR times the epochs. A diagnostic of the miss, not a row of the targets."""
    name, cache_dir, truth = prepared["name"], prepared["cache_dir"], prepared["truth"]
    by = {(r["variant"], r["model"]): r for r in rows}
    best = best_baseline(by, name)
    if name not in TARGET_VARIANTS or best is None or (check.get("bag_auc") or 0) < 0.9:
        return []
    out = []
    for model, overrides in CLAM_MODELS:
        row = by.get((name, model))
        if (
            model not in CLAM_NAMES
            or row is None
            or auc_of(row) is None
            or auc_of(row) >= auc_of(best)
            or (row["training"].get("last_train_auc") or 0) >= FITTED
        ):
            continue
        epochs = size.epochs * BUDGET_FACTOR
        label = f"{model}, {epochs} epochs (diagnostic, not a target row)"
        log_line(f"[{name}] {label} ...")
        parent, seconds = cross_validate_model(
            cache_dir,
            prepared["home"] / "runs" / f"budget_{overrides['model_type']}",
            replace(size, epochs=epochs),
            folds,
            device,
            prepared["splits"],
            **overrides,
        )
        out.append(
            {
                "variant": name,
                "model": label,
                "kind": "diagnostic",
                "of": model,
                "epochs": epochs,
                "auc": summary_auc(parent, "auc"),
                "localisation": localisation(parent, cache_dir, truth, device),
                "seconds": seconds,
                "training": training_facts(parent),
            }
        )
        log_line(f"  {describe_row(out[-1])}")
    return out


def run_scales(
    prepared: dict[str, Any], size: Size, folds: int, device: str, splits: Path
) -> list[dict[str, Any]]:
    difficulty, cache_dir, truth = prepared["name"], prepared["cache_dir"], prepared["truth"]
    rows = []
    scaled = {
        label: scaled_cache(cache_dir, prepared["home"] / "scaled" / f"scale_{i}", a, b)
        for i, (label, a, b) in enumerate(SCALES)
    }
    variants = [("standard", label, scaled[label]) for label, _, _ in SCALES]
    variants += [("none", "x1", cache_dir)] + [("none", label, scaled[label]) for label, _, _ in SCALES]
    for i, (norm, label, folder) in enumerate(variants):
        name = f"CLAM-SB, features {label}, feature_norm {norm}"
        log_line(f"[{difficulty}] {name} ...")
        parent, seconds = cross_validate_model(
            folder,
            prepared["home"] / "runs" / f"scale_{i}",
            size,
            folds,
            device,
            splits,
            model_type="clam_sb",
            feature_norm=norm,
        )
        rows.append(
            {
                "variant": difficulty,
                "model": name,
                "kind": "scale",
                "norm": norm,
                "scale": label,
                "auc": summary_auc(parent, "auc"),
                "localisation": localisation(parent, folder, truth, device),
                "seconds": seconds,
            }
        )
        log_line(f"  {describe_row(rows[-1])}")
    return rows


# ---------------------------------------------------------------- the section


def fmt_auc(auc: dict[str, Any] | None) -> str:
    if not auc or auc.get("auc") is None:
        return "undefined" + (f" ({auc['reason']})" if auc and auc.get("reason") else "")
    return format_auc(auc, brackets=True)


def fmt_localisation(loc: dict[str, Any] | None) -> str:
    if loc is None:
        return "n/a"
    if loc["mean"] is None:
        return f"undefined (0 slides, {loc['skipped']} skipped)"
    return f"{loc['mean']:.3f} ({loc['n']} slides)"


def describe_row(row: dict[str, Any]) -> str:
    return (
        f"{row['model']}: AUC {fmt_auc(row['auc'])}, localisation {fmt_localisation(row['localisation'])}, "
        f"{row['seconds']:.1f} s"
    )


def library_state() -> str:
    """The commit of the library code the benchmark ran, and whether clam/ or feature_extraction/ differed."""

    def git(*command: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(ROOT), *command], capture_output=True, text=True, check=False
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "library version unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--", "clam", "feature_extraction")
    return f"library at commit {commit}" + (
        " with uncommitted changes in clam/ or feature_extraction/" if dirty else ""
    )


def auc_of(row: dict[str, Any] | None) -> float | None:
    return None if row is None or not row["auc"] else row["auc"].get("auc")


def contains_half(auc: dict[str, Any] | None) -> bool:
    return bool(auc) and auc.get("ci_low") is not None and auc["ci_low"] <= 0.5 <= auc["ci_high"]


def above_chance(row: dict[str, Any] | None) -> bool:
    return bool(row and row["auc"] and row["auc"].get("ci_low") is not None and row["auc"]["ci_low"] > 0.5)


CLAM_NAMES = ("CLAM-SB", "CLAM-MB")
BASELINE_NAMES = ("mean-pool logistic regression", "max-pool logistic regression")
MODEL_NAMES = CLAM_NAMES + ("attention-MIL (CLAM-SB, bag_weight 1.0)",) + BASELINE_NAMES


def best_baseline(by: dict[tuple[str, str], dict], name: str) -> dict[str, Any] | None:
    baselines = [by.get((name, m)) for m in BASELINE_NAMES]
    baselines = [b for b in baselines if auc_of(b) is not None]
    return max(baselines, key=auc_of) if baselines else None


def knobs(variant: Variant) -> str:
    """ "strength 1, no label noise" for the text."""
    noise = variant.knob("label_noise")
    return f"strength {variant.knob('signal_strength'):g}, " + (
        f"label noise {noise:g}" if noise else "no label noise"
    )


def fraction_of(witness: dict[str, tuple[float, str]], name: str) -> str:
    return witness[name][1].split(" ")[0]


def vs_baseline(by: dict[tuple[str, str], dict], name: str, model: str, best: dict[str, Any]) -> str:
    """ "met (by 0.074)", or "**missed by 0.031**", and whether the baseline's AUC is inside CLAM's CI."""
    clam_ci = by[(name, model)]["auc"]
    gap = auc_of(by[(name, model)]) - auc_of(best)
    verdict = f"met (by {gap:.3f})" if gap >= 0 else f"**missed by {-gap:.3f}**"
    if clam_ci.get("ci_low") is not None and clam_ci["ci_low"] <= auc_of(best) <= clam_ci["ci_high"]:
        verdict += (
            f" (the baseline's AUC is inside CLAM's CI [{clam_ci['ci_low']:.3f}, {clam_ci['ci_high']:.3f}])"
        )
    return verdict


def targets(rows: list[dict[str, Any]], witness: dict[str, tuple[float, str]]) -> list[str]:
    """Each target, checked on the full-signal witness-fraction cohorts: met, or missed and by how much."""
    out = []
    by = {(r["variant"], r["model"]): r for r in rows}
    for name in TARGET_VARIANTS:
        best = best_baseline(by, name)
        if best is None or name not in witness:
            continue
        title = BY_NAME[name].title
        for model in CLAM_NAMES:
            clam = auc_of(by.get((name, model)))
            if clam is None:
                continue
            out.append(
                f"CLAM at least the best baseline at {fraction_of(witness, name)} witness fraction ({title}): "
                f"{model} {clam:.3f} vs {best['model']} {auc_of(best):.3f}: {vs_baseline(by, name, model, best)}."
            )
        fails = contains_half(best["auc"])
        out.append(
            f"Not a target: does pooling fail at {fraction_of(witness, name)} witness fraction ({title}), as "
            f"expected? The best baseline, {best['model']}, {fmt_auc(best['auc'])}: "
            + ("yes, its CI includes 0.5." if fails else "no, its CI is above 0.5.")
        )
    scale_rows = [r for r in rows if r["kind"] == "scale" and r["variant"] == SCALE_VARIANT]
    references = {
        "standard": by.get((SCALE_VARIANT, "CLAM-SB")),
        "none": next((r for r in scale_rows if r["norm"] == "none" and r["scale"] == "x1"), None),
    }
    for norm, reference in references.items():
        group = [r for r in scale_rows if r["norm"] == norm and r["scale"] != "x1" and auc_of(r) is not None]
        if reference is None or auc_of(reference) is None or not group:
            continue
        ref = reference["auc"]
        worst = max(group, key=lambda r: abs(auc_of(r) - ref["auc"]))
        diff = abs(auc_of(worst) - ref["auc"])
        inside = ref.get("ci_low") is not None and all(
            ref["ci_low"] <= auc_of(r) <= ref["ci_high"] for r in group
        )
        where = f"{BY_NAME[SCALE_VARIANT].title}, CLAM-SB"
        if norm == "standard":
            head = f"Equal AUC across the feature scales ({where}, default feature_norm standard)"
            verdict = (
                "met" if inside else f"**missed**: {worst['scale']} is {diff:.3f} from x1, outside its CI"
            )
        else:
            head = f"For comparison, not a target: the same with feature_norm none ({where} on raw features)"
            verdict = "within the x1 CI" if inside else f"{worst['scale']} is outside the x1 CI"
        out.append(
            f"{head}: x1 {fmt_auc(ref)}, "
            + ", ".join(f"{r['scale']} {auc_of(r):.3f}" for r in group)
            + f"; largest difference {diff:.3f}: {verdict}."
        )
    for model in CLAM_NAMES:
        row = by.get((LOCALISATION_VARIANT, model))
        if row is None or row["localisation"] is None or row["localisation"]["mean"] is None:
            continue
        value = row["localisation"]["mean"]
        verdict = (
            "met" if value >= LOCALISATION_TARGET else f"**missed by {LOCALISATION_TARGET - value:.3f}**"
        )
        out.append(
            f"Localisation AUC at least {LOCALISATION_TARGET} at {fraction_of(witness, LOCALISATION_VARIANT)} "
            f"witness fraction ({BY_NAME[LOCALISATION_VARIANT].title}): {model} {value:.3f} over "
            f"{row['localisation']['n']} slides: {verdict}."
        )
    return out


def further_verdicts(rows: list[dict[str, Any]], witness: dict[str, tuple[float, str]]) -> list[str]:
    """The cohorts that are not the targets' (the easy preset, the subtler presets): how CLAM compares with
    the best baseline there, and which models are shown to learn the label at all."""
    out = []
    by = {(r["variant"], r["model"]): r for r in rows}
    for variant in VARIANTS:
        best = best_baseline(by, variant.name)
        if variant.name in TARGET_VARIANTS or best is None:
            continue
        clams = [
            (m, by[(variant.name, m)]) for m in CLAM_NAMES if auc_of(by.get((variant.name, m))) is not None
        ]
        learners = [m for m in MODEL_NAMES if above_chance(by.get((variant.name, m)))]
        loc = [
            f"{m} {r['localisation']['mean']:.3f}" for m, r in clams if r["localisation"]["mean"] is not None
        ]
        out.append(
            f"{variant.title} ({fraction_of(witness, variant.name)} witness, {knobs(variant)}): "
            + ", ".join(f"{m} {auc_of(r):.3f}" for m, r in clams)
            + f" vs {best['model']} {auc_of(best):.3f} ("
            + ", ".join(f"{m} {auc_of(r) - auc_of(best):+.3f}" for m, r in clams)
            + "); "
            + (
                "above chance (CI above 0.5): " + ", ".join(learners)
                if learners
                else "**no model is above chance** (every CI includes 0.5)"
            )
            + (f"; localisation {', '.join(loc)}" if loc else "")
            + "."
        )
    return out


def diagnosis(
    rows: list[dict[str, Any]],
    prepared: dict[str, dict],
    checks: dict[str, dict[str, Any]],
    witness: dict[str, tuple[float, str]],
    weights: str,
) -> list[str]:
    """Measured facts that explain the numbers, and what follows from them where it follows."""
    out = []
    by = {(r["variant"], r["model"]): r for r in rows}
    diagnosed = {(r["variant"], r["of"]): r for r in rows if r["kind"] == "diagnostic"}
    f3 = format_number
    for d, check in checks.items():
        sb = by.get((d, "CLAM-SB"))
        if sb is None:
            continue
        title = BY_NAME[d].title
        facts = sb.get("training") or {}
        best = best_baseline(by, d)
        out.append(
            f"{title}: CLAM-SB held-out AUC {f3(auc_of(sb))}; its training AUC at the last epoch "
            f"{f3(facts.get('last_train_auc'))} (mean over folds); epochs selected {facts.get('selected_epochs')} by "
            f"validation parts of {facts.get('n_val_patients')} patients. What the features allow, from the "
            f"ground truth: a tile classifier trained on the witness-tile labels (linear, patient-grouped "
            f"{check['folds']}-fold) scores a tile AUC of {f3(check['tile_auc'])} (within the positive slides, "
            f"localisation {f3(check['localisation'])}), and each slide's best tile under it gives a bag-level AUC "
            f"of {f3(check['bag_auc'])}; label-free tile scores localise the witness tiles at "
            f"{f3(check['small_norm'])} (a smaller raw feature norm) and {f3(check['outlier'])} (an unusual "
            "standardised feature)."
        )
        models = [m for m in (by.get((d, name)) for name in MODEL_NAMES) if m is not None]
        if models and all(contains_half(m["auc"]) for m in models):
            out.append(
                f"{title}: every model's CI includes 0.5: none of them is shown to have learned the label here, "
                f"and their differences (largest {max(map(auc_of, models)) - min(map(auc_of, models)):.3f}) "
                f"are within the noise of {len({s['patient_id'] for s in prepared[d]['truth'].values()})} patients."
            )
        if check["bag_auc"] is not None and check["bag_auc"] < 0.75:
            n_tiles = sorted({s["n_tiles"] for s in prepared[d]["truth"].values()})
            out.append(
                f"{title}: even the linear tile classifier told which tiles are the witness tiles reaches a "
                f"bag-level AUC of only {check['bag_auc']:.3f} when a slide is scored by its best tile: among "
                f"{n_tiles[-1]} tiles per slide, a negative slide's most witness-like tile often outscores a "
                "positive slide's few witness tiles. A model that must find those tiles without their labels, "
                "as attention does, is not expected to do better on these features: here the bag-level "
                "figures test the backbone before CLAM."
            )
        if (
            d in TARGET_VARIANTS
            and best is not None
            and check["bag_auc"] is not None
            and check["bag_auc"] >= 0.9
        ):
            behind = [
                m
                for m in CLAM_NAMES
                if auc_of(by.get((d, m))) is not None and auc_of(by[(d, m)]) < auc_of(best)
            ]
            if behind:
                out.append(
                    f"{title}: the features carry the signal at this witness fraction (a slide's best tile under "
                    f"the told tile classifier gives a bag-level AUC of {check['bag_auc']:.3f}), so the backbone "
                    f"is not what keeps {', '.join(behind)} below {best['model']} ({auc_of(best):.3f}) here."
                )
        if (facts.get("last_train_auc") or 0) >= FITTED and contains_half(sb["auc"]):
            bags = [n for n in facts.get("n_train_bags") or [] if n]
            out.append(
                f"{title}: CLAM-SB fits its training bags (training AUC {facts['last_train_auc']:.3f}) but what it "
                f"fits does not carry to held-out patients: with {min(bags)}-{max(bags) if bags else '?'} "
                "training bags per fold it fits them without finding what generalises."
            )
        elif (
            facts.get("last_train_auc") is not None
            and facts["last_train_auc"] < FITTED
            and (d, "CLAM-SB") not in diagnosed
        ):  # else the diagnostic's line says it
            out.append(
                f"{title}: CLAM-SB has not fit its training bags by its last epoch: training AUC "
                f"{f3(facts.get('first_train_auc'))} at epoch 1 and {facts['last_train_auc']:.3f} at epoch "
                f"{facts.get('epochs')} (means over the folds)."
            )
        for diag in (r for r in rows if r["kind"] == "diagnostic" and r["variant"] == d):
            base, more = by[(d, diag["of"])], diag["training"]
            fast = by.get((LOCALISATION_VARIANT, diag["of"])) if d != LOCALISATION_VARIANT else None
            line = (
                f"{title}: {diag['of']} misses the target with {base['training'].get('epochs')} epochs while "
                f"still learning (training AUC {f3(base['training'].get('first_train_auc'))} at epoch 1, "
                f"{f3(base['training'].get('last_train_auc'))} at the last"
                + (
                    f"; at {fraction_of(witness, LOCALISATION_VARIANT)} witness fraction, full signal, it reaches "
                    f"{f3(fast['training'].get('last_train_auc'))} in as many epochs"
                    if fast and fast.get("training")
                    else ""
                )
                + f"). The same cross-validation with {diag['epochs']} epochs, nothing else changed: held-out AUC "
                f"{fmt_auc(diag['auc'])} against {best['model']} {auc_of(best):.3f}, localisation "
                f"{fmt_localisation(diag['localisation'])}, training AUC at the last epoch "
                f"{f3(more.get('last_train_auc'))}, epochs selected {more.get('selected_epochs')}."
            )
            if auc_of(diag) is not None and auc_of(diag) >= auc_of(best) and above_chance(diag):
                slower = bool(
                    fast
                    and fast.get("training")
                    and (fast["training"].get("last_train_auc") or 0)
                    > (base["training"].get("last_train_auc") or 0)
                )
                ci = diag["auc"]
                inside = ci.get("ci_low") is not None and ci["ci_low"] <= auc_of(best) <= ci["ci_high"]
                line += (
                    f" With the longer training it learns the label (CI above 0.5) and is at least the best "
                    f"baseline (by {auc_of(diag) - auc_of(best):.3f}"
                    + (", the baseline's AUC inside its CI" if inside else "")
                    + "): the "
                    f"training budget of {base['training'].get('epochs')} epochs accounts for the miss"
                    + (
                        f"; with {fraction_of(witness, d)} of the tiles carrying the signal, the bag label teaches "
                        f"it more slowly than at {fraction_of(witness, LOCALISATION_VARIANT)}"
                        if slower
                        else ""
                    )
                    + "."
                )
            elif above_chance(diag):
                line += (
                    " With the longer training it learns the label (CI above 0.5) but stays below the best "
                    f"baseline by {auc_of(best) - auc_of(diag):.3f}: the budget explains part of the miss, not all."
                )
            else:
                line += (
                    " Even with the longer training it is not shown to learn the label (its CI includes 0.5): more "
                    "epochs alone do not remove the miss here."
                )
            early = [i + 1 for i, e in enumerate(more.get("selected_epochs") or []) if e == 1]
            if early:
                line += (
                    f" Fold{'s' if len(early) > 1 else ''} {', '.join(map(str, early))} selected epoch 1 (lowest "
                    "validation loss on its few validation patients), so its test part is scored by a model "
                    "trained one epoch."
                )
            out.append(line)
        attention = {m: by.get((d, m)) for m in CLAM_NAMES}
        attention = {
            m: r["localisation"]["mean"]
            for m, r in attention.items()
            if r is not None and r["localisation"]["mean"] is not None
        }
        if (
            d == LOCALISATION_VARIANT
            and check["localisation"] is not None
            and check["localisation"] >= LOCALISATION_TARGET
            and attention
            and min(attention.values()) < LOCALISATION_TARGET
        ):
            inverted = [m for m, v in attention.items() if v < 0.5]
            lowest = {m: by[(d, m)]["localisation"]["min"] for m in attention}
            out.append(
                f"{title}: within a slide the witness tiles are separable on these features (the tile classifier "
                f"told their labels localises at {check['localisation']:.3f}), so a localisation of "
                f"{LOCALISATION_TARGET} is within the features' reach; CLAM's attention, taught only by the bag "
                "label, reaches "
                + ", ".join(f"{m} {v:.3f} (lowest slide {lowest[m]:.3f})" for m, v in attention.items())
                + (
                    f" ({', '.join(inverted)} below 0.5: its attention prefers the other tiles)"
                    if inverted
                    else ""
                )
                + "."
            )
        none_x1 = next(
            (
                r
                for r in rows
                if r["kind"] == "scale" and r["norm"] == "none" and r["scale"] == "x1" and r["variant"] == d
            ),
            None,
        )
        if (
            none_x1
            and check.get("small_norm")
            and none_x1["localisation"]["mean"] is not None
            and contains_half(none_x1["auc"])
            and abs(none_x1["localisation"]["mean"] - check["small_norm"]) < 0.05
        ):
            out.append(
                f"{title}: the high localisation of CLAM-SB on raw features (feature_norm none, x1: "
                f"{none_x1['localisation']['mean']:.3f}) comes without a held-out AUC shown above chance "
                f"({fmt_auc(none_x1['auc'])}) and matches that of ranking tiles by a smaller raw feature norm "
                f"({check['small_norm']:.3f}): on unstandardised features the attention follows the feature "
                "norm. A localisation AUC is evidence of learning only beside a bag AUC above chance."
            )
    # Cohorts with the same preset's slides and witness tiles, only a weaker signal: what the strength alone does.
    for full in VARIANTS:
        for subtle in VARIANTS:
            if (
                full.name not in checks
                or subtle.name not in checks
                or full.preset != subtle.preset
                or witness[full.name][1] != witness[subtle.name][1]
                or full.knob("signal_strength") <= subtle.knob("signal_strength")
            ):
                continue
            a, b = checks[full.name], checks[subtle.name]
            sa, sb_ = by.get((full.name, "CLAM-SB")), by.get((subtle.name, "CLAM-SB"))
            line = (
                f"The same witness tiles ({witness[full.name][1]}), only the signal weaker: {full.title} "
                f"({knobs(full)}) against the {subtle.title} ({knobs(subtle)}): the told tile classifier's tile AUC "
                f"{f3(a['tile_auc'])} against {f3(b['tile_auc'])}, its best-tile bag-level AUC {f3(a['bag_auc'])} "
                f"against {f3(b['bag_auc'])}; CLAM-SB's held-out AUC {f3(auc_of(sa))} against {f3(auc_of(sb_))}"
            )
            also = " and the label noise" if subtle.knob("label_noise") != full.knob("label_noise") else ""
            if above_chance(sa) and not above_chance(sb_):
                line += (
                    f". At this witness fraction CLAM-SB learns the label at full strength (CI above 0.5) and "
                    f"not in the {subtle.title}: what the subtler preset loses, it loses with the signal's "
                    f"strength{also}, not with the witness fraction."
                )
            elif not above_chance(sa) and not above_chance(sb_):
                longer = diagnosed.get((full.name, "CLAM-SB"))
                line += (
                    f". CLAM-SB is not above chance even at full strength with {sa['training'].get('epochs')} "
                    "epochs: at this witness fraction the signal's strength is not the only obstacle"
                    + (
                        f" (with {longer['epochs']} epochs, at full strength, it is above chance: the diagnostic "
                        "above)"
                        if longer and above_chance(longer)
                        else ""
                    )
                    + "."
                )
            else:
                line += "."
            out.append(line)
    for d, p in prepared.items():
        flipped = sorted({s["patient_id"] for s in p["truth"].values() if s["label_flipped"]})
        if flipped:
            out.append(
                f"{BY_NAME[d].title}: {len(flipped)} of {len({s['patient_id'] for s in p['truth'].values()})} "
                f"patients ({', '.join(flipped)}) carry the wrong label (the preset's label noise); "
                "cross-validation trains and scores against the recorded labels, so every held-out AUC of these "
                "rows, baselines included, is measured against them. Localisation uses the true labels."
            )
    if weights == "random":
        out.append(
            "The backbone's weights are random. The planted nuclei do move a tile's random feature (the tile "
            "AUCs above), but whether pretrained features would carry the subtler signals better is not "
            "measured here: put the ImageNet weights in the torch hub cache and rerun (the script picks them "
            "up and embeds anew) before reading these rows as CLAM's accuracy."
        )
    return out


def section(
    args,
    weights: str,
    weights_note: str,
    rows: list[dict[str, Any]],
    prepared: dict[str, dict],
    witness: dict[str, tuple[float, str]],
    checks: dict[str, dict[str, Any]],
    size: Size,
    total_seconds: float,
) -> str:
    command = " ".join(["python", "benchmarks/bench_learning.py"] + [shlex.quote(a) for a in args.argv])
    from feature_extraction.example_plan import DIFFICULTIES as PRESETS

    lines = [SECTION, ""]
    if weights == "random":
        why = (
            "`--weights random` was asked for."
            if args.weights == "random"
            else f"`load_backbone({args.backbone!r}, 'imagenet')` failed on this machine: {weights_note}"
        )
        lines += [
            (
                f"> **RANDOM BACKBONE WEIGHTS.** {why} Every tile was embedded with `--weights random`: a randomly "
                "initialised ResNet-50 whose features are not meant to carry histology. These numbers measure the "
                "pipeline on such features, not what CLAM reaches with a pretrained backbone."
            ),
            "",
        ]
    cores = available_cores()
    lines += [
        (
            f"`{command}` on {machine()}, torch {torch.__version__}, {args.device_resolved}, {time.strftime('%Y-%m-%d')}, "
            f"{library_state()}; "
            f"{total_seconds / 60:.1f} minutes in all (cohorts and caches "
            + (
                "reused from"
                if all(p["embed"]["reused"] for p in prepared.values())
                else "built in or reused from"
            )
            + f" `{args.workdir}`). Backbone {args.backbone}, weights **{weights}**. Load average (1 minute) "
            f"{LOAD['start']:.2f} at the start, at most {LOAD['max']:.2f} while it ran, {load_average():.2f} at the "
            f"end, on {cores} cores; the benchmark's own training counts in it, and whatever else ran on the machine "
            "makes the seconds noisy: read them as rough."
        ),
        "",
        (
            f"Example cohort, train split, {size.n_patients} patients (seed {SEED}), in {len(prepared)} variants: the "
            "witness fraction alone (full-strength signal, no label noise: the easy preset at 20%, and the medium and "
            "hard presets' slides at strength 1) and the subtler presets as they are. The targets are checked on "
            "the full-signal 5% and 2% cohorts. "
            f"{args.folds}-fold patient-level cross-validation, the same folds (one splits.csv) for every model of a "
            f"cohort; CLAM with the defaults of `clam.train` ({size.epochs} epochs, lr 1e-4, validation "
            "a fifth of the other folds' patients, best validation loss selects the epoch). AUC: patient level, pooled "
            "over the folds' held-out test parts, bootstrap 95% CI. Localisation: mean over the truly positive slides "
            "of the test parts of the ROC AUC of the tile attention (CLAM-MB: the positive-class branch) against the "
            f"witness tiles of the ground truth. Seconds: wall time of the whole cross-validation ({args.folds} trainings, "
            "test predictions, the mean-pool baseline inside each); for the baselines, reading the bags, fitting and scoring."
        ),
        "",
        (
            "| cohort | witness fraction | signal strength | label noise | model | held-out AUC [95% CI] "
            "| localisation AUC (n slides) | seconds |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        variant = BY_NAME[row["variant"]]
        lines.append(
            f"| {variant.title} | {witness[variant.name][1]} | {variant.knob('signal_strength'):g} | "
            f"{variant.knob('label_noise'):g} | {row['model']} | {fmt_auc(row['auc'])} | "
            f"{fmt_localisation(row['localisation'])} | {row['seconds']:.1f} |"
        )
    lines += [
        "",
        "Embedding (once per cohort, kept in the workdir): "
        + "; ".join(
            f"{p['variant'].title} {p['cohort_seconds']:.0f} s to write "
            f"{PRESETS[p['variant'].preset].tiles_per_slide if size.tiles_per_slide is None else size.tiles_per_slide}"
            f"-tile slides, "
            + (
                "embedding time not recorded"
                if p["embed"].get("seconds") is None
                else f"{p['embed']['seconds']:.0f} s to embed {p['embed']['n_tiles']} tiles "
                f"({p['embed']['tiles_per_second']:.1f} tiles/s, {p['embed']['runtime']})"
            )
            + (" (measured when the cache was built)" if p["embed"]["reused"] else "")
            for p in prepared.values()
        )
        + ".",
    ]
    if args.witness_note:
        lines += ["", args.witness_note]
    verdicts = targets(rows, witness)
    if verdicts:
        lines += ["", "Targets (on the full-signal witness-fraction cohorts):", ""] + [
            f"- {c}" for c in verdicts
        ]
    further = further_verdicts(rows, witness)
    if further:
        lines += ["", "The other cohorts, not targets:", ""] + [f"- {c}" for c in further]
    notes = diagnosis(rows, prepared, checks, witness, weights)
    if notes:
        lines += ["", "Why:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"cohorts, caches and runs, reused by the next run (default {DEFAULT_WORKDIR})",
    )
    # argparse formats the help with %, and the titles hold "5%"
    cohorts = "; ".join(f"{v.name}: {v.title}" for v in VARIANTS).replace("%", "%%")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[v.name for v in VARIANTS],
        default=[v.name for v in VARIANTS],
        help=f"the cohorts to run: {cohorts}",
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke test: {QUICK.n_patients} patients, {QUICK.tiles_per_slide} tiles of "
        f"{QUICK.tile_size} px per slide, {QUICK.epochs} epochs, 3 folds unless --folds",
    )
    parser.add_argument("--backbone", default="resnet50_trunc")
    parser.add_argument(
        "--weights",
        choices=("auto", "imagenet", "random"),
        default="auto",
        help="auto: ImageNet when the weights load here, else random (said loudly)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--write", action="store_true", help="write the section into --out (default: print only)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    size = QUICK if args.quick else FULL
    if args.quick and "--folds" not in " ".join(args.argv):
        args.folds = 3
    if args.quick:
        args.workdir = args.workdir / "quick"

    from feature_extraction.runtime import resolve_device

    args.device_resolved = str(resolve_device(args.device))
    LOAD["start"] = LOAD["max"] = load_average()
    started = time.perf_counter()
    if args.weights == "auto":
        weights, weights_note = pick_weights(args.backbone)
    else:
        weights, weights_note = args.weights, "asked for with --weights"
    log_line(f"backbone weights: {weights.upper()}" + (f" ({weights_note})" if weights == "random" else ""))

    variants = [v for v in VARIANTS if v.name in args.variants]
    prepared = {v.name: prepare(args.workdir, v, size, weights, args.backbone) for v in variants}
    witness = {d: witness_description(p["truth"]) for d, p in prepared.items()}
    args.witness_note = (
        "The easy preset draws 10-25% witness tiles; here its witness fraction is set to 0.20, "
        "which on 24-tile slides rounds up to 5 tiles."
        if "easy" in prepared and not args.quick
        else ""
    )
    rows: list[dict[str, Any]] = []
    checks: dict[str, dict[str, Any]] = {}
    for v in variants:
        rows += run_variant(
            prepared[v.name], size, args.folds, args.device, with_scales=v.name == SCALE_VARIANT
        )
        checks[v.name] = feature_checks(prepared[v.name]["cache_dir"], prepared[v.name]["truth"], args.folds)
        log_line(f"[{v.name}] what the features allow: {checks[v.name]}")
        rows += run_budget_diagnostics(prepared[v.name], rows, checks[v.name], size, args.folds, args.device)
    total = time.perf_counter() - started
    (args.workdir / "results.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "checks": checks,
                "seconds": total,
                "weights": weights,
                "load": LOAD,
                "prepared": {d: {k: v for k, v in p.items() if k != "truth"} for d, p in prepared.items()},
            },
            indent=1,
            default=str,
        )
    )
    text = section(args, weights, weights_note, rows, prepared, witness, checks, size, total)
    publish(text, SECTION, args.out, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
