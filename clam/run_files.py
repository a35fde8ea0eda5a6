"""The names of every file clam writes, and of their columns: readers and writers take them from here.

A training run (``python -m clam.train``)::

    <output_dir>/run_YYYYMMDD_HHMMSS/      one folder per run (``_2``, ``_3`` when started the same second)
        config.json                        training arguments, current and best epoch/loss, metrics
        split.csv                          slide_id, patient_id, label, set (train / val / test)
        checkpoint_epoch_N.pt              after every epoch N = 1, 2, ...
        best_model.pt                      the epoch with the lowest validation loss
        training.html, curves.png          the run's page and its curves (clam.training_report)
        tensorboard/                       with --tensorboard: TensorBoard event files

A cross-validation run (``--folds K``) is a parent run folder holding ``splits.csv`` (slide_id,
patient_id, label, fold, fold_1..fold_K), one run folder per fold (``fold_1`` ... ``fold_K``),
``oof_predictions.csv`` (per patient), ``oof_predictions_slide.csv``, ``summary.csv``,
``summary.json`` and ``training.html`` (a page linking the folds' pages).

An evaluation (``python -m clam.evaluate``) writes ``eval_<timestamp>/`` (``attention_<timestamp>/``
for ``python -m clam.attention``) inside the run folder: ``predictions.csv``,
``predictions_patient.csv`` (probability columns ``prob_<class>``, the baseline's
``baseline_prob_<class>``), ``metrics.json``, ``roc.png``, ``confusion_matrix.png`` and
``attention/`` (``<slide_id>.csv``, ``<slide_id>_topk.png``, ``<slide_id>_heatmap.png``, ``index.csv``).

Besides the names: creating a run folder, finding the newest run, telling a cross-validation run
from a single one, and the strict JSON that the run's .json files are written in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from feature_extraction.atomic import atomic_write_json
from feature_extraction.errors import PipelineError
from feature_extraction.layout import project_root

# ---------------------------------------------------------------- a training run
RUN_PREFIX = "run_"
CONFIG_NAME = "config.json"
SPLIT_FILE = "split.csv"
SPLIT_COLUMNS = ("slide_id", "patient_id", "label", "set")
BEST_NAME = "best_model.pt"
TRAINING_HTML = "training.html"
CURVES_PNG = "curves.png"
TENSORBOARD_DIR = "tensorboard"
DEFAULT_TOP_K = 8  # attention maps: tiles per row of the montage, outlined tiles of the heatmap

# ---------------------------------------------------------------- a cross-validation run
SPLITS_FILE = "splits.csv"
SPLITS_COLUMNS = ("slide_id", "patient_id", "label", "fold")
FOLD_PREFIX = "fold_"  # the fold folders and the fold_k columns of splits.csv
OOF_PATIENTS = "oof_predictions.csv"
OOF_SLIDES = "oof_predictions_slide.csv"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"

# ---------------------------------------------------------------- an evaluation
EVAL_PREFIX = "eval"
ATTENTION_PREFIX = "attention"
PREDICTIONS = "predictions.csv"
PATIENT_PREDICTIONS = "predictions_patient.csv"
METRICS_JSON = "metrics.json"
ROC_PNG = "roc.png"
CONFUSION_PNG = "confusion_matrix.png"
ATTENTION_DIR = "attention"
ATTENTION_INDEX = "index.csv"
ATTENTION_COLUMNS = ("tile_name", "x", "y", "attention", "attention_raw", "rank")
INDEX_COLUMNS = (
    "slide_id",
    "patient_id",
    "label",
    "predicted",
    "probability",
    "branch",
    "n_tiles",
    "scores_csv",
    "topk_png",
    "heatmap_png",
    "note",
)
# The leading columns of predictions.csv (then prob_<class>..., predicted, predicted_name, n_tiles,
# baseline_prob_<class>...). predictions_patient.csv starts with patient_id, n_slides, slide_ids,
# label, label_name (clam.inference.aggregate_patients), then prob_<class>..., predicted, ...
SLIDE_ID_COLUMNS = ("slide_id", "patient_id", "class_folder", "label", "label_name")


def checkpoint_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch}.pt"


def fold_name(fold: int) -> str:
    """A fold's run folder and its column in splits.csv: ``fold_<k>``."""
    return f"{FOLD_PREFIX}{fold}"


