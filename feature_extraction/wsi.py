"""The whole-slide reader, part one: open slides with OpenSlide and read tiles and thumbnails.

    WsiConfig                                 how slides become tiles (size, resolution, tissue)
    open_slide(path)          -> OpenSlide    SlideSkipped naming the file when it cannot be read
    read_tile(region)         -> PIL RGB      what a worker calls: one read_region, resized
    wsi_thumbnail(path, size) -> (RGB, scale) for drawing heatmaps over the slide
    wsi_tile_image(path, attrs, x, y)         one embedded tile of a bag again (top-k montages)
    slide_resolution(slide, ...)              level-0 um/px and where it came from
    require_openslide(slides)                 one clear error before any work when OpenSlide is missing
    add_wsi_arguments / wsi_config_from_args  the --wsi_* options of `embed` and `tile_slides`

Part two, ``wsi_plan``, finds the tissue, plans the tile grid, caches plans and lists a
slide's tiles for embedding. Which files are slides is decided in ``sources``.

OpenSlide is an optional extra (``pip install 'clam-egfr[wsi]'``); it is imported only when a
slide is opened, so tile-folder cohorts never need it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from feature_extraction.errors import PipelineError
from feature_extraction.sources import SlideSource, TileError, TileRef

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'clam-egfr[wsi]'  (or: pip install openslide-python openslide-bin tifffile)"
# 20x objective ~ 0.5 um/px: the convention CLAM, TRIDENT and slideflow use to convert.
MPP_AT_1X = 10.0
# A level whose downsample is within this relative distance of the wanted one is read as is
# (a scanner's 0.499 um/px is 0.5 um/px), which saves a resize per tile.
LEVEL_TOLERANCE = 0.02
READ_BLOCK = 4096  # px per side read at once when building a thumbnail


class SlideSkipped(PipelineError):
    """A slide that cannot be tiled: unreadable, no tissue, or no resolution to scale by.

    The message names the slide and why; callers report it and go on with the next slide."""


@dataclass(frozen=True)
class WsiConfig:
    """How slides become tiles. Every field changes the tiles, so all belong in the cache key."""

    tile_size: int = 256  # px per side of a tile as stored/embedded (before the backbone's resize)
    tile_mpp: float = 0.5  # um per tile pixel (0.5 ~ 20x)
    min_tissue: float = 0.5  # minimum tissue fraction of a tile, 0..1
    slide_mpp: float | None = None  # level-0 um/px assumed for slides that record none (--wsi_mpp)
    mask_mpp: float = 8.0  # um per pixel of the thumbnail the tissue mask is computed on
    saturation_range: tuple[int, int] = (15, 30)  # Otsu's threshold is clipped into this (0..255)
    morphology_um: float = 40.0  # specks and holes narrower than this are removed / filled

    def __post_init__(self) -> None:
        if self.tile_size < 8:
            raise PipelineError(f"WSI tile size {self.tile_size} px is too small; use e.g. 256.")
        if not self.tile_mpp > 0:
            raise PipelineError(f"WSI tile resolution {self.tile_mpp} um/px must be positive.")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise PipelineError(f"minimum tissue fraction {self.min_tissue} must lie in [0, 1].")
        if self.slide_mpp is not None and not self.slide_mpp > 0:
            raise PipelineError(f"--wsi_mpp {self.slide_mpp} must be positive (um per level-0 pixel).")

    @property
    def magnification(self) -> float:
        return MPP_AT_1X / self.tile_mpp

    def as_dict(self) -> dict[str, Any]:
        """JSON-able fields, for cache keys and manifests."""
        out = asdict(self)
        out["saturation_range"] = list(self.saturation_range)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> WsiConfig:
        """The inverse of ``as_dict`` (e.g. the tiling a feature cache records); unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        if "saturation_range" in kept:
            kept["saturation_range"] = tuple(kept["saturation_range"])
        return cls(**kept)


