"""``python -m clam.attention``: attention scores, top/bottom-k montages and heatmaps for chosen
slides, without computing metrics (the maps are clam.heatmaps'; see its docstring for the files).

    python -m clam.attention --checkpoint RUN/best_model.pt --slides C-S-EGFR_positive__P001

Without ``--checkpoint`` the newest run's best_model.pt is used; a cross-validation run has one
model per fold, so one of them must be named (``--checkpoint RUN/fold_K/best_model.pt``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from clam.eval_config import add_input_arguments, config_from_args, parse_attention
from clam.evaluation import explain
from clam.heatmaps import DEFAULT_TOP_K
from clam.run_files import (
    ATTENTION_PREFIX,
    BEST_NAME,
    default_runs_dir,
    fold_name,
    is_crossval_run,
    newest_run,
)
from feature_extraction.errors import PipelineError, cli_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clam.attention",
        description="Attention scores, top/bottom-k montages and heatmaps for chosen slides, "
        "without computing metrics. Slides missing from the feature cache are embedded first.",
    )
    add_input_arguments(
        parser,
        f"checkpoint to explain; of a --folds run, one fold's (RUN/{fold_name(1)}/{BEST_NAME}) "
        f"(default: the newest run under {default_runs_dir()}: its {BEST_NAME})",
    )
    parser.add_argument(
        "--slides", nargs="+", default=["all"], help="slide ids to explain (default: all slides of the split)"
    )
    parser.add_argument(
        "--top_k",
        type=int,
        default=DEFAULT_TOP_K,
        help="tiles per row of the montage: the k highest and k lowest (default: %(default)s)",
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=None,
        help="default: attention_<timestamp>/ inside the checkpoint's run folder",
    )
    return parser


def _refuse_crossval(run_dir: Path) -> None:
    example = Path(run_dir) / fold_name(1) / BEST_NAME
    raise PipelineError(
        f"{run_dir} is a cross-validation run, with one model per fold: name one, e.g. --checkpoint {example}."
    )


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoint is None:
        chosen = newest_run()
        print(chosen.describe())
        if chosen.crossval:
            _refuse_crossval(chosen.run_dir)
        args.checkpoint = chosen.checkpoint
    elif is_crossval_run(args.checkpoint):
        _refuse_crossval(args.checkpoint)
    config = config_from_args(args, attention=parse_attention(args.slides), output_prefix=ATTENTION_PREFIX)
    out_dir = explain(config)
    print(f"attention maps: {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
