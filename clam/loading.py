"""How training meets its bags: class-imbalance weights, the order of each epoch, and whether
bags are read into memory or streamed (the loading plan).

- ``class_counts`` / ``inverse_frequency_weights``: bags per class, and the class weights of
  ``--balance loss`` and ``--balance sampler``.
- ``epoch_order``: the seeded order (or class-balanced draw) of one training epoch.
- ``plan_loading``: memory or streaming, loader workers and compute threads, as a ``LoaderPlan``.

A bottom-layer module: it knows bags only as objects with a ``label``, and imports nothing of clam.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from feature_extraction.runtime import available_cores

IN_MEMORY_FRACTION = 0.25  # a cache up to this share of the free memory is read into memory once


class Labelled(Protocol):
    """Anything with a class index ``label`` (a ``clam.data.BagRecord``)."""

    @property
    def label(self) -> int: ...


def class_counts(records: Sequence[Labelled], n_classes: int) -> list[int]:
    counts = Counter(r.label for r in records)
    return [counts.get(c, 0) for c in range(n_classes)]


def inverse_frequency_weights(counts: Sequence[int]) -> list[float]:
    """Class weights n / (classes present x n_c): a mean weight of 1 per bag; 0 for absent classes."""
    present = [c for c in counts if c > 0]
    total = sum(present)
    return [total / (len(present) * c) if c > 0 else 0.0 for c in counts]


def epoch_order(
    records: Sequence[Labelled], n_classes: int, seed: int, epoch: int, balanced: bool
) -> list[int]:
    """The bags of training epoch ``epoch``, in a seeded order: a permutation, or with ``balanced``
    a draw with replacement in which every class is equally likely (CLAM's ``--weighted_sample``).

    Computed up front from (seed, epoch) alone, so a resumed run sees the order the first run
    would have seen, however the loader is iterated."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if not balanced:
        return torch.randperm(len(records), generator=generator).tolist()
    weights = inverse_frequency_weights(class_counts(records, n_classes))
    per_bag = torch.tensor([weights[r.label] for r in records], dtype=torch.float64)
    return torch.multinomial(per_bag, len(records), replacement=True, generator=generator).tolist()


@dataclass(frozen=True)
class LoaderPlan:
    """How bags reach the model, and why; recorded in config.json."""

    in_memory: bool
    num_workers: int
    torch_threads: int
    reason: str


def available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def plan_loading(
    total_bytes: int, in_memory: str, requested_workers: int, device: torch.device
) -> LoaderPlan:
    """Choose memory or streaming, loader workers and compute threads so that they never
    compete for the same cores (oversubscribed, a training loop ran 14 x slower here).

    ``in_memory``: "auto" (memory when the cache is at most IN_MEMORY_FRACTION of free memory),
    "yes" or "no"."""
    cores = available_cores()
    threads = max(1, min(torch.get_num_threads(), cores))  # honours OMP_NUM_THREADS
    fits = total_bytes <= IN_MEMORY_FRACTION * available_memory_bytes()
    use_memory = in_memory == "yes" or (in_memory == "auto" and fits)
    size = f"{total_bytes / 2**20:.1f} MiB of features"
    if use_memory:
        return LoaderPlan(
            True,
            0,
            threads,
            f"{size} read into memory once; bags are sliced in the main process, so loader "
            "workers would only add inter-process copies "
            f"(--num_workers {requested_workers} not needed)",
        )
    if requested_workers <= 0:
        return LoaderPlan(
            False, 0, threads, f"{size} streamed from disk in the main process (--num_workers 0)"
        )
    if device.type == "cpu":
        # Workers only read HDF5 rows; leave the other cores to the model's arithmetic.
        workers = min(requested_workers, max(1, cores // 2))
        threads = max(1, min(threads, cores - workers))
    else:
        workers = min(requested_workers, max(1, cores - 1))
    return LoaderPlan(
        False,
        workers,
        threads,
        f"{size} streamed from disk by {workers} loader workers (of {requested_workers} asked, "
        f"{cores} cores) while the model uses {threads} threads",
    )
