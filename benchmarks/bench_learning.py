"""Learning: does CLAM find the few tiles that matter? Writes the ``## Learning`` section of docs/benchmarks.md.

    python benchmarks/bench_learning.py --write                        # the full benchmark (about 10 minutes on 2 cores)
    python benchmarks/bench_learning.py                                # the same, printed only
    python benchmarks/bench_learning.py --quick --difficulties medium  # a smoke test (a minute), printed only

On the example cohort (``feature_extraction.example_cohort``, train split, 36 patients) at three
difficulties, witness fraction 20% (the easy preset with its witness fraction set to 0.20), 5%
(medium) and 2% (hard), each embedded once (ImageNet weights when they can be had, else random
weights, which the section says loudly), then 5-fold patient-level cross-validation
(``clam.crossval``) with the same folds for every model of a difficulty:

- CLAM-SB and CLAM-MB with the defaults of ``clam.train``;
- attention-MIL: CLAM-SB without instance clustering (``bag_weight 1.0``);
- mean-pool logistic regression: the baseline every fold fits beside CLAM (``summary.json``);
- max-pool logistic regression: ``clam.baselines`` fitted here on each fold's training part.

Every AUC is the pooled patient-level AUC over the folds' held-out test parts, with its bootstrap
95% CI. The localisation AUC is, per truly positive slide of a test part, the ROC AUC of the
attention its fold's selected model gives each tile against the ground truth's witness tiles
(positive-class branch for CLAM-MB), averaged over the slides. On the 5% cohort CLAM-SB also runs
on copies of the bags scaled x30 + 30 and x0.01, with the default ``--feature_norm standard`` and
with ``--feature_norm none`` (CLAM's raw-feature behaviour).

Cohorts, caches and timings of the embedding are kept under ``--workdir`` (default
/tmp/bench_learning) and reused by the next run; the cross-validation runs are redone every time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import write_section  # noqa: E402

SECTION = "## Learning"
DEFAULT_WORKDIR = Path("/tmp/bench_learning")
DIFFICULTIES = ("easy", "medium", "hard")
WITNESS_OVERRIDE = {"easy": 0.20}  # the issue asks for 20%; the easy preset draws 10-25%
POSITIVE = 1  # class index of EGFR_positive
SCALES = (("x30 + 30", 30.0, 30.0), ("x0.01", 0.01, 0.0))
LOCALISATION_TARGET = 0.9
SEED = 0


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


def log_line(message: str) -> None:
    print(message, flush=True)


def quiet(_: str) -> None:
    pass


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


def cohort_params(difficulty: str, size: Size) -> dict[str, Any]:
    params: dict[str, Any] = {"seed": SEED, "n_train_patients": size.n_patients, "difficulty": difficulty,
                              "tile_size": size.tile_size}
    if size.tiles_per_slide is not None:
        params["tiles_per_slide"] = size.tiles_per_slide
    if difficulty in WITNESS_OVERRIDE:
        params["signal_fraction"] = WITNESS_OVERRIDE[difficulty]
    return params


def prepare(workdir: Path, difficulty: str, size: Size, weights: str, backbone: str) -> dict[str, Any]:
    """Build the cohort's train split and embed it, or reuse both from an earlier run with the same
    settings. Returns the cache folder, the ground truth and the seconds each step took (when built)."""
    from feature_extraction.embed import embed_cohort
    from feature_extraction.example_cohort import build_example_cohort, load_ground_truth

    home = workdir / difficulty
    params = cohort_params(difficulty, size)
    record_path = home / "prepared.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("params") != params:
        if home.exists():
            shutil.rmtree(home)
        home.mkdir(parents=True)
        log_line(f"[{difficulty}] building the example cohort ({params})")
        started = time.perf_counter()
        summary = build_example_cohort(home / "cohort", splits=("train",), **params)
        record = {"params": params, "cohort_seconds": time.perf_counter() - started, "n_tiles": summary.n_tiles,
                  "n_slides": summary.n_slides, "embed": {}}
        record_path.write_text(json.dumps(record, indent=1))
    started = time.perf_counter()
    report = embed_cohort(home / "cohort" / "train", "train", features_dir=home / "features", backbone=backbone,
                          weights=weights, seed=SEED, progress=False)
    wall = time.perf_counter() - started
    if report.failed:
        raise SystemExit(f"[{difficulty}] embedding failed for {report.failed}")
    if report.n_embedded:  # embedded now: record the time; a reused cache keeps the first run's
        record["embed"][weights] = {"seconds": wall, "n_tiles": report.n_tiles_embedded,
                                    "tiles_per_second": report.tiles_per_second,
                                    "runtime": report.runtime, "cache_dir": str(report.cache_dir)}
        record_path.write_text(json.dumps(record, indent=1))
    embed = dict(record["embed"].get(weights) or {"seconds": None})
    embed["reused"] = not report.n_embedded
    log_line(f"[{difficulty}] cache {report.cache_dir} ({'reused' if embed['reused'] else f'embedded in {wall:.0f} s'})")
    return {"difficulty": difficulty, "home": home, "cache_dir": report.cache_dir,
            "truth": load_ground_truth(home / "cohort" / "train"), "cohort_seconds": record["cohort_seconds"],
            "embed": embed, "params": params}


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


def cross_validate_model(cache_dir: Path, out: Path, size: Size, folds: int, device: str, splits: Path | None,
                         **overrides: Any) -> tuple[Path, float]:
    """One ``clam.crossval`` run (the parent run folder) and its wall seconds."""
    from clam.crossval import cross_validate
    from clam.train import TrainConfig

    if out.exists():
        shutil.rmtree(out)
    config = TrainConfig(features_dir=str(cache_dir), folds=0 if splits else folds,
                         splits=str(splits) if splits else None, num_epochs=size.epochs, seed=SEED, device=device,
                         output_dir=str(out), progress=False, **overrides)
    started = time.perf_counter()
    parent = cross_validate(config, log=quiet, n_bootstrap=size.n_bootstrap)
    return parent, time.perf_counter() - started


def fold_dirs(parent: Path) -> list[Path]:
    from clam.crossval import FOLD_PREFIX

    return sorted(parent.glob(f"{FOLD_PREFIX}*"), key=lambda p: int(p.name[len(FOLD_PREFIX):]))


def fold_parts(fold_dir: Path) -> dict[str, list[dict[str, str]]]:
    """fold_k/split.csv as {train, val, test: rows (slide_id, patient_id, label)}."""
    parts: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    with open(fold_dir / "split.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            parts[row["set"]].append(row)
    return parts


def summary_auc(parent: Path, key: str) -> dict[str, Any]:
    return json.loads((parent / "summary.json").read_text())["pooled_oof"][key]


def pooled_baseline(parent: Path, cache_dir: Path, pool: str, n_bootstrap: int) -> tuple[dict[str, Any], float]:
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

        fitted = fit_baseline(pooled(parts["train"]), [int(r["label"]) for r in parts["train"]], 2, pool, SEED)
        if fitted is None:
            return {"auc": None, "ci_low": None, "ci_high": None, "reason": "a fold's training part held one class"}, 0.0
        for row, probs in zip(parts["test"], fitted.probs(pooled(parts["test"]))):
            by_patient.setdefault(row["patient_id"], []).append(float(probs[POSITIVE]))
            labels[row["patient_id"]] = int(row["label"])
    patients = sorted(by_patient)
    positive = np.array([np.mean(by_patient[p]) for p in patients])
    auc = auc_with_ci([labels[p] for p in patients], np.column_stack([1 - positive, positive]), 2, n_bootstrap, SEED)
    return auc.to_dict(), time.perf_counter() - started


def localisation(parent: Path, cache_dir: Path, truth: dict[str, dict], device: str) -> dict[str, Any]:
    """Mean over the truly positive slides of every fold's test part of the ROC AUC of the attention
    scores (positive-class branch for CLAM-MB) against the witness-tile indicator."""
    from sklearn.metrics import roc_auc_score

    from clam.crossval import selected_checkpoint
    from clam.evaluate import load_model, predict
    from clam.splits import read_split
    from clam.train import TrainConfig, load_bags
    from feature_extraction.bags import read_bag

    bags = load_bags(TrainConfig(features_dir=str(cache_dir), progress=False), quiet)
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
    return {"mean": float(np.mean(aucs)) if aucs else None, "n": len(aucs), "skipped": skipped,
            "min": float(np.min(aucs)) if aucs else None}


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
    x, y, groups, slides = np.concatenate(x).astype(np.float64), np.array(y, dtype=int), np.array(groups), np.array(slides)
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
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
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
    out["bag_auc"] = float(roc_auc_score([labels[p] for p in patients], [np.mean(by_patient[p]) for p in patients]))
    return out


def training_facts(parent: Path) -> dict[str, Any]:
    """From the folds' config.json: the training AUC of the last epoch and the selected epochs."""
    last_train_auc, selected = [], []
    for fold_dir in fold_dirs(parent):
        info = json.loads((fold_dir / "config.json").read_text())
        metrics = info.get("metrics") or []
        if metrics and metrics[-1].get("train_auc") is not None:
            last_train_auc.append(float(metrics[-1]["train_auc"]))
        selected.append(info.get("best_epoch"))
    data = [json.loads((f / "config.json").read_text())["data"] for f in fold_dirs(parent)]
    return {"last_train_auc": float(np.mean(last_train_auc)) if last_train_auc else None, "selected_epochs": selected,
            "n_val_patients": [d.get("n_val_patients") for d in data], "n_train_bags": [d.get("n_train_bags") for d in data]}


