"""The embedding engine behind ``embed_cohort``: tiles in, one bag per slide out.

How a run goes: keep the slides whose bag is current (``cache.slide_status``); stream the tiles
of all other slides through one DataLoader, so batches span slide boundaries; decode in worker
processes; run the backbone; gather each slide's rows as batches return and hand a finished
slide to a writer thread, which writes its bag atomically (``bags.write_bag`` with
``BagAttrs``). Memory is bounded by the batches in flight: a slide of more than ``SPILL_BYTES``
of features is gathered in a file (plain writes, no memory map) and its bag written from there in
chunks, so peak memory does not grow with the slide's size. Each slide is locked while it is embedded, so several
processes (``torchrun --nproc_per_node N``, or two runs by accident) share the work without
doing any slide twice. A ``throughput.ThroughputMeter`` times the batch loop (``throughput()``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from feature_extraction import __version__
from feature_extraction.backbones import LoadedBackbone
from feature_extraction.bags import BagAttrs, RowFile, bag_path, write_bag
from feature_extraction.cache import (
    ExtractionConfig,
    clear_failure,
    remove_stale_temporaries,
    slide_status,
    sweep_leftovers,
    write_failure,
)
from feature_extraction.errors import PipelineError, os_error_text
from feature_extraction.locks import LOCK_DIR, SlideLocks
from feature_extraction.manifest import STATUS_OK
from feature_extraction.runtime import ComputePlan, OnnxRunner, TorchRunner, build_runner
from feature_extraction.sources import SlideTiles, TileRef, TileTransform
from feature_extraction.throughput import Throughput, ThroughputMeter, settle_batch_size
from feature_extraction.tile_batches import TileCollate, TileDataset

POSTFIX_EVERY = 8  # batches between two refreshes of the progress bar's figures
SPILL_BYTES = 32 * 2**20  # a slide's features above this size are gathered in a file, not in memory
MAX_PENDING_WRITES = 4  # finished slides waiting for the writer thread (bounds memory)
WAIT_POLL_SECONDS = 1.0  # how often to look at slides another process is embedding
log = logging.getLogger(__name__)


class Outcome(str, Enum):
    """What became of one slide in a run. A ``str``: compares equal to its value ("reused", ...)."""

    REUSED = "reused"  # its bag was already current
    EMBEDDED = "embedded"  # this process wrote its bag
    BY_OTHER = "by_other"  # another process (a torchrun rank, a parallel run) wrote it meanwhile
    FAILED = "failed"  # no bag: no readable tile (a failure record says why)

    def __str__(self) -> str:
        return self.value


@dataclass
class _SlideBuffer:
    """The rows of one slide while its batches come back: in memory (``features``), or, for a
    slide above SPILL_BYTES, written at their offsets in the raw float32 file ``spill``."""

    listing: SlideTiles
    features: np.ndarray | None
    spill: Path | None = None
    spill_fd: int | None = None
    features_dim: int = 0  # columns of the spill file
    errors: dict[int, str] = field(default_factory=dict)
    received: int = 0

    @property
    def complete(self) -> bool:
        return self.received >= len(self.listing.tiles)

    def put(self, row: int, vector: np.ndarray) -> None:
        if self.spill_fd is None:
            self.features[row] = vector
        else:
            data = np.ascontiguousarray(vector, dtype=np.float32)
            os.pwrite(self.spill_fd, data.tobytes(), row * data.nbytes)

    def rows_to_write(self, ok_rows: list[int]) -> np.ndarray | RowFile:
        """The matrix of ``ok_rows`` for write_bag: compacted in place, or read back from the spill file."""
        if self.spill_fd is None:
            return compact_rows(self.features, ok_rows)
        n, dim = len(self.listing.tiles), self.features_dim
        return RowFile(self.spill, n, dim, None if len(ok_rows) == n else np.asarray(ok_rows, np.int64))

    def close(self) -> None:
        """Free the rows: the array, or the spill file (closed and deleted)."""
        self.features = None
        if self.spill_fd is not None:
            os.close(self.spill_fd)
            self.spill_fd = None
        if self.spill is not None:
            self.spill.unlink(missing_ok=True)


class EmbeddingRun:
    """One run's state: locks, the runner (built on first need), the writer thread, outcomes.

    ``run(listings)`` embeds every listed slide whose bag is not current (``newer_than``: a bag
    written before that time is not current, for --overwrite); ``close()`` always follows."""

    def __init__(
        self,
        cache_dir: Path,
        config: ExtractionConfig,
        backbone: LoadedBackbone,
        transform: TileTransform,
        features_dir: Path,
        plan: ComputePlan,
        *,
        newer_than: float | None,
        run_started: float,
        progress: bool,
    ) -> None:
        self.cache_dir, self.config, self.backbone, self.transform = cache_dir, config, backbone, transform
        self.features_dir, self.plan, self.newer_than, self.run_started = (
            features_dir,
            plan,
            newer_than,
            run_started,
        )
        self.progress = progress
        self.cache_key = config.cache_key
        self.locks = SlideLocks(cache_dir)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bag-writer")
        self.writes: list[tuple[str, Future]] = []
        self.outcome: dict[str, Outcome] = {}
        self.runner: TorchRunner | OnnxRunner | None = None
        self.n_tiles = 0
        self.n_written = self.n_pass_slides = 0  # slides finished / open in the current pass (progress bar)
        self.seconds = 0.0
        self.meter = ThroughputMeter()
        self.n_gathered = 0
        self.bar: tqdm | None = None

    # -- the loop over passes

    def run(self, listings: list[SlideTiles]) -> None:
        sweep_leftovers(self.cache_dir, self.locks)  # what a killed run left behind
        for listing in listings:
            if self._status(listing) == STATUS_OK:
                self.outcome[listing.slide.slide_id] = Outcome.REUSED
        idle_passes = 0
        while True:
            open_slides = [listing for listing in listings if listing.slide.slide_id not in self.outcome]
            for listing in open_slides:  # finished by another process since we last looked?
                state = self._status(listing)
                if state:
                    self.outcome[listing.slide.slide_id] = (
                        Outcome.BY_OTHER if state == STATUS_OK else Outcome.FAILED
                    )
            open_slides = [listing for listing in open_slides if listing.slide.slide_id not in self.outcome]
            if not open_slides:
                return
            if all(self.locks.held_by_other(listing.slide.slide_id) for listing in open_slides):
                time.sleep(WAIT_POLL_SECONDS)  # the rest is in other processes' hands
                continue
            if self._embed_pass(open_slides) == 0:
                idle_passes += 1
                if idle_passes > 30:
                    raise PipelineError(
                        f"could not lock {len(open_slides)} slides in {self.cache_dir / LOCK_DIR} "
                        f"(e.g. {open_slides[0].slide.slide_id}); delete stale .lock files if no other run is active"
                    )
                time.sleep(WAIT_POLL_SECONDS)
            else:
                idle_passes = 0

    def _status(self, listing: SlideTiles) -> str | None:
        """STATUS_OK if the slide's bag is current, STATUS_FAILED if its failure was recorded during
        this run (by any process), else None (``cache.slide_status``)."""
        return slide_status(
            self.cache_dir,
            listing.slide.slide_id,
            self.cache_key,
            listing.tiles_digest,
            newer_than=self.newer_than,
            failed_since=self.run_started,
        )

    def _embed_pass(self, listings: list[SlideTiles]) -> int:
        """Embed the slides we can lock; return how many we locked."""
        if self.runner is None:
            self.runner = build_runner(self.backbone, self.plan, self.features_dir)
            self.plan = settle_batch_size(self.runner, self.plan)  # --batch_size auto on CUDA
            log.info(f"running {self.runner.name} on {self.plan.describe()}")
        plan = self.plan
        buffers: dict[int, _SlideBuffer] = {}
        locked = [0]
        self.n_written, self.n_pass_slides = 0, len(listings)
        total = sum(len(listing.tiles) for listing in listings)
        self.bar = tqdm(
            total=total,
            unit="tile",
            desc="embedding",
            disable=not self.progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        loader = DataLoader(
            TileDataset(self.transform),
            batch_sampler=self._batches(listings, buffers, locked),
            num_workers=plan.num_workers,
            collate_fn=TileCollate(self.transform.input_size),
            pin_memory=plan.device.startswith("cuda"),
        )
        threads = torch.get_num_threads()
        if plan.device == "cpu" and self.runner.name == "torch":
            torch.set_num_threads(plan.compute_threads)
        started = time.perf_counter()
        previous = None
        self.meter.start_pass()
        try:
            for positions, rows, images, errors, decode_seconds in loader:
                self.meter.arrived(len(positions), decode_seconds)
                valid = [i for i, error in enumerate(errors) if not error]
                if len(valid) == len(errors):
                    result = self.runner.start(images)
                else:
                    result = self.runner.start(images[valid]) if valid else None
                if previous is not None:  # gather the last batch while this one computes
                    self._gather(*previous, buffers)
                previous = (positions, rows, errors, valid, result)
                self.locks.refresh()
                self.meter.done()
            if previous is not None:
                self._gather(*previous, buffers)
            self.meter.end_pass()
            self._drain_writes(0)
            self.bar.total = self.bar.n  # slides other processes took are not ours to wait for
            self.bar.set_postfix_str(self._postfix())
        finally:
            torch.set_num_threads(threads)
            self.meter.end_pass()
            self.seconds += time.perf_counter() - started
            self.bar.close()
            for buffer in buffers.values():  # interrupted: drop unfinished slides, free their locks
                self._drop(buffer)
        return locked[0]

    def _batches(
        self, listings: list[SlideTiles], buffers: dict[int, _SlideBuffer], locked: list[int]
    ) -> Iterator[list[tuple[int, int, TileRef]]]:
        """Lazily lock slides and cut their tiles into batches that span slide boundaries.

        Runs in the main process as the DataLoader asks for work, so a slide is locked just
        before its tiles are decoded, not at the start of the run."""
        batch: list[tuple[int, int, TileRef]] = []
        for position, listing in enumerate(listings):
            slide_id = listing.slide.slide_id
            if not self.locks.try_acquire(slide_id):
                continue
            locked[0] += 1
            state = self._status(listing)  # it may have been finished while we were not looking
            if state:
                self.locks.release(slide_id)
                self.outcome[slide_id] = Outcome.BY_OTHER if state == STATUS_OK else Outcome.FAILED
                continue
            remove_stale_temporaries(self.cache_dir, slide_id)
            if not listing.tiles:
                # A whole slide without tissue or resolution, or unreadable, says why (wsi.py).
                self.record_failure(
                    listing,
                    listing.reason
                    or f"no image tiles in {listing.slide.path}"
                    + (f" ({len(listing.ignored)} non-image files ignored)" if listing.ignored else ""),
                )
                self.locks.release(slide_id)
                continue
            buffers[position] = self._new_buffer(listing)
            for row, tile in enumerate(listing.tiles):
                batch.append((position, row, tile))
                if len(batch) == self.plan.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _new_buffer(self, listing: SlideTiles) -> _SlideBuffer:
        shape = (len(listing.tiles), self.config.feature_dim)
        if shape[0] * shape[1] * 4 <= SPILL_BYTES:
            return _SlideBuffer(listing, np.empty(shape, np.float32))
        # Hidden and pid-named like atomic temporaries: a killed run's spill file is swept.
        spill = self.cache_dir / f".{listing.slide.slide_id}.spill.{os.getpid()}.tmp"
        fd = os.open(spill, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        return _SlideBuffer(listing, None, spill, fd, features_dim=shape[1])

    def _gather(
        self,
        positions: list[int],
        rows: list[int],
        errors: list[str],
        valid: list[int],
        result,
        buffers: dict[int, _SlideBuffer],
    ) -> None:
        features = result() if result is not None else None
        valid_index = {i: j for j, i in enumerate(valid)}
        touched = []
        for i, (position, row) in enumerate(zip(positions, rows)):
            buffer = buffers[position]
            if errors[i]:
                buffer.errors[row] = errors[i]
            else:
                buffer.put(row, features[valid_index[i]])
            buffer.received += 1
            if not touched or touched[-1] != position:
                touched.append(position)
        self.n_tiles += len(valid)
        self.bar.update(len(positions))
        for position in touched:
            if position in buffers and buffers[position].complete:
                buffer = buffers.pop(position)
                self._drain_writes(MAX_PENDING_WRITES - 1)
                self.writes.append((buffer.listing.slide.slide_id, self.writer.submit(self._write, buffer)))
        self.n_gathered += 1
        if self.n_gathered % POSTFIX_EVERY == 1:  # the first batch, then every few
            self.bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        figures = self.throughput()
        return f"slides {self.n_written}/{self.n_pass_slides}" + (f", {figures.postfix()}" if figures else "")

    def throughput(self) -> Throughput | None:
        """Where this process's embedding time went so far (None before the first batch)."""
        if self.runner is None or not self.meter.n_batches:
            return None
        return self.meter.result(self.plan, self.runner.name, self.runner.busy_seconds)

    def _drain_writes(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are pending; record their outcomes (raises their errors)."""
        while len(self.writes) > keep:
            slide_id, future = self.writes.pop(0)
            self.outcome[slide_id] = future.result()
            self.n_written += 1

    def _write(self, buffer: _SlideBuffer) -> Outcome:
        """Writer thread: write the slide's bag (or its failure record) and release its lock."""
        listing = buffer.listing
        slide = listing.slide
        try:
            ok_rows = [row for row in range(len(listing.tiles)) if row not in buffer.errors]
            skipped = [
                {"name": listing.tiles[row].name, "reason": reason}
                for row, reason in sorted(buffer.errors.items())
            ]
            if not ok_rows:
                example = f" (e.g. {skipped[0]['name']}: {skipped[0]['reason']})" if skipped else ""
                self.record_failure(
                    listing, f"none of the {len(listing.tiles)} tiles could be read{example}", skipped
                )
                return Outcome.FAILED
            features = buffer.rows_to_write(ok_rows)
            tiles = [listing.tiles[row] for row in ok_rows]
            path = bag_path(self.cache_dir, slide.slide_id)
            try:
                write_bag(
                    path,
                    features,
                    np.array([[t.x, t.y] for t in tiles], np.int64).reshape(-1, 2),
                    [t.name for t in tiles],
                    self._bag_attrs(listing, skipped),
                    dtype=self.config.feature_dtype,
                )
            except OSError as error:
                raise PipelineError(
                    f"cannot write bag {path} ({os_error_text(error)}); check free space and "
                    "permissions, then rerun to resume"
                ) from error
            clear_failure(self.cache_dir, slide.slide_id)
            return Outcome.EMBEDDED
        finally:
            self._drop(buffer)

    def _drop(self, buffer: _SlideBuffer) -> None:
        buffer.close()
        self.locks.release(buffer.listing.slide.slide_id)

    def _bag_attrs(self, listing: SlideTiles, skipped: list[dict[str, str]]) -> BagAttrs:
        slide, config, plan = listing.slide, self.config, self.plan
        return BagAttrs(
            slide_id=slide.slide_id,
            patient_id=slide.patient_id,
            class_folder=slide.class_folder,
            label=int(slide.label),
            split=slide.split,
            source=str(slide.path),
            cache_key=self.cache_key,
            backbone=config.backbone,
            weights=config.weights,
            weights_digest=config.weights_digest,
            weights_random=self.backbone.is_random,
            weights_source=self.backbone.weights_source,
            transform=config.transform,
            tile_size=config.input_size,
            max_tiles=config.max_tiles,
            seed=config.seed,
            subset_rule=config.subset_rule,
            tiles_digest=listing.tiles_digest,
            n_available=listing.n_available,
            n_selected=len(listing.tiles),
            n_skipped=len(skipped),
            skipped_tiles=tuple(skipped),
            n_ignored_files=len(listing.ignored),
            package_version=__version__,
            runtime=self.runner.name if self.runner else "",
            precision=plan.precision,
            device=plan.device,
            embedded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra=dict(listing.attrs),  # the slide reader's own (e.g. a whole slide's resolution)
        )

    def record_failure(self, listing: SlideTiles, reason: str, skipped: list[dict[str, str]] = ()) -> None:
        slide = listing.slide
        write_failure(
            self.cache_dir,
            {
                "slide_id": slide.slide_id,
                "patient_id": slide.patient_id,
                "class_folder": slide.class_folder,
                "label": int(slide.label),
                "split": slide.split,
                "source": str(slide.path),
                "cache_key": self.cache_key,
                "tiles_digest": listing.tiles_digest,
                "reason": reason,
                "n_available": listing.n_available,
                "n_skipped": len(skipped),
                "skipped_tiles": list(skipped),
                "written_at": time.time(),
            },
        )
        self.outcome[slide.slide_id] = Outcome.FAILED

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.writer.shutdown(wait=True)
        self.locks.release_all()


def compact_rows(features: np.ndarray, rows: list[int]) -> np.ndarray:
    """``features[rows]`` without a second slide-sized array: rows move up in place, in chunks."""
    if len(rows) == len(features):
        return features
    index = np.asarray(rows)
    for start in range(0, len(index), 4096):  # index[i] >= i: a chunk never overwrites rows still to move
        chunk = index[start : start + 4096]
        features[start : start + len(chunk)] = features[chunk]
    return features[: len(index)]


def shard_order(n: int, rank: int, world: int) -> list[int]:
    """Slides of this rank first (i % world == rank), then the others' from their end, so a
    rank that finishes early takes over work the others would reach last."""
    own = [i for i in range(n) if i % world == rank]
    return own + [i for i in reversed(range(n)) if i % world != rank]
