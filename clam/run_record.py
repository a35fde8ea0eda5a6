"""What a training run records: where it stands (``RunState``), config.json, and the files of each epoch.

``save_epoch`` writes best_model.pt (when the epoch is the best), config.json, then
checkpoint_epoch_N.pt; the checkpoint's contents are ``clam.checkpoints.build_checkpoint``'s,
the file names ``clam.run_files``'.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import h5py
import numpy
import sklearn
import torch

from clam import __version__
from clam.checkpoints import SavedProgress, build_checkpoint, save_checkpoint
from clam.data import BagSet
from clam.loading import class_counts
from clam.metrics import default_class_names, format_number
from clam.run_files import BEST_NAME, CONFIG_NAME, SPLIT_FILE, checkpoint_name, write_json
from clam.train_config import TrainConfig, config_args
from feature_extraction.errors import write_error


@dataclass
class RunState:
    """Where the run stands; saved in every checkpoint so --resume continues exactly."""

    epoch: int = 0
    loss: float = math.nan  # the monitored loss of ``epoch``
    best_epoch: int | None = None
    best_loss: float = math.inf
    epochs_since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row of metrics per epoch
    is_best: bool = False
    stopped_early: bool = False
    status: str = "running"

    @classmethod
    def resumed(cls, saved: SavedProgress) -> RunState:
        """The state a checkpoint was saved in (``clam.checkpoints.saved_progress``)."""
        return cls(
            epoch=saved.epoch,
            loss=saved.loss,
            best_epoch=saved.best_epoch,
            best_loss=saved.best_loss,
            epochs_since_best=saved.epochs_since_best,
            history=list(saved.history),
        )

    def progress(self) -> SavedProgress:
        return SavedProgress(
            self.epoch, self.loss, self.best_epoch, self.best_loss, self.epochs_since_best, self.history
        )

    def record(self, epoch: int, train: dict, val: dict | None, seconds: float, patience: int | None) -> None:
        # The monitored loss: validation loss, or the training loss when there is no validation set.
        self.epoch, self.loss = epoch, (val or train)["loss"]
        row = {"epoch": epoch, "seconds": round(seconds, 3)}
        row.update({f"train_{k}": v for k, v in train.items()})
        row.update({f"val_{k}": v for k, v in (val or {}).items()})
        self.is_best = self.loss < self.best_loss
        if self.is_best:
            self.best_epoch, self.best_loss, self.epochs_since_best = epoch, self.loss, 0
        else:
            self.epochs_since_best += 1
        row["best"] = self.is_best
        self.history.append(row)
        self.stopped_early = patience is not None and self.epochs_since_best >= patience

    def summary_line(self, num_epochs: int) -> str:
        row = self.history[-1]
        parts = [f"epoch {row['epoch']}/{num_epochs}"]
        for side in ("train", "val"):
            if f"{side}_loss" in row:
                numbers = [
                    format_number(row.get(f"{side}_{key}"), "n/a")
                    for key in ("auc", "balanced_accuracy", "inst_acc")
                ]
                parts.append(
                    f"{side} loss {row[f'{side}_loss']:.4f} auc {numbers[0]} bacc {numbers[1]} "
                    f"inst acc {numbers[2]}"
                )
        parts.append(f"{row['seconds']:.1f} s" + ("  * best" if row["best"] else ""))
        return " | ".join(parts)


def way_on(last_saved: Path | None) -> str:
    """What to run after a stop, given the newest complete checkpoint (None: none yet)."""
    if last_saved is None:
        return "no epoch was saved yet: run the command again"
    return f"continue with: python -m clam.train --resume {last_saved}"


def save_epoch(
    run_dir: Path,
    model,
    optimizer,
    config: TrainConfig,
    state: RunState,
    run_info: dict,
    baseline: dict | None = None,
    last_saved: Path | None = None,
    bag_versions: dict[str, str] | None = None,
) -> Path:
    """best_model.pt when this epoch is the best, then config.json, then checkpoint_epoch_N.pt;
    returns the checkpoint's path. The checkpoint goes last: once it exists, everything of epoch N
    is saved (on the last epoch, config.json's final status too); a crash or a full disk before it
    leaves epoch N to be trained again, to the same weights, by --resume from N - 1. A file that
    cannot be written raises WriteError naming it and the checkpoint to resume from
    (``last_saved``: the newest complete one)."""
    checkpoint = build_checkpoint(
        model,
        optimizer,
        state.progress(),
        args=config_args(config),
        model_config=run_info["model"],
        cache=run_info["cache"],
        class_names=run_info["data"]["class_names"],
        versions=run_info["versions"],
        baseline=baseline or {},
        feature_norm=run_info["feature_norm"],
        bag_versions=bag_versions,
    )
    path = run_dir / checkpoint_name(state.epoch)
    writes = (
        [(run_dir / BEST_NAME, lambda: save_checkpoint(run_dir / BEST_NAME, checkpoint))]
        if state.is_best
        else []
    )
    writes += [
        (run_dir / CONFIG_NAME, lambda: write_config(run_dir, config, state, run_info)),
        (path, lambda: save_checkpoint(path, checkpoint)),
    ]
    for target, write in writes:
        try:
            write()
        except OSError as error:
            kept = [
                name for name in (checkpoint_name(state.epoch - 1), BEST_NAME) if (run_dir / name).is_file()
            ]
            intact = f"{' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} intact. " if kept else ""
            then = way_on(last_saved)
            raise write_error(target, error, f"{intact}{then[0].upper()}{then[1:]}") from error
    return path


def write_config(run_dir: Path, config: TrainConfig, state: RunState, run_info: dict) -> None:
    write_json(
        run_dir / CONFIG_NAME,
        {
            "epoch": state.epoch,
            "loss": state.loss,
            "args": config_args(config),
            "best_epoch": state.best_epoch,
            "best_loss": state.best_loss if state.best_epoch is not None else None,
            "status": state.status,
            "metrics": state.history,
            **run_info,
            "updated": datetime.now().isoformat(timespec="seconds"),
        },
    )


_IMBALANCE = {
    "loss": "bag cross-entropy weighted by n / (classes x n_class) of the training bags",
    "sampler": "bags drawn with replacement, each class equally often (CLAM's --weighted_sample)",
    "none": "no correction",
}


def run_info(config, bags: BagSet, split, plan, model, counts, class_weights, run_dir) -> dict[str, Any]:
    """What the run is, for config.json and the checkpoints (plain values only)."""
    cache_config = json.loads(json.dumps(bags.cache_config, default=str))
    return {
        "run_dir": str(run_dir),
        "model": model.config.to_dict(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "cache": {
            **cache_config,
            "cache_dir": str(bags.cache_dir),
            "cache_key": bags.cache_key,
            "feature_dim": bags.feature_dim,
        },
        "data": {
            "class_names": default_class_names(config.n_classes),
            "n_train_bags": len(split.train),
            "n_val_bags": len(split.val),
            "n_train_patients": len({r.patient_id for r in split.train}),
            "n_val_patients": len({r.patient_id for r in split.val}),
            "train_class_counts": counts,
            "val_class_counts": class_counts(split.val, config.n_classes),
            "n_test_bags": len(split.test),  # a cross-validation fold's held-out part: never used here
            "n_test_patients": len({r.patient_id for r in split.test}),
            "split_file": SPLIT_FILE,
        },
        "imbalance": {
            "method": config.balance,
            "description": _IMBALANCE[config.balance],
            "class_weights": class_weights,
        },
        "loader": asdict(plan),
        "versions": versions(),
    }


def describe_run(info: dict) -> str:
    data, cache = info["data"], info["cache"]
    return (
        f"bags: {data['n_train_bags']} train ({data['n_train_patients']} patients, classes "
        f"{data['train_class_counts']}), {data['n_val_bags']} validation ({data['n_val_patients']} "
        f"patients); {cache['feature_dim']}-d features from {cache['cache_dir']}\nimbalance: "
        f"{info['imbalance']['description']}\nloading: {info['loader']['reason']}"
    )


def versions() -> dict[str, str]:
    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "h5py": h5py.__version__,
        "clam": __version__,
    }
    return {name: str(version) for name, version in found.items()}  # torch's is a str subclass
