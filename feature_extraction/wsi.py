"""Whole-slide images: open with OpenSlide, find the tissue, plan a tile grid, read tiles.

    plan_slide(path, config)  -> SlidePlan   tissue mask on a low-resolution image, the grid of
                                              level-0 tile positions, the pyramid level to read
    read_tile(region)         -> PIL RGB     what a worker calls: one read_region, resized
    wsi_thumbnail(path, size) -> (RGB, scale) for drawing heatmaps over the slide
    wsi_tile_image(path, attrs, x, y)         one embedded tile of a bag again (top-k montages)
    whole_slide_files(folder) -> [Path]       which files of a folder are slides (layout detection)
    require_openslide(slides)                 one clear error before any work when OpenSlide is missing

Tissue: saturation of a thumbnail at ``mask_mpp`` um/px, median-filtered, thresholded by Otsu's
method (clipped to ``saturation_range`` so that a blank slide finds nothing and a slide full of
tissue is not split into pale and dark tissue), then a morphological closing (fills holes) and
opening (drops specks) with PIL's max/min filters. A grid cell becomes a tile when at least
``min_tissue`` of it is tissue. The slide is never read whole: thumbnails come from the
coarsest pyramid level that is fine enough, read in blocks. See docs/wsi.md.

OpenSlide is an optional extra (``pip install 'clam-egfr[wsi]'``); it is imported only when a
slide is opened, so tile-folder cohorts never need it.

Plans are cached: ``list_wsi_tiles(..., plan_cache=<features_dir>/wsi_plans)`` keeps one small JSON
per slide and tiling, keyed by the slide's path, size and modification time and every tiling
setting, so a rerun over current bags does not redo the tissue detection.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageFilter

from feature_extraction.atomic import atomic_write_text, remove_stale_temps
from feature_extraction.errors import PipelineError
from feature_extraction.layout import WSI_SUFFIXES, SlideSource
from feature_extraction.tiles import SlideTiles, TileError, TileRef, select_subset

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'clam-egfr[wsi]'  (or: pip install openslide-python openslide-bin tifffile)"
PLAN_CACHE_FOLDER = "wsi_plans"  # under --features_dir: one JSON per slide and tiling
PLAN_FORMAT = 1  # bump when a plan's content or its JSON changes

# A .tif/.tiff is a slide only when it looks like one (see is_whole_slide_file); else a tile.
TIFF_SUFFIXES = (".tif", ".tiff")
# A TIFF without a pyramid still counts as a slide when it is tiled and at least this large.
MIN_SLIDE_SIDE = 4096
# 20x objective ~ 0.5 um/px: the convention CLAM, TRIDENT and slideflow use to convert.
MPP_AT_1X = 10.0
# A level whose downsample is within this relative distance of the wanted one is read as is
# (a scanner's 0.499 um/px is 0.5 um/px), which saves a resize per tile.
LEVEL_TOLERANCE = 0.02
MAX_THUMBNAIL_SIDE = 8192  # bounds the tissue mask's memory for very large slides
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
    def from_dict(cls, values: Mapping[str, Any]) -> "WsiConfig":
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


@dataclass(frozen=True, eq=False)
class SlidePlan:
    """The tiles of one slide and how to read them. Coordinates are level-0 pixels."""

    path: Path
    coords: np.ndarray  # (N, 2) int64, (x, y) of each tile's top-left corner, row-major order
    tissue_fraction: np.ndarray  # (N,) float32, tissue share of each tile
    tile_size: int  # px per side of a tile as read (after resizing)
    size_level0: int  # px per side of a tile at level 0
    level: int  # pyramid level read
    level_downsample: float  # that level's downsample from level 0
    read_size: int  # px per side read at that level
    level0_mpp: float  # um per level-0 pixel
    mpp_source: str  # where level0_mpp came from: "slide", "--wsi_mpp" or "objective power"
    level0_magnification: float
    dimensions: tuple[int, int]  # level-0 (width, height)
    config: WsiConfig
    mask: np.ndarray | None = field(repr=False)  # (h, w) bool tissue mask on the thumbnail; None from the plan cache
    mask_scale: float = 0.0  # mask px per level-0 px
    saturation_threshold: int = 0

    @property
    def mpp(self) -> float:
        """um per pixel of the tiles as read (the target, up to LEVEL_TOLERANCE)."""
        return self.level0_mpp * self.size_level0 / self.tile_size

    @property
    def tile_names(self) -> list[str]:
        """``x{X}_y{Y}`` per tile (level-0 pixels): what tiles.parse_coords reads back."""
        return [tile_name(int(x), int(y)) for x, y in self.coords]

    def tile(self, index: int) -> WsiTileRef:
        x, y = (int(v) for v in self.coords[index])
        return WsiTileRef(tile_name(x, y), x, y, self.path, self.level, self.read_size, self.tile_size)

    def attrs(self) -> dict[str, Any]:
        """The attributes CLAM and TRIDENT write next to level-0 ``coords``.

        ``patch_size`` is the tile side as read, ``patch_size_level0`` its level-0 extent,
        ``downsample`` = patch_size_level0 / patch_size (level-0 px per tile px), so
        ``coords + patch_size * downsample`` is a tile's far corner in level-0 pixels."""
        return {
            "slide_kind": "wsi",
            "patch_size": self.tile_size,
            "patch_size_level0": self.size_level0,
            "patch_level": self.level,
            "downsample": self.size_level0 / self.tile_size,
            "level_downsample": self.level_downsample,
            "target_magnification": round(self.config.magnification, 3),
            "magnification": round(MPP_AT_1X / self.mpp, 3),
            "level0_magnification": round(self.level0_magnification, 3),
            "mpp": round(self.mpp, 5),
            "level0_mpp": round(self.level0_mpp, 5),
            "mpp_source": self.mpp_source,
            "overlap": 0,
            "min_tissue": self.config.min_tissue,
            "slide_width": self.dimensions[0],
            "slide_height": self.dimensions[1],
            "slide_file": self.path.name,
        }