# ---------------------------------------------------------------- one difficulty


CLAM_MODELS = (
    ("CLAM-SB", {"model_type": "clam_sb"}),
    ("CLAM-MB", {"model_type": "clam_mb"}),
    ("attention-MIL (CLAM-SB, bag_weight 1.0)", {"model_type": "clam_sb", "bag_weight": 1.0}),
)


def run_difficulty(prepared: dict[str, Any], size: Size, folds: int, device: str,
                   with_scales: bool) -> list[dict[str, Any]]:
    difficulty, cache_dir, truth = prepared["difficulty"], prepared["cache_dir"], prepared["truth"]
    runs = prepared["home"] / "runs"
    rows: list[dict[str, Any]] = []
    splits = None
    first = None
    for name, overrides in CLAM_MODELS:
        key = name.split(" ")[0].lower()
        log_line(f"[{difficulty}] {name}: {folds}-fold cross-validation ...")
        parent, seconds = cross_validate_model(cache_dir, runs / key, size, folds, device, splits, **overrides)
        if splits is None:
            splits, first = parent / "splits.csv", parent
        rows.append({"difficulty": difficulty, "model": name, "kind": "clam", "auc": summary_auc(parent, "auc"),
                     "localisation": localisation(parent, cache_dir, truth, device), "seconds": seconds,
                     "training": training_facts(parent)})
        log_line(f"  {describe_row(rows[-1])}")
    # The baselines, on the same test parts as the first CLAM run.
    mean_auc = summary_auc(first, "baseline_auc")
    recomputed, mean_seconds = pooled_baseline(first, cache_dir, "mean", size.n_bootstrap)
    if mean_auc and recomputed["auc"] is not None and abs(mean_auc["auc"] - recomputed["auc"]) > 1e-6:
        log_line(f"  warning: the mean-pool baseline recomputed here ({recomputed['auc']:.4f}) differs from "
                 f"summary.json's ({mean_auc['auc']:.4f})")
    rows.append({"difficulty": difficulty, "model": "mean-pool logistic regression", "kind": "baseline",
                 "auc": mean_auc, "localisation": None, "seconds": mean_seconds,
                 "recomputed_auc": recomputed["auc"]})
    max_auc, max_seconds = pooled_baseline(first, cache_dir, "max", size.n_bootstrap)
    rows.append({"difficulty": difficulty, "model": "max-pool logistic regression", "kind": "baseline",
                 "auc": max_auc, "localisation": None, "seconds": max_seconds})
    for row in rows[-2:]:
        log_line(f"  {describe_row(row)}")
    if with_scales:
        rows += run_scales(prepared, size, folds, device, splits)
    return rows


