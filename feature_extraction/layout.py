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
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from feature_extraction.errors import PipelineError

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

# Whole-slide scanner formats: such a file directly inside a class folder is one slide.
WSI_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif")

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


@dataclass(frozen=True)
class SlideSource:
    """One slide to embed: a patient folder of tiles, or one whole-slide image file."""

    slide_id: str  # unique within a cohort; also the bag's file stem
    patient_id: str
    class_folder: str
    label: int
    split: str
    path: Path
    kind: str = "tiles"  # "tiles" (a folder of tile images) or "wsi" (one slide file)


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
    folder is missing, when a class folder holds loose tiles instead of patient folders, or
    when one patient appears under both labels. Loose image files lying beside patient folders
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
    return slides


def _slides_in_class_folder(class_dir: Path, folder: str, label: int, split: str) -> list[SlideSource]:
    # Imported here: wsi imports tiles, which imports this module.
    from feature_extraction.tiles import TILE_SUFFIXES
    from feature_extraction.wsi import is_mirax_companion, is_whole_slide_file, whole_slide_files

    slides = []
    loose_tiles = []
    for entry in sorted(class_dir.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if is_mirax_companion(entry):  # the data folder of <name>.mrxs, not a patient
                continue
            slide_files = whole_slide_files(entry)
            if not slide_files:
                slides.append(SlideSource(slide_id_for(folder, entry.name), entry.name, folder, label, split, entry))
            # A patient folder of whole-slide images: one slide (one bag) per file; the bag is
            # named after the patient when there is one file, else after patient and file.
            for file in slide_files:
                name = entry.name if len(slide_files) == 1 else f"{entry.name}__{file.stem}"
                slides.append(SlideSource(slide_id_for(folder, name), entry.name, folder, label, split, file, kind="wsi"))
        elif entry.suffix.lower() in WSI_SUFFIXES or is_whole_slide_file(entry):
            slides.append(SlideSource(slide_id_for(folder, entry.stem), entry.stem, folder, label, split, entry, kind="wsi"))
        elif entry.is_file():
            loose_tiles.append(entry.name)
    if loose_tiles and not slides:
        raise PipelineError(
            f"{class_dir} holds {len(loose_tiles)} loose files (e.g. {loose_tiles[0]!r}) but no patient "
            f"folders. Put each patient's tiles in a folder of its own: {class_dir}/<patient>/<tiles>"
        )
    _warn_loose_images(class_dir, [name for name in loose_tiles if name.lower().endswith(TILE_SUFFIXES)])
    return slides


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
        class_dir, len(names), "" if len(names) == 1 else "s", names[0], class_dir)


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
