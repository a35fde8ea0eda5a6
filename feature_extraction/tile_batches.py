"""What the embedding engine's DataLoader hands out: decoded tiles, stacked into batches.

``TileDataset`` decodes one tile (in a worker process) and times it; ``collate_tiles`` stacks a
batch into one shared uint8 tensor, keeping the slide position, row and error of every tile and
the seconds spent decoding them (for ``throughput``'s account of where the time went).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from feature_extraction.sources import TileRef, TileTransform


class TileDataset(Dataset):
    """Items are (slide position, row, TileRef) triples handed out by the batch sampler;
    returns (position, row, (S, S, 3) uint8 array or None, error text or "", seconds decoding)."""

    def __init__(self, transform: TileTransform) -> None:
        self.transform = transform

    def __getitem__(self, item: tuple[int, int, TileRef]) -> tuple[int, int, np.ndarray | None, str, float]:
        position, row, tile = item
        started = time.perf_counter()
        try:
            pixels, error = self.transform(tile.load()), ""
        except Exception as failure:  # TileError, or anything a broken file provokes: skip the tile
            pixels, error = None, str(failure) or type(failure).__name__
        return position, row, pixels, error, time.perf_counter() - started


def collate_tiles(items: list[tuple[int, int, np.ndarray | None, str, float]], size: int):
    """Stack one batch: (positions, rows, (N, S, S, 3) uint8 tensor, errors, seconds decoding it)."""
    images = torch.empty((len(items), size, size, 3), dtype=torch.uint8)
    if get_worker_info() is not None:
        images.share_memory_()  # written once, sent to the main process without another copy
    pixels = images.numpy()
    for i, (_, _, array, _, _) in enumerate(items):
        pixels[i] = 0 if array is None else array
    positions = [item[0] for item in items]
    rows = [item[1] for item in items]
    return positions, rows, images, [item[3] for item in items], sum(item[4] for item in items)


class TileCollate:
    """A picklable collate_fn bound to the input size."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, items):
        return collate_tiles(items, self.size)
