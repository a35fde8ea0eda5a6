"""Serving validated bags to training and inference: the Dataset, the batches, the statistics.

- ``BagDataset`` serves each bag's instances as float32, or with ``sample_tiles`` up to that many
  (a fresh draw every training epoch, a fixed draw for validation), from memory when the cache is
  small (kept as stored: a float16 cache takes half the memory), else streamed from disk;
  ``instance_rows`` is that draw.
- ``collate_bags`` pads bags of different sizes into one ``BagBatch`` with a mask.
- ``feature_statistics`` streams the per-dimension mean and std of the training instances
  (for the model's feature standardisation).

The bags come as ``clam.data.BagRecord``s, validated by ``clam.data.validate_records``; a bag
whose file changed since is refused (``clam.data.BagChanged``). Bags are read only through
``feature_extraction.bags``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from clam.data import BagChanged, BagRecord, changed_bags
from feature_extraction.bags import read_features
from feature_extraction.errors import BagError, PipelineError


def instance_rows(
    n: int, sample_tiles: int, seed: int, slide_id: str, epoch: int | None
) -> np.ndarray | None:
    """Sorted rows (of ``n``) of the up to ``sample_tiles`` instances to use, or None for all of them.

    Training draws afresh each epoch (``epoch``); validation (``epoch=None``) always draws the
    same rows. Seeded by the slide id, not its position, so the draw does not depend on order."""
    if sample_tiles <= 0 or n <= sample_tiles:
        return None
    salt = zlib.crc32(slide_id.encode("utf-8"))
    rng = np.random.default_rng([seed, salt] if epoch is None else [seed, salt, epoch])
    return np.sort(rng.choice(n, size=sample_tiles, replace=False))


class BagDataset(torch.utils.data.Dataset):
    """Item ``i``: (features (n, D) float32 tensor, label, i): every instance of the bag (its
    ``record.rows`` when cut to ``--max_tiles``), or with ``sample_tiles`` > 0 a draw of up to that
    many: a fresh draw each training epoch (``set_epoch``), a fixed one with ``train=False``.

    ``in_memory``: read every bag once, now, keeping the stored dtype (float16 or float32); else read
    only the rows in use on each access, so memory is bounded by the batch whatever the size of
    the cache. Either way an item is float32."""

    def __init__(
        self,
        records: Sequence[BagRecord],
        sample_tiles: int = 0,
        seed: int = 0,
        train: bool = True,
        in_memory: bool = False,
        progress: bool = True,
    ) -> None:
        self.records = tuple(records)
        self.sample_tiles = sample_tiles
        self.seed, self.train = seed, train
        self.epoch = 1
        self.features: list[torch.Tensor] | None = None
        if in_memory:
            self.features = [
                torch.from_numpy(self._read(r, None, dtype=None))
                for r in tqdm(
                    self.records, desc="reading bags", unit="bag", disable=not progress, leave=False
                )
            ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """The instances each item holds (its bag's in use, at most ``sample_tiles`` when set)."""
        cap = self.sample_tiles if self.sample_tiles > 0 else None
        return [min(r.n_instances, cap) if cap else r.n_instances for r in self.records]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.instances(index, self.epoch if self.train else None), self.records[index].label, index

    def instances(self, index: int, epoch: int | None) -> torch.Tensor:
        """Bag ``index``'s instances for ``epoch`` (None: the fixed draw validation uses; without
        ``sample_tiles`` every instance in use), as a (n, D) float32 tensor."""
        record = self.records[index]
        draw = instance_rows(record.n_instances, self.sample_tiles, self.seed, record.slide_id, epoch)
        if self.features is not None:
            bag = self.features[index]
            return (bag if draw is None else bag[torch.from_numpy(draw)]).float()  # no copy when float32
        return torch.from_numpy(self._read(record, draw))

    @staticmethod
    def _read(record: BagRecord, draw: np.ndarray | None, dtype=np.float32) -> np.ndarray:
        """Rows ``draw`` (None: all) of the rows in use of the bag, read from its file as ``dtype``
        (None: as stored). Raises BagChanged when the file is not the one validated (checked
        before and after the read)."""
        rows = draw
        if record.rows is not None:
            rows = np.asarray(record.rows, dtype=np.int64) if draw is None else np.asarray(record.rows)[draw]
        if changed_bags([record]):
            raise BagChanged.of(record)
        try:
            features = read_features(record.path, rows=rows, dtype=dtype)
        except BagError:
            if changed_bags([record]):  # e.g. gone for a moment, or another bag under its name
                raise BagChanged.of(record) from None
            raise
        if changed_bags([record]):
            raise BagChanged.of(record)
        return features

    def changed(self) -> list[BagRecord]:
        """The bags of this dataset whose file changed since validation."""
        return changed_bags(self.records)

    def all_instances(self) -> Iterator[np.ndarray]:
        """Every instance in use of every bag, one (n, D) array per bag (streamed when not in memory;
        in memory, as stored)."""
        for index, record in enumerate(self.records):
            yield self.features[index].numpy() if self.features is not None else self._read(record, None)


@dataclass(frozen=True)
class FeatureStats:
    """Per-dimension mean and std (population) of a set of instances. ``std`` is 1 where a
    dimension is constant (``n_constant`` of them), so standardising never divides by zero."""

    mean: np.ndarray  # (D,) float64
    std: np.ndarray  # (D,) float64
    n_instances: int
    n_bags: int
    n_constant: int

    def describe(self) -> str:
        return (
            f"{self.n_instances} instances of {self.n_bags} training bags: mean in [{self.mean.min():.3g}, "
            f"{self.mean.max():.3g}], std in [{self.std.min():.3g}, {self.std.max():.3g}]"
            + (f", {self.n_constant} constant dimensions left unscaled" if self.n_constant else "")
        )

    def to_dict(self) -> dict:
        return {
            "n_instances": self.n_instances,
            "n_bags": self.n_bags,
            "n_constant_dims": self.n_constant,
            "mean_range": [float(self.mean.min()), float(self.mean.max())],
            "std_range": [float(self.std.min()), float(self.std.max())],
        }


CONSTANT_STD = 1e-6  # a dimension whose std is below this share of (|mean| + typical std) is constant


def feature_statistics(bags: Iterable[np.ndarray]) -> FeatureStats:
    """Mean and std per dimension over all instances of ``bags``, streamed one bag at a time
    (Chan et al.'s pairwise update, in float64): memory is one bag, whatever the cache size."""
    count, n_bags = 0, 0
    mean = m2 = None
    for bag in bags:
        x = np.asarray(bag, dtype=np.float64)
        if x.ndim != 2 or not len(x):
            continue
        n, bag_mean = len(x), x.mean(axis=0)
        bag_m2 = ((x - bag_mean) ** 2).sum(axis=0)
        if mean is None:
            mean, m2 = bag_mean, bag_m2
        else:
            delta = bag_mean - mean
            total = count + n
            mean = mean + delta * (n / total)
            m2 = m2 + bag_m2 + delta**2 * (count * n / total)
        count += n
        n_bags += 1
    if mean is None:
        raise PipelineError("no instances to compute feature statistics from: the training bags are empty.")
    std = np.sqrt(m2 / count)
    typical = float(np.sqrt(np.mean(std**2)))
    constant = std <= CONSTANT_STD * (np.abs(mean) + typical)
    return FeatureStats(mean, np.where(constant, 1.0, std), count, n_bags, int(constant.sum()))


@dataclass
class BagBatch:
    """B bags padded to the longest: features (B, N, D); mask (B, N), True for real instances,
    None when no bag is padded; labels (B,); indices (B,) into the dataset."""

    features: torch.Tensor
    mask: torch.Tensor | None
    labels: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device) -> BagBatch:
        non_blocking = device.type == "cuda"
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return BagBatch(move(self.features), move(self.mask), move(self.labels), self.indices)

    def pin_memory(self) -> BagBatch:
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return BagBatch(pin(self.features), pin(self.mask), pin(self.labels), self.indices)


def collate_bags(items: Sequence[tuple[torch.Tensor, int, int]]) -> BagBatch:
    lengths = [len(features) for features, _, _ in items]
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.long)
    indices = torch.tensor([index for _, _, index in items], dtype=torch.long)
    first = items[0][0]
    features = _batch_tensor((len(items), max(lengths), first.shape[1]), first)
    if len(set(lengths)) == 1:
        torch.stack([f for f, _, _ in items], out=features)
        return BagBatch(features, None, labels, indices)
    mask = torch.zeros(len(items), features.shape[1], dtype=torch.bool)
    for i, (bag, _, _) in enumerate(items):
        features[i, : len(bag)] = bag
        features[i, len(bag) :] = 0
        mask[i, : len(bag)] = True
    return BagBatch(features, mask, labels, indices)


def _batch_tensor(shape: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor for a batch. In a loader worker it is made in shared memory, as
    torch's own ``default_collate`` does, so that handing it to the training process copies
    nothing more (a streamed bag is then copied once after it is read, not twice)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=like.dtype)
    storage = like._typed_storage()._new_shared(math.prod(shape), device=like.device)
    return like.new(storage).resize_(shape)
