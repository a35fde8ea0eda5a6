"""One slide of the example cohort: its tissue, its witness tiles, its tile files.

A slide is a connected blob of grid cells, like tissue on a slide; a positive slide's witness
tiles are one contiguous focus of them (``witness_tile_range`` tiles). Each tile is a crop of a
texture source, stained with a slide-level and a tile-level jitter, with the planted signal
drawn over the witness tiles, and written as PNG or JPEG under its level-0 pixel coordinates.

Everything is drawn from a ``numpy`` generator seeded by (seed, split, true class folder,
patient), so a slide's tiles do not depend on the other slides nor on whether its label was
flipped. ``feature_extraction.example_cohort`` writes the slides of each split with
``write_slide``.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from feature_extraction.example_plan import CohortConfig, SlidePlan, witness_tile_range
from feature_extraction.example_tissue import (
    SIGNAL,
    SignalStyle,
    TextureSource,
    crop_tile,
    hed_to_rgb,
    plant_signal,
    rgb_to_hed,
)


def _slide_rng(config: CohortConfig, plan: SlidePlan) -> np.random.Generator:
    # Keyed by name, not position, so one slide's tiles do not depend on the others.
    key = hashlib.sha256(f"{plan.split}/{plan.class_folder}/{plan.patient_id}".encode()).digest()
    return np.random.default_rng([config.seed, int.from_bytes(key[:8], "little")])


def _tissue_grid(rng: np.random.Generator, n_tiles: int) -> list[tuple[int, int]]:
    """``n_tiles`` (row, col) cells forming one connected blob, like tissue on a slide."""
    cols = math.ceil(math.sqrt(n_tiles * 1.6))
    rows = math.ceil(n_tiles * 1.6 / cols)
    start = (int(rng.integers(rows)), int(rng.integers(cols)))
    cells, frontier = [start], []
    chosen = {start}
    while len(cells) < n_tiles:
        r, c = cells[-1]
        for cell in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= cell[0] < rows and 0 <= cell[1] < cols and cell not in chosen and cell not in frontier:
                frontier.append(cell)
        cell = frontier.pop(int(rng.integers(len(frontier))))
        chosen.add(cell)
        cells.append(cell)
    return sorted(cells)


def _signal_cells(
    rng: np.random.Generator, cells: list[tuple[int, int]], n_signal: int
) -> set[tuple[int, int]]:
    """The ``n_signal`` cells nearest a random cell: one contiguous focus, as a tumour region."""
    seed_cell = cells[int(rng.integers(len(cells)))]
    distance = [(abs(r - seed_cell[0]) + abs(c - seed_cell[1]), rng.random(), (r, c)) for r, c in cells]
    return {cell for _, _, cell in sorted(distance)[:n_signal]}


def _n_signal_tiles(rng: np.random.Generator, config: CohortConfig) -> int:
    low, high = witness_tile_range(config)
    return int(rng.integers(low, high + 1))


def write_slide(
    split_dir: Path,
    plan: SlidePlan,
    config: CohortConfig,
    sources: list[TextureSource],
    style: SignalStyle | None = None,
) -> dict:
    """Write the tiles of one slide into ``split_dir/<recorded class folder>/<patient>/`` and
    return its ground-truth record (tiles, witness tiles, true and recorded label)."""
    style = SIGNAL if style is None else style
    rng = _slide_rng(config, plan)
    cells = _tissue_grid(rng, config.tiles_per_slide)
    n_signal = _n_signal_tiles(rng, config) if plan.label == 1 else 0
    signal_cells = _signal_cells(rng, cells, n_signal) if n_signal else set()
    # Slide-level stain and source mix, drawn the same way for both labels (no confound).
    slide_alpha = rng.uniform(0.92, 1.08, size=3)
    slide_beta = rng.uniform(-0.03, 0.03, size=3)
    source_weights = rng.dirichlet(np.ones(len(sources)) * 2)
    folder = split_dir / plan.recorded_folder / plan.patient_id
    folder.mkdir(parents=True, exist_ok=True)
    tiles, signal_tiles = [], []
    for row, col in cells:
        name = f"tile_x{col * config.tile_size}_y{row * config.tile_size}.{config.image_format}"
        source = sources[int(rng.choice(len(sources), p=source_weights))]
        hed = rgb_to_hed(crop_tile(rng, source, config.tile_size))
        if (row, col) in signal_cells:
            hed = plant_signal(rng, hed, style)
            signal_tiles.append(name)
        alpha = slide_alpha * rng.uniform(0.98, 1.02, size=3)
        rgb = hed_to_rgb(hed * alpha.astype(np.float32) + slide_beta.astype(np.float32))
        (folder / name).write_bytes(_encode(rgb, config.image_format))
        tiles.append(name)
    return {
        "slide_id": plan.slide_id,
        "patient_id": plan.patient_id,
        "class_folder": plan.recorded_folder,
        "label": plan.label,
        "n_tiles": len(tiles),
        "tiles": tiles,
        "signal_tiles": signal_tiles,
        "signal_fraction": round(len(signal_tiles) / len(tiles), 4),
        "true_label": plan.label,
        "recorded_label": plan.recorded_label,
        "label_flipped": plan.flipped,
    }


def _encode(rgb: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        # Level 1: nearly the size of level 6 on tissue texture, at a third of the time.
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
