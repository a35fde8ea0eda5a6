"""What a slide and a tile are, how a tile's pixels are decoded, and which files are which.

The bottom of the slide readers: the tile-folder reader (``tile_folder``), the whole-slide
reader (``wsi``, ``wsi_plan``) and the dispatcher over them (``layout``) all build on this
module, which imports none of them.

    SlideSource   one slide to embed: a patient folder of tiles, or one whole-slide image file
    TileRef       one tile of a slide; ``load()`` decodes it into RGB (TileError when it cannot)
    SlideTiles    the tiles of one slide chosen for embedding
    select_subset the seeded ``max_tiles`` subset, the same for tile folders and whole slides
    is_tile_image / is_whole_slide_file / whole_slide_files / slide_tile_folders /
    is_mirax_companion
                  which files and folders are tiles, slides, the tiles of one slide of a patient,
                  or the data folder of a MIRAX slide
    decode_rgb, TileTransform   an image file -> 8-bit RGB -> the backbone's input
    fast_decode   the faster decoders decode_rgb uses for JPEG and PNG tiles when installed

The subset: when a slide has more than ``max_tiles`` tiles, each tile is ranked by
sha256(seed, slide_id, tile name) and the ``max_tiles`` lowest are kept, in listing order.
That depends on nothing but those three values, so it is the same on every run, machine,
Python and NumPy version, and adding one tile to a folder changes at most one tile of the
subset.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# Whole-slide scanner formats: such a file is a slide wherever it lies.
WSI_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif")
# A .tif/.tiff is a slide only when it looks like one (see is_whole_slide_file); else a tile.
TIFF_SUFFIXES = (".tif", ".tiff")
# A TIFF without a pyramid still counts as a slide when it is tiled and at least this large.
MIN_SLIDE_SIDE = 4096
SUBSET_RULE = "sha256-rank(seed,slide_id,tile_name)"  # part of the cache key: change it if the rule changes

# A tile larger than this (pixels) is skipped as a possible decompression bomb; PIL's own
# limit is checked on the header, before any pixel is decoded.
MAX_TILE_PIXELS = Image.MAX_IMAGE_PIXELS


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


def select_subset(names: list[str], slide_id: str, max_tiles: int, seed: int) -> list[int]:
    """Indices (ascending) of the ``max_tiles`` tiles kept; all of them when ``max_tiles <= 0``."""
    if max_tiles <= 0 or len(names) <= max_tiles:
        return list(range(len(names)))
    prefix = f"{seed}\x00{slide_id}\x00".encode()
    ranks = [hashlib.sha256(prefix + name.encode("utf-8")).digest() for name in names]
    kept = sorted(range(len(names)), key=lambda i: (ranks[i], names[i]))[:max_tiles]
    return sorted(kept)


# --------------------------------------------------------------------------- which files are which


def is_tile_image(name: str | Path) -> bool:
    """True for a file name ending in a tile image suffix (TILE_SUFFIXES, any letter case)."""
    return str(name).lower().endswith(TILE_SUFFIXES)


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
        import tifffile  # optional (the ``wsi`` extra), so imported here: tile cohorts never need it
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


def slide_tile_folders(folder: str | Path) -> list[Path]:
    """The sub-folders of ``folder`` named after a slide file (``A.svs/``, ``B.tif/``), sorted by
    name: inside a patient folder, each holds the tiles of that one slide (what ``tile_slides``
    writes for a patient with several slides)."""
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            suffix = os.path.splitext(entry.name)[1].lower()
            if not entry.name.startswith(".") and suffix in WSI_SUFFIXES + TIFF_SUFFIXES and entry.is_dir():
                found.append(Path(entry.path))
    return sorted(found, key=lambda p: p.name)


def is_mirax_companion(folder: Path) -> bool:
    """A MIRAX slide is ``name.mrxs`` plus a folder ``name/`` of its data: not a patient folder."""
    return folder.is_dir() and folder.with_name(folder.name + ".mrxs").is_file()


# --------------------------------------------------------------------------- decoding


def decode_rgb(path: str | Path) -> Image.Image:
    """Decode an image file into 8-bit RGB; raise TileError when it cannot be used.

    Transparent pixels are composited on white (the background of a scanned slide);
    grayscale, palette, CMYK and 16-bit images are converted with their full range.

    The common tiles take a faster decoder when it is installed (``fast_decode``: simplejpeg for
    baseline JPEG, imagecodecs for 8-bit RGB PNG), which gives the same pixels as Pillow; every
    other file, and any file the fast decoder refuses, goes through Pillow (``pil_decode_rgb``)."""
    file = Path(path)
    data = _read_bytes(file)
    if data == b"":
        raise TileError("empty file (0 bytes)")
    array = None if data is None else _fast_decode_bytes(data)
    if array is not None:
        return Image.fromarray(array)
    return pil_decode_rgb(file)  # also names the error of a file that cannot be read


def _read_bytes(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:  # missing, a folder, unreadable: Pillow's attempt names the error
        return None


def pil_decode_rgb(path: str | Path) -> Image.Image:
    """``decode_rgb`` through Pillow alone (and tifffile for the TIFFs Pillow cannot read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_TILE_PIXELS:
                    raise TileError(
                        f"{width}x{height} pixels is larger than the {MAX_TILE_PIXELS} pixel limit"
                    )
                image.load()
                return to_rgb(image)
    except TileError:
        raise
    except Exception as error:  # PIL raises many types for malformed files; any of them means "skip"
        fallback = _tifffile_rgb(Path(path))
        if fallback is not None:
            return fallback
        raise TileError(_describe(error, Path(path))) from error


# --------------------------------------------------------------------------- faster decoders

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_FAST_DECODERS: dict[str, Any] = {}


def _fast_module(name: str) -> Any:
    """simplejpeg or imagecodecs when installed, else None (looked up once per process)."""
    if name not in _FAST_DECODERS:
        try:
            _FAST_DECODERS[name] = importlib.import_module(name)
        except ImportError:
            _FAST_DECODERS[name] = None
    return _FAST_DECODERS[name]


def fast_decoders() -> dict[str, str]:
    """Which fast decoder serves which format in this process: {"jpeg": ..., "png": ...} ("pillow": none)."""
    return {
        "jpeg": "simplejpeg" if _fast_module("simplejpeg") else "pillow",
        "png": "imagecodecs" if _fast_module("imagecodecs") else "pillow",
    }


def fast_decode(path: Path) -> np.ndarray | None:
    """(H, W, 3) uint8 pixels of a baseline JPEG (YCbCr or gray) or an 8-bit RGB PNG without
    transparency, decoded by simplejpeg / imagecodecs; None for any other file, when the package
    is missing, or when the decoder refuses the file (Pillow then decides, and names the error).

    Both libraries decode exactly as Pillow does (libjpeg-turbo with the accurate DCT and fancy
    upsampling; lossless PNG), so the pixels, and the features, do not depend on which one ran:
    tests/test_tiles.py checks that on real H&E tiles."""
    data = _read_bytes(Path(path))
    return None if data is None else _fast_decode_bytes(data)


def _fast_decode_bytes(data: bytes) -> np.ndarray | None:
    try:
        if data.startswith(_JPEG_SIGNATURE):
            return _fast_jpeg(data)
        if data.startswith(_PNG_SIGNATURE):
            return _fast_png(data)
    except Exception:  # noqa: BLE001 - a refused file is Pillow's to decode or to name
        return None
    return None


def _fast_jpeg(data: bytes) -> np.ndarray | None:
    simplejpeg = _fast_module("simplejpeg")
    if simplejpeg is None:
        return None
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace not in ("YCbCr", "Gray") or height * width > MAX_TILE_PIXELS:
        return None  # CMYK, YCCK, Adobe RGB, or too large: Pillow converts or refuses it
    # strict: a truncated or corrupt file raises instead of coming back padded with grey.
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)