# --------------------------------------------------------------------------- opening slides


def _openslide():
    try:
        import openslide
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
        _openslide()
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
    openslide = _openslide()
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as error:
        kind = "is not a format OpenSlide reads" if isinstance(
            error, openslide.OpenSlideUnsupportedFormatError) else f"cannot be read ({error})"
        raise SlideSkipped(f"slide {path} {kind}; skipped. Check the file is complete and a "
                           "supported scanner format (.svs, .ndpi, .mrxs, pyramidal .tif, ...).") from error


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
    except (SlideSkipped, _openslide().OpenSlideError) as error:
        _forget_slide(str(region.path))  # an OpenSlide handle stays unusable after an error
        raise TileError(f"region at ({region.x}, {region.y}) of {region.path} cannot be read: {error}") from error
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
    tile = WsiTileRef(tile_name(int(x), int(y)), int(x), int(y), Path(slide_path), level, read_size,
                      int(attrs["patch_size"]))
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
        log.warning("slide %s records no microns per pixel; assuming %.3g um/px from its %gx objective. "
                    "Pass --wsi_mpp to set it.", path, MPP_AT_1X / power, power)
        return MPP_AT_1X / power, "objective power"
    raise SlideSkipped(f"slide {path} records no resolution (microns per pixel or objective power); skipped. "
                       "Pass --wsi_mpp <um per level-0 pixel> to tile it at a known scale.")


def _best_level(downsamples: tuple[float, ...], wanted: float) -> int:
    """The coarsest level not coarser than ``wanted`` (within LEVEL_TOLERANCE)."""
    best = 0
    for level, downsample in enumerate(downsamples):
        if downsample <= wanted * (1 + LEVEL_TOLERANCE):
            best = level
    return best


# --------------------------------------------------------------------------- thumbnails, tissue


def _downsampled(slide, size: tuple[int, int]) -> Image.Image:
    """The whole slide at ``size`` (w, h) px, read in blocks from the best pyramid level."""
    width0, height0 = slide.dimensions
    level = _best_level(tuple(slide.level_downsamples), min(width0 / size[0], height0 / size[1]))
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
        return _downsampled(slide, size), size[0] / width0
    finally:
        slide.close()


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising between-class variance of <=t vs >t."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    if hist.sum() == 0:
        return 0
    p = hist / hist.sum()
    weight = np.cumsum(p)  # share of pixels <= t
    mean = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean[-1] * weight - mean) ** 2 / (weight * (1.0 - weight))
    between[~np.isfinite(between)] = -1.0
    return int(np.argmax(between))