def fold_number(name: str) -> int | None:
    """k of ``fold_<k>``; None for any other name."""
    rest = name[len(FOLD_PREFIX) :] if name.startswith(FOLD_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def probability_column(class_name: str) -> str:
    return f"prob_{class_name}"


def baseline_column(class_name: str) -> str:
    return f"baseline_prob_{class_name}"


def attention_files(slide_id: str) -> dict[str, str]:
    """The files of one slide in ``attention/``, under the index.csv columns that name them."""
    return {
        "scores_csv": f"{slide_id}.csv",
        "topk_png": f"{slide_id}_topk.png",
        "heatmap_png": f"{slide_id}_heatmap.png",
    }


# ---------------------------------------------------------------- run folders


def default_runs_dir() -> Path:
    """Where ``python -m clam.train`` creates its run folders, and where evaluation looks by default."""
    return project_root() / "clam" / "checkpoints"


def make_run_dir(output_dir: str | Path, now: datetime | None = None) -> Path:
    """Create and return ``output_dir/run_YYYYMMDD_HHMMSS``; a run started in the same second
    gets ``..._2``, ``..._3``. Creation is atomic (mkdir), so two processes never share a folder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{RUN_PREFIX}{(now or datetime.now()):%Y%m%d_%H%M%S}"
    for attempt in range(1, 10_000):
        run_dir = output_dir / (stamp if attempt == 1 else f"{stamp}_{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise PipelineError(f"cannot create a run folder in {output_dir}: too many runs named {stamp}")


def make_output_dir(parent: Path, prefix: str, now: datetime | None = None) -> Path:
    """Create and return ``parent/<prefix>_YYYYMMDD_HHMMSS`` (``_2``, ``_3``, ... when it exists)."""
    stamp = f"{prefix}_{(now or datetime.now()):%Y%m%d_%H%M%S}"
    for attempt in range(1, 1000):
        candidate = parent / (stamp if attempt == 1 else f"{stamp}_{attempt}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise PipelineError(f"cannot create an output folder in {parent}; pass --output_dir.")


def fold_dirs(parent: Path) -> list[Path]:
    """The fold folders of a cross-validation run that hold a best_model.pt, in fold order."""
    found = [p.parent for p in parent.glob(f"{FOLD_PREFIX}*/{BEST_NAME}") if fold_number(p.parent.name)]
    return sorted(found, key=lambda p: fold_number(p.name) or 0)


def is_crossval_run(path: Path) -> bool:
    """A parent run folder of ``--folds``: splits.csv and fold_*/best_model.pt."""
    return path.is_dir() and (path / SPLITS_FILE).is_file() and bool(fold_dirs(path))


def is_single_run(path: Path) -> bool:
    return path.is_dir() and (path / BEST_NAME).is_file()


@dataclass(frozen=True)
class ChosenRun:
    """The run evaluated when no checkpoint is given, and why."""

    run_dir: Path
    crossval: bool
    n_folds: int
    runs_dir: Path

    @property
    def checkpoint(self) -> Path:
        """What ``--checkpoint`` would name: a cross-validation run's parent folder, else its best_model.pt."""
        return self.run_dir if self.crossval else self.run_dir / BEST_NAME

    def describe(self) -> str:
        kind = f"single run: {BEST_NAME}"
        if self.crossval:
            kind = f"cross-validation, {self.n_folds} folds: each fold's model and their ensemble"
        return f"checkpoint: newest run in {_shown(self.runs_dir)}: {self.run_dir.name} ({kind})"


def newest_run(runs_dir: Path | None = None) -> ChosenRun:
    """The newest ``run_*`` folder (by name, i.e. start time) that can be evaluated, whatever its kind:
    a single run with a best_model.pt, or a cross-validation run with at least one fold's."""
    runs_dir = Path(runs_dir or default_runs_dir())
    runs = sorted(
        (p for p in runs_dir.glob(f"{RUN_PREFIX}*") if is_single_run(p) or is_crossval_run(p)),
        key=lambda p: p.name,
    )
    if not runs:
        raise PipelineError(
            f"no training run with a {BEST_NAME} under {runs_dir}. Train one with `python -m clam.train`, "
            "or pass --checkpoint PATH."
        )
    newest = runs[-1]
    crossval = not is_single_run(newest)
    return ChosenRun(newest, crossval, len(fold_dirs(newest)) if crossval else 0, runs_dir)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json."""
    return json.loads((Path(run_dir) / CONFIG_NAME).read_text(encoding="utf-8"))


def selected_checkpoint(run_dir: Path) -> Path:
    """The model a run is scored with: best_model.pt (lowest validation loss) when the run had a
    validation part, else the last epoch's checkpoint."""
    info = read_run_config(run_dir)
    if info["data"].get("n_val_bags"):
        return run_dir / BEST_NAME
    return run_dir / checkpoint_name(int(info["epoch"]))


# ---------------------------------------------------------------- strict JSON


def json_safe(value: Any) -> Any:
    """Strict JSON has no NaN or Infinity: they become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` atomically as strict JSON (non-finite floats as null)."""
    atomic_write_json(path, json_safe(value))
