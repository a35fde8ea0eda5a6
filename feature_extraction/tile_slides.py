"""`python -m feature_extraction.tile_slides`: cut whole-slide images into tile folders in the spec's layout.

    <out_dir>/<class_folder>/<patient>/<slide>_x{X}_y{Y}.png     X, Y: level-0 pixels
    <out_dir>/<class_folder>/<patient>/<slide file>/<slide>_x{X}_y{Y}.png
                                                                 a patient with several slides
    <out_dir>/wsi_tiles.json                                     per slide: tiles, attributes, skips
    <out_dir>/overviews/<slide_id>.png                           (--overview) thumbnail, mask, grid

A patient's only slide fills the patient folder. A patient with several slides (several slide
files in one patient folder) gets one sub-folder per slide, named after its slide file
(``P012/A.svs/``, ``P012/B.svs/``), which ``layout.discover_slides`` reads as the slides
``<class>__P012__A`` and ``<class>__P012__B`` of patient P012: the slide ids and bags that
embedding the slides directly gives.

The output is a cohort `feature_extraction.embed` reads like any tile folders (coordinates
come back from the names). Slides come from a cohort (``--data_dir``/``--split``, the
whole-slide images among its slides) or from files (``--slides ... --class_folder ...``).
A slide that cannot be opened, has no tissue or lacks a resolution is reported and skipped.
A slide whose tiles are already in place is skipped (``--overwrite`` redoes it): tiles are
written to a hidden folder first and moved in when all of them are written.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from feature_extraction.atomic import atomic_write_json
from feature_extraction.errors import PipelineError, cli_main
from feature_extraction.layout import SPLIT_FOLDERS, SPLITS, default_data_dir, discover_slides, slide_id_for
from feature_extraction.sources import SlideSource, TileError, TileRef, is_whole_slide_file
from feature_extraction.wsi import WsiConfig, add_wsi_arguments, require_openslide, wsi_config_from_args
from feature_extraction.wsi_plan import list_wsi_tiles, plot_plan

log = logging.getLogger("feature_extraction.tile_slides")  # not __name__: that is "__main__" under python -m

MANIFEST = "wsi_tiles.json"


@dataclass(frozen=True)
class TiledSlide:
    """What happened to one slide: ``status`` is "tiled", "existing" or "skipped"."""

    slide_id: str
    path: Path
    out_dir: Path  # the folder the tiles are in: the patient folder, or the slide's folder inside it
    status: str
    n_tiles: int = 0
    n_available: int = 0
    message: str = ""
    attrs: dict[str, Any] | None = None


def tile_file_name(slide: SlideSource, x: int, y: int) -> str:
    return f"{slide.path.stem}_x{x}_y{y}.png"


def slide_tiles_dir(out_dir: str | Path, slide: SlideSource) -> Path:
    """Where the tiles of ``slide`` go: ``<out_dir>/<class>/<patient>/`` when it is the patient's
    only slide (its slide id is ``<class>__<patient>``), else ``<out_dir>/<class>/<patient>/<slide
    file name>/``, a folder that ``layout.discover_slides`` reads as that one slide of the patient."""
    patient_dir = Path(out_dir) / slide.class_folder / slide.patient_id
    if slide.slide_id == slide_id_for(slide.class_folder, slide.patient_id):
        return patient_dir
    return patient_dir / slide.path.name


def tile_slide(
    slide: SlideSource,
    out_dir: str | Path,
    config: WsiConfig = WsiConfig(),
    max_tiles: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    overview: bool = False,
    num_workers: int = 2,
) -> TiledSlide:
    """Write the tiles of one whole-slide image as PNGs into ``slide_tiles_dir(out_dir, slide)``.

    ``max_tiles <= 0`` writes every tile; else the seeded subset embed would use
    (sources.select_subset). Returns a "skipped" result naming the reason for a slide that
    cannot be tiled; raises PipelineError only when OpenSlide is not installed."""
    tiles_dir = slide_tiles_dir(out_dir, slide)
    prefix = f"{slide.path.stem}_x"
    staging = Path(out_dir) / slide.class_folder / f".{slide.patient_id}.{slide.path.stem}.partial"
    existing = (
        sorted(p for p in tiles_dir.iterdir() if p.name.startswith(prefix) and p.suffix == ".png")
        if tiles_dir.is_dir()
        else []
    )
    if existing and not overwrite and not staging.exists():
        return TiledSlide(slide.slide_id, slide.path, tiles_dir, "existing", len(existing), len(existing))
    listed = list_wsi_tiles(slide, max_tiles=max_tiles, seed=seed, config=config)
    if listed.reason:
        return TiledSlide(slide.slide_id, slide.path, tiles_dir, "skipped", message=listed.reason)

    written = _write_tiles(slide, listed.tiles, staging, num_workers)
    if not any(written):
        shutil.rmtree(staging)
        return TiledSlide(
            slide.slide_id,
            slide.path,
            tiles_dir,
            "skipped",
            message=f"slide {slide.path}: none of its {len(written)} tiles could be read; skipped.",
        )
    tiles_dir.mkdir(parents=True, exist_ok=True)
    for old in existing:  # --overwrite: tiles of an earlier run with other settings go
        old.unlink()
    for file in sorted(staging.iterdir()):
        file.replace(tiles_dir / file.name)
    staging.rmdir()
    if overview and listed.plan is not None:
        plot_plan(listed.plan, Path(out_dir) / "overviews" / f"{slide.slide_id}.png")
    message = "" if all(written) else f"{written.count(False)} tiles could not be read and were left out"
    return TiledSlide(
        slide.slide_id,
        slide.path,
        tiles_dir,
        "tiled",
        sum(written),
        listed.n_available,
        message,
        listed.attrs,
    )


def _write_tiles(slide: SlideSource, tiles: Sequence[TileRef], staging: Path, num_workers: int) -> list[bool]:
    """Write ``tiles`` as PNGs into a fresh ``staging`` folder; per tile, whether it could be read."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    def write(tile: TileRef) -> bool:
        try:
            image = tile.load()
        except TileError:
            return False
        image.save(staging / tile_file_name(slide, tile.x, tile.y), format="PNG")
        return True

    # OpenSlide reads and PNG encoding release the GIL, so threads share the slide handle.
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        return list(
            tqdm(
                pool.map(write, tiles),
                total=len(tiles),
                desc=slide.slide_id,
                unit="tile",
                leave=False,
                disable=None,
            )
        )


