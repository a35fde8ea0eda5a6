"""``python -m clam.evaluate``: a trained CLAM checkpoint on a held-out cohort, with the numbers
a paper reports, their uncertainty, and the attention maps.

    python -m clam.evaluate                                   # newest run's best_model.pt on <project root>/test
    python -m clam.evaluate --checkpoint clam/checkpoints/run_20260101_120000/best_model.pt

Writes into ``<run folder>/eval_<timestamp>/`` (or ``--output_dir``):

    predictions.csv           one row per slide: ids, true label, probability of each class, prediction
    predictions_patient.csv   one row per patient: the mean of its slides' probabilities
    metrics.json              per slide and per patient: AUC with its 95% bootstrap CI, accuracy,
                              balanced accuracy, sensitivity, specificity, F1, confusion matrix, n
    roc.png                   ROC curves with their bootstrap bands (per slide | per patient)
    confusion_matrix.png      confusion matrices (per slide | per patient)
    attention/                per-slide attention scores, top/bottom-k montages, heatmaps (clam.attention)

Bags come from the feature cache the checkpoint was trained on: slides of ``--data_dir`` that
it lacks are embedded first with the checkpoint's backbone, weights and tile subset, and a
cache with another key is refused. Every instance of every bag is used (no subsampling).

Leakage: the evaluated slides are matched, by slide id and by patient id, against the
``split.csv`` of the checkpoint's run folder. Slides (or other slides of patients) the run
trained or validated on are reported in a ``WARNING:`` line, in the summary and in
metrics.json (``leakage``): such metrics are optimistic. A ``test`` set in split.csv (held out
by the run) is not leakage. Without a split file the check is skipped, with a note.

``--checkpoint`` may also be a bare CLAM state dict (mahmoodlab/CLAM's ``s_0_checkpoint.pt``):
the model is rebuilt from its tensor shapes (``clam.checkpoints.clam_state_dict``); it records
no feature cache, so its bags come from ``--labels_csv`` and ``--features_dir``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay
from tqdm.auto import tqdm

from feature_extraction.atomic import atomic_output, atomic_write_json, atomic_write_text
from feature_extraction.bags import bag_path, read_bag
from feature_extraction.cache import STATUS_FAILED, read_cache_config, read_manifest
from feature_extraction.errors import PipelineError, cli_main
from feature_extraction.layout import SPLITS, default_data_dir, default_features_dir, discover_slides, project_root

from clam import attention as attention_maps
from clam.baselines import PooledBaseline
from clam.checkpoints import BEST_NAME, CLAM_STATE_DICT, RUN_PREFIX, model_from_checkpoint, resolve_device
from clam.data import (
    BagDataset,
    BagRecord,
    is_cache_dir,
    plan_loading,
    records_from_cache,
    records_from_labels_csv,
    validate_records,
)
from clam.metrics import DEFAULT_N_BOOTSTRAP, default_class_names, roc_band, summarize
from clam.splits import SPLIT_FILE

ALL = "all"
NONE = "none"
# Sets of a run's split.csv whose slides the run learnt from (train) or chose its best epoch and
# stopped on (val): evaluating on them is leakage. Any other set (a held-out "test") is not.
LEAKAGE_SETS = ("train", "val")
N_LEAKAGE_EXAMPLES = 5


def default_runs_dir() -> Path:
    """Where ``python -m clam.train`` puts its runs by default."""
    return project_root() / "clam" / "checkpoints"


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate and where to write it. ``None`` means the documented default.

    ``attention``: "all", "none" or a tuple of slide ids to draw maps for. ``metrics=False``
    only writes attention maps (``python -m clam.attention``)."""

    checkpoint: Path | None = None
    data_dir: Path | None = None
    split: str = "test"
    labels_csv: Path | None = None
    features_dir: Path | None = None
    output_dir: Path | None = None
    device: str = "auto"
    num_workers: int = 4
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP
    top_k: int = attention_maps.DEFAULT_TOP_K
    attention: str | tuple[str, ...] = ALL
    seed: int = 0
    metrics: bool = True
    output_prefix: str = "eval"
    progress: bool = True


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint, in eval mode on ``device``, and what it was trained on."""

    model: torch.nn.Module
    checkpoint: dict[str, Any]
    path: Path
    device: torch.device
    n_classes: int
    feature_dim: int
    class_names: tuple[str, ...]
    cache_key: str | None
    cache: dict[str, Any]  # the cache's configuration as recorded in the checkpoint

    @property
    def args(self) -> dict[str, Any]:
        return dict(self.checkpoint.get("args") or {})

    @property
    def is_clam_state_dict(self) -> bool:
        """Weights of mahmoodlab/CLAM (a bare state dict): no cache, class names, epoch or split."""
        return self.checkpoint.get("checkpoint_format") == CLAM_STATE_DICT


@dataclass(frozen=True)
class Cohort:
    """The validated bags to evaluate, and the slides that have none (with the reason)."""

    records: tuple[BagRecord, ...]
    cache_dir: Path
    cache_key: str | None
    left_out: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SlidePrediction:
    record: BagRecord
    probs: np.ndarray  # (C,)
    attention: np.ndarray  # (K, N), K = 1 (CLAM-SB) or C (CLAM-MB)
    attention_raw: np.ndarray  # (K, N)
    pooled: dict[str, np.ndarray] = field(default_factory=dict)  # "mean" / "max" of the bag's raw features, (D,)


@dataclass(frozen=True)
class EvaluationResult:
    output_dir: Path
    metrics: dict[str, Any]
    slides: list[dict[str, Any]]
    patients: list[dict[str, Any]]


# ---------------------------------------------------------------- the model


def newest_checkpoint(runs_dir: Path | None = None) -> Path:
    """``best_model.pt`` of the newest ``run_*`` folder (by name, i.e. start time) that has one."""
    runs_dir = Path(runs_dir or default_runs_dir())
    runs = sorted((p for p in runs_dir.glob(f"{RUN_PREFIX}*") if (p / BEST_NAME).is_file()),
                  key=lambda p: p.name)
    if not runs:
        raise PipelineError(
            f"no training run with a {BEST_NAME} under {runs_dir}. Train one with `python -m clam.train`, "
            "or pass --checkpoint PATH."
        )
    return runs[-1] / BEST_NAME


def load_model(checkpoint_path: Path | None, device: str = "auto") -> LoadedModel:
    """Rebuild the checkpoint's model for inference (default: the newest run's best model)."""
    path = Path(checkpoint_path) if checkpoint_path else newest_checkpoint()
    resolved = resolve_device(device)
    model, checkpoint = model_from_checkpoint(path, resolved)
    config = checkpoint.get("model_config") or {}
    n_classes = int(config.get("n_classes") or checkpoint.get("args", {}).get("n_classes") or 2)
    names = checkpoint.get("class_names") or default_class_names(n_classes)
    cache = dict(checkpoint.get("cache") or {})
    return LoadedModel(
        model=model,
        checkpoint=checkpoint,
        path=path,
        device=resolved,
        n_classes=n_classes,
        feature_dim=int(config.get("in_dim") or 0),
        class_names=tuple(str(n) for n in names),
        cache_key=cache.get("cache_key") or None,
        cache=cache,
    )


# ---------------------------------------------------------------- the bags


def cohort_bags(config: EvaluateConfig, loaded: LoadedModel, log: Callable[[str], None] = print) -> Cohort:
    """The bags to evaluate: from ``--labels_csv`` and ``--features_dir``, else the slides of
    ``--data_dir``/``--split`` in the checkpoint's feature cache, embedding those it lacks.

    Raises PipelineError when the cache (or a bag) has another key than the checkpoint's, when
    a bag's feature dimension differs from the model's, or when nothing can be evaluated."""
    if config.labels_csv is not None:
        if config.features_dir is None:
            raise PipelineError("--labels_csv needs --features_dir: the folder holding <slide_id>.h5 bags.")
        records = records_from_labels_csv(config.labels_csv, config.features_dir)
        cache_dir = Path(config.features_dir)
        return _validated(records, cache_dir, loaded, {}, config.progress, log)
    if loaded.is_clam_state_dict:
        raise PipelineError(
            f"checkpoint {loaded.path} is a bare CLAM state dict (weights only, as mahmoodlab/CLAM saves them): it "
            "records no feature cache, so the slides of a data folder cannot be embedded to match it. Pass "
            "--labels_csv (slide_id,label[,patient_id]) and --features_dir (the folder of <slide_id>.h5 bags made "
            "with the feature extractor it was trained with)."
        )
    data_dir = Path(config.data_dir or default_data_dir(config.split))
    slides = discover_slides(data_dir, config.split)
    if not slides:
        raise PipelineError(f"{data_dir} holds no patient folders for --split {config.split}.")
    slide_ids = {s.slide_id for s in slides}
    cache_dir = _checkpoint_cache_dir(config, loaded)
    if _not_embedded(cache_dir, slide_ids):
        cache_dir = _embed_missing(config, loaded, data_dir, cache_dir, slide_ids, log)
    _check_cache_key(cache_dir, loaded)
    records = records_from_cache(cache_dir, slide_ids, config.split, log=log)
    cohort = _validated(records, cache_dir, loaded, read_cache_config(cache_dir), config.progress)
    errors = {row.slide_id: row.error for row in read_manifest(cache_dir)}
    left_out = {s: f"no bag in the feature cache: {errors.get(s) or 'stage 1 found no readable tile'}"
                for s in sorted(slide_ids - {r.slide_id for r in cohort.records})}
    return Cohort(cohort.records, cohort.cache_dir, cohort.cache_key, left_out)


def _checkpoint_cache_dir(config: EvaluateConfig, loaded: LoadedModel) -> Path:
    """The cache folder to look in: ``--features_dir`` itself if it is a cache, else the folder of
    the checkpoint's cache name inside ``--features_dir`` (default: the one it was trained from)."""
    if loaded.cache_key is None:
        raise PipelineError(
            f"checkpoint {loaded.path} records no feature cache (it was trained on bags from a labels CSV), "
            "so the slides of a data folder cannot be embedded to match it. Pass --labels_csv and --features_dir."
        )
    trained_dir = Path(str(loaded.cache.get("cache_dir") or ""))
    if config.features_dir is not None:
        features_dir = Path(config.features_dir)
        return features_dir if is_cache_dir(features_dir) else features_dir / trained_dir.name
    # Where training found it; else the project's default cache folder (a project moved elsewhere).
    moved = default_features_dir() / trained_dir.name
    return moved if not is_cache_dir(trained_dir) and is_cache_dir(moved) else trained_dir


