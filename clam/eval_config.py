"""What ``python -m clam.evaluate`` and ``python -m clam.attention`` are asked to do: ``EvaluateConfig``,
and the command-line arguments the two share."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clam.metrics import DEFAULT_N_BOOTSTRAP
from clam.run_files import DEFAULT_TOP_K, EVAL_PREFIX
from feature_extraction.layout import SPLITS

ALL = "all"
NONE = "none"


@dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate and where to write it. ``None`` means the documented default.

    ``checkpoint``: a checkpoint file (the commands resolve a missing one to the newest run, and a
    cross-validation run to its folds). ``attention``: "all", "none" or a tuple of slide ids to
    draw maps for. ``metrics=False`` only writes attention maps (``python -m clam.attention``)."""

    checkpoint: Path | None = None
    data_dir: Path | None = None
    split: str = "test"
    labels_csv: Path | None = None
    features_dir: Path | None = None
    output_dir: Path | None = None
    device: str = "auto"
    num_workers: int = 4
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP
    top_k: int = DEFAULT_TOP_K
    attention: str | tuple[str, ...] = ALL
    seed: int = 0
    metrics: bool = True
    output_prefix: str = EVAL_PREFIX
    progress: bool = True


def add_input_arguments(parser: argparse.ArgumentParser, checkpoint_help: str) -> None:
    """The arguments shared by ``clam.evaluate`` and ``clam.attention``; ``checkpoint_help`` is
    the command's own help for ``--checkpoint`` (only evaluation takes a cross-validation run)."""
    parser.add_argument("--checkpoint", type=Path, default=None, help=checkpoint_help)
    parser.add_argument(
        "--data_dir",
        type=Path,
        default=None,
        help="cohort folder (default: <project root>/<split>); also where the maps read tile images",
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="test", help="layout of --data_dir (default: %(default)s)"
    )
    parser.add_argument(
        "--labels_csv",
        type=Path,
        default=None,
        help="CSV slide_id,label[,patient_id] of bags in --features_dir, instead of --data_dir",
    )
    parser.add_argument(
        "--features_dir",
        type=Path,
        default=None,
        help="folder of feature caches, or one cache (default: the one the checkpoint was trained on)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)"
    )
    parser.add_argument(
        "--num_workers", type=int, default=4, help="bag-loading workers (default: %(default)s)"
    )


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