def run_scales(prepared: dict[str, Any], size: Size, folds: int, device: str, splits: Path) -> list[dict[str, Any]]:
    difficulty, cache_dir, truth = prepared["difficulty"], prepared["cache_dir"], prepared["truth"]
    rows = []
    scaled = {label: scaled_cache(cache_dir, prepared["home"] / "scaled" / f"scale_{i}", a, b)
              for i, (label, a, b) in enumerate(SCALES)}
    variants = [("standard", label, scaled[label]) for label, _, _ in SCALES]
    variants += [("none", "x1", cache_dir)] + [("none", label, scaled[label]) for label, _, _ in SCALES]
    for i, (norm, label, folder) in enumerate(variants):
        name = f"CLAM-SB, features {label}, feature_norm {norm}"
        log_line(f"[{difficulty}] {name} ...")
        parent, seconds = cross_validate_model(folder, prepared["home"] / "runs" / f"scale_{i}", size, folds, device,
                                               splits, model_type="clam_sb", feature_norm=norm)
        rows.append({"difficulty": difficulty, "model": name, "kind": "scale", "norm": norm, "scale": label,
                     "auc": summary_auc(parent, "auc"), "localisation": localisation(parent, folder, truth, device),
                     "seconds": seconds})
        log_line(f"  {describe_row(rows[-1])}")
    return rows