def _fast_png(data: bytes) -> np.ndarray | None:
    imagecodecs = _fast_module("imagecodecs")
    if imagecodecs is None or not _plain_rgb_png(data):
        return None
    array = imagecodecs.png_decode(data)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        return None
    return array


def _plain_rgb_png(data: bytes) -> bool:
    """An 8-bit RGB PNG (colour type 2) within MAX_TILE_PIXELS, with no tRNS chunk before its
    pixels (a transparent colour, which Pillow composites on white)."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    if data[24] != 8 or data[25] != 2 or width * height > MAX_TILE_PIXELS:
        return False
    offset = 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"tRNS":
            return False
        if kind == b"IDAT":
            return True
        offset += 12 + length
    return False


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
        return Image.fromarray(np.clip(np.nan_to_num(values) * scale, 0, 255).astype(np.uint8), "L").convert(
            "RGB"
        )
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
        import tifffile  # optional (the ``wsi`` extra), so imported here: tile cohorts never need it

        array = np.asarray(tifffile.imread(path, key=0))
    except Exception:
        return None
    if array.ndim == 2:
        array = array[..., None]
    if (
        array.ndim != 3
        or array.shape[-1] not in (1, 2, 3, 4)
        or array.shape[0] * array.shape[1] > MAX_TILE_PIXELS
    ):
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
    to ``input_size`` pixels, as uint8 HWC. With ``resize_size`` larger than ``input_size`` the
    square is resized to ``resize_size`` and its centre ``input_size`` pixels kept (resize then
    centre crop, in one resampling of the matching centre of the tile). ``mean``/``std``
    normalisation happens on the device, inside the model wrapper, so workers ship 4x fewer bytes."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_size: int = 0  # 0 (or input_size): no crop

    def __call__(self, image: Image.Image) -> np.ndarray:
        """(input_size, input_size, 3) uint8 array of the RGB ``image``."""
        size = self.input_size
        width, height = image.size
        cropped = self.resize_size > size
        if (width, height) != (size, size) or cropped:
            side = min(width, height) * (size / self.resize_size if cropped else 1.0)
            box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
            image = image.resize((size, size), Image.BILINEAR, box=box)
        return np.asarray(image, dtype=np.uint8)

    def describe(self) -> str:
        """A stable text that changes whenever the transform's output would change."""
        mean = ",".join(f"{v:g}" for v in self.mean)
        std = ",".join(f"{v:g}" for v in self.std)
        crop = (
            f"resize({self.resize_size},bilinear,antialias,PIL)|center_crop({self.input_size})"
            if self.resize_size > self.input_size
            else f"resize({self.input_size},bilinear,antialias,PIL)"
        )
        return (
            f"rgb(alpha->white,16bit->8bit)|center_square|{crop}"
            f"|to_float(/255)|normalize(mean=[{mean}],std=[{std}])"
        )