def _not_embedded(cache_dir: Path, slide_ids: set[str]) -> list[str]:
    """Slides with neither a bag nor a recorded failure (no readable tile) in ``cache_dir``.

    Failed slides are not retried here: that would load the backbone (and need its weights,
    perhaps unavailable offline) on every evaluation; ``python -m feature_extraction.embed`` retries them."""
    if not is_cache_dir(cache_dir):
        return sorted(slide_ids)
    failed = {row.slide_id for row in read_manifest(cache_dir) if row.status == STATUS_FAILED}
    return sorted(s for s in slide_ids if s not in failed and not bag_path(cache_dir, s).is_file())


def _embed_missing(
    config: EvaluateConfig, loaded: LoadedModel, data_dir: Path, cache_dir: Path, slide_ids: set[str],
    log: Callable[[str], None],
) -> Path:
    if is_cache_dir(cache_dir):
        _check_cache_key(cache_dir, loaded)  # refuse before spending time embedding
    missing = _not_embedded(cache_dir, slide_ids)
    backbone = loaded.cache.get("backbone") or loaded.args.get("backbone")
    # The cache records what the features really came from ("imagenet", "random", or "file-<stem>" for a
    # weights file, whose path only the arguments hold); --weights may be a default that a cache folder
    # given as --features_dir overrode.
    recorded = loaded.cache.get("weights")
    weights = recorded if recorded in ("imagenet", "random") else loaded.args.get("weights") or recorded
    max_tiles, seed = int(loaded.cache.get("max_tiles", 0)), int(loaded.cache.get("seed", 0))
    log(f"feature cache: {len(missing)} of {len(slide_ids)} slides of {data_dir} are not in {cache_dir}; "
        f"embedding them first with the checkpoint's {backbone} / {weights} (max_tiles {max_tiles}, seed {seed}).")
    from feature_extraction.embed import CacheKeyMismatch, EmbedConfig, embed_cohort  # stage 1 when needed

    # The checkpoint's cache entry replays: whole slides are tiled as for training (its wsi_tiling),
    # and a configuration that no longer gives its cache key is refused before a tile is embedded.
    replay = EmbedConfig.from_dict({
        **loaded.cache, "backbone": backbone, "weights": weights, "max_tiles": max_tiles, "seed": seed,
        "num_workers": config.num_workers, "device": config.device, "progress": config.progress,
        "expected_cache_key": loaded.cache_key,
    })
    try:
        report = embed_cohort(replay, data_dir, config.split, cache_dir.parent)
    except CacheKeyMismatch as mismatch:
        raise PipelineError(
            f"embedding {data_dir} with the checkpoint's backbone {backbone!r} and weights {weights!r} now gives "
            f"cache key {mismatch.config.cache_key!r}, but {loaded.path} was trained on {loaded.cache_key!r}: "
            f"{_key_difference(mismatch.config, loaded.cache)}. Its predictions on these features would be "
            "meaningless; use the weights the model was trained with, or retrain. Nothing was embedded."
        ) from None
    return Path(report.cache_dir)