def slides_from_files(
    paths: Sequence[str | Path], class_folder: str, split: str = "train"
) -> list[SlideSource]:
    """SlideSources for loose slide files: patient = file stem, label from ``class_folder``."""
    labels = {folder: label for folders in SPLIT_FOLDERS.values() for folder, (label, _) in folders.items()}
    if class_folder not in labels:
        raise PipelineError(
            f"--class_folder {class_folder!r} is not a class folder of the spec; "
            f"use one of {', '.join(labels)}"
        )
    slides = []
    for path in map(Path, paths):
        if not path.is_file():
            raise PipelineError(f"slide file {path} does not exist.")
        if not is_whole_slide_file(path):
            raise PipelineError(
                f"{path} is not a whole-slide image (.svs, .ndpi, .mrxs, pyramidal .tif, ...)."
            )
        slides.append(
            SlideSource(
                slide_id_for(class_folder, path.stem),
                path.stem,
                class_folder,
                labels[class_folder],
                split,
                path,
                kind="wsi",
            )
        )
    return slides


def tile_slides(
    slides: Sequence[SlideSource],
    out_dir: str | Path,
    config: WsiConfig = WsiConfig(),
    max_tiles: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    overview: bool = False,
    num_workers: int = 2,
) -> list[TiledSlide]:
    """Tile every whole-slide image of ``slides`` (tile folders among them are passed over) and
    write ``<out_dir>/wsi_tiles.json``. Skipped slides are reported, not raised; PipelineError
    before any work when OpenSlide is not installed."""
    require_openslide(slides)
    results = []
    for slide in tqdm([s for s in slides if s.kind == "wsi"], desc="slides", unit="slide", disable=None):
        result = tile_slide(slide, out_dir, config, max_tiles, seed, overwrite, overview, num_workers)
        if result.status == "skipped":
            log.warning("skipped %s: %s", slide.slide_id, result.message)
        results.append(result)
    atomic_write_json(
        Path(out_dir) / MANIFEST,
        {
            "config": config.as_dict(),
            "max_tiles": max_tiles,
            "seed": seed,
            "slides": [
                {
                    "slide_id": r.slide_id,
                    "path": str(r.path),
                    "out_dir": str(r.out_dir),
                    "status": r.status,
                    "n_tiles": r.n_tiles,
                    "n_available": r.n_available,
                    "message": r.message,
                    "attrs": r.attrs,
                }
                for r in results
            ],
        },
    )
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m feature_extraction.tile_slides",
        description="Cut whole-slide images into tile folders <out_dir>/<class_folder>/<patient>/"
        "<slide>_x{X}_y{Y}.png (level-0 coordinates), keeping tiles with enough tissue. "
        "A patient with several slides gets one sub-folder per slide, named after its "
        "slide file (<patient>/<slide file>/), which embed reads as separate slides.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data_dir",
        type=Path,
        default=None,
        help="cohort in the spec's layout whose whole-slide images are tiled "
        "(default: <project root>/<split>)",
    )
    source.add_argument(
        "--slides",
        type=Path,
        nargs="+",
        default=None,
        help="slide files to tile instead of a cohort (needs --class_folder)",
    )
    parser.add_argument(
        "--class_folder", default=None, help="class folder the --slides belong to, e.g. EGFR_positive"
    )
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--out_dir", type=Path, required=True, help="where the tile cohort is written")
    parser.add_argument(
        "--max_tiles",
        type=int,
        default=0,
        help="tiles per slide, the same seeded subset embed uses; 0 = all (default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=2, help="threads reading and writing tiles")
    parser.add_argument("--overwrite", action="store_true", help="re-tile slides whose tiles exist")
    parser.add_argument(
        "--overview",
        action="store_true",
        help="also save thumbnail + tissue mask + tile grid pictures in <out_dir>/overviews/",
    )
    add_wsi_arguments(parser)
    return parser


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = wsi_config_from_args(args)
    if args.slides:
        if not args.class_folder:
            raise PipelineError("--slides needs --class_folder (e.g. --class_folder EGFR_positive).")
        slides = slides_from_files(args.slides, args.class_folder, args.split)
    else:
        data_dir = args.data_dir or default_data_dir(args.split)
        if args.out_dir.resolve() == data_dir.resolve():
            raise PipelineError(
                "--out_dir must differ from --data_dir: tiles would be mixed with the slides."
            )
        slides = discover_slides(data_dir, args.split)
        if not any(s.kind == "wsi" for s in slides):
            raise PipelineError(
                f"no whole-slide images (.svs, .ndpi, .mrxs, pyramidal .tif, ...) found in the "
                f"class folders of {data_dir}."
            )
    results = tile_slides(
        slides,
        args.out_dir,
        config,
        args.max_tiles,
        args.seed,
        args.overwrite,
        args.overview,
        args.num_workers,
    )
    counts = {status: sum(r.status == status for r in results) for status in ("tiled", "existing", "skipped")}
    print(
        f"{counts['tiled']} slides tiled ({sum(r.n_tiles for r in results if r.status == 'tiled')} tiles), "
        f"{counts['existing']} already tiled, {counts['skipped']} skipped; written to {args.out_dir}"
    )
    for result in results:
        if result.status == "skipped":
            print(f"  skipped {result.slide_id}: {result.message}")
    if counts["skipped"] and not counts["tiled"] and not counts["existing"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
