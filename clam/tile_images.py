"""Where a bag's tile images are, and reading them back: a tile file of a tile-folder slide, or the
tile (and the thumbnail) of a whole-slide image, read from the slide exactly as it was embedded."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from feature_extraction.errors import PipelineError
from feature_extraction.sources import TileError, decode_rgb
from feature_extraction.wsi import wsi_thumbnail, wsi_tile_image

HEATMAP_MAX_PIXELS = 1000  # longest side of a heatmap's slide: about twice its size in the figure


def read_tile_image(
    data_dir: Path | None, attrs: dict[str, Any], tile_name: str, xy: Sequence[int]
) -> Image.Image | None:
    """The RGB image of one tile of a bag, or None when it cannot be found or decoded.

    The one place that knows where a bag's tile images live. A tile-folder slide's tile is
    ``<data_dir>/<class_folder>/<patient_id>/<tile_name>`` (the layout of the specification),
    else under the slide folder recorded in the bag (attribute ``source``). Bags cut from
    whole-slide images (attribute ``slide_kind`` = "wsi") have no tile files: their tile is
    read back from the slide (``<data_dir>/<class_folder>/<slide_file>``, else ``source``) at
    ``xy`` (level-0 pixels), exactly as it was embedded."""
    if str(attrs.get("slide_kind", "")) == "wsi":
        return _read_wsi_tile(data_dir, attrs, xy)
    candidates = []
    if data_dir is not None and attrs.get("class_folder") and attrs.get("patient_id"):
        candidates.append(Path(data_dir) / str(attrs["class_folder"]) / str(attrs["patient_id"]) / tile_name)
    if attrs.get("source"):
        candidates.append(Path(str(attrs["source"])) / tile_name)
    for path in candidates:
        if path.is_file():
            try:
                return decode_rgb(path)
            except TileError:
                return None
    return None


def _wsi_candidates(data_dir: Path | None, attrs: dict[str, Any]) -> list[Path]:
    """Where the slide of a bag cut from a whole-slide image may be, in the order to try."""
    candidates = []
    if data_dir is not None and attrs.get("class_folder") and attrs.get("slide_file"):
        candidates.append(Path(data_dir) / str(attrs["class_folder"]) / str(attrs["slide_file"]))
    if attrs.get("source"):
        candidates.append(Path(str(attrs["source"])))
    return candidates


def _read_wsi_tile(data_dir: Path | None, attrs: dict[str, Any], xy: Sequence[int]) -> Image.Image | None:
    for path in _wsi_candidates(data_dir, attrs):
        if path.is_file():
            try:
                return wsi_tile_image(path, attrs, int(xy[0]), int(xy[1]))
            except (TileError, PipelineError):  # unreadable slide or OpenSlide missing: draw no image
                return None
    return None


def slide_thumbnail(data_dir: Path | None, attrs: dict[str, Any],
                    max_size: int = HEATMAP_MAX_PIXELS) -> tuple[Image.Image, float] | str:
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