def _key_difference(config, trained: dict) -> str:
    """Which recorded fields of the training cache differ from ``config`` (an ExtractionConfig)."""
    now = {k: v for k, v in asdict(config).items() if k != "weights"}
    changed = [k for k, v in now.items() if k in trained and str(trained[k]) != str(v)]
    if not changed:
        return "the weights or the transform changed since training"
    return "changed since training: " + ", ".join(
        f"{k} {str(trained[k])[:40]!r} -> {str(now[k])[:40]!r}" for k in changed)


def _check_cache_key(cache_dir: Path, loaded: LoadedModel) -> None:
    found = read_cache_config(cache_dir).get("cache_key")
    if found != loaded.cache_key:
        raise PipelineError(
            f"feature cache {cache_dir} has key {found!r}, but {loaded.path} was trained on features with key "
            f"{loaded.cache_key!r} (another backbone, weights, transform or tile subset). The model cannot be "
            "evaluated on these features: pass the --features_dir it was trained with, or let evaluation embed "
            "the slides by pointing --features_dir at a folder of caches."
        )


def _validated(records: Sequence[BagRecord], cache_dir: Path, loaded: LoadedModel, cache_config: dict,
               progress: bool, log: Callable[[str], None] = print) -> Cohort:
    expected = {"cache_key": loaded.cache_key, "feature_dim": loaded.feature_dim}
    bagset = validate_records(records, cache_dir, loaded.n_classes, {**cache_config, **expected}, progress)
    if loaded.is_clam_state_dict:
        # Nothing records which extractor CLAM's features came from: only the dimension is checked.
        log(f"note: {loaded.path} records no feature extractor; the bags in {cache_dir} have the feature dimension "
            f"it expects ({loaded.feature_dim}), but make sure they come from the extractor it was trained with "
            "(CLAM's default: ResNet50 truncated after layer 3, ImageNet weights, 1024 features).")
    elif loaded.cache_key is None and bagset.cache_key is not None:
        raise PipelineError(
            f"the bags in {cache_dir} come from feature cache {bagset.cache_key!r}, but {loaded.path} was trained "
            "on bags without a cache key (a labels CSV of foreign bags). Evaluate it on bags of the same origin."
        )
    return Cohort(bagset.records, Path(cache_dir), bagset.cache_key)