@dataclass(frozen=True)
class WsiTileRef(TileRef):
    """A tile of a whole-slide image (``path`` is the slide file): ``read_size`` px read at
    pyramid ``level`` from level-0 (``x``, ``y``), resized to ``tile_size`` px.

    Holds plain values only, so it pickles to DataLoader workers; each worker process opens
    the slide once and keeps the handle."""

    level: int
    read_size: int
    tile_size: int

    def load(self) -> Image.Image:
        """The tile as RGB; raises TileError when the region cannot be read."""
        return read_tile(self)


# --------------------------------------------------------------------------- opening slides


def import_openslide():
    """The openslide module; PipelineError naming the install command when it cannot be imported."""
    try:
        import openslide  # optional (the ``wsi`` extra): imported on first use, never for tile folders
    except (ImportError, OSError) as error:  # OSError: the python package without the C library
        raise PipelineError(
            f"reading whole-slide images needs OpenSlide, which is not installed ({error}). "
            f"Install it with: {INSTALL_HINT}"
        ) from error
    return openslide


def require_openslide(slides: Sequence[SlideSource]) -> None:
    """Raise one PipelineError when ``slides`` hold whole-slide images and OpenSlide cannot be
    imported: called before any work, so a run stops once instead of failing every slide."""
    wanted = [slide for slide in slides if slide.kind == "wsi"]
    if not wanted:
        return
    try:
        import_openslide()
    except PipelineError as error:
        cause = error.__cause__ or error
        raise PipelineError(
            f"{len(wanted)} of the {len(slides)} slides are whole-slide images (e.g. {wanted[0].path}), and "
            f"reading them needs OpenSlide, which is not installed ({cause}). Install it with: "
            "pip install openslide-python openslide-bin  (or the project's extra: pip install 'clam-egfr[wsi]'), "
            "then run the command again."
        ) from error


def open_slide(path: str | Path):
    """Open a slide with OpenSlide; SlideSkipped naming the file when it cannot be read."""
    openslide = import_openslide()
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as error:
        kind = (
            "is not a format OpenSlide reads"
            if isinstance(error, openslide.OpenSlideUnsupportedFormatError)
            else f"cannot be read ({error})"
        )
        raise SlideSkipped(
            f"slide {path} {kind}; skipped. Check the file is complete and a "
            "supported scanner format (.svs, .ndpi, .mrxs, pyramidal .tif, ...)."
        ) from error


_HANDLES: OrderedDict[str, Any] = OrderedDict()
_HANDLES_PID = os.getpid()
_HANDLES_LOCK = threading.Lock()
MAX_OPEN_SLIDES = 8


def _cached_slide(path: str):
    """An open handle per slide and process: workers read many tiles of one slide in a row.

    Handles inherited through fork are dropped, not shared: each process opens its own.
    Handles are dropped, never closed, here: OpenSlide closes one when its last user (another
    thread may still be reading) lets go of it."""
    global _HANDLES_PID
    with _HANDLES_LOCK:
        if _HANDLES_PID != os.getpid():
            _HANDLES.clear()
            _HANDLES_PID = os.getpid()
        slide = _HANDLES.get(path)
        if slide is None:
            slide = _HANDLES[path] = open_slide(path)
            while len(_HANDLES) > MAX_OPEN_SLIDES:
                _HANDLES.popitem(last=False)
        _HANDLES.move_to_end(path)
        return slide


def _forget_slide(path: str) -> None:
    with _HANDLES_LOCK:
        _HANDLES.pop(path, None)


