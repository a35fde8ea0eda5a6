"""How fast an embedding run goes, and why: the batch size a GPU can hold, and where the time went.

``settle_batch_size`` fits ``--batch_size auto`` to a CUDA device's free memory once the model is
on it. ``ThroughputMeter`` times the batch loop of ``extractor.EmbeddingRun``: how long the main
loop waited for the DataLoader (the device waiting for decoded tiles), how long the decode workers
spent decoding, and, from the runner, how long the device computed (``busy_seconds``: see
``runtime``). ``Throughput`` turns these into shares of the run's time, a verdict (decode-bound,
compute-bound, balanced or host-bound) and an action, shown in the progress bar, the summary, and
one line per run and process appended to ``embed_runs.jsonl`` in the cache folder.

The clock of a pass starts when its first batch arrives: starting the workers and decoding the
first batch (``startup_seconds``) are a fixed cost, reported apart, that says nothing about the
steady state. The accounting costs a few clock reads per batch and one per tile in the workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from feature_extraction.runtime import (
    ComputePlan,
    OnnxRunner,
    TorchRunner,
    decode_cores,
    max_decode_workers,
    thread_budget,
)

MAX_AUTO_BATCH = 512
MEMORY_HEADROOM = 0.25  # "auto" on CUDA leaves this share of the free memory unused
MEMORY_PROBE_TILES = (4, 16)  # the two batches whose peak memory gives the per-tile cost
DECODE_BOUND_WAIT = 0.15  # the device waits for tiles at least this share of the time: decode-bound
HOST_BOUND_OTHER = 0.15  # the device idles, with tiles ready, at least this share: host-bound
COMPUTE_BOUND_BUSY = 0.80  # the device is busy at least this share ...
DECODE_SATURATED = 0.80  # ... and the decode workers less than this: compute-bound (else balanced)
WORKER_MARGIN = 1.15  # decode workers suggested: this much more decoding than the device consumes
RUN_LOG = "embed_runs.jsonl"  # in the cache folder: one JSON line per run and process
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ --batch_size auto


def fit_batch_size(
    free_bytes: float,
    fixed_bytes: float,
    per_tile_bytes: float,
    headroom: float = MEMORY_HEADROOM,
    cap: int = MAX_AUTO_BATCH,
) -> int:
    """The largest power of two b <= ``cap`` with fixed + b x per_tile <= free x (1 - headroom);
    1 when not even 2 fits (the run then says what it can: an out-of-memory error)."""
    budget = free_bytes * (1.0 - headroom) - fixed_bytes
    batch = 1
    while batch * 2 <= cap and batch * 2 * per_tile_bytes <= budget:
        batch *= 2
    return batch


def linear_memory(
    peak_bytes: Callable[[int], float], sizes: tuple[int, int] = MEMORY_PROBE_TILES
) -> tuple[float, float]:
    """(fixed, per-tile) bytes of a forward pass, from its peak memory at two batch sizes. When the
    peak did not grow (allocator rounding), all of the larger batch's peak counts per tile."""
    small, large = sizes
    low, high = peak_bytes(small), peak_bytes(large)
    if high <= low:
        return 0.0, max(high / large, 1.0)
    per_tile = (high - low) / (large - small)
    return max(low - small * per_tile, 0.0), per_tile


def settle_batch_size(runner: TorchRunner | OnnxRunner, plan: ComputePlan) -> ComputePlan:
    """``plan`` with a batch size "auto" on CUDA fitted to the device: the free memory with the
    model on it (``torch.cuda.mem_get_info``), the memory of a tile from two short forward passes
    (``TorchRunner.peak_bytes``: peak allocated memory, input to output), ``MEMORY_HEADROOM`` kept
    free, at most 512 (``fit_batch_size``). Any other plan is returned as it is."""
    if not plan.batch_auto or not isinstance(runner, TorchRunner):
        return plan
    fixed, per_tile = linear_memory(runner.peak_bytes)
    runner.busy_seconds = 0.0  # the probe is not part of the run
    free = device_free_bytes(runner.device)
    batch = fit_batch_size(free, fixed, per_tile)
    log.info(
        f"--batch_size auto: {batch} ({free / 2**30:.1f} GiB free on {runner.device}, "
        f"{per_tile / 2**20:.1f} MiB per tile + {fixed / 2**20:.0f} MiB, {MEMORY_HEADROOM:.0%} kept free)"
    )
    return replace(plan, batch_size=batch, batch_auto=False)