def tissue_mask(thumbnail: Image.Image, config: WsiConfig, pixel_um: float) -> tuple[np.ndarray, int]:
    """Boolean tissue mask (h, w) of an RGB thumbnail whose pixels are ``pixel_um`` um wide,
    and the saturation threshold used (0..255)."""
    saturation = np.asarray(thumbnail.convert("HSV").filter(ImageFilter.MedianFilter(5)))[..., 1]
    low, high = config.saturation_range
    threshold = int(np.clip(otsu_threshold(saturation), low, high))
    mask = Image.fromarray(np.where(saturation > threshold, 255, 0).astype(np.uint8))
    # Odd kernel of about morphology_um; PIL's min/max filters are erosion/dilation.
    size = max(3, 2 * round(config.morphology_um / pixel_um / 2) + 1)
    # Closing first joins loose fibrous tissue into one region and fills its holes; the opening
    # after it then removes only specks that stand alone.
    mask = mask.filter(ImageFilter.MaxFilter(size)).filter(ImageFilter.MinFilter(size))  # closing: holes
    mask = mask.filter(ImageFilter.MinFilter(size)).filter(ImageFilter.MaxFilter(size))  # opening: specks
    return np.asarray(mask) > 127, threshold


def _cell_fractions(mask: np.ndarray, scale: float, xs: np.ndarray, ys: np.ndarray, side: int) -> np.ndarray:
    """Tissue share of each grid cell (len(ys), len(xs)) from the mask's integral image.

    A cell of level-0 extent [x, x+side) covers mask columns floor(x*scale)..ceil((x+side)*scale)."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    h, w = mask.shape
    x0 = np.clip(np.floor(xs * scale).astype(int), 0, w - 1)
    x1 = np.clip(np.ceil((xs + side) * scale).astype(int), x0 + 1, w)
    y0 = np.clip(np.floor(ys * scale).astype(int), 0, h - 1)
    y1 = np.clip(np.ceil((ys + side) * scale).astype(int), y0 + 1, h)
    total = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    area = np.outer(y1 - y0, x1 - x0)
    return total / area


# --------------------------------------------------------------------------- the plan


def plan_slide(path: str | Path, config: WsiConfig = WsiConfig()) -> SlidePlan:
    """Find the tissue of one slide and the tiles to read from it.

    Raises SlideSkipped (naming the slide) when it cannot be opened, records no resolution
    and none is given, or has no tile with at least ``config.min_tissue`` tissue;
    PipelineError when OpenSlide is not installed."""
    path = Path(path)
    slide = open_slide(path)
    try:
        level0_mpp, mpp_source = slide_resolution(slide, path, config.slide_mpp)
        width0, height0 = slide.dimensions
        downsamples = tuple(float(d) for d in slide.level_downsamples)

        # Tile geometry: level-0 extent of a tile, snapped to a pyramid level when close to one.
        wanted = config.tile_mpp / level0_mpp
        level = _best_level(downsamples, wanted)
        downsample = downsamples[level] if abs(downsamples[level] / wanted - 1) <= LEVEL_TOLERANCE else wanted
        size_level0 = max(1, round(config.tile_size * downsample))
        read_size = max(1, round(size_level0 / downsamples[level]))
        if wanted < 1 / (1 + LEVEL_TOLERANCE):
            log.warning("slide %s is scanned at %.3g um/px, coarser than the %.3g um/px asked: tiles are upsampled.",
                        path, level0_mpp, config.tile_mpp)

        # Tissue mask on a thumbnail of about mask_mpp um/px (never more than MAX_THUMBNAIL_SIDE).
        mask_scale = min(level0_mpp / config.mask_mpp, MAX_THUMBNAIL_SIDE / max(width0, height0), 1.0)
        size = (max(1, round(width0 * mask_scale)), max(1, round(height0 * mask_scale)))
        try:
            thumbnail = _downsampled(slide, size)
        except _openslide().OpenSlideError as error:
            raise SlideSkipped(f"slide {path} cannot be decoded ({error}); skipped. The file is damaged.") from error
        mask_scale = size[0] / width0
        mask, threshold = tissue_mask(thumbnail, config, pixel_um=level0_mpp / mask_scale)

        xs = np.arange(0, width0 - size_level0 + 1, size_level0, dtype=np.int64)
        ys = np.arange(0, height0 - size_level0 + 1, size_level0, dtype=np.int64)
        if len(xs) == 0 or len(ys) == 0:
            raise SlideSkipped(f"slide {path} ({width0} x {height0} px) is smaller than one "
                               f"{size_level0} px tile; skipped.")
        fractions = _cell_fractions(mask, mask_scale, xs, ys, size_level0)
        # A cell with zero tissue is never kept, even with --wsi_min_tissue 0.
        keep = (fractions >= config.min_tissue) & (fractions > 0)
        rows, cols = np.nonzero(keep)  # row-major: y, then x
        if len(rows) == 0:
            found = "no tissue" if not mask.any() else f"no tile with at least {config.min_tissue:.0%} tissue"
            raise SlideSkipped(f"slide {path}: {found} found (saturation threshold {threshold}); skipped.")
        objective = slide.properties.get("openslide.objective-power")
        try:
            level0_magnification = float(objective) if objective and mpp_source == "slide" else MPP_AT_1X / level0_mpp
        except ValueError:
            level0_magnification = MPP_AT_1X / level0_mpp
        return SlidePlan(
            path=path,
            coords=np.stack([xs[cols], ys[rows]], axis=1).astype(np.int64),
            tissue_fraction=fractions[rows, cols].astype(np.float32),
            tile_size=config.tile_size,
            size_level0=size_level0,
            level=level,
            level_downsample=downsamples[level],
            read_size=read_size,
            level0_mpp=level0_mpp,
            mpp_source=mpp_source,
            level0_magnification=level0_magnification,
            dimensions=(int(width0), int(height0)),
            config=config,
            mask=mask,
            mask_scale=mask_scale,
            saturation_threshold=threshold,
        )
    finally:
        slide.close()


def plot_plan(plan: SlidePlan, out_path: str | Path, max_size: int = 1024) -> Path:
    """Save a three-panel picture: thumbnail, tissue mask, kept tiles drawn on the thumbnail."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    if plan.mask is None:  # a plan from the cache keeps no mask
        plan = plan_slide(plan.path, plan.config)
    thumbnail, scale = wsi_thumbnail(plan.path, max_size)
    side = plan.size_level0 * scale
    fig, axes = plt.subplots(1, 3, figsize=(12, 12 * thumbnail.height / thumbnail.width / 3 + 0.8))
    axes[0].imshow(thumbnail)
    axes[0].set_title(f"{plan.path.name}\n{plan.dimensions[0]} x {plan.dimensions[1]} px at {plan.level0_mpp:.3g} um/px")
    axes[1].imshow(plan.mask, cmap="gray", interpolation="nearest")
    axes[1].set_title(f"tissue mask ({plan.mask.shape[1]} x {plan.mask.shape[0]} px)\n"
                      f"saturation > {plan.saturation_threshold}")
    axes[2].imshow(thumbnail)
    boxes = [Rectangle((x * scale, y * scale), side, side) for x, y in plan.coords]
    axes[2].add_collection(PatchCollection(boxes, facecolor="none", edgecolor="lime", linewidth=0.8))
    axes[2].set_title(f"{len(plan.coords)} tiles, {plan.tile_size} px at {plan.mpp:.3g} um/px\n"
                      f"(>= {plan.config.min_tissue:.0%} tissue)")
    for axis in axes:
        axis.set_axis_off()
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