# ---------------------------------------------------------------- leakage


def run_split_sets(checkpoint_path: Path) -> tuple[Path | None, list[dict[str, str]] | None, str | None]:
    """(split file, its rows as dicts with slide_id, patient_id, set, why not) for a checkpoint.

    The split file is ``split.csv`` of the checkpoint's run folder; for a cross-validation fold
    folder ``fold_K`` without one, the parent's ``splits.csv`` gives it (fold K validated, the
    others trained). Rows are None, with the reason, when there is none or it cannot be read."""
    from clam.crossval import FOLD_PREFIX, SPLITS_FILE  # crossval imports this module

    run_dir = Path(checkpoint_path).parent
    path = run_dir / SPLIT_FILE
    parent_file = run_dir.parent / SPLITS_FILE
    fold = run_dir.name[len(FOLD_PREFIX):] if run_dir.name.startswith(FOLD_PREFIX) else ""
    if path.is_file():
        column = "set"
    elif fold.isdigit() and parent_file.is_file():
        path, column = parent_file, "fold"
    else:
        path = None
    if path is not None:
        try:
            rows = _csv_rows(path, ("slide_id", column))
            if column == "fold":  # the parent's folds: its fold_K column names each part; an older
                for row in rows:  # two-part file means fold K validated this model, the others trained it
                    row["set"] = row.get(f"{FOLD_PREFIX}{fold}") or ("val" if int(row["fold"]) == int(fold) else "train")
        except (OSError, ValueError, csv.Error, UnicodeDecodeError) as error:
            return path, None, f"the split file {path} cannot be read ({error})"
        return path, [{"slide_id": r["slide_id"], "patient_id": r.get("patient_id") or "", "set": r["set"]}
                      for r in rows], None
    return None, None, (f"there is no {SPLIT_FILE} next to {checkpoint_path} (a checkpoint copied out of its run "
                        "folder, or weights trained elsewhere), so which slides it was trained on is unknown")


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
    result: dict[str, Any] = {"checked": rows is not None, "split_file": str(split_file) if split_file else None,
                              "leakage_sets": list(LEAKAGE_SETS), "n_evaluated_slides": len(records),
                              "n_evaluated_patients": n_eval_patients, "n_slides": None, "n_patients": None,
                              "by_set": {}, "reason": reason, "message": None}
    if rows is None:
        result["message"] = (f"note: not checked for leakage: {reason}. Make sure the evaluated slides were not "
                             "used to train or validate it.")
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
        hit = [r for r in records if r.slide_id in slides_by_set.get(name, ()) or
               r.patient_id in patients_by_set.get(name, ())]
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
            extra = f", {by_patient} of them only by patient id (another slide of that patient)" if by_patient else ""
            parts.append(f"{found['n_slides']} slides / {found['n_patients']} patients in its {title}{extra}")
    examples = sorted({s for name in LEAKAGE_SETS for s in leakage["by_set"][name]["slide_ids"]})[:N_LEAKAGE_EXAMPLES]
    return (f"WARNING: leakage: {leakage['n_slides']} of the {leakage['n_evaluated_slides']} evaluated slides "
            f"({leakage['n_patients']} of {leakage['n_evaluated_patients']} patients) were used by this model's run "
            f"({leakage['split_file']}): {'; '.join(parts)}; e.g. {', '.join(examples)}. These metrics are optimistic, "
            "not a held-out estimate: evaluate on slides the run never saw (e.g. the external test cohort).")


# ---------------------------------------------------------------- inference


