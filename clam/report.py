"""``python -m clam.report DIR``: write a folder's HTML page again from the files on disk, without the
model or the features (after moving a folder, upgrading the tool, or deleting the page).

    python -m clam.report clam/checkpoints/run_20260101_120000/eval_20260101_130000   # report.html

    python -m clam.report clam/checkpoints/run_20260101_120000                          # training.html

What is written depends on the kind of folder, found through ``KINDS``: an evaluation folder
(``python -m clam.evaluate``, single or cross-validation) gets ``report.html`` (clam.eval_report); a
training run folder, or the parent folder of a cross-validation run, gets ``training.html`` and
``curves.png`` (clam.training_report).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clam.eval_report import is_evaluation_dir, write_eval_report
from clam.run_files import CONFIG_NAME, EVAL_PREFIX, SPLITS_FILE
from clam.training_report import write_training_report
from feature_extraction.errors import PipelineError, cli_main


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder, how to recognise it, and the writer of its page (returns the page's path)."""

    name: str
    matches: Callable[[Path], bool]
    write: Callable[[Path], Path]


def is_run_dir(path: Path) -> bool:
    """A training run folder (config.json), or the parent folder of a cross-validation run (splits.csv)."""
    return (path / CONFIG_NAME).is_file() or (path / SPLITS_FILE).is_file()


# The first kind that matches writes the page.
KINDS: tuple[FolderKind, ...] = (
    FolderKind("evaluation", is_evaluation_dir, write_eval_report),
    FolderKind("training run", is_run_dir, write_training_report),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clam.report",
        description="Write the HTML page of an evaluation folder (report.html) or of a training run folder "
        "(training.html, curves.png) again from its files, without the model or the features. "
        "See docs/evaluation.md and docs/training.md.",
    )
    parser.add_argument(
        "folder",
        type=Path,
        metavar="DIR",
        help="an evaluation folder (eval_<timestamp>/ of a run), a run folder (run_<timestamp>/), "
        "or a cross-validation run's parent folder",
    )
    return parser


def write_report(folder: Path) -> Path:
    """The page of ``folder``, written by the first of KINDS that matches; PipelineError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(
            f"{folder} is not a folder: pass an evaluation folder (eval_<timestamp>/) or a run folder "
            "(run_<timestamp>/)."
        )
    for kind in KINDS:
        if kind.matches(folder):
            return kind.write(folder)
    evaluations = sorted(p.parent.name for p in folder.glob(f"{EVAL_PREFIX}_*/metrics.json"))
    hint = f"; its evaluations: {', '.join(evaluations)} (pass one of them)" if evaluations else ""
    raise PipelineError(
        f"{folder} holds neither an evaluation (metrics.json and predictions.csv) nor a training run "
        f"({CONFIG_NAME}, or {SPLITS_FILE} of a cross-validation): pass a folder written by "
        f"python -m clam.evaluate or python -m clam.train{hint}."
    )


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(write_report(args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