# ---------------------------------------------------------------- the section


def fmt_auc(auc: dict[str, Any] | None) -> str:
    if not auc or auc.get("auc") is None:
        return "undefined" + (f" ({auc['reason']})" if auc and auc.get("reason") else "")
    if auc.get("ci_low") is None:
        return f"{auc['auc']:.3f}"
    return f"{auc['auc']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]"


def fmt_localisation(loc: dict[str, Any] | None) -> str:
    if loc is None:
        return "n/a"
    if loc["mean"] is None:
        return f"undefined (0 slides, {loc['skipped']} skipped)"
    return f"{loc['mean']:.3f} ({loc['n']} slides)"


def describe_row(row: dict[str, Any]) -> str:
    return (f"{row['model']}: AUC {fmt_auc(row['auc'])}, localisation {fmt_localisation(row['localisation'])}, "
            f"{row['seconds']:.1f} s")


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{name}, {len(os.sched_getaffinity(0))} cores"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def library_state() -> str:
    """The commit of the library code the benchmark ran, and whether clam/ or feature_extraction/ differed."""
    def git(*command: str) -> str:
        result = subprocess.run(["git", "-C", str(ROOT), *command], capture_output=True, text=True, check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "library version unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--", "clam", "feature_extraction")
    return f"library at commit {commit}" + (" with uncommitted changes in clam/ or feature_extraction/" if dirty else "")


def auc_of(row: dict[str, Any] | None) -> float | None:
    return None if row is None or not row["auc"] else row["auc"].get("auc")


