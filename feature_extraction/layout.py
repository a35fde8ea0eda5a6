"""The cohort layout of the specification: class folders of patient folders of tiles.

    data_dir/                      (--split train)
      EGFR_positive/<patient>/<tiles>
      EGFR_negative/<patient>/<tiles>
      EGFR_positive_cnn/<patient>/<tiles>   (optional)
      EGFR_negative_cnn/<patient>/<tiles>   (optional)
    data_dir/                      (--split test)
      C-S-EGFR_positive/<patient>/<tiles>
      C-S-EGFR_negative/<patient>/<tiles>

Every patient folder is one slide and one bag. A patient may appear under a plain and a
``_cnn`` folder; both slides carry the same ``patient_id`` so that splits keep them together.

A patient with several slides: whole-slide files side by side in the patient folder
(``P012/A.svs``, ``P012/B.svs``), or the tiles of each slide in a sub-folder named after its
slide file (``P012/A.svs/``, ``P012/B.svs/``, what ``tile_slides`` writes). Either way each
slide is a bag of its own, ``<class>__P012__A`` and ``<class>__P012__B``, of patient P012; a
patient folder holding a single slide keeps the bag name ``<class>__P012``. Any other
sub-folder of a patient folder holds tiles of the patient folder's one slide.

This module is the dispatcher over the two slide readers: it finds the slides of a cohort
(``discover_slides``) and lists a slide's tiles whatever its kind (``list_slide_tiles``),
with the tile-folder reader (``tile_folder``) or the whole-slide reader (``wsi_plan``).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from feature_extraction.errors import PipelineError
from feature_extraction.sources import (
    SlideSource,
    SlideTiles,
    is_mirax_companion,
    is_tile_image,
    is_whole_slide_file,
    slide_tile_folders,
    whole_slide_files,
)
from feature_extraction.tile_folder import list_folder_tiles
from feature_extraction.wsi import WsiConfig
from feature_extraction.wsi_plan import list_wsi_tiles

CLASS_NAMES = ("EGFR_negative", "EGFR_positive")  # label index = position

# class folder -> (label, required)
SPLIT_FOLDERS: dict[str, dict[str, tuple[int, bool]]] = {
    "train": {
        "EGFR_negative": (0, True),
        "EGFR_positive": (1, True),
        "EGFR_negative_cnn": (0, False),
        "EGFR_positive_cnn": (1, False),
    },
    "test": {
        "C-S-EGFR_negative": (0, True),
        "C-S-EGFR_positive": (1, True),
    },
}
SPLITS = tuple(SPLIT_FOLDERS)

log = logging.getLogger(__name__)
# Class folders already warned about loose tiles, so that a run which lists the cohort twice
# (clam.train, then the embedding it starts) says it once.
_warned_loose: set[tuple[str, int]] = set()
_warned_mutex = threading.Lock()


def project_root() -> Path:
    """The repository root (where pyproject.toml lives), else the working directory.

    ``CLAM_PROJECT_ROOT`` overrides both, for installs outside a checkout."""
    if os.environ.get("CLAM_PROJECT_ROOT"):
        return Path(os.environ["CLAM_PROJECT_ROOT"]).resolve()
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").is_file():
        return here
    return Path.cwd()


def default_data_dir(split: str = "train") -> Path:
    return project_root() / split


def default_features_dir() -> Path:
    return project_root() / "features"


def slide_id_for(class_folder: str, patient_id: str) -> str:
    # The same patient may have a plain and a _cnn folder: the class folder keeps them apart.
    return f"{class_folder}__{patient_id}"


def expected_layout(split: str) -> str:
    lines = ["data_dir/"]
    for folder, (_, required) in SPLIT_FOLDERS[split].items():
        lines.append(f"  {folder}/<patient>/<tiles>" + ("" if required else "   (optional)"))
    return "\n".join(lines)


def discover_slides(data_dir: str | Path, split: str = "train") -> list[SlideSource]:
    """List the slides of ``data_dir`` for ``split`` in a deterministic order.

    Raises PipelineError (with the expected layout) when ``data_dir`` or a required class
    folder is missing, when a class folder holds loose tiles instead of patient folders, when
    one patient appears under both labels, when tiles lie beside a patient's per-slide tile
    folders, or when two slides would share a bag name. Loose image files lying beside patient folders
    are not embedded; a warning (logger ``feature_extraction.layout``) names the class folder,
    counts them and says where to move them, once per process."""
    if split not in SPLIT_FOLDERS:
        raise PipelineError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PipelineError(
            f"data directory {data_dir} does not exist. Expected (--split {split}):\n"
            f"{expected_layout(split)}\nPass --data_dir, or build the example cohort with "
            f"`python -m feature_extraction.example_cohort`."
        )
    slides: list[SlideSource] = []
    for folder, (label, required) in SPLIT_FOLDERS[split].items():
        class_dir = data_dir / folder
        if not class_dir.is_dir():
            if required:
                raise PipelineError(
                    f"class folder {class_dir} is missing. Expected (--split {split}):\n"
                    f"{expected_layout(split)}"
                )
            continue
        slides.extend(_slides_in_class_folder(class_dir, folder, label, split))
    _check_patient_labels(slides, data_dir)
    _check_unique_slide_ids(slides)
    return slides


def _slides_in_class_folder(class_dir: Path, folder: str, label: int, split: str) -> list[SlideSource]:
    slides = []
    loose_tiles = []
    for entry in sorted(class_dir.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_mirax_companion(entry):  # the data folder of <name>.mrxs, not a patient
                continue
            slides.extend(_slides_in_patient_folder(entry, folder, label, split))
        elif is_whole_slide_file(entry):
            slides.append(
                SlideSource(
                    slide_id_for(folder, entry.stem), entry.stem, folder, label, split, entry, kind="wsi"
                )
            )
        elif entry.is_file():
            loose_tiles.append(entry.name)
    if loose_tiles and not slides:
        raise PipelineError(
            f"{class_dir} holds {len(loose_tiles)} loose files (e.g. {loose_tiles[0]!r}) but no patient "
            f"folders. Put each patient's tiles in a folder of its own: {class_dir}/<patient>/<tiles>"
        )
    _warn_loose_images(class_dir, [name for name in loose_tiles if is_tile_image(name)])
    return slides


def _slides_in_patient_folder(patient_dir: Path, folder: str, label: int, split: str) -> list[SlideSource]:
    """The slides of one patient folder: its whole-slide files and its per-slide tile folders
    (``<slide file name>/``), else the folder itself as one slide of tiles.

    The bag is named after the patient when the patient has one slide, else after patient and
    slide (file stem): the same names whether the slides are embedded directly or tiled first."""
    patient = patient_dir.name
    files = whole_slide_files(patient_dir)
    found = [(file, "wsi") for file in files]
    found += [(sub, "tiles") for sub in _slide_tile_folders(patient_dir, files)]
    if not found:
        return [SlideSource(slide_id_for(folder, patient), patient, folder, label, split, patient_dir)]
    slides = []
    for path, kind in sorted(found, key=lambda item: item[0].name):
        name = patient if len(found) == 1 else f"{patient}__{Path(path.name).stem}"
        slides.append(SlideSource(slide_id_for(folder, name), patient, folder, label, split, path, kind=kind))
    return slides


def _slide_tile_folders(patient_dir: Path, slide_files: list[Path]) -> list[Path]:
    """The per-slide tile folders of a patient folder (sources.slide_tile_folders); PipelineError
    when tiles lie beside them and its ``slide_files`` (such tiles would belong to no slide)."""
    slide_dirs = slide_tile_folders(patient_dir)
    if not slide_dirs:
        return []
    taken = set(slide_dirs) | set(slide_files)
    beside = sorted(
        e.name
        for e in patient_dir.iterdir()
        if not e.name.startswith(".")
        and e not in taken
        and (e.is_dir() and not is_mirax_companion(e) or is_tile_image(e.name))
    )
    if beside:
        raise PipelineError(
            f"{patient_dir} holds the tiles of {len(slide_dirs)} slides in sub-folders named after their "
            f"slide files ({', '.join(d.name + '/' for d in slide_dirs)}) and also {beside[0]!r} beside "
            "them, which belongs to none of them. Move those tiles into the folder of their slide, or delete them "
            "(e.g. tiles of an earlier `tile_slides` run, when the patient had one slide)."
        )
    return slide_dirs


def _warn_loose_images(class_dir: Path, names: list[str]) -> None:
    """Say (once per class folder and count) that image files beside the patient folders are
    not embedded: they belong to no patient, so no bag can hold them."""
    if not names:
        return
    key = (str(class_dir), len(names))
    with _warned_mutex:
        if key in _warned_loose:
            return
        _warned_loose.add(key)
    log.warning(
        "%s holds %d loose image file%s beside its patient folders (e.g. %r); they belong to no patient "
        "and are NOT embedded. Move them into the folder of the patient they were cut from: %s/<patient>/<tiles>",
        class_dir,
        len(names),
        "" if len(names) == 1 else "s",
        names[0],
        class_dir,
    )


def _check_patient_labels(slides: list[SlideSource], data_dir: Path) -> None:
    labels: dict[str, SlideSource] = {}
    for slide in slides:
        seen = labels.setdefault(slide.patient_id, slide)
        if seen.label != slide.label:
            raise PipelineError(
                f"patient {slide.patient_id!r} appears under {seen.class_folder}/ and "
                f"{slide.class_folder}/ in {data_dir}, which carry different labels. "
                "Move the patient folder to the class folder of its true label."
            )


def _check_unique_slide_ids(slides: list[SlideSource]) -> None:
    seen: dict[str, SlideSource] = {}
    for slide in slides:
        other = seen.setdefault(slide.slide_id, slide)
        if other is not slide:
            raise PipelineError(
                f"{other.path} and {slide.path} would both be the bag {slide.slide_id!r} (a bag is named "
                "after the class folder, the patient and, for a patient with several slides, the slide "
                "file's stem). Rename one of them."
            )


def list_slide_tiles(
    slide: SlideSource,
    max_tiles: int = 100,
    seed: int = 0,
    wsi: WsiConfig | None = None,
    plan_cache: Path | None = None,
) -> SlideTiles:
    """The tiles of ``slide`` to embed; the one place that dispatches on ``slide.kind``.

    ``max_tiles <= 0`` keeps every tile. ``wsi`` (default settings when None) says how
    whole-slide images are tiled; ``plan_cache`` is the folder their tile plans are cached in
    (None: planned every time). Raises PipelineError for a slide kind this installation cannot
    read (a whole-slide image without OpenSlide installed)."""
    if slide.kind == "tiles":
        return list_folder_tiles(slide, max_tiles, seed)
    if slide.kind == "wsi":
        return list_wsi_tiles(slide, max_tiles, seed, wsi or WsiConfig(), plan_cache=plan_cache)
    raise PipelineError(f"slide {slide.slide_id} at {slide.path} has unknown kind {slide.kind!r}")
