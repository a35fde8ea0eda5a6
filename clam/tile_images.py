"""Where a bag's tile images are, and reading them back: a tile file of a tile-folder slide, or the
tile (and the thumbnail) of a whole-slide image, read from the slide exactly as it was embedded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from feature_extraction.bags import BagAttrs
from feature_extraction.errors import PipelineError
from feature_extraction.sources import TileError, decode_rgb
from feature_extraction.wsi import wsi_thumbnail, wsi_tile_image

HEATMAP_MAX_PIXELS = 1000  # longest side of a heatmap's slide: about twice its size in the figure


def read_tile_image(
    data_dir: Path | None, attrs: BagAttrs | None, tile_name: str, xy: Sequence[int]
) -> Image.Image | None:
    """The RGB image of one tile of a bag, or None when it cannot be found or decoded.

    The one place that knows where a bag's tile images live. ``attrs`` are the bag's (``Bag.typed_attrs``;
    None for a bag not written by stage 1, whose tiles cannot be found). A tile-folder slide's
    tile is under ``<data_dir>/<class_folder>/<patient_id>/`` (the layout of the specification)
    or, for one of a patient's several slides tiled by ``tile_slides``, under
    ``<data_dir>/<class_folder>/<patient_id>/<slide file name>/`` (``P012/A.svs/``); else under
    the slide folder recorded in the bag (``source``). Bags cut from whole-slide images
    (``slide_kind`` "wsi" among the slide reader's attributes) have no tile files: their tile is
    read back from the slide (``<data_dir>/<class_folder>/<slide_file>``, else ``source``) at
    ``xy`` (level-0 pixels), exactly as it was embedded."""
    if attrs is None:
        return None
    if is_whole_slide(attrs):
        return _read_wsi_tile(data_dir, attrs, xy)
    folders = [Path(data_dir) / folder for folder in _slide_folders(attrs)] if data_dir is not None else []
    if attrs.source:
        folders.append(Path(attrs.source))
    for path in (folder / tile_name for folder in folders):
        if path.is_file():
            try:
                return decode_rgb(path)
            except TileError:
                return None
    return None


def is_whole_slide(attrs: BagAttrs | None) -> bool:
    """Whether the bag was cut from a whole-slide image (its reader recorded ``slide_kind`` "wsi")."""
    return attrs is not None and str(attrs.extra.get("slide_kind", "")) == "wsi"


def _slide_folders(attrs: BagAttrs) -> list[Path]:
    """Where a tile-folder slide may lie relative to the data folder: the slide folder of a
    patient with several slides (``<class>/<patient>/<slide file name>``, the name taken from the
    recorded ``source``), then the patient folder itself."""
    if not attrs.class_folder or not attrs.patient_id:
        return []
    patient = Path(attrs.class_folder) / attrs.patient_id
    source = Path(attrs.source) if attrs.source else None
    if source is not None and source.parent.name == attrs.patient_id and source.name != attrs.patient_id:
        return [patient / source.name, patient]
    return [patient]


def _wsi_candidates(data_dir: Path | None, attrs: BagAttrs) -> list[Path]:
    """Where the slide of a bag cut from a whole-slide image may be, in the order to try."""
    candidates = []
    slide_file = str(attrs.extra.get("slide_file", ""))
    if data_dir is not None and attrs.class_folder and slide_file:
        candidates.append(Path(data_dir) / attrs.class_folder / slide_file)
    if attrs.source:
        candidates.append(Path(attrs.source))
    return candidates


def _read_wsi_tile(data_dir: Path | None, attrs: BagAttrs, xy: Sequence[int]) -> Image.Image | None:
    for path in _wsi_candidates(data_dir, attrs):
        if path.is_file():
            try:
                return wsi_tile_image(path, dict(attrs.extra), int(xy[0]), int(xy[1]))
            except (TileError, PipelineError):  # unreadable slide or OpenSlide missing: draw no image
                return None
    return None


def slide_thumbnail(
    data_dir: Path | None, attrs: BagAttrs, max_size: int = HEATMAP_MAX_PIXELS
) -> tuple[Image.Image, float] | str:
    """The thumbnail of a bag's whole-slide image and its scale (thumbnail px per level-0 px),
    or why there is none: the slide file is not found, cannot be opened, or OpenSlide is missing."""
    candidates = _wsi_candidates(data_dir, attrs)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        looked = " or ".join(str(p) for p in candidates) or "nowhere (the bag names no slide file)"
        return f"slide file not found (looked for {looked})"
    try:
        return wsi_thumbnail(path, max_size)
    except (PipelineError, OSError) as error:  # SlideSkipped, OpenSlide not installed, I/O error
        return str(error)
