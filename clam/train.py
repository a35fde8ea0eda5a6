"""``python -m clam.train``: train CLAM on the cached feature bags (the user's specification).

    python -m clam.train                                    # <project root>/train, defaults
    python -m clam.train --data_dir /path/to/data --split test
    python -m clam.train --features_dir DIR --labels_csv labels.csv   # any folder of HDF5 bags
    python -m clam.train --resume clam/checkpoints/run_.../checkpoint_epoch_3.pt
    python -m clam.train --folds 5                          # patient-level 5-fold cross-validation

This module only parses the arguments and calls ``clam.training.train`` (one run) or
``clam.crossval.cross_validate`` (``--folds``/``--splits``). It re-exports ``TrainConfig`` and
``train``, and ``load_checkpoint`` as the specification shows it (``from clam.train import
load_checkpoint``; it lives in ``clam.checkpoints``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from clam.checkpoints import load_checkpoint, model_from_checkpoint
from clam.crossval import cross_validate
from clam.model import FEATURE_NORMS, INSTANCE_LOSSES, MODEL_SIZES, MODEL_TYPES
from clam.train_config import BALANCE_CHOICES, TrainConfig
from clam.training import train
from clam.training_report import require_tensorboard
from feature_extraction.backbones import BACKBONES, resolve_weights
from feature_extraction.errors import cli_main
from feature_extraction.layout import SPLITS
from feature_extraction.weights import read_weights_map

__all__ = ["TrainConfig", "train", "main", "load_checkpoint", "model_from_checkpoint"]


# ---------------------------------------------------------------- command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        # "(default: None)" says nothing; those arguments name their default in the help text.
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


_Add = Callable[..., None]  # add(group, name, **add_argument options), the default filled in


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The spec's arguments (first group) and the extras. ``defaults=False`` leaves unset
    arguments out of the namespace, to tell which ones the user typed."""
    parser = argparse.ArgumentParser(
        prog="python -m clam.train",
        formatter_class=_HelpFormatter,
        description="Train CLAM on the cached feature bags of a cohort.",
    )
    base = TrainConfig()

    def add(group, name: str, **kwargs) -> None:
        dest = kwargs.get("dest", name.lstrip("-"))
        kwargs["default"] = getattr(base, dest) if defaults else argparse.SUPPRESS
        group.add_argument(name, **kwargs)

    # The order of the calls is the order of --help.
    _specification_arguments(parser.add_argument_group("data, model and training (the specification)"), add)
    extra = parser.add_argument_group("features, model variant, run control")
    _feature_arguments(extra, add)
    _model_variant_arguments(extra, add)
    _run_control_arguments(extra, add)
    return parser


def _specification_arguments(group: argparse._ArgumentGroup, add: _Add) -> None:
    """The arguments the specification names: data, model and training."""
    add(
        group,
        "--data_dir",
        help="cohort folder with EGFR_positive/, EGFR_negative/ (and optional _cnn folders); "
        "for --split test, C-S-EGFR_positive/ and C-S-EGFR_negative/ "
        "(default: <project root>/train, or <project root>/test with --split test)",
    )
    add(group, "--split", choices=SPLITS, help="which class folders to read")
    add(
        group,
        "--max_tiles",
        type=int,
        help="maximum number of tiles per bag: the seeded subset stage 1 embeds, which picks the feature cache; "
        "bags of a cache embedded with more are cut to that same subset; 0 = all tiles",
    )
    add(
        group,
        "--num_workers",
        type=int,
        help="data-loading worker processes (used when bags stream from disk)",
    )
    add(group, "--model_size", choices=tuple(MODEL_SIZES), help="small: attention hidden width 256; big: 384")
    add(group, "--dropout", type=float, help="dropout rate")
    add(
        group,
        "--k_sample",
        type=int,
        help="CLAM's k_sample (the spec calls it 'number of attention heads', which it is not): how many "
        "highest- and how many lowest-attention instances of each bag train the instance-level "
        "classifiers. CLAM-SB has one attention branch, CLAM-MB one per class. Clamped to half the bag",
    )
    add(group, "--n_classes", type=int, help="number of classes")
    add(group, "--num_epochs", type=int, help="number of training epochs")
    add(
        group,
        "--batch_size",
        type=int,
        help="bags per optimiser step (padded and masked in one forward pass)",
    )
    add(group, "--learning_rate", type=float, help="Adam learning rate")