def targets(rows: list[dict[str, Any]], witness: dict[str, tuple[float, str]]) -> list[str]:
    """Each target of the issue, checked: met, or missed and by how much."""
    out = []
    by = {(r["difficulty"], r["model"]): r for r in rows}
    for difficulty in ("medium", "hard"):
        baselines = [by.get((difficulty, m)) for m in ("mean-pool logistic regression", "max-pool logistic regression")]
        baselines = [b for b in baselines if auc_of(b) is not None]
        if not baselines:
            continue
        best = max(baselines, key=auc_of)
        for model in ("CLAM-SB", "CLAM-MB"):
            clam = auc_of(by.get((difficulty, model)))
            if clam is None:
                continue
            gap = clam - auc_of(best)
            verdict = "met" if gap >= 0 else f"**missed by {-gap:.3f}**"
            clam_ci = by[(difficulty, model)]["auc"]
            if gap < 0 and clam_ci.get("ci_low") is not None and clam_ci["ci_low"] <= auc_of(best) <= clam_ci["ci_high"]:
                verdict += f" (inside CLAM's CI [{clam_ci['ci_low']:.3f}, {clam_ci['ci_high']:.3f}])"
            out.append(f"CLAM at least the best baseline at {witness[difficulty][1].split(' ')[0]} witness fraction "
                       f"({difficulty}): {model} {clam:.3f} vs {best['model']} {auc_of(best):.3f}: {verdict}.")
    scale_rows = [r for r in rows if r["kind"] == "scale"]
    references = {"standard": by.get(("medium", "CLAM-SB")),
                  "none": next((r for r in scale_rows if r["norm"] == "none" and r["scale"] == "x1"), None)}
    for norm, reference in references.items():
        group = [r for r in scale_rows if r["norm"] == norm and r["scale"] != "x1" and auc_of(r) is not None]
        if reference is None or auc_of(reference) is None or not group:
            continue
        ref = reference["auc"]
        worst = max(group, key=lambda r: abs(auc_of(r) - ref["auc"]))
        diff = abs(auc_of(worst) - ref["auc"])
        inside = ref.get("ci_low") is not None and all(ref["ci_low"] <= auc_of(r) <= ref["ci_high"] for r in group)
        if norm == "standard":
            head = "Equal AUC across the feature scales (CLAM-SB, default feature_norm standard)"
            verdict = "met" if inside else f"**missed**: {worst['scale']} is {diff:.3f} from x1, outside its CI"
        else:
            head = "For comparison, not a target: the same with feature_norm none (CLAM's raw features)"
            verdict = ("within the x1 CI" if inside else f"{worst['scale']} is outside the x1 CI")
        out.append(f"{head}: x1 {fmt_auc(ref)}, " + ", ".join(f"{r['scale']} {auc_of(r):.3f}" for r in group)
                   + f"; largest difference {diff:.3f}: {verdict}.")
    for model in ("CLAM-SB", "CLAM-MB"):
        row = by.get(("medium", model))
        if row is None or row["localisation"] is None or row["localisation"]["mean"] is None:
            continue
        value = row["localisation"]["mean"]
        verdict = "met" if value >= LOCALISATION_TARGET else f"**missed by {LOCALISATION_TARGET - value:.3f}**"
        out.append(f"Localisation AUC at least {LOCALISATION_TARGET} at {witness['medium'][1].split(' ')[0]} witness "
                   f"fraction (medium): {model} {value:.3f} over {row['localisation']['n']} slides: {verdict}.")
    return out


def contains_half(auc: dict[str, Any] | None) -> bool:
    return bool(auc) and auc.get("ci_low") is not None and auc["ci_low"] <= 0.5 <= auc["ci_high"]