def predict(
    loaded: LoadedModel, records: Sequence[BagRecord], num_workers: int = 0, progress: bool = True
) -> Iterator[SlidePrediction]:
    """Run the model on every instance of each bag, one bag per forward pass, in record order."""
    total_bytes = sum(r.n_instances for r in records) * loaded.feature_dim * 4
    plan = plan_loading(total_bytes, "no", num_workers, loaded.device)
    dataset = BagDataset(records, sample_tiles=0, seed=0, train=False, in_memory=False, progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=plan.num_workers,
                                         pin_memory=loaded.device.type == "cuda")
    loaded.model.eval()
    with torch.inference_mode():
        for features, _, index in tqdm(loader, total=len(dataset), desc="evaluating", unit="slide",
                                       disable=not progress, leave=False):
            output = loaded.model(features.to(loaded.device)[None])
            yield SlidePrediction(
                record=records[int(index)],
                probs=output.probs[0].float().cpu().numpy(),
                attention=output.attention[0].float().cpu().numpy(),
                attention_raw=output.attention_raw[0].float().cpu().numpy(),
                pooled={"mean": features.double().mean(dim=0).numpy(), "max": features.double().amax(dim=0).numpy()},
            )


def aggregate_patients(slides: Sequence[dict[str, Any]], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per patient: the mean probability of each class over its slides, argmax prediction.

    ``slides`` are rows of predictions.csv (as dicts); patients are listed in first-seen order."""
    columns = [probability_column(name) for name in class_names]
    # The baseline's probabilities, where the rows carry them: averaged the same way (None when missing).
    baseline_columns = [baseline_column(name) for name in class_names if slides and baseline_column(name) in slides[0]]
    patients: dict[str, list[dict[str, Any]]] = {}
    for row in slides:
        patients.setdefault(str(row["patient_id"]), []).append(row)
    out = []
    for patient_id, rows in patients.items():
        probs = np.mean([[float(r[c]) for c in columns] for r in rows], axis=0)
        predicted = int(np.argmax(probs))
        out.append({
            "patient_id": patient_id,
            "n_slides": len(rows),
            "slide_ids": ";".join(str(r["slide_id"]) for r in rows),
            "label": int(rows[0]["label"]),
            "label_name": class_names[int(rows[0]["label"])],
            **{c: float(p) for c, p in zip(columns, probs)},
            "predicted": predicted,
            "predicted_name": class_names[predicted],
            **{c: None if any(r[c] in (None, "") for r in rows) else float(np.mean([float(r[c]) for r in rows]))
               for c in baseline_columns},
        })
    return out


def probability_column(class_name: str) -> str:
    return f"prob_{class_name}"


def baseline_column(class_name: str) -> str:
    return f"baseline_prob_{class_name}"


# ---------------------------------------------------------------- evaluation


def evaluate(config: EvaluateConfig, log: Callable[[str], None] = print) -> EvaluationResult:
    """Evaluate a checkpoint; write predictions, metrics, figures and attention maps (module docstring)."""
    if config.split not in SPLITS:
        raise PipelineError(f"unknown split {config.split!r}: use one of {', '.join(SPLITS)}")
    from clam.crossval import evaluate_folds, is_crossval_run  # crossval imports this module

    if config.checkpoint is not None and is_crossval_run(Path(config.checkpoint)):
        return evaluate_folds(config, log)  # every fold's best model and their ensemble
    loaded = load_model(config.checkpoint, config.device)
    if loaded.is_clam_state_dict:
        settings = loaded.checkpoint["model_config"]
        log(f"{loaded.path} is a bare CLAM state dict; model from its tensor shapes: "
            + ", ".join(f"{k} {settings[k]}" for k in ("model_type", "model_size", "in_dim", "n_classes")))
    cohort = cohort_bags(config, loaded, log)
    leakage = check_leakage(loaded.path, cohort.records)
    if leakage["message"]:
        log(leakage["message"])
    selected = _attention_selection(config.attention, cohort)
    output_dir = _output_dir(config, loaded)
    attention_dir = output_dir / "attention"
    data_dir = _image_dir(config)
    log(f"evaluating {loaded.path} on {len(cohort.records)} slides ({cohort.cache_dir}) -> {output_dir}")

    names = loaded.class_names
    baseline = saved_baseline(loaded.checkpoint)
    slides, index_rows = [], []
    for prediction in predict(loaded, cohort.records, config.num_workers, config.progress):
        record = prediction.record
        predicted = int(np.argmax(prediction.probs))
        base = {} if baseline is None else {
            baseline_column(n): float(p) for n, p in zip(names, baseline.probs(prediction.pooled[baseline.pool][None])[0])}
        slides.append({
            "slide_id": record.slide_id,
            "patient_id": record.patient_id,
            "class_folder": record.class_folder,
            "label": record.label,
            "label_name": names[record.label],
            **{probability_column(n): float(p) for n, p in zip(names, prediction.probs)},
            "predicted": predicted,
            "predicted_name": names[predicted],
            "n_tiles": prediction.attention.shape[-1],
            **base,
        })
        if record.slide_id in selected:
            index_rows.append(_explain(prediction, names, attention_dir, data_dir, config.top_k))
    if index_rows:
        attention_maps.write_index(attention_dir, index_rows)

    patients = aggregate_patients(slides, names)
    write_table(output_dir / "predictions.csv", slides)
    write_table(output_dir / "predictions_patient.csv", patients)
    metrics: dict[str, Any] = {}
    if config.metrics:
        metrics = _metrics(config, loaded, cohort, slides, patients, leakage)
        atomic_write_json(output_dir / "metrics.json", metrics)
        plot_roc(output_dir / "roc.png", {"per slide": slides, "per patient": patients}, metrics,
                 config.n_bootstrap, config.seed)
        plot_confusion(output_dir / "confusion_matrix.png", metrics)
        log(summary_table(metrics))
    log(f"results: {output_dir}")
    return EvaluationResult(output_dir, metrics, slides, patients)


def explain(config: EvaluateConfig, log: Callable[[str], None] = print) -> Path:
    """Only the attention maps of the chosen slides (``python -m clam.attention``); returns the folder."""
    loaded = load_model(config.checkpoint, config.device)
    cohort = cohort_bags(config, loaded, log)
    selected = _attention_selection(config.attention, cohort)
    records = [r for r in cohort.records if r.slide_id in selected]
    output_dir = _output_dir(config, loaded)
    data_dir = _image_dir(config)
    rows = [_explain(p, loaded.class_names, output_dir, data_dir, config.top_k)
            for p in predict(loaded, records, config.num_workers, config.progress)]
    attention_maps.write_index(output_dir, rows)
    return output_dir


def _image_dir(config: EvaluateConfig) -> Path | None:
    """Where the maps look for tile images: the cohort folder (None for bags from a labels CSV
    without --data_dir; the maps then use the slide folder recorded in each bag)."""
    if config.labels_csv is not None and config.data_dir is None:
        return None
    return Path(config.data_dir or default_data_dir(config.split))


def _explain(prediction: SlidePrediction, names: Sequence[str], out_dir: Path, data_dir: Path | None,
             top_k: int) -> dict[str, Any]:
    record = prediction.record
    bag = read_bag(record.path)  # tile names, coordinates and attributes; the features were read by the loader
    slide = attention_maps.slide_attention(
        record.slide_id, record.patient_id, record.label, prediction.probs, prediction.attention,
        prediction.attention_raw, bag.tile_names, bag.coords, names, bag.attrs,
    )
    return attention_maps.explain_slide(out_dir, slide, data_dir, top_k)


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
    stamp = f"{config.output_prefix}_{datetime.now():%Y%m%d_%H%M%S}"
    for attempt in range(1, 1000):
        candidate = loaded.path.parent / (stamp if attempt == 1 else f"{stamp}_{attempt}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise PipelineError(f"cannot create an output folder in {loaded.path.parent}; pass --output_dir.")


def _metrics(config: EvaluateConfig, loaded: LoadedModel, cohort: Cohort, slides: list[dict],
             patients: list[dict], leakage: dict[str, Any] | None = None) -> dict[str, Any]:
    names = list(loaded.class_names)

    def level(rows: list[dict]) -> dict[str, Any]:
        return level_metrics(rows, names, config.n_bootstrap, config.seed)

    return {
        "checkpoint": str(loaded.path),
        "checkpoint_format": loaded.checkpoint.get("checkpoint_format") or "clam.train",
        "epoch": loaded.checkpoint.get("epoch"),
        "model_config": loaded.checkpoint.get("model_config"),
        "cache_key": cohort.cache_key,
        "cache_dir": str(cohort.cache_dir),
        "data_dir": None if config.labels_csv else str(config.data_dir or default_data_dir(config.split)),
        "labels_csv": str(config.labels_csv) if config.labels_csv else None,
        "split": config.split,
        "class_names": names,
        "positive_class": names[1] if loaded.n_classes == 2 else None,
        "instances": "all instances of every bag (no subsampling)",
        "patient_aggregation": "mean of the patient's slide probabilities, then argmax",
        "per_slide": level(slides),
        "per_patient": level(patients),
        "left_out": cohort.left_out,
        "leakage": leakage,
        "baseline": _baseline_metrics(config, loaded, slides, patients),
        "created": datetime.now().isoformat(timespec="seconds"),
    }


def level_metrics(rows: Sequence[dict[str, Any]], class_names: Sequence[str], n_bootstrap: int, seed: int,
                  column=probability_column) -> dict[str, Any]:
    """``clam.metrics.summarize`` of prediction rows (predictions.csv or predictions_patient.csv as
    dicts): their labels and the probabilities in ``column(class name)`` columns."""
    names = list(class_names)
    y_true = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    probs = np.array([[float(r[column(n)]) for n in names] for r in rows], dtype=np.float64).reshape(-1, len(names))
    return summarize(y_true, probs, len(names), n_bootstrap, seed, names)


def saved_baseline(checkpoint: dict[str, Any]) -> PooledBaseline | None:
    """The pooled logistic-regression baseline fitted beside the model (clam.baselines), if the
    checkpoint holds one (checkpoints from before it, bare CLAM state dicts and one-class training
    sets have none)."""
    params = (checkpoint.get("baseline") or {}).get("params")
    return PooledBaseline.from_dict(params) if params else None


def _baseline_metrics(config: EvaluateConfig, loaded: LoadedModel, slides: list[dict],
                      patients: list[dict]) -> dict[str, Any] | None:
    """The baseline's metrics on the same slides and patients as CLAM's, with the same bootstrap."""
    saved = loaded.checkpoint.get("baseline") or {}
    names = list(loaded.class_names)
    if not slides or baseline_column(names[0]) not in slides[0]:
        return None

    def level(rows: list[dict]) -> dict[str, Any]:
        return level_metrics(rows, names, config.n_bootstrap, config.seed, column=baseline_column)

    return {"method": saved.get("method"), "fitted_on": "the run's training bags (as the model)",
            "instances": "every instance of each bag, pooled", "val_auc_at_training": saved.get("val_auc"),
            "per_slide": level(slides), "per_patient": level(patients)}


# ---------------------------------------------------------------- files and figures


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """A CSV with the keys of the first row as header (probabilities with 6 decimals)."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())


def plot_roc(path: Path, levels: dict[str, list[dict]], metrics: dict[str, Any], n_bootstrap: int,
             seed: int) -> None:
    """One panel per level: the ROC of the positive class (or one-vs-rest per class) with its
    pointwise 95% bootstrap band; the AUC and its CI (from ``metrics``) are in the legend
    (for more than two classes, the macro AUC and its CI are in the panel's title)."""
    class_names = metrics["class_names"]
    positives = [1] if len(class_names) == 2 else list(range(len(class_names)))
    fig = Figure(figsize=(5.4 * len(levels), 6.0 if len(positives) == 1 else 6.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(levels)))
    band_alpha = 0.2 if len(positives) == 1 else 0.1  # overlapping bands of several classes stay readable
    colours = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown"]
    for ax, (title, rows) in zip(axes, levels.items()):
        y_true = np.array([int(r["label"]) for r in rows])
        auc = metrics["per_" + title.split()[-1]]["auc"]
        drawn = 0
        for colour_index, positive in enumerate(positives):
            scores = np.array([float(r[probability_column(class_names[positive])]) for r in rows])
            band = roc_band(y_true, scores, positive, n_bootstrap, seed)
            if band is None:
                continue
            colour = colours[colour_index % len(colours)]
            label = f"AUC {_auc_text(auc)}" if len(positives) == 1 else \
                f"{class_names[positive]} vs rest: AUC {band.auc:.3f}"
            ax.fill_between(band.grid, band.tpr_low, band.tpr_high, color=colour, alpha=band_alpha, linewidth=0)
            ax.step(band.fpr, band.tpr, where="post", color=colour, linewidth=2, label=label)
            drawn += 1
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
        if drawn == 0:
            ax.text(0.5, 0.55, "ROC undefined:\nonly one class present", ha="center", va="center", fontsize=12)
        else:
            shade = colours[0] if len(positives) == 1 else "0.5"
            ax.plot([], [], color=shade, alpha=0.3, linewidth=8, label="95% bootstrap band")
        counts = ", ".join(f"{(y_true == c).sum()} {class_names[c]}" for c in range(len(class_names)))
        macro = "" if len(positives) == 1 else f"\nmacro one-vs-rest AUC {_auc_text(auc)}"
        ax.set_title(f"{title} (n={len(rows)}: {counts}){macro}", fontsize=10)
        positive_name = class_names[1] if len(class_names) == 2 else "each class"
        ax.set_xlabel("1 - specificity (false positive rate)")
        ax.set_ylabel(f"sensitivity (true positive rate, {positive_name})")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8.5)
    fig.suptitle("ROC curves with 95% bootstrap confidence bands", fontsize=11)
    _save_figure(fig, path)


