"""How training meets its bags: class-imbalance weights, the order of each epoch, and whether
bags are read into memory or streamed (the loading plan).

- ``class_counts`` / ``inverse_frequency_weights``: bags per class, and the class weights of
  ``--balance loss`` and ``--balance sampler``.
- ``epoch_order``: the seeded order (or class-balanced draw) of one training epoch.
- ``capped_batches``: that order cut into batches of at most ``batch_size`` bags and at most
  MAX_BATCH_INSTANCES padded instances, so bags of very different sizes cannot blow up a batch.
- ``memory_budget`` / ``plan_loading``: memory or streaming (``--in_memory auto``: in memory when
  the cache fits the budget, IN_MEMORY_FRACTION of the available memory or $CLAM_MEMORY_BUDGET),
  loader workers and compute threads, as a ``LoaderPlan``.

A bottom-layer module: it knows bags only as objects with a ``label``, and imports nothing of clam.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from feature_extraction.errors import PipelineError
from feature_extraction.runtime import available_cores

# --in_memory auto reads a cache into memory when it is at most this share of the available memory
# (docs/training.md, "Caches larger than memory": in memory, the process holds the cache once, as stored).
IN_MEMORY_FRACTION = 0.5
MEMORY_BUDGET_ENV = "CLAM_MEMORY_BUDGET"  # overrides the budget: bytes, or e.g. 8G, 512M
# A padded batch holds at most this many instance rows (bags x the longest bag's instances), whatever
# --batch_size says. At 1024-d a training step at the cap took 256 MiB of features and 1.5 GiB more
# for the forward and backward pass of CLAM-SB small (24 KiB per instance; docs/training.md).
MAX_BATCH_INSTANCES = 65_536


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


def capped_batches(
    order: Iterable[int], lengths: Sequence[int], batch_size: int, max_instances: int | None = None
) -> list[list[int]]:
    """``order`` (dataset indices) cut, in order, into batches of at most ``batch_size`` bags whose
    padded size, bags x the longest bag's instances (``lengths[index]``), is at most
    ``max_instances`` (default MAX_BATCH_INSTANCES). A bag longer than that is a batch of its own;
    with ``batch_size`` 1 every bag is."""
    max_instances = MAX_BATCH_INSTANCES if max_instances is None else max_instances
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        widest = max(longest, lengths[index])
        if current and (len(current) >= batch_size or (len(current) + 1) * widest > max_instances):
            batches.append(current)
            current, widest = [], lengths[index]
        current.append(index)
        longest = widest
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class LoaderPlan:
    """How bags reach the model, and why; recorded in config.json."""

    in_memory: bool
    num_workers: int
    torch_threads: int
    reason: str


def available_memory_bytes() -> int:
    """Memory that can be had without swapping: Linux's MemAvailable (free memory plus the page
    cache and buffers the kernel can reclaim); elsewhere the free pages; 4 GiB if neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"512MiB"``, ``"1.5g"`` or a plain byte count, in bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise PipelineError(
            f"{MEMORY_BUDGET_ENV}={text!r} is not a size: give bytes, or a number with K, M, G or T "
            "(e.g. 8G), or unset it to use half the available memory."
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def memory_budget() -> tuple[int, str]:
    """The bytes a cache may take in memory under ``--in_memory auto``, and where that comes from:
    $CLAM_MEMORY_BUDGET when set, else IN_MEMORY_FRACTION of the available memory now."""
    given = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if given:
        return parse_bytes(given), f"{MEMORY_BUDGET_ENV}={given}"
    available = available_memory_bytes()
    share = f"{IN_MEMORY_FRACTION:g} x the {available / 2**30:.1f} GiB available"
    return int(IN_MEMORY_FRACTION * available), share


def plan_loading(
    total_bytes: int, in_memory: str, requested_workers: int, device: torch.device
) -> LoaderPlan:
    """Choose memory or streaming, loader workers and compute threads so that they never
    compete for the same cores (oversubscribed, a training loop ran 14 x slower here).

    ``in_memory``: "auto" (memory when the cache, ``total_bytes`` as stored, fits ``memory_budget()``),
    "yes" or "no"."""
    cores = available_cores()
    threads = max(1, min(torch.get_num_threads(), cores))  # honours OMP_NUM_THREADS
    size = f"{total_bytes / 2**20:.1f} MiB of features"
    use_memory = in_memory == "yes"
    why = "--in_memory yes"
    if in_memory == "auto":
        budget, source = memory_budget()
        use_memory = total_bytes <= budget
        why = f"{'within' if use_memory else 'over'} the budget of {budget / 2**30:.1f} GiB ({source})"
    if use_memory:
        return LoaderPlan(
            True,
            0,
            threads,
            f"{size} read into memory once ({why}); bags are sliced in the main process, so loader "
            "workers would only add inter-process copies "
            f"(--num_workers {requested_workers} not needed)",
        )
    size = f"{size} ({why})" if in_memory == "auto" else size
    if requested_workers <= 0:
        return LoaderPlan(
            False, 0, threads, f"{size} streamed from disk in the main process (--num_workers 0)"
        )
    if device.type == "cpu":
        # Workers only read HDF5 rows, mostly waiting on the disk: the first shares the model's cores
        # (a worker used about 14 ms of CPU per 16 MB bag; on 2 cores, 1 worker + 2 threads trained a
        # streamed epoch in 12.5 s, 1 worker + 1 thread in 16.0 s), the others take one core each.
        workers = min(requested_workers, max(1, cores // 2))
        threads = max(1, min(threads, cores - workers + 1))
    else:
        workers = min(requested_workers, max(1, cores - 1))
    return LoaderPlan(
        False,
        workers,
        threads,
        f"{size} streamed from disk by {workers} loader workers (of {requested_workers} asked, "
        f"{cores} cores) while the model uses {threads} threads",
    )