def diagnosis(rows: list[dict[str, Any]], prepared: dict[str, dict], checks: dict[str, dict[str, Any]],
              weights: str) -> list[str]:
    """Measured facts that explain the numbers, and what follows from them where it follows."""
    out = []
    by = {(r["difficulty"], r["model"]): r for r in rows}
    f3 = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for d, check in checks.items():
        sb = by.get((d, "CLAM-SB"))
        if sb is None:
            continue
        facts = sb.get("training") or {}
        line = (f"{d}: CLAM-SB held-out AUC {f3(auc_of(sb))}; its training AUC at the last epoch {f3(facts.get('last_train_auc'))} "
                f"(mean over folds); epochs selected {facts.get('selected_epochs')} by validation parts of "
                f"{facts.get('n_val_patients')} patients. What the features allow, from the ground truth: a tile "
                f"classifier trained on the witness-tile labels (linear, patient-grouped {check['folds']}-fold) scores a "
                f"tile AUC of {f3(check['tile_auc'])} (within the positive slides, localisation {f3(check['localisation'])}), "
                f"and each slide's best tile under it gives a bag-level AUC of {f3(check['bag_auc'])}; label-free tile scores localise the witness tiles at {f3(check['small_norm'])} "
                f"(a smaller raw feature norm) and {f3(check['outlier'])} (an unusual standardised feature).")
        out.append(line)
        models = [by.get((d, m)) for m in ("CLAM-SB", "CLAM-MB", "attention-MIL (CLAM-SB, bag_weight 1.0)",
                                           "mean-pool logistic regression", "max-pool logistic regression")]
        models = [m for m in models if m is not None]
        if models and all(contains_half(m["auc"]) for m in models):
            out.append(f"{d}: every model's CI includes 0.5: none of them is shown to have learned the label here, "
                       f"and their differences (largest {max(map(auc_of, models)) - min(map(auc_of, models)):.3f}) "
                       f"are within the noise of {len({s['patient_id'] for s in prepared[d]['truth'].values()})} patients.")
        if check["bag_auc"] is not None and check["bag_auc"] < 0.75:
            n_tiles = sorted({s["n_tiles"] for s in prepared[d]["truth"].values()})
            out.append(f"{d}: even the linear tile classifier told which tiles are the witness tiles reaches a "
                       f"bag-level AUC of only {check['bag_auc']:.3f} when a slide is scored by its best tile: among "
                       f"{n_tiles[-1]} tiles per slide, a negative slide's most witness-like tile often outscores a "
                       "positive slide's few witness tiles. A model that must find those tiles without their labels, "
                       "as attention does, is not expected to do better on these features: at this difficulty "
                       "the bag-level targets test the backbone before CLAM.")
        if (facts.get("last_train_auc") or 0) >= 0.75 and contains_half(sb["auc"]):
            bags = [n for n in facts.get("n_train_bags") or [] if n]
            out.append(f"{d}: CLAM fits its training bags (training AUC {facts['last_train_auc']:.3f}) but what it "
                       f"fits does not carry to held-out patients: with {min(bags)}-{max(bags) if bags else '?'} "
                       "training bags per fold it fits them without finding what generalises.")
        attention = {m: by.get((d, m)) for m in ("CLAM-SB", "CLAM-MB")}
        attention = {m: r["localisation"]["mean"] for m, r in attention.items()
                     if r is not None and r["localisation"]["mean"] is not None}
        if d == "medium" and check["localisation"] is not None and check["localisation"] >= LOCALISATION_TARGET \
                and attention and min(attention.values()) < LOCALISATION_TARGET:
            inverted = [m for m, v in attention.items() if v < 0.5]
            out.append(f"{d}: within a slide the witness tiles are separable on these features (the tile classifier "
                       f"told their labels localises at {check['localisation']:.3f}), so a localisation of "
                       f"{LOCALISATION_TARGET} is within the features' reach; CLAM's attention, taught only by the bag "
                       "label, which says little here (the bag-level figures above), reaches "
                       + ", ".join(f"{m} {v:.3f}" for m, v in attention.items())
                       + (f" ({', '.join(inverted)} below 0.5: its attention prefers the other tiles)" if inverted else "")
                       + ".")
        none_x1 = next((r for r in rows if r["kind"] == "scale" and r["norm"] == "none" and r["scale"] == "x1"
                        and r["difficulty"] == d), None)
        if none_x1 and check.get("small_norm") and none_x1["localisation"]["mean"] is not None \
                and contains_half(none_x1["auc"]) and abs(none_x1["localisation"]["mean"] - check["small_norm"]) < 0.05:
            out.append(f"{d}: the high localisation of CLAM-SB on raw features (feature_norm none, x1: "
                       f"{none_x1['localisation']['mean']:.3f}) comes without learning the label (its AUC is at "
                       f"chance) and matches that of ranking tiles by a smaller raw feature norm "
                       f"({check['small_norm']:.3f}): on unstandardised features the attention follows the feature "
                       "norm. A localisation AUC is evidence of learning only beside a bag AUC above chance.")
    hard = prepared.get("hard")
    if hard and any(s["label_flipped"] for s in hard["truth"].values()):
        flipped = sorted({s["patient_id"] for s in hard["truth"].values() if s["label_flipped"]})
        out.append(f"hard: {len(flipped)} of {len({s['patient_id'] for s in hard['truth'].values()})} patients "
                   f"({', '.join(flipped)}) carry the wrong label (the preset's label noise); cross-validation "
                   "trains and scores against the recorded labels, so every held-out AUC of the hard rows, "
                   "baselines included, is measured against them. Localisation uses the true labels.")
    if weights == "random":
        out.append("The backbone's weights are random. The planted nuclei do move a tile's random feature (the tile "
                   "AUCs above), but whether pretrained features would carry the subtler signals better is not "
                   "measured here: put the ImageNet weights in the torch hub cache and rerun (the script picks them "
                   "up and embeds anew) before reading these rows as CLAM's accuracy.")
    return out