def _auc_text(auc: dict[str, Any]) -> str:
    if auc["auc"] is None:
        return "undefined"
    if auc["ci_low"] is None:
        return f"{auc['auc']:.3f}"
    return f"{auc['auc']:.3f} (95% CI {auc['ci_low']:.3f}-{auc['ci_high']:.3f})"


def plot_confusion(path: Path, metrics: dict[str, Any]) -> None:
    """sklearn's ConfusionMatrixDisplay per level (counts, rows = true class)."""
    levels = {"per slide": metrics["per_slide"], "per patient": metrics["per_patient"]}
    names = metrics["class_names"]
    side = max(4.4, 1.3 * len(names) + 2.2)
    fig = Figure(figsize=(side * len(levels), side + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(levels)))
    for ax, (title, summary) in zip(axes, levels.items()):
        matrix = np.array(summary["confusion_matrix"]["matrix"])
        ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=ax, cmap="Blues", colorbar=False,
                                                                 values_format="d", text_kw={"fontsize": 14})
        accuracy = summary["accuracy"]
        ax.set_title(f"{title} (n={summary['n']}, accuracy {accuracy:.3f})" if accuracy is not None
                     else f"{title} (n={summary['n']})", fontsize=10)
        if len(names) > 2 or max(len(n) for n in names) > 12:
            ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle("Confusion matrices (rows: true class, columns: predicted class)", fontsize=11)
    _save_figure(fig, path)