def _feature_arguments(group: argparse._ArgumentGroup, add: _Add) -> None:
    """Which features: the cache, the backbone and its weights, or a folder of bags and their labels."""
    add(
        group,
        "--features_dir",
        help="feature cache root (default: <project root>/features), one cache folder "
        "(holding cache.json), or with --labels_csv any folder of <slide_id>.h5 bags",
    )
    add(
        group,
        "--backbone",
        help="backbone of the features (the ResNets or a foundation-model encoder: `python -m "
        "feature_extraction.embed --list_backbones`); slides missing from the cache are embedded first",
    )
    add(
        group,
        "--weights",
        help="backbone weights: imagenet (the ResNets), hub (the encoders' default: the Hugging Face hub "
        "cache), random, or a weights file",
    )
    group.add_argument(
        "--weights_map",
        default=None,
        help="JSON or TOML file mapping backbone names to weight files, used when --weights is not given",
    )
    add(group, "--labels_csv", help="CSV of slide_id,label[,patient_id] for the bags in --features_dir")


def _model_variant_arguments(group: argparse._ArgumentGroup, add: _Add) -> None:
    """The model variant, its losses and the training choices beyond the specification."""
    add(group, "--model_type", choices=MODEL_TYPES, help="CLAM single-branch or multi-branch")
    add(
        group,
        "--bag_weight",
        type=float,
        help="loss = bag_weight x bag loss + (1 - bag_weight) x instance loss",
    )
    add(
        group,
        "--inst_loss",
        dest="instance_loss",
        choices=INSTANCE_LOSSES,
        help="instance loss: cross-entropy or smooth top-1 SVM (CLAM's svm)",
    )
    add(
        group,
        "--subtyping",
        action="store_true",
        help="also train the other classes' instance classifiers to reject their top instances (CLAM's --subtyping)",
    )
    add(group, "--weight_decay", type=float, help="Adam weight decay")
    add(
        group,
        "--val_fraction",
        type=float,
        help="fraction of each class's patients held out for validation (0: none)",
    )
    add(
        group,
        "--feature_norm",
        choices=FEATURE_NORMS,
        help="standard: standardise each feature dimension with the training instances' mean and std (stored "
        "in the model, applied wherever it is used); none: raw features, as CLAM",
    )
    add(
        group,
        "--sample_tiles",
        type=int,
        help="instances drawn afresh from each bag every training epoch (validation: one fixed draw); "
        "0 = off: every instance of the bag, in training and validation",
    )
    add(
        group,
        "--balance",
        choices=BALANCE_CHOICES,
        help="class imbalance: weighted loss, balanced sampling, or none",
    )
    add(
        group,
        "--seed",
        type=int,
        help="seed of the split, the model initialisation and the tile draws; also of the --max_tiles subset "
        "of each slide, and so it picks the feature cache (see docs/training.md)",
    )


def _run_control_arguments(group: argparse._ArgumentGroup, add: _Add) -> None:
    """Device, stopping, memory, resuming, output, progress and cross-validation."""
    add(group, "--device", help="auto, cpu, cuda, cuda:N or mps")
    add(
        group,
        "--patience",
        type=int,
        help="stop after this many epochs without a lower validation loss (default: off)",
    )
    add(
        group,
        "--in_memory",
        choices=("auto", "yes", "no"),
        help="read the whole cache into memory once (auto: when it fits easily)",
    )
    add(group, "--resume", help="checkpoint_epoch_N.pt to continue from, in its own run folder")
    add(
        group, "--output_dir", help="where run folders are created (default: <project root>/clam/checkpoints)"
    )
    add(group, "--no_progress", dest="progress", action="store_false", help="no progress bars")
    add(
        group,
        "--tensorboard",
        action="store_true",
        help="also write each epoch's losses, AUCs, balanced accuracies and learning rate for TensorBoard "
        "under <run folder>/tensorboard (needs the tensorboard package)",
    )
    add(
        group,
        "--folds",
        type=int,
        help="K >= 2: patient-level, label-stratified K-fold cross-validation, one "
        "run per fold in one parent run folder (0: a single run)",
    )
    add(
        group, "--splits", help="cross-validation splits file (splits.csv of an earlier --folds run) to reuse"
    )


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, frozenset[str]]:
    """(configuration, names of the arguments given on the command line)."""
    values = vars(build_parser().parse_args(argv))
    explicit = frozenset(vars(build_parser(defaults=False).parse_args(argv))) - {"weights_map"}
    weights_map = values.pop("weights_map")
    if "weights" not in explicit and values["backbone"] in BACKBONES:  # the backbone's own default
        mapping = read_weights_map(Path(weights_map)) if weights_map else {}
        values["weights"] = resolve_weights(values["backbone"], None, mapping)
    return TrainConfig(**values), explicit


@cli_main
def main(argv: list[str] | None = None) -> int:
    config, explicit = parse_args(argv)
    if config.tensorboard:
        require_tensorboard()  # before any bag is read or embedded
    if config.folds or config.splits:
        cross_validate(config)
    else:
        train(config, explicit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