def device_free_bytes(device: torch.device) -> float:
    """Free memory of a CUDA device, counting what PyTorch's allocator holds unused as free."""
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    return float(free)


# ------------------------------------------------------------------------------ the accounting


class ThroughputMeter:
    """Clock reads in the batch loop: ``start_pass``, then per batch ``arrived`` (just after the
    DataLoader handed it over) and ``done`` (before asking for the next), then ``end_pass``."""

    def __init__(self) -> None:
        self.wall = self.startup = self.tile_wait = self.decode = 0.0
        self.n_batches = self.n_tiles = self.n_decoded = 0
        self._pass_started = self._first = self._mark = 0.0
        self._in_pass = False

    def start_pass(self) -> None:
        self._pass_started, self._first, self._in_pass = time.perf_counter(), 0.0, True

    def arrived(self, n_tiles: int, decode_seconds: float) -> None:
        now = time.perf_counter()
        if not self._first:  # the first batch of a pass: workers started, first tiles decoded
            self._first = now
            self.startup += now - self._pass_started
        else:
            self.tile_wait += now - self._mark
            self.decode += decode_seconds
            self.n_decoded += n_tiles
        self.n_batches += 1
        self.n_tiles += n_tiles

    def done(self) -> None:
        self._mark = time.perf_counter()

    def end_pass(self) -> None:
        if self._in_pass and self._first:
            self.wall += time.perf_counter() - self._first
        self._in_pass = False

    def result(self, plan: ComputePlan, runtime: str, busy_seconds: float) -> Throughput:
        """The figures so far (mid-pass too: the progress bar's)."""
        wall = self.wall + (time.perf_counter() - self._first if self._in_pass and self._first else 0.0)
        accelerator = plan.device != "cpu"
        return Throughput(
            wall_seconds=wall,
            startup_seconds=self.startup,
            busy_seconds=busy_seconds,
            tile_wait_seconds=self.tile_wait,
            decode_seconds=self.decode,
            n_batches=self.n_batches,
            n_tiles=self.n_tiles,
            n_decoded=self.n_decoded,
            device=plan.device,
            runtime=runtime,
            batch_size=plan.batch_size,
            num_workers=plan.num_workers,
            cores=decode_cores() if accelerator else thread_budget(),
            max_workers=max_decode_workers(on_cpu=not accelerator),
        )


