"""``python -m clam.evaluate``: a trained CLAM checkpoint on a held-out cohort, with the numbers
a paper reports, their uncertainty, and the attention maps.

    python -m clam.evaluate                                   # the newest run, on <project root>/test
    python -m clam.evaluate --checkpoint clam/checkpoints/run_20260101_120000/best_model.pt
    python -m clam.evaluate --checkpoint clam/checkpoints/run_20260101_120000   # a --folds run

This module only parses the arguments and decides what is evaluated: a checkpoint file
(``clam.evaluation.evaluate``) or the parent folder of a cross-validation run, every fold's model
and their ensemble (``clam.crossval.evaluate_folds``). Without ``--checkpoint`` it takes the
newest run under ``<project root>/clam/checkpoints``, whatever its kind, and says which.

Outputs, the feature cache, the leakage check and bare CLAM state dicts: clam.evaluation,
clam.cohort and clam.leakage (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from clam.crossval import evaluate_folds
from clam.eval_config import (
    EvaluateConfig,
    add_input_arguments,
    config_from_args,
    parse_attention,
)
from clam.evaluation import evaluate
from clam.heatmaps import DEFAULT_TOP_K
from clam.metrics import DEFAULT_N_BOOTSTRAP
from clam.run_files import BEST_NAME, default_runs_dir, is_crossval_run, newest_run
from feature_extraction.errors import PipelineError, cli_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clam.evaluate",
        description="Evaluate a CLAM checkpoint on a cohort: predictions, metrics with bootstrap CIs, ROC and "
        "confusion-matrix figures, attention maps. See docs/evaluation.md.",
    )
    add_input_arguments(
        parser,
        f"checkpoint to evaluate, or the parent run folder of a --folds run (every fold's model and "
        f"their ensemble) (default: the newest run under {default_runs_dir()}: its {BEST_NAME}, or its "
        "folds for a --folds run)",
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=None,
        help="default: eval_<timestamp>/ inside the checkpoint's run folder",
    )
    parser.add_argument(
        "--n_bootstrap",
        type=int,
        default=DEFAULT_N_BOOTSTRAP,
        help="bootstrap resamples for the confidence intervals (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")
    parser.add_argument(
        "--top_k",
        type=int,
        default=DEFAULT_TOP_K,
        help="tiles per row of the attention montages (default: %(default)s)",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["all"],
        metavar="SLIDE",
        help="attention maps for: all (default), none, or the slide ids given",
    )
    return parser


def run(config: EvaluateConfig) -> None:
    """Evaluate what ``config.checkpoint`` names (default: the newest run, which is said)."""
    if config.checkpoint is None:
        chosen = newest_run()
        print(chosen.describe())
        config = replace(config, checkpoint=chosen.checkpoint)
    if is_crossval_run(Path(config.checkpoint)):
        evaluate_folds(config)  # every fold's selected model and their ensemble
    else:
        evaluate(config)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_bootstrap < 0 or args.top_k < 1:
        raise PipelineError("--n_bootstrap must be >= 0 and --top_k >= 1")
    run(
        config_from_args(
            args,
            n_bootstrap=args.n_bootstrap,
            seed=args.seed,
            attention=parse_attention(args.attention),
            progress=sys.stderr.isatty(),
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