def section(args, weights: str, weights_note: str, rows: list[dict[str, Any]], prepared: dict[str, dict],
            witness: dict[str, tuple[float, str]], checks: dict[str, dict[str, Any]], size: Size,
            total_seconds: float) -> str:
    command = " ".join(["python", "benchmarks/bench_learning.py"] + [shlex.quote(a) for a in args.argv])
    from feature_extraction.example_cohort import DIFFICULTIES as PRESETS

    lines = [SECTION, ""]
    if weights == "random":
        why = ("`--weights random` was asked for." if args.weights == "random" else
               f"`load_backbone({args.backbone!r}, 'imagenet')` failed on this machine: {weights_note}")
        lines += [f"> **RANDOM BACKBONE WEIGHTS.** {why} Every tile was embedded with `--weights random`: a randomly "
                  "initialised ResNet-50 whose features are not meant to carry histology. These numbers measure the "
                  "pipeline on such features, not what CLAM reaches with a pretrained backbone.", ""]
    lines += [
        f"`{command}` on {machine()}, torch {torch.__version__}, {args.device_resolved}, {time.strftime('%Y-%m-%d')}, "
        f"{library_state()}; "
        f"{total_seconds / 60:.1f} minutes in all, load average {os.getloadavg()[0]:.2f} when it finished (cohorts and caches "
        + ("reused from" if all(p["embed"]["reused"] for p in prepared.values()) else "built in")
        + f" `{args.workdir}`). Backbone {args.backbone}, weights **{weights}**.",
        "",
        f"Example cohort, train split, {size.n_patients} patients (seed {SEED}); "
        f"{args.folds}-fold patient-level cross-validation, the same folds (one splits.csv) for every model of a "
        f"difficulty; CLAM with the defaults of `clam.train` ({size.epochs} epochs, lr 1e-4, validation "
        "a fifth of the other folds' patients, best validation loss selects the epoch). AUC: patient level, pooled "
        "over the folds' held-out test parts, bootstrap 95% CI. Localisation: mean over the truly positive slides "
        "of the test parts of the ROC AUC of the tile attention (CLAM-MB: the positive-class branch) against the "
        f"witness tiles of the ground truth. Seconds: wall time of the whole cross-validation ({args.folds} trainings, "
        "test predictions, the mean-pool baseline inside each); for the baselines, reading the bags, fitting and scoring.",
        "",
        "| difficulty | witness fraction | model | held-out AUC [95% CI] | localisation AUC (n slides) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = row["difficulty"]
        preset = PRESETS[d]
        label = f"{d} (strength {preset.signal_strength:g}" + (f", label noise {preset.label_noise:g})" if preset.label_noise else ")")
        lines.append(f"| {label} | {witness[d][1]} | {row['model']} | {fmt_auc(row['auc'])} | "
                     f"{fmt_localisation(row['localisation'])} | {row['seconds']:.1f} |")
    lines += ["", "Embedding (once per difficulty, kept in the workdir): " + "; ".join(
        f"{d} {p['cohort_seconds']:.0f} s to write {PRESETS[d].tiles_per_slide if size.tiles_per_slide is None else size.tiles_per_slide}"
        f"-tile slides, " + ("embedding time not recorded" if p["embed"].get("seconds") is None else
                             f"{p['embed']['seconds']:.0f} s to embed {p['embed']['n_tiles']} tiles "
                             f"({p['embed']['tiles_per_second']:.1f} tiles/s, {p['embed']['runtime']})")
        + (" (measured when the cache was built)" if p["embed"]["reused"] else "")
        for d, p in prepared.items()) + "."]
    if args.witness_note:
        lines += ["", args.witness_note]
    verdicts = targets(rows, witness)
    if verdicts:
        lines += ["", "Targets:", ""] + [f"- {c}" for c in verdicts]
    notes = diagnosis(rows, prepared, checks, weights)
    if notes:
        lines += ["", "Why:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"cohorts, caches and runs, reused by the next run (default {DEFAULT_WORKDIR})")
    parser.add_argument("--difficulties", nargs="+", choices=DIFFICULTIES, default=list(DIFFICULTIES))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke test: {QUICK.n_patients} patients, {QUICK.tiles_per_slide} tiles of "
                             f"{QUICK.tile_size} px per slide, {QUICK.epochs} epochs, 3 folds unless --folds")
    parser.add_argument("--backbone", default="resnet50_trunc")
    parser.add_argument("--weights", choices=("auto", "imagenet", "random"), default="auto",
                        help="auto: ImageNet when the weights load here, else random (said loudly)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--write", action="store_true", help="write the section into --out (default: print only)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    size = QUICK if args.quick else FULL
    if args.quick and "--folds" not in " ".join(args.argv):
        args.folds = 3
    if args.quick:
        args.workdir = args.workdir / "quick"

    from clam.checkpoints import resolve_device

    args.device_resolved = str(resolve_device(args.device))
    started = time.perf_counter()
    if args.weights == "auto":
        weights, weights_note = pick_weights(args.backbone)
    else:
        weights, weights_note = args.weights, "asked for with --weights"
    log_line(f"backbone weights: {weights.upper()}" + (f" ({weights_note})" if weights == "random" else ""))

    difficulties = [d for d in DIFFICULTIES if d in args.difficulties]
    prepared = {d: prepare(args.workdir, d, size, weights, args.backbone) for d in difficulties}
    witness = {d: witness_description(p["truth"]) for d, p in prepared.items()}
    args.witness_note = ("The easy preset draws 10-25% witness tiles; here its witness fraction is set to 0.20, "
                         "which on 24-tile slides rounds up to 5 tiles." if "easy" in prepared and not args.quick else "")
    rows: list[dict[str, Any]] = []
    checks: dict[str, dict[str, Any]] = {}
    for d in difficulties:
        rows += run_difficulty(prepared[d], size, args.folds, args.device, with_scales=d == "medium")
        checks[d] = feature_checks(prepared[d]["cache_dir"], prepared[d]["truth"], args.folds)
        log_line(f"[{d}] what the features allow: {checks[d]}")
    total = time.perf_counter() - started
    (args.workdir / "results.json").write_text(json.dumps(
        {"rows": rows, "checks": checks, "seconds": total, "weights": weights,
         "prepared": {d: {k: v for k, v in p.items() if k != "truth"} for d, p in prepared.items()}},
        indent=1, default=str))
    text = section(args, weights, weights_note, rows, prepared, witness, checks, size, total)
    print(text)
    if args.write:
        write_section(args.out, SECTION, text)
        print(f"wrote the {SECTION} section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