@dataclass(frozen=True)
class Throughput:
    """Where a run's time went. Shares are of ``wall_seconds`` (from each pass's first batch to its
    last): ``busy`` the device computing, ``waiting`` the device idle while the main loop waited for
    decoded tiles, ``other`` the rest (the device idle with tiles at hand: gathering rows, queueing
    bag writes). ``decode_load``: how busy the decode workers were (1 - the share of their time
    they waited for the device); with no worker, the main process decodes."""

    wall_seconds: float
    startup_seconds: float
    busy_seconds: float
    tile_wait_seconds: float
    decode_seconds: float  # worker-seconds decoding the tiles after each pass's first batch
    n_batches: int
    n_tiles: int
    n_decoded: int  # tiles whose decoding ``decode_seconds`` counts
    device: str
    runtime: str
    batch_size: int
    num_workers: int
    cores: int  # this process's: threads on a CPU, its share of the node's cores on an accelerator
    max_workers: int  # the most decode workers the plan starts (runtime.max_decode_workers)

    @property
    def accelerator(self) -> bool:
        return self.device != "cpu"

    @property
    def busy(self) -> float:
        return min(1.0, self.busy_seconds / self.wall_seconds) if self.wall_seconds > 0 else 0.0

    @property
    def waiting(self) -> float:
        if self.wall_seconds <= 0:
            return 0.0
        idle = max(0.0, self.wall_seconds - self.busy_seconds)  # an asynchronous device computes meanwhile
        return min(self.tile_wait_seconds, idle) / self.wall_seconds

    @property
    def other(self) -> float:
        return max(0.0, 1.0 - self.busy - self.waiting)

    @property
    def decode_load(self) -> float:
        if self.wall_seconds <= 0:
            return 0.0
        return min(1.0, self.decode_seconds / (self.wall_seconds * max(1, self.num_workers)))

    @property
    def workers_needed(self) -> int:
        """Decode workers that would keep the device busy: decode time per tile over device time
        per tile, with ``WORKER_MARGIN``; 0 when either is unknown."""
        if not self.n_decoded or not self.n_tiles or self.busy_seconds <= 0:
            return 0
        ratio = (self.decode_seconds / self.n_decoded) / (self.busy_seconds / self.n_tiles)
        return max(1, math.ceil(ratio * WORKER_MARGIN))

    @property
    def verdict(self) -> str:
        if self.waiting >= DECODE_BOUND_WAIT and self.waiting >= self.other:
            return "decode-bound"
        if self.other >= HOST_BOUND_OTHER:
            return "host-bound"
        if self.busy >= COMPUTE_BOUND_BUSY and self.decode_load < DECODE_SATURATED:
            return "compute-bound"
        return "balanced"

    def advice(self) -> str:
        verdict, needed = self.verdict, self.workers_needed
        if verdict == "decode-bound":
            if self.num_workers < self.max_workers and needed > self.num_workers:
                return f"try --num_workers {min(needed, self.max_workers)}"
            if not self.accelerator:
                return (
                    f"a CPU run starts at most {self.max_workers} decode workers (they share the cores "
                    "with the backbone); JPEG tiles decode 2-3x faster than PNG"
                )
            return (
                f"decoding needs about {needed} workers and this process has {self.cores} cores: "
                "more cores, or JPEG tiles (2-3x faster to decode than PNG)"
            )
        if verdict == "host-bound":
            return "the main process (gathering rows, queueing bag writes) is the limit: try a larger --batch_size"
        if verdict == "compute-bound":
            if not self.accelerator:
                return "the backbone is the limit, as planned on a CPU"
            spare = f"; {needed} decode workers would do" if 0 < needed < self.num_workers else ""
            return f"the device is the limit: more decode workers will not help{spare}"
        return "decoding and the device keep pace: more speed needs both"

    def describe(self) -> str:
        """E.g. "device busy 41%, waiting for tiles 59% (decode workers busy 97%): decode-bound;
        16 cores, 4 decode workers; try --num_workers 14"."""
        other = f", other {self.other:.0%}" if self.other >= 0.05 else ""
        workers = "decode workers busy" if self.num_workers else "decoding in the main process:"
        return (
            f"device busy {self.busy:.0%}, waiting for tiles {self.waiting:.0%}{other} "
            f"({workers} {self.decode_load:.0%}): {self.verdict}; "
            f"{self.cores} cores, {self.num_workers} decode worker{'' if self.num_workers == 1 else 's'}; "
            f"{self.advice()}"
        )

    def postfix(self) -> str:
        return f"busy {self.busy:.0%}, waiting {self.waiting:.0%}: {self.verdict}"

    def as_record(self) -> dict:
        """The figures, shares, verdict and advice, as JSON values."""
        return {
            **asdict(self),
            "device_busy": round(self.busy, 4),
            "waiting_for_tiles": round(self.waiting, 4),
            "other": round(self.other, 4),
            "decode_workers_busy": round(self.decode_load, 4),
            "verdict": self.verdict,
            "advice": self.advice(),
        }


def append_run_record(cache_dir: Path, throughput: Throughput, **fields) -> Path | None:
    """Append one JSON line (when, which process, ``fields``, the figures) to ``embed_runs.jsonl``
    in the cache folder. One ``write`` per line in append mode, so processes sharing the folder do
    not interleave (on a local file system). A failure only warns: the bags are what matters."""
    record = {
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "pid": os.getpid(),
        **fields,
        **throughput.as_record(),
    }
    path = Path(cache_dir) / RUN_LOG
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
    except OSError as error:
        log.warning(f"could not append this run's figures to {path}: {error}")
        return None
    return path