def _background(slide) -> tuple[int, int, int]:
    value = slide.properties.get("openslide.background-color", "ffffff")
    try:
        return tuple(int(value[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        return (255, 255, 255)


def _flatten(region: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    # Outside the scanned area OpenSlide returns transparent pixels: show them as the background.
    if region.getchannel("A").getextrema() == (255, 255):  # opaque, as nearly every tile is: drop alpha
        return region.convert("RGB")
    out = Image.new("RGB", region.size, background)
    out.paste(region, mask=region.getchannel("A"))
    return out


def tile_name(x: int, y: int) -> str:
    return f"x{x}_y{y}"


def read_tile(region: WsiTileRef) -> Image.Image:
    """Read one tile: ``read_size`` px at ``level`` from level-0 (x, y), as RGB ``tile_size`` px.

    Raises TileError when the slide cannot be opened or the region cannot be decoded (the
    tile is then skipped and counted like an unreadable tile file)."""
    try:
        slide = _cached_slide(str(region.path))
        raw = slide.read_region((region.x, region.y), region.level, (region.read_size, region.read_size))
    except (SlideSkipped, import_openslide().OpenSlideError) as error:
        _forget_slide(str(region.path))  # an OpenSlide handle stays unusable after an error
        raise TileError(
            f"region at ({region.x}, {region.y}) of {region.path} cannot be read: {error}"
        ) from error
    tile = _flatten(raw, _background(slide))
    if region.read_size != region.tile_size:
        tile = tile.resize((region.tile_size, region.tile_size), Image.BILINEAR)
    return tile


def wsi_tile_image(slide_path: str | Path, attrs: dict[str, Any], x: int, y: int) -> Image.Image:
    """The tile at level-0 (x, y) of a bag cut from ``slide_path``, as it was embedded.

    ``attrs`` are the bag's (``patch_size``, ``patch_size_level0``, ``patch_level``,
    ``level_downsample``). Raises TileError when the slide or region cannot be read."""
    level = int(attrs["patch_level"])
    read_size = max(1, round(float(attrs["patch_size_level0"]) / float(attrs["level_downsample"])))
    tile = WsiTileRef(
        tile_name(int(x), int(y)),
        int(x),
        int(y),
        Path(slide_path),
        level,
        read_size,
        int(attrs["patch_size"]),
    )
    return tile.load()


# --------------------------------------------------------------------------- resolution


def slide_resolution(slide, path: str | Path, fallback_mpp: float | None) -> tuple[float, str]:
    """Level-0 um/px of a slide and where it came from.

    Order: the slide's own mpp; ``fallback_mpp`` (--wsi_mpp); 10 / objective power (with a
    warning). Raises SlideSkipped when none is known."""
    props = slide.properties
    values = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            value = float(props.get(key, "nan"))
        except ValueError:
            value = math.nan
        if value > 0:
            values.append(value)
    if values:
        return float(np.mean(values)), "slide"
    if fallback_mpp is not None:
        return float(fallback_mpp), "--wsi_mpp"
    try:
        power = float(props.get("openslide.objective-power", "nan"))
    except ValueError:
        power = math.nan
    if power > 0:
        log.warning(
            "slide %s records no microns per pixel; assuming %.3g um/px from its %gx objective. "
            "Pass --wsi_mpp to set it.",
            path,
            MPP_AT_1X / power,
            power,
        )
        return MPP_AT_1X / power, "objective power"
    raise SlideSkipped(
        f"slide {path} records no resolution (microns per pixel or objective power); skipped. "
        "Pass --wsi_mpp <um per level-0 pixel> to tile it at a known scale."
    )


def best_level(downsamples: tuple[float, ...], wanted: float) -> int:
    """The coarsest level not coarser than ``wanted`` (within LEVEL_TOLERANCE)."""
    best = 0
    for level, downsample in enumerate(downsamples):
        if downsample <= wanted * (1 + LEVEL_TOLERANCE):
            best = level
    return best


# --------------------------------------------------------------------------- thumbnails


def read_downsampled(slide, size: tuple[int, int]) -> Image.Image:
    """The whole slide at ``size`` (w, h) px, read in blocks from the best pyramid level."""
    width0, height0 = slide.dimensions
    level = best_level(tuple(slide.level_downsamples), min(width0 / size[0], height0 / size[1]))
    level_w, level_h = slide.level_dimensions[level]
    downsample = slide.level_downsamples[level]
    background = _background(slide)
    out = Image.new("RGB", size, background)
    sx, sy = size[0] / level_w, size[1] / level_h
    for by in range(0, level_h, READ_BLOCK):
        for bx in range(0, level_w, READ_BLOCK):
            bw, bh = min(READ_BLOCK, level_w - bx), min(READ_BLOCK, level_h - by)
            # Output box from rounded edges, so neighbouring blocks meet without gaps.
            ox0, oy0 = round(bx * sx), round(by * sy)
            ox1, oy1 = round((bx + bw) * sx), round((by + bh) * sy)
            if ox1 <= ox0 or oy1 <= oy0:
                continue
            block = slide.read_region((round(bx * downsample), round(by * downsample)), level, (bw, bh))
            out.paste(_flatten(block, background).resize((ox1 - ox0, oy1 - oy0), Image.BILINEAR), (ox0, oy0))
    return out


def wsi_thumbnail(path: str | Path, max_size: int = 1024) -> tuple[Image.Image, float]:
    """An RGB thumbnail of the slide whose longer side is ``max_size`` px, and its scale.

    ``scale`` is thumbnail px per level-0 px: a tile at level-0 (x, y) of level-0 side s covers
    (x*scale, y*scale, (x+s)*scale, (y+s)*scale) on the thumbnail. Raises SlideSkipped when the
    slide cannot be opened, PipelineError when OpenSlide is missing."""
    slide = open_slide(path)
    try:
        width0, height0 = slide.dimensions
        scale = min(1.0, max_size / max(width0, height0))
        size = (max(1, round(width0 * scale)), max(1, round(height0 * scale)))
        return read_downsampled(slide, size), size[0] / width0
    finally:
        slide.close()


# --------------------------------------------------------------------------- CLI options


def add_wsi_arguments(parser: argparse.ArgumentParser) -> None:
    """The whole-slide options shared by `embed` and `tile_slides`."""
    group = parser.add_argument_group("whole-slide images (.svs, .ndpi, .mrxs, pyramidal .tif)")
    group.add_argument(
        "--wsi_tile_size",
        type=int,
        default=WsiConfig.tile_size,
        help="tile side in pixels at the tile resolution (default: %(default)s)",
    )
    scale = group.add_mutually_exclusive_group()
    scale.add_argument(
        "--wsi_magnification",
        type=float,
        default=None,
        help="tile magnification, converted as 10 / magnification um/px (default: 20)",
    )
    scale.add_argument(
        "--wsi_tile_mpp",
        type=float,
        default=None,
        help=f"tile resolution in um/px (default: {WsiConfig.tile_mpp})",
    )
    group.add_argument(
        "--wsi_min_tissue",
        type=float,
        default=WsiConfig.min_tissue,
        help="minimum tissue fraction of a kept tile, 0..1 (default: %(default)s)",
    )
    group.add_argument(
        "--wsi_mpp",
        type=float,
        default=None,
        help="um per level-0 pixel for slides that record none (else such slides are "
        "scaled by their objective power, or skipped)",
    )


def wsi_config_from_args(args: argparse.Namespace) -> WsiConfig:
    if args.wsi_magnification is not None:
        if not args.wsi_magnification > 0:
            raise PipelineError(f"--wsi_magnification {args.wsi_magnification} must be positive.")
        tile_mpp = MPP_AT_1X / args.wsi_magnification
    else:
        tile_mpp = args.wsi_tile_mpp if args.wsi_tile_mpp is not None else WsiConfig.tile_mpp
    return WsiConfig(
        tile_size=args.wsi_tile_size,
        tile_mpp=tile_mpp,
        min_tissue=args.wsi_min_tissue,
        slide_mpp=args.wsi_mpp,
    )
