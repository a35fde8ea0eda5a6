"""The whole-slide reader, part two: find the tissue, plan the tile grid, cache plans, list tiles.

    plan_slide(path, config)  -> SlidePlan   tissue mask on a low-resolution image, the grid of
                                              level-0 tile positions, the pyramid level to read
    cached_plan(path, config, cache_dir)     the same, read from / stored in the plan cache
    list_wsi_tiles(slide, ...) -> WsiSlideTiles   the tiles of a slide to embed (the seeded subset)
    plot_plan(plan, out_path)                 thumbnail, tissue mask and kept tiles in one picture

Tissue: saturation of a thumbnail at ``mask_mpp`` um/px, median-filtered, thresholded by Otsu's
method (clipped to ``saturation_range`` so that a blank slide finds nothing and a slide full of
tissue is not split into pale and dark tissue), then a morphological closing (fills holes) and
opening (drops specks) with max/min filters. A grid cell becomes a tile when at least
``min_tissue`` of it is tissue. The slide is never read whole: thumbnails come from the
coarsest pyramid level that is fine enough, read in blocks. See docs/wsi.md.

Plans are cached: ``list_wsi_tiles(..., plan_cache=<features_dir>/wsi_plans)`` keeps one small JSON
per slide and tiling, keyed by the slide's path, size and modification time and every tiling
setting, so a rerun over current bags does not redo the tissue detection.

Opening and reading slides is part one, ``wsi``; the tile-folder reader (``tile_folder``) sits
beside both and imports neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from feature_extraction.atomic import atomic_write_text, remove_stale_temps
from feature_extraction.sources import SlideSource, SlideTiles, select_subset
from feature_extraction.wsi import (
    LEVEL_TOLERANCE,
    MPP_AT_1X,
    SlideSkipped,
    WsiConfig,
    WsiTileRef,
    best_level,
    import_openslide,
    open_slide,
    read_downsampled,
    slide_resolution,
    tile_name,
    wsi_thumbnail,
)

log = logging.getLogger(__name__)

PLAN_CACHE_FOLDER = "wsi_plans"  # under --features_dir: one JSON per slide and tiling
PLAN_FORMAT = 1  # bump when a plan's content or its JSON changes
MAX_THUMBNAIL_SIDE = 8192  # bounds the tissue mask's memory for very large slides


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
    # (h, w) bool tissue mask on the thumbnail; None from the plan cache
    mask: np.ndarray | None = field(repr=False)
    mask_scale: float = 0.0  # mask px per level-0 px
    saturation_threshold: int = 0

    @property
    def mpp(self) -> float:
        """um per pixel of the tiles as read (the target, up to LEVEL_TOLERANCE)."""
        return self.level0_mpp * self.size_level0 / self.tile_size

    @property
    def tile_names(self) -> list[str]:
        """``x{X}_y{Y}`` per tile (level-0 pixels): what tile_folder.parse_coords reads back."""
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


# --------------------------------------------------------------------------- tissue


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
    # Imported here: scipy costs about a second to import, and only whole-slide planning needs it.
    from scipy import ndimage

    # The median of the saturation band only: a third of filtering all three HSV bands.
    saturation = np.asarray(thumbnail.convert("HSV").getchannel("S").filter(ImageFilter.MedianFilter(5)))
    low, high = config.saturation_range
    threshold = int(np.clip(otsu_threshold(saturation), low, high))
    # Odd square kernel of about morphology_um. Max/min filters are dilation/erosion; scipy's
    # separable ones (edges replicated, as PIL's MaxFilter/MinFilter do) give the same mask
    # as PIL's, many times faster on the thumbnail of a large slide.
    size = max(3, 2 * round(config.morphology_um / pixel_um / 2) + 1)
    mask = saturation > threshold
    # Closing first joins loose fibrous tissue into one region and fills its holes; the opening
    # after it then removes only specks that stand alone.
    for grow in (True, False, False, True):  # closing (holes), then opening (specks)
        mask = (ndimage.maximum_filter if grow else ndimage.minimum_filter)(mask, size, mode="nearest")
    return mask, threshold


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
    total = integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0]
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
        level = best_level(downsamples, wanted)
        downsample = downsamples[level] if abs(downsamples[level] / wanted - 1) <= LEVEL_TOLERANCE else wanted
        size_level0 = max(1, round(config.tile_size * downsample))
        read_size = max(1, round(size_level0 / downsamples[level]))
        if wanted < 1 / (1 + LEVEL_TOLERANCE):
            log.warning(
                "slide %s is scanned at %.3g um/px, coarser than the %.3g um/px asked: tiles are upsampled.",
                path,
                level0_mpp,
                config.tile_mpp,
            )

        # Tissue mask on a thumbnail of about mask_mpp um/px (never more than MAX_THUMBNAIL_SIDE).
        mask_scale = min(level0_mpp / config.mask_mpp, MAX_THUMBNAIL_SIDE / max(width0, height0), 1.0)
        size = (max(1, round(width0 * mask_scale)), max(1, round(height0 * mask_scale)))
        try:
            thumbnail = read_downsampled(slide, size)
        except import_openslide().OpenSlideError as error:
            raise SlideSkipped(
                f"slide {path} cannot be decoded ({error}); skipped. The file is damaged."
            ) from error
        mask_scale = size[0] / width0
        mask, threshold = tissue_mask(thumbnail, config, pixel_um=level0_mpp / mask_scale)

        xs = np.arange(0, width0 - size_level0 + 1, size_level0, dtype=np.int64)
        ys = np.arange(0, height0 - size_level0 + 1, size_level0, dtype=np.int64)
        if len(xs) == 0 or len(ys) == 0:
            raise SlideSkipped(
                f"slide {path} ({width0} x {height0} px) is smaller than one {size_level0} px tile; skipped."
            )
        fractions = _cell_fractions(mask, mask_scale, xs, ys, size_level0)
        # A cell with zero tissue is never kept, even with --wsi_min_tissue 0.
        keep = (fractions >= config.min_tissue) & (fractions > 0)
        rows, cols = np.nonzero(keep)  # row-major: y, then x
        if len(rows) == 0:
            found = "no tissue" if not mask.any() else f"no tile with at least {config.min_tissue:.0%} tissue"
            raise SlideSkipped(f"slide {path}: {found} found (saturation threshold {threshold}); skipped.")
        objective = slide.properties.get("openslide.objective-power")
        try:
            level0_magnification = (
                float(objective) if objective and mpp_source == "slide" else MPP_AT_1X / level0_mpp
            )
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
    import matplotlib  # imported here: only overview pictures need it, and it is slow to import

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
    axes[0].set_title(
        f"{plan.path.name}\n{plan.dimensions[0]} x {plan.dimensions[1]} px at {plan.level0_mpp:.3g} um/px"
    )
    axes[1].imshow(plan.mask, cmap="gray", interpolation="nearest")
    axes[1].set_title(
        f"tissue mask ({plan.mask.shape[1]} x {plan.mask.shape[0]} px)\n"
        f"saturation > {plan.saturation_threshold}"
    )
    axes[2].imshow(thumbnail)
    boxes = [Rectangle((x * scale, y * scale), side, side) for x, y in plan.coords]
    axes[2].add_collection(PatchCollection(boxes, facecolor="none", edgecolor="lime", linewidth=0.8))
    axes[2].set_title(
        f"{len(plan.coords)} tiles, {plan.tile_size} px at {plan.mpp:.3g} um/px\n"
        f"(>= {plan.config.min_tissue:.0%} tissue)"
    )
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
    return {
        "format": PLAN_FORMAT,
        "slide": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "config": config.as_dict(),
    }


def _plan_cache_file(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:32]
    return cache_dir / f"{digest}.json"


# The plain-valued fields of a SlidePlan, stored as they are; arrays and the rest are handled by name.
_PLAN_ARRAYS = {"coords": (np.int64, (-1, 2)), "tissue_fraction": (np.float32, (-1,))}
_PLAN_VALUES = tuple(
    f.name for f in fields(SlidePlan) if f.name not in (*_PLAN_ARRAYS, "path", "config", "mask", "dimensions")
)


def _plan_to_json(plan: SlidePlan, key: dict[str, Any]) -> str:
    return json.dumps(
        {
            **key,
            **{name: getattr(plan, name).tolist() for name in _PLAN_ARRAYS},
            **{name: getattr(plan, name) for name in _PLAN_VALUES},
            "dimensions": list(plan.dimensions),
        },
        separators=(",", ":"),
    )


def _plan_from_json(text: str, path: Path, key: dict[str, Any], config: WsiConfig) -> SlidePlan | None:
    """The cached plan, or None when the file is unreadable or was made for another slide or tiling."""
    try:
        data = json.loads(text)
        if any(data.get(name) != value for name, value in key.items()):
            return None
        arrays = {
            name: np.asarray(data[name], dtype=dtype).reshape(shape)
            for name, (dtype, shape) in _PLAN_ARRAYS.items()
        }
        if len(arrays["coords"]) != len(arrays["tissue_fraction"]):
            return None
        return SlidePlan(
            path=path,
            config=config,
            mask=None,
            dimensions=tuple(data["dimensions"][:2]),
            **arrays,
            **{name: data[name] for name in _PLAN_VALUES},
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


_SWEPT: set[str] = set()


def cached_plan(
    path: str | Path, config: WsiConfig, cache_dir: str | Path | None, stat: os.stat_result | None = None
) -> SlidePlan:
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
        log.warning(
            "cannot cache the tile plan of %s in %s (%s); it is planned again on the next run.",
            path,
            cache_dir,
            error,
        )
    return plan


def list_wsi_tiles(
    slide: SlideSource,
    max_tiles: int = 100,
    seed: int = 0,
    config: WsiConfig = WsiConfig(),
    plan_cache: str | Path | None = None,
) -> WsiSlideTiles:
    """The tiles of a whole-slide ``slide`` to embed, with the same seeded ``max_tiles`` subset
    as tile folders (sources.select_subset over the ``x{X}_y{Y}`` names).

    ``attrs`` holds the plan's CLAM/TRIDENT attributes plus ``slide_kind`` ("wsi") and
    ``slide_file`` (the slide's path relative to its class folder). ``tiles_digest`` changes
    when the slide file or the tiling configuration changes. A slide that cannot be tiled
    (unreadable, no tissue, no resolution) comes back with no tiles and ``reason`` set;
    PipelineError is raised only when OpenSlide is not installed. ``plan_cache``: a folder of
    cached plans (see cached_plan; embed uses ``<features_dir>/wsi_plans``), None to always plan."""
    stat = slide.path.stat()
    digest = hashlib.sha256(f"{slide.path.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
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