def _save_figure(fig: Figure, path: Path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def summary_table(metrics: dict[str, Any]) -> str:
    """A short plain-text table of the headline numbers per slide and per patient."""
    header = f"{'level':<9}{'n':>5}  {'AUC [95% CI]':<22}{'accuracy':>9}{'bal.acc':>9}{'sens':>7}{'spec':>7}{'F1':>7}"
    lines = [header, "-" * len(header)]
    for level in ("per_slide", "per_patient"):
        m = metrics[level]
        auc = m["auc"]
        auc_text = "undefined" if auc["auc"] is None else (
            f"{auc['auc']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" if auc["ci_low"] is not None
            else f"{auc['auc']:.3f}")
        lines.append(f"{level[4:]:<9}{m['n']:>5}  {auc_text:<22}{_fmt(m['accuracy']):>9}"
                     f"{_fmt(m['balanced_accuracy']):>9}{_fmt(m['sensitivity']):>7}{_fmt(m['specificity']):>7}"
                     f"{_fmt(m['f1']):>7}")
    notes = sorted({reason for level in ("per_slide", "per_patient")
                    for reason in metrics[level]["undefined"].values()})
    baseline = metrics.get("baseline")
    if baseline:
        aucs = []
        for level in ("per_slide", "per_patient"):
            auc = baseline[level]["auc"]
            aucs.append(f"{level[4:]} " + ("undefined" if auc["auc"] is None else f"{auc['auc']:.3f}" + (
                f" [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]" if auc["ci_low"] is not None else "")))
        lines.append(f"baseline, {baseline['method']}, same slides: AUC " + ", ".join(aucs))
    lines += [f"note: {note}" for note in notes]
    if metrics.get("left_out"):
        lines.append(f"note: {len(metrics['left_out'])} slides without a bag were not evaluated "
                     "(metrics.json: left_out)")
    leakage = metrics.get("leakage") or {}
    if leakage.get("n_slides"):
        lines.append(f"WARNING: {leakage['n_slides']} of these slides ({leakage['n_patients']} patients) were used to "
                     "train or validate this model: the metrics are optimistic (metrics.json: leakage)")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


# ---------------------------------------------------------------- command line


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments shared by ``clam.evaluate`` and ``clam.attention``."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help=f"checkpoint to evaluate, or the parent run folder of a --folds run (every fold's "
                             f"model and their ensemble) (default: {BEST_NAME} of the newest run under "
                             f"{default_runs_dir()})")
    parser.add_argument("--data_dir", type=Path, default=None,
                        help="cohort folder (default: <project root>/<split>); also where the maps read tile images")
    parser.add_argument("--split", choices=SPLITS, default="test", help="layout of --data_dir (default: %(default)s)")
    parser.add_argument("--labels_csv", type=Path, default=None,
                        help="CSV slide_id,label[,patient_id] of bags in --features_dir, instead of --data_dir")
    parser.add_argument("--features_dir", type=Path, default=None,
                        help="folder of feature caches, or one cache (default: the one the checkpoint was trained on)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--num_workers", type=int, default=4, help="bag-loading workers (default: %(default)s)")


def parse_attention(values: Sequence[str]) -> str | tuple[str, ...]:
    values = [v for v in values if v]
    if len(values) == 1 and values[0].lower() in (ALL, NONE):
        return values[0].lower()
    return tuple(values)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> EvaluateConfig:
    return EvaluateConfig(
        checkpoint=args.checkpoint,
        data_dir=args.data_dir,
        split=args.split,
        labels_csv=args.labels_csv,
        features_dir=args.features_dir,
        output_dir=args.output_dir,
        device=args.device,
        num_workers=args.num_workers,
        top_k=args.top_k,
        **overrides,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clam.evaluate",
        description="Evaluate a CLAM checkpoint on a cohort: predictions, metrics with bootstrap CIs, ROC and "
                    "confusion-matrix figures, attention maps. See docs/evaluation.md.",
    )
    add_input_arguments(parser)
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="default: eval_<timestamp>/ inside the checkpoint's run folder")
    parser.add_argument("--n_bootstrap", type=int, default=DEFAULT_N_BOOTSTRAP,
                        help="bootstrap resamples for the confidence intervals (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")
    parser.add_argument("--top_k", type=int, default=attention_maps.DEFAULT_TOP_K,
                        help="tiles per row of the attention montages (default: %(default)s)")
    parser.add_argument("--attention", nargs="+", default=[ALL], metavar="SLIDE",
                        help="attention maps for: all (default), none, or the slide ids given")
    return parser


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_bootstrap < 0 or args.top_k < 1:
        raise PipelineError("--n_bootstrap must be >= 0 and --top_k >= 1")
    evaluate(config_from_args(args, n_bootstrap=args.n_bootstrap, seed=args.seed,
                              attention=parse_attention(args.attention), progress=sys.stderr.isatty()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