@dataclass(frozen=True)
class WsiSlideTiles(SlideTiles):
    """SlideTiles of a whole-slide image: also the plan they came from (None when skipped)
    and, for a skipped slide (no tiles), the reason naming it."""

    plan: SlidePlan | None = None


# --------------------------------------------------------------------------- the plan cache


def _plan_key(path: Path, stat: os.stat_result, config: WsiConfig) -> dict[str, Any]:
    """What a cached plan must match: the slide file as it is now and every tiling setting."""
    return {"format": PLAN_FORMAT, "slide": str(path.resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "config": config.as_dict()}


def _plan_cache_file(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:32]
    return cache_dir / f"{digest}.json"


# The plain-valued fields of a SlidePlan, stored as they are; arrays and the rest are handled by name.
_PLAN_ARRAYS = {"coords": (np.int64, (-1, 2)), "tissue_fraction": (np.float32, (-1,))}
_PLAN_VALUES = tuple(f.name for f in fields(SlidePlan)
                     if f.name not in (*_PLAN_ARRAYS, "path", "config", "mask", "dimensions"))


def _plan_to_json(plan: SlidePlan, key: dict[str, Any]) -> str:
    return json.dumps({
        **key,
        **{name: getattr(plan, name).tolist() for name in _PLAN_ARRAYS},
        **{name: getattr(plan, name) for name in _PLAN_VALUES},
        "dimensions": list(plan.dimensions),
    }, separators=(",", ":"))


def _plan_from_json(text: str, path: Path, key: dict[str, Any], config: WsiConfig) -> SlidePlan | None:
    """The cached plan, or None when the file is unreadable or was made for another slide or tiling."""
    try:
        data = json.loads(text)
        if any(data.get(name) != value for name, value in key.items()):
            return None
        arrays = {name: np.asarray(data[name], dtype=dtype).reshape(shape)
                  for name, (dtype, shape) in _PLAN_ARRAYS.items()}
        if len(arrays["coords"]) != len(arrays["tissue_fraction"]):
            return None
        return SlidePlan(path=path, config=config, mask=None, dimensions=tuple(data["dimensions"][:2]),
                         **arrays, **{name: data[name] for name in _PLAN_VALUES})
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


_SWEPT: set[str] = set()


def cached_plan(path: str | Path, config: WsiConfig, cache_dir: str | Path | None,
                stat: os.stat_result | None = None) -> SlidePlan:
    """``plan_slide(path, config)``, read from ``cache_dir`` when a plan of this slide file (path,
    size, modification time) and tiling is there, else computed and stored there atomically.

    A cached plan has ``mask`` None (plot_plan recomputes it). Skipped slides are not cached:
    they are tried again on the next run. ``stat`` is the slide's stat taken before planning
    (taken here when None). A cache that cannot be read or written is passed over with a warning."""
    path = Path(path)
    if cache_dir is None:
        return plan_slide(path, config)
    cache_dir = Path(cache_dir)
    key = _plan_key(path, stat or path.stat(), config)
    file = _plan_cache_file(cache_dir, key)
    try:
        plan = _plan_from_json(file.read_text(encoding="utf-8"), path, key, config)
    except FileNotFoundError:
        plan = None
    except (OSError, UnicodeDecodeError) as error:
        log.warning("cannot read cached tile plan %s (%s); planning slide %s again.", file, error, path)
        plan = None
    if plan is not None:
        return plan
    plan = plan_slide(path, config)
    try:
        if str(cache_dir) not in _SWEPT:  # temporary files of killed writers, once per process
            _SWEPT.add(str(cache_dir))
            if cache_dir.is_dir():
                remove_stale_temps(cache_dir)
        atomic_write_text(file, _plan_to_json(plan, key))
    except OSError as error:
        log.warning("cannot cache the tile plan of %s in %s (%s); it is planned again on the next run.",
                    path, cache_dir, error)
    return plan


def list_wsi_tiles(slide: SlideSource, max_tiles: int = 100, seed: int = 0,
                   config: WsiConfig = WsiConfig(), plan_cache: str | Path | None = None) -> WsiSlideTiles:
    """The tiles of a whole-slide ``slide`` to embed, with the same seeded ``max_tiles`` subset
    as tile folders (tiles.select_subset over the ``x{X}_y{Y}`` names).

    ``attrs`` holds the plan's CLAM/TRIDENT attributes plus ``slide_kind`` ("wsi") and
    ``slide_file`` (the slide's path relative to its class folder). ``tiles_digest`` changes
    when the slide file or the tiling configuration changes. A slide that cannot be tiled
    (unreadable, no tissue, no resolution) comes back with no tiles and ``reason`` set;
    PipelineError is raised only when OpenSlide is not installed. ``plan_cache``: a folder of
    cached plans (see cached_plan; embed uses ``<features_dir>/wsi_plans``), None to always plan."""
    stat = slide.path.stat()
    digest = hashlib.sha256(f"{slide.path.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode("utf-8"))
    digest.update(json.dumps(config.as_dict(), sort_keys=True).encode("utf-8"))
    try:
        plan = cached_plan(slide.path, config, plan_cache, stat)
    except SlideSkipped as error:
        return WsiSlideTiles(slide, (), 0, (), digest.hexdigest(), reason=str(error))
    names = plan.tile_names
    chosen = select_subset(names, slide.slide_id, max_tiles, seed)
    # <class_folder>/<slide file> or <class_folder>/<patient>/<slide file>
    in_class_folder = slide.path.parent.name == slide.class_folder
    relative = slide.path.name if in_class_folder else f"{slide.path.parent.name}/{slide.path.name}"
    return WsiSlideTiles(
        slide=slide,
        tiles=tuple(plan.tile(i) for i in chosen),
        n_available=len(names),
        ignored=(),
        tiles_digest=digest.hexdigest(),
        attrs={**plan.attrs(), "slide_file": relative},
        plan=plan,
    )


# --------------------------------------------------------------------------- which files are slides


def is_whole_slide_file(path: str | Path) -> bool:
    """True for a scanner file (.svs, .ndpi, .mrxs, ...) and for a TIFF that is a slide.

    A .tif/.tiff is a slide when it holds a resolution pyramid, or is tiled and at least
    MIN_SLIDE_SIDE px on its longer side; any other TIFF is an ordinary tile image. Without
    tifffile (part of the ``wsi`` extra) every TIFF counts as a tile."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in WSI_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES or not path.is_file():
        return False
    try:
        import tifffile
    except ImportError:
        return False
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if len(series.levels) > 1:
                return True
            page = tif.pages[0]
            return bool(page.is_tiled) and max(page.shape[:2]) >= MIN_SLIDE_SIDE
    except Exception:  # noqa: BLE001 - tifffile raises many types; an unreadable TIFF is left to the tile reader
        return False


def whole_slide_files(folder: str | Path) -> list[Path]:
    """The slide files directly inside ``folder``, sorted by name; [] for a folder of tiles.

    Only the largest TIFF is inspected first: tiles are smaller than slides, so when it is not
    a slide the folder's other TIFFs are tiles too, and a tile folder costs one header read.
    Names are filtered by suffix before anything is stat'ed: tile folders can be large."""
    slides: list[Path] = []
    tiffs: list[tuple[int, Path]] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            suffix = os.path.splitext(entry.name)[1].lower()
            if entry.name.startswith(".") or suffix not in WSI_SUFFIXES + TIFF_SUFFIXES:
                continue
            if not entry.is_file():
                continue
            if suffix in WSI_SUFFIXES:
                slides.append(Path(entry.path))
            else:
                tiffs.append((entry.stat().st_size, Path(entry.path)))
    if tiffs and is_whole_slide_file(max(tiffs)[1]):
        slides.extend(path for _, path in tiffs if is_whole_slide_file(path))
    return sorted(slides, key=lambda p: p.name)


def is_mirax_companion(folder: Path) -> bool:
    """A MIRAX slide is ``name.mrxs`` plus a folder ``name/`` of its data: not a patient folder."""
    return folder.is_dir() and folder.with_name(folder.name + ".mrxs").is_file()


# --------------------------------------------------------------------------- CLI options


def add_wsi_arguments(parser: argparse.ArgumentParser) -> None:
    """The whole-slide options shared by `embed` and `tile`."""
    group = parser.add_argument_group("whole-slide images (.svs, .ndpi, .mrxs, pyramidal .tif)")
    group.add_argument("--wsi_tile_size", type=int, default=WsiConfig.tile_size,
                       help="tile side in pixels at the tile resolution (default: %(default)s)")
    scale = group.add_mutually_exclusive_group()
    scale.add_argument("--wsi_magnification", type=float, default=None,
                       help="tile magnification, converted as 10 / magnification um/px (default: 20)")
    scale.add_argument("--wsi_tile_mpp", type=float, default=None,
                       help=f"tile resolution in um/px (default: {WsiConfig.tile_mpp})")
    group.add_argument("--wsi_min_tissue", type=float, default=WsiConfig.min_tissue,
                       help="minimum tissue fraction of a kept tile, 0..1 (default: %(default)s)")
    group.add_argument("--wsi_mpp", type=float, default=None,
                       help="um per level-0 pixel for slides that record none (else such slides are "
                            "scaled by their objective power, or skipped)")


def wsi_config_from_args(args: argparse.Namespace) -> WsiConfig:
    if args.wsi_magnification is not None:
        if not args.wsi_magnification > 0:
            raise PipelineError(f"--wsi_magnification {args.wsi_magnification} must be positive.")
        tile_mpp = MPP_AT_1X / args.wsi_magnification
    else:
        tile_mpp = args.wsi_tile_mpp if args.wsi_tile_mpp is not None else WsiConfig.tile_mpp
    return WsiConfig(tile_size=args.wsi_tile_size, tile_mpp=tile_mpp,
                     min_tissue=args.wsi_min_tissue, slide_mpp=args.wsi_mpp)
