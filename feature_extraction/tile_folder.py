"""The tile-folder reader: the tiles of a slide that is a folder of tile images.

Listing: files ending in .png .jpg .jpeg .tif .tiff .bmp (any letter case), in sub-folders
too, sorted by their path relative to the slide folder (plain code-point order, the same on
every machine). Hidden files and folders are skipped; other files are ignored and counted.

Coordinates come from the tile's file name (see ``parse_coords``); a name without a
position gets ``COORD_SENTINEL`` (-1, -1). The ``max_tiles`` subset is
``sources.select_subset``, the same rule as for whole-slide images.

The whole-slide reader (``wsi_plan.list_wsi_tiles``) sits beside this module; neither imports
the other. ``layout.list_slide_tiles`` picks one of them by the slide's kind.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from feature_extraction.bags import COORD_SENTINEL
from feature_extraction.sources import SlideSource, SlideTiles, TileRef, is_tile_image, select_subset

_XY_TAGGED = re.compile(r"(?<![a-z])x[=_\-]?(\d+)[\s,_\-]*y[=_\-]?(\d+)(?!\d)", re.IGNORECASE)
_PARENTHESISED = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")
_TRAILING_PAIR = re.compile(r"(?:^|[_\-\s.])(\d+)[_\-](\d+)$")


def list_folder_tiles(slide: SlideSource, max_tiles: int = 100, seed: int = 0) -> SlideTiles:
    """The tiles of a tile-folder ``slide`` to embed: its ``max_tiles`` subset (every tile when
    ``max_tiles <= 0``), positions parsed from the names, and a digest of the listed files."""
    names, stats, ignored = _list_folder(slide.path)
    digest = hashlib.sha256()
    for name, (size, mtime_ns) in zip(names, stats):
        digest.update(f"{name}\t{size}\t{mtime_ns}\n".encode())
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
            if not is_tile_image(file):
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
