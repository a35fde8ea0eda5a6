"""The tiles of one slide: list them, pick the seeded ``max_tiles`` subset, parse their
coordinates from their names and decode them robustly into the backbone's input.

Listing (a folder of tile images): files ending in .png .jpg .jpeg .tif .tiff .bmp (any
letter case), in sub-folders too, sorted by their path relative to the slide folder (plain
code-point order, the same on every machine). Hidden files and folders are skipped; other
files are ignored and counted.

Coordinates come from the tile's file name (see ``parse_coords``); a name without a
position gets ``COORD_SENTINEL`` (-1, -1).

The subset: when a slide has more than ``max_tiles`` tiles, each tile is ranked by
sha256(seed, slide_id, tile name) and the ``max_tiles`` lowest are kept, in listing order.
That depends on nothing but those three values, so it is the same on every run, machine,
Python and NumPy version, and adding one tile to a folder changes at most one tile of the
subset.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from feature_extraction.bags import COORD_SENTINEL
from feature_extraction.errors import PipelineError
from feature_extraction.layout import SlideSource

TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SUBSET_RULE = "sha256-rank(seed,slide_id,tile_name)"  # part of the cache key: change it if the rule changes

# A tile larger than this (pixels) is skipped as a possible decompression bomb; PIL's own
# limit is checked on the header, before any pixel is decoded.
MAX_TILE_PIXELS = Image.MAX_IMAGE_PIXELS

_XY_TAGGED = re.compile(r"(?<![a-z])x[=_\-]?(\d+)[\s,_\-]*y[=_\-]?(\d+)(?!\d)", re.IGNORECASE)
_PARENTHESISED = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")
_TRAILING_PAIR = re.compile(r"(?:^|[_\-\s.])(\d+)[_\-](\d+)$")


class TileError(Exception):
    """A tile that cannot be decoded (truncated, zero bytes, not an image, too large).

    Never leaves the embedding stage: the tile is skipped, counted and named."""


@dataclass(frozen=True)
class TileRef:
    """One tile of a slide: its name (path relative to the slide folder, '/'-separated), its
    position in slide pixels, and where to read it.

    ``load()`` decodes the file into an RGB image. Whole-slide tiles use a subclass whose
    ``load()`` reads a region of the slide instead. Instances are pickled to DataLoader
    workers, so they hold only plain values."""

    name: str
    x: int
    y: int
    path: Path

    def load(self) -> Image.Image:
        """The tile as an RGB image; raises TileError when it cannot be decoded."""
        return decode_rgb(self.path)


@dataclass(frozen=True)
class SlideTiles:
    """The tiles of one slide chosen for embedding.

    ``tiles`` is the ``max_tiles`` subset (all tiles when the slide has fewer), in listing
    order; ``n_available`` counts every tile found; ``ignored`` names the non-image files;
    ``tiles_digest`` changes whenever a tile is added, removed, resized or rewritten;
    ``attrs`` are extra bag attributes from the slide reader (e.g. a whole slide's resolution);
    ``reason`` says why a slide that has no tiles has none (unreadable, no tissue, ...)."""

    slide: SlideSource
    tiles: tuple[TileRef, ...]
    n_available: int
    ignored: tuple[str, ...]
    tiles_digest: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""


def list_slide_tiles(slide: SlideSource, max_tiles: int = 100, seed: int = 0, wsi=None,
                     plan_cache: Path | None = None) -> SlideTiles:
    """The tiles of ``slide`` to embed; the one place that dispatches on ``slide.kind``.

    ``max_tiles <= 0`` keeps every tile. ``wsi`` (a ``wsi.WsiConfig``, default settings when
    None) says how whole-slide images are tiled; ``plan_cache`` is the folder their tile plans
    are cached in (None: planned every time). Raises PipelineError for a slide kind this
    installation cannot read (a whole-slide image without OpenSlide installed)."""
    if slide.kind == "tiles":
        return _folder_tiles(slide, max_tiles, seed)
    if slide.kind == "wsi":
        # Imported here: wsi imports this module (TileRef); OpenSlide itself loads on first use.
        from feature_extraction.wsi import WsiConfig, list_wsi_tiles

        return list_wsi_tiles(slide, max_tiles, seed, wsi or WsiConfig(), plan_cache=plan_cache)
    raise PipelineError(f"slide {slide.slide_id} at {slide.path} has unknown kind {slide.kind!r}")


def _folder_tiles(slide: SlideSource, max_tiles: int, seed: int) -> SlideTiles:
    names, stats, ignored = _list_folder(slide.path)
    digest = hashlib.sha256()
    for name, (size, mtime_ns) in zip(names, stats):
        digest.update(f"{name}\t{size}\t{mtime_ns}\n".encode("utf-8"))
    chosen = select_subset(names, slide.slide_id, max_tiles, seed)
    tiles = []
    for index in chosen:
        x, y = parse_coords(names[index])
        tiles.append(TileRef(names[index], x, y, slide.path / names[index]))
    return SlideTiles(slide, tuple(tiles), len(names), tuple(ignored), digest.hexdigest())


def _list_folder(root: Path) -> tuple[list[str], list[tuple[int, int]], list[str]]:
    """(tile names, their (size, mtime_ns), ignored non-image names), sorted by name."""
    found: list[tuple[str, tuple[int, int]]] = []
    ignored: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        relative = Path(directory).relative_to(root)
        for file in files:
            if file.startswith("."):
                continue
            name = (relative / file).as_posix()
            if not file.lower().endswith(TILE_SUFFIXES):
                ignored.append(name)
                continue
            try:
                stat = os.stat(os.path.join(directory, file))
            except OSError:  # a dangling link: listed, and reported as unreadable when decoded
                found.append((name, (-1, -1)))
                continue
            found.append((name, (stat.st_size, stat.st_mtime_ns)))
    found.sort(key=lambda item: item[0])
    return [n for n, _ in found], [s for _, s in found], sorted(ignored)


def select_subset(names: list[str], slide_id: str, max_tiles: int, seed: int) -> list[int]:
    """Indices (ascending) of the ``max_tiles`` tiles kept; all of them when ``max_tiles <= 0``."""
    if max_tiles <= 0 or len(names) <= max_tiles:
        return list(range(len(names)))
    prefix = f"{seed}\x00{slide_id}\x00".encode("utf-8")
    ranks = [hashlib.sha256(prefix + name.encode("utf-8")).digest() for name in names]
    kept = sorted(range(len(names)), key=lambda i: (ranks[i], names[i]))[:max_tiles]
    return sorted(kept)


def parse_coords(name: str) -> tuple[int, int]:
    """(x, y) from a tile name, else (COORD_SENTINEL, COORD_SENTINEL).

    Recognised, in this order, in the file name without folder and extension:
    ``..._x123_y456`` / ``x=123,y=456`` (any case), ``(123,456)``, and a trailing pair of
    numbers ``123_456`` / ``..._123_456``."""
    stem = Path(name).stem
    for pattern in (_XY_TAGGED, _PARENTHESISED, _TRAILING_PAIR):
        match = pattern.search(stem)
        if match:
            return int(match.group(1)), int(match.group(2))
    return COORD_SENTINEL, COORD_SENTINEL


def decode_rgb(path: str | Path) -> Image.Image:
    """Decode an image file into 8-bit RGB; raise TileError when it cannot be used.

    Transparent pixels are composited on white (the background of a scanned slide);
    grayscale, palette, CMYK and 16-bit images are converted with their full range."""
    file = Path(path)
    if file.is_file() and file.stat().st_size == 0:
        raise TileError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_TILE_PIXELS:
                    raise TileError(f"{width}x{height} pixels is larger than the {MAX_TILE_PIXELS} pixel limit")
                image.load()
                return to_rgb(image)
    except TileError:
        raise
    except Exception as error:  # PIL raises many types for malformed files; any of them means "skip"
        fallback = _tifffile_rgb(Path(path))
        if fallback is not None:
            return fallback
        raise TileError(_describe(error, Path(path))) from error


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``image`` (alpha on white, 16-bit scaled, palette expanded)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy()
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale: scale 0..65535 to 0..255 (PIL's own conversion clips instead).
        values = np.asarray(image).astype(np.float32)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else 1.0  # a float image is usually 0..1
        return Image.fromarray(np.clip(np.nan_to_num(values) * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _tifffile_rgb(path: Path) -> Image.Image | None:
    """Read a TIFF that PIL cannot (e.g. 16-bit RGB) with tifffile when it is installed."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        import tifffile

        array = np.asarray(tifffile.imread(path, key=0))
    except Exception:
        return None
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4) or array.shape[0] * array.shape[1] > MAX_TILE_PIXELS:
        return None
    if array.dtype == np.uint16:
        array = np.rint(array / 257.0)
    elif np.issubdtype(array.dtype, np.floating):
        array = array * 255.0 if np.nanmax(array, initial=0.0) <= 1.0 else array
    array = np.clip(np.nan_to_num(array.astype(np.float32)), 0, 255).astype(np.uint8)
    channels = array.shape[-1]
    if channels in (2, 4):  # gray+alpha or RGB+alpha: composite on white
        alpha = array[..., -1:].astype(np.float32) / 255.0
        color = array[..., :-1].astype(np.float32)
        array = np.rint(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _describe(error: Exception, path: Path) -> str:
    text = str(error).replace(str(path), path.name).strip() or type(error).__name__
    return f"{type(error).__name__}: {text}" if type(error).__name__ not in text else text


@dataclass(frozen=True)
class TileTransform:
    """Tile -> backbone input: the centred square of the tile resized (bilinear, antialiased)
    to ``input_size`` pixels, as uint8 HWC. ``mean``/``std`` normalisation happens on the
    device, inside the model wrapper, so workers ship 4x fewer bytes."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """(input_size, input_size, 3) uint8 array of the RGB ``image``."""
        size = self.input_size
        width, height = image.size
        if (width, height) != (size, size):
            side = min(width, height)
            box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
            image = image.resize((size, size), Image.BILINEAR, box=box)
        return np.asarray(image, dtype=np.uint8)

    def describe(self) -> str:
        """A stable text that changes whenever the transform's output would change."""
        mean = ",".join(f"{v:g}" for v in self.mean)
        std = ",".join(f"{v:g}" for v in self.std)
        return (
            f"rgb(alpha->white,16bit->8bit)|center_square|resize({self.input_size},bilinear,antialias,PIL)"
            f"|to_float(/255)|normalize(mean=[{mean}],std=[{std}])"
        )
