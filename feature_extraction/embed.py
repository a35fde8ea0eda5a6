"""Stage 1: embed every tile of a cohort with a backbone into one HDF5 bag per slide.

    python -m feature_extraction.embed --data_dir train --split train --backbone resnet50_trunc

``embed_cohort`` is the library function behind the command; see docs/embedding.md.

How a run goes: list every slide's tiles and keep those whose bag is current (same cache key,
same tiles digest); stream the tiles of all other slides through one DataLoader, so batches
span slide boundaries; decode in worker processes; run the backbone; gather each slide's
rows as batches return and hand a finished slide to a writer thread, which writes its bag
atomically. Memory is bounded by the batches in flight (a slide too large for memory is
gathered in a file-backed buffer). Each slide is locked while it is embedded, so several
processes (``torchrun --nproc_per_node N``, or two runs by accident) share the work without
doing any slide twice; every process then waits for the others and rank 0 rewrites the
manifest from the bags on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from feature_extraction import __version__
from feature_extraction.backbones import BACKBONES, DEFAULT_BACKBONE, LoadedBackbone, describe, load_backbone
from feature_extraction.bags import bag_path, read_attrs, write_bag
from feature_extraction.cache import (
    STATUS_OK,
    ExtractionConfig,
    ManifestRow,
    SlideLocks,
    clear_failure,
    collect_manifest,
    current_bag_attrs,
    open_cache,
    read_failure,
    remove_stale_temporaries,
    write_failure,
    write_manifest,
)
from feature_extraction.errors import PipelineError, cli_main
from feature_extraction.layout import (
    SPLITS,
    default_data_dir,
    default_features_dir,
    discover_slides,
    list_slide_tiles,
)
from feature_extraction.runtime import (
    DEVICES,
    PRECISIONS,
    RUNTIMES,
    ComputePlan,
    OnnxRunner,
    TorchRunner,
    build_runner,
    plan_compute,
)
from feature_extraction.sources import SUBSET_RULE, SlideSource, SlideTiles, TileRef, TileTransform
from feature_extraction.wsi import WsiConfig, add_wsi_arguments, require_openslide, wsi_config_from_args
from feature_extraction.wsi_plan import PLAN_CACHE_FOLDER

SPILL_BYTES = 256 * 2**20  # a slide's features above this size are gathered in a file, not in memory
MAX_PENDING_WRITES = 4  # finished slides waiting for the writer thread (bounds memory)
WAIT_POLL_SECONDS = 1.0  # how often to look at slides another process is embedding


@dataclass(frozen=True)
class SkippedTile:
    slide_id: str
    name: str
    reason: str


@dataclass
class EmbedReport:
    """What ``embed_cohort`` did. ``slides`` holds the manifest rows of this data_dir/split
    in discovery order; ``failed`` pairs (slide_id, reason) for slides without a bag."""

    cache_dir: Path
    config: ExtractionConfig
    cache_key: str
    slides: list[ManifestRow]
    n_embedded: int  # bags written by this process
    n_reused: int  # bags that were already current
    n_by_others: int  # bags written meanwhile by another process (torchrun ranks, a parallel run)
    failed: list[tuple[str, str]]
    skipped_tiles: list[SkippedTile]
    n_ignored_files: int  # non-image files in the slide folders
    n_tiles_embedded: int  # tiles through the backbone in this process
    embed_seconds: float  # time spent embedding (0 when nothing needed it)
    plan: ComputePlan | None  # None when nothing was embedded
    runtime: str = ""
    random_weights: bool = False

    @property
    def tiles_per_second(self) -> float:
        return self.n_tiles_embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0


class CacheKeyMismatch(PipelineError):
    """The configuration of an ``embed_cohort`` call does not give the cache key it was asked for."""

    def __init__(self, config: ExtractionConfig) -> None:
        super().__init__(f"this configuration gives cache key {config.cache_key!r}, not the one expected")
        self.config = config


def embed_cohort(
    data_dir: str | Path,
    split: str = "train",
    *,
    features_dir: str | Path | None = None,
    backbone: str = DEFAULT_BACKBONE,
    weights: str | Path = "imagenet",
    max_tiles: int = 100,
    seed: int = 0,
    batch_size: int | None = None,
    num_workers: int = 4,
    device: str = "auto",
    precision: str = "auto",
    runtime: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    wsi: WsiConfig | None = None,
    expected_cache_key: str | None = None,
) -> EmbedReport:
    """Embed the slides of ``data_dir`` (layout of ``split``) into the cache of this
    configuration under ``features_dir``; reuse every bag that is already current.

    ``max_tiles <= 0`` embeds every tile. ``wsi`` says how whole-slide images are tiled
    (docs/wsi.md; default settings when None). ``overwrite`` re-embeds this cohort's slides even
    when their bags are current. ``expected_cache_key``: raise CacheKeyMismatch, before any
    tile is embedded, if this configuration's cache key is another (a model trained on one
    cache being evaluated on slides embedded anew). Raises PipelineError for an unusable input
    or set-up (bad folder, missing weights); unreadable tiles and slides are skipped and reported."""
    started = time.time()
    slides = discover_slides(data_dir, split)
    if not slides:
        raise PipelineError(f"{data_dir} has the class folders of --split {split} but no patient folder in them")
    require_openslide(slides)  # whole-slide images without OpenSlide: stop once, before any work
    loaded = load_backbone(backbone, weights)
    rank, world = _rank_and_world()
    progress = progress and rank == 0  # one progress bar under torchrun, not one per process
    log = _logger(progress)
    if loaded.is_random:
        _shout("--weights random: the backbone is randomly initialised (fixed seed). Its features only test "
               "the pipeline; the cache folder and every bag say weights=random.")
    spec = loaded.spec
    transform = TileTransform(spec.input_size, spec.mean, spec.std)
    max_tiles = max(0, int(max_tiles))
    config = ExtractionConfig(
        backbone=spec.name, weights=loaded.weights, weights_digest=loaded.weights_digest,
        transform=transform.describe(), input_size=spec.input_size, max_tiles=max_tiles, seed=int(seed),
        feature_dim=spec.feature_dim, subset_rule=SUBSET_RULE,
        wsi_tiling=(json.dumps((wsi or WsiConfig()).as_dict(), sort_keys=True)
                    if any(slide.kind == "wsi" for slide in slides) else ""),
    )
    if expected_cache_key is not None and config.cache_key != expected_cache_key:
        raise CacheKeyMismatch(config)
    features_dir = Path(features_dir) if features_dir is not None else default_features_dir()
    cache_dir = open_cache(features_dir, config)
    log(f"{describe(loaded)}\ncache {cache_dir}")

    plan = plan_compute(device, precision, runtime, batch_size, num_workers)  # bad options fail before any work
    job = _Embedding(cache_dir, config, loaded, transform, features_dir, plan,
                     newer_than=started if overwrite else None, run_started=started, log=log, progress=progress)
    listings = []
    for slide in slides:
        try:
            listings.append(list_slide_tiles(slide, max_tiles, seed, wsi, plan_cache=features_dir / PLAN_CACHE_FOLDER))
        except PipelineError as error:  # e.g. an unreadable whole-slide file: this slide fails, the run goes on
            # recorded in the pass, under the slide's lock and by one rank only, like any slide without tiles
            listings.append(SlideTiles(slide, (), 0, (), "", reason=str(error)))
    listings = [listings[i] for i in _shard_order(len(listings), rank, world)]
    try:
        job.run(listings)
    finally:
        job.close()

    rows = collect_manifest(cache_dir)
    if rank == 0:
        write_manifest(cache_dir, rows)
    return _report(job, listings, slides, rows, cache_dir, config, loaded)


# ------------------------------------------------------------------------------------ the work

class TileDataset(Dataset):
    """Items are (slide position, row, TileRef) triples handed out by the batch sampler;
    returns (position, row, (S, S, 3) uint8 array or None, error text or "")."""

    def __init__(self, transform: TileTransform) -> None:
        self.transform = transform

    def __getitem__(self, item: tuple[int, int, TileRef]) -> tuple[int, int, np.ndarray | None, str]:
        position, row, tile = item
        try:
            return position, row, self.transform(tile.load()), ""
        except Exception as error:  # TileError, or anything a broken file provokes: skip the tile
            return position, row, None, str(error) or type(error).__name__


def collate_tiles(items: list[tuple[int, int, np.ndarray | None, str]], size: int):
    """Stack one batch: (positions, rows, (N, S, S, 3) uint8 tensor, errors)."""
    images = torch.empty((len(items), size, size, 3), dtype=torch.uint8)
    if get_worker_info() is not None:
        images.share_memory_()  # written once, sent to the main process without another copy
    pixels = images.numpy()
    for i, (_, _, array, _) in enumerate(items):
        pixels[i] = 0 if array is None else array
    positions = [item[0] for item in items]
    rows = [item[1] for item in items]
    return positions, rows, images, [item[3] for item in items]


class _Collate:
    """A picklable collate_fn bound to the input size."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, items):
        return collate_tiles(items, self.size)


@dataclass
class _SlideBuffer:
    """The rows of one slide while its batches come back."""

    listing: SlideTiles
    features: np.ndarray
    spill: Path | None
    errors: dict[int, str] = field(default_factory=dict)
    received: int = 0

    @property
    def complete(self) -> bool:
        return self.received >= len(self.listing.tiles)


class _Embedding:
    """One run's state: locks, the runner (built on first need), the writer thread, outcomes."""

    def __init__(self, cache_dir: Path, config: ExtractionConfig, backbone: LoadedBackbone,
                 transform: TileTransform, features_dir: Path, plan: ComputePlan, *, newer_than: float | None,
                 run_started: float, log, progress: bool) -> None:
        self.cache_dir, self.config, self.backbone, self.transform = cache_dir, config, backbone, transform
        self.features_dir, self.plan, self.newer_than, self.run_started = features_dir, plan, newer_than, run_started
        self.log, self.progress = log, progress
        self.cache_key = config.cache_key
        self.locks = SlideLocks(cache_dir)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bag-writer")
        self.writes: list[tuple[str, Future]] = []
        self.outcome: dict[str, str] = {}  # slide_id -> reused | embedded | by_other | failed
        self.runner: TorchRunner | OnnxRunner | None = None
        self.n_tiles = 0
        self.n_written = self.n_pass_slides = 0  # slides finished / open in the current pass (progress bar)
        self.seconds = 0.0
        self.bar: tqdm | None = None

    # -- the loop over passes

    def run(self, listings: list[SlideTiles]) -> None:
        self.locks.sweep(self.cache_dir)  # what a killed run left behind
        for listing in listings:
            if self._resolved(listing) == STATUS_OK:
                self.outcome[listing.slide.slide_id] = "reused"
        idle_passes = 0
        while True:
            open_slides = [l for l in listings if l.slide.slide_id not in self.outcome]
            for listing in open_slides:  # finished by another process since we last looked?
                state = self._resolved(listing)
                if state:
                    self.outcome[listing.slide.slide_id] = "by_other" if state == STATUS_OK else "failed"
            open_slides = [l for l in open_slides if l.slide.slide_id not in self.outcome]
            if not open_slides:
                return
            if all(self.locks.held_by_other(l.slide.slide_id) for l in open_slides):
                time.sleep(WAIT_POLL_SECONDS)  # the rest is in other processes' hands
                continue
            if self._embed_pass(open_slides) == 0:
                idle_passes += 1
                if idle_passes > 30:
                    raise PipelineError(
                        f"could not lock {len(open_slides)} slides in {self.cache_dir / '.locks'} "
                        f"(e.g. {open_slides[0].slide.slide_id}); delete stale .lock files if no other run is active")
                time.sleep(WAIT_POLL_SECONDS)
            else:
                idle_passes = 0

    def _resolved(self, listing: SlideTiles) -> str | None:
        """"ok" if the slide's bag is current, "failed" if this run already recorded a failure."""
        slide_id = listing.slide.slide_id
        if current_bag_attrs(self.cache_dir, slide_id, self.cache_key, listing.tiles_digest, self.newer_than):
            return STATUS_OK
        record = read_failure(self.cache_dir, slide_id)
        # A failure recorded by another process during this run (a little clock slack for
        # coarse file-system timestamps; an older record is retried).
        if (record and record.get("cache_key") == self.cache_key and record.get("tiles_digest") == listing.tiles_digest
                and float(record.get("written_at", 0)) >= self.run_started - 2.0):
            return "failed"
        return None

    def _embed_pass(self, listings: list[SlideTiles]) -> int:
        """Embed the slides we can lock; return how many we locked."""
        if self.runner is None:
            self.runner = build_runner(self.backbone, self.plan, self.features_dir, log=self.log)
            self.log(f"running {self.runner.name} on {self.plan.describe()}")
        plan = self.plan
        buffers: dict[int, _SlideBuffer] = {}
        locked = [0]
        self.n_written, self.n_pass_slides = 0, len(listings)
        total = sum(len(l.tiles) for l in listings)
        self.bar = tqdm(total=total, unit="tile", desc="embedding", disable=not self.progress, dynamic_ncols=True,
                        file=sys.stderr)
        loader = DataLoader(
            TileDataset(self.transform), batch_sampler=self._batches(listings, buffers, locked),
            num_workers=plan.num_workers, collate_fn=_Collate(self.transform.input_size),
            pin_memory=plan.device.startswith("cuda"),
        )
        threads = torch.get_num_threads()
        if plan.device == "cpu" and self.runner.name == "torch":
            torch.set_num_threads(plan.compute_threads)
        started = time.perf_counter()
        previous = None
        try:
            for positions, rows, images, errors in loader:
                valid = [i for i, error in enumerate(errors) if not error]
                if len(valid) == len(errors):
                    result = self.runner.start(images)
                else:
                    result = self.runner.start(images[valid]) if valid else None
                if previous is not None:  # gather the last batch while this one computes
                    self._gather(*previous, buffers)
                previous = (positions, rows, errors, valid, result)
                self.locks.refresh()
            if previous is not None:
                self._gather(*previous, buffers)
            self._drain_writes(0)
            self.bar.total = self.bar.n  # slides other processes took are not ours to wait for
            self.bar.set_postfix_str(f"slides {self.n_written}/{self.n_pass_slides}")
        finally:
            torch.set_num_threads(threads)
            self.seconds += time.perf_counter() - started
            self.bar.close()
            for buffer in buffers.values():  # interrupted: drop unfinished slides, free their locks
                self._drop(buffer)
        return locked[0]

    def _batches(self, listings: list[SlideTiles], buffers: dict[int, _SlideBuffer],
                 locked: list[int]) -> Iterator[list[tuple[int, int, TileRef]]]:
        """Lazily lock slides and cut their tiles into batches that span slide boundaries.

        Runs in the main process as the DataLoader asks for work, so a slide is locked just
        before its tiles are decoded, not at the start of the run."""
        batch: list[tuple[int, int, TileRef]] = []
        for position, listing in enumerate(listings):
            slide_id = listing.slide.slide_id
            if not self.locks.try_acquire(slide_id):
                continue
            locked[0] += 1
            state = self._resolved(listing)  # it may have been finished while we were not looking
            if state:
                self.locks.release(slide_id)
                self.outcome[slide_id] = "by_other" if state == STATUS_OK else "failed"
                continue
            remove_stale_temporaries(self.cache_dir, slide_id)
            if not listing.tiles:
                # A whole slide without tissue or resolution, or unreadable, says why (wsi.py).
                self.record_failure(listing, listing.reason or f"no image tiles in {listing.slide.path}"
                                     + (f" ({len(listing.ignored)} non-image files ignored)" if listing.ignored else ""))
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
            return _SlideBuffer(listing, np.empty(shape, np.float32), None)
        spill = self.cache_dir / f".{listing.slide.slide_id}.spill.{os.getpid()}.tmp"
        return _SlideBuffer(listing, np.lib.format.open_memmap(spill, "w+", np.float32, shape), spill)

    def _gather(self, positions: list[int], rows: list[int], errors: list[str], valid: list[int],
                result, buffers: dict[int, _SlideBuffer]) -> None:
        features = result() if result is not None else None
        valid_index = {i: j for j, i in enumerate(valid)}
        touched = []
        for i, (position, row) in enumerate(zip(positions, rows)):
            buffer = buffers[position]
            if errors[i]:
                buffer.errors[row] = errors[i]
            else:
                buffer.features[row] = features[valid_index[i]]
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
        self.bar.set_postfix_str(f"slides {self.n_written}/{self.n_pass_slides}", refresh=False)

    def _drain_writes(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are pending; record their outcomes (raises their errors)."""
        while len(self.writes) > keep:
            slide_id, future = self.writes.pop(0)
            self.outcome[slide_id] = future.result()
            self.n_written += 1

    def _write(self, buffer: _SlideBuffer) -> str:
        """Writer thread: write the slide's bag (or its failure record) and release its lock."""
        listing = buffer.listing
        slide = listing.slide
        try:
            ok_rows = [row for row in range(len(listing.tiles)) if row not in buffer.errors]
            skipped = [{"name": listing.tiles[row].name, "reason": reason} for row, reason in sorted(buffer.errors.items())]
            if not ok_rows:
                example = f" (e.g. {skipped[0]['name']}: {skipped[0]['reason']})" if skipped else ""
                self.record_failure(listing, f"none of the {len(listing.tiles)} tiles could be read{example}", skipped)
                return "failed"
            features = _compact(buffer.features, ok_rows)
            tiles = [listing.tiles[row] for row in ok_rows]
            path = bag_path(self.cache_dir, slide.slide_id)
            try:
                write_bag(path, features, np.array([[t.x, t.y] for t in tiles], np.int64).reshape(-1, 2),
                          [t.name for t in tiles], self._attrs(listing, skipped))
            except OSError as error:
                raise PipelineError(f"cannot write bag {path} ({_os_error_text(error)}); check free space and "
                                    "permissions, then rerun to resume") from error
            clear_failure(self.cache_dir, slide.slide_id)
            return "embedded"
        finally:
            self._drop(buffer)

    def _drop(self, buffer: _SlideBuffer) -> None:
        if buffer.spill is not None:
            del buffer.features
            buffer.spill.unlink(missing_ok=True)
        self.locks.release(buffer.listing.slide.slide_id)

    def _attrs(self, listing: SlideTiles, skipped: list[dict[str, str]]) -> dict[str, Any]:
        slide, config, plan = listing.slide, self.config, self.plan
        return {
            **listing.attrs,  # the slide reader's own (e.g. a whole slide's resolution); ours win
            "slide_id": slide.slide_id, "patient_id": slide.patient_id, "class_folder": slide.class_folder,
            "label": int(slide.label), "split": slide.split, "source": str(slide.path),
            "cache_key": self.cache_key, "backbone": config.backbone, "weights": config.weights,
            "weights_digest": config.weights_digest, "weights_random": self.backbone.is_random,
            "weights_source": self.backbone.weights_source, "transform": config.transform,
            "tile_size": config.input_size, "max_tiles": config.max_tiles, "seed": config.seed,
            "subset_rule": config.subset_rule, "tiles_digest": listing.tiles_digest,
            "n_available": listing.n_available, "n_selected": len(listing.tiles), "n_skipped": len(skipped),
            "skipped_tiles": skipped, "n_ignored_files": len(listing.ignored),
            "package_version": __version__, "runtime": self.runner.name if self.runner else "",
            "precision": plan.precision if plan else "", "device": plan.device if plan else "",
            "embedded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def record_failure(self, listing: SlideTiles, reason: str, skipped: list[dict[str, str]] = ()) -> None:
        slide = listing.slide
        write_failure(self.cache_dir, {
            "slide_id": slide.slide_id, "patient_id": slide.patient_id, "class_folder": slide.class_folder,
            "label": int(slide.label), "split": slide.split, "source": str(slide.path),
            "cache_key": self.cache_key, "tiles_digest": listing.tiles_digest, "reason": reason,
            "n_available": listing.n_available, "n_skipped": len(skipped), "skipped_tiles": list(skipped),
            "written_at": time.time(),
        })
        self.outcome[slide.slide_id] = "failed"

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.writer.shutdown(wait=True)
        self.locks.release_all()


def _os_error_text(error: OSError) -> str:
    """``[Errno 28] No space left on device`` rather than a library's multi-line report."""
    if error.errno:
        return f"[Errno {error.errno}] {os.strerror(error.errno)}"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _compact(features: np.ndarray, rows: list[int]) -> np.ndarray:
    """``features[rows]`` without a second slide-sized array: rows move up in place, in chunks."""
    if len(rows) == len(features):
        return features
    index = np.asarray(rows)
    for start in range(0, len(index), 4096):  # index[i] >= i: a chunk never overwrites rows still to move
        chunk = index[start:start + 4096]
        features[start:start + len(chunk)] = features[chunk]
    return features[: len(index)]


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's RANK / WORLD_SIZE; 0, 1 alone)."""
    try:
        return int(os.environ.get("RANK", "0")), max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 0, 1


def _shard_order(n: int, rank: int, world: int) -> list[int]:
    """Slides of this rank first (i % world == rank), then the others' from their end, so a
    rank that finishes early takes over work the others would reach last."""
    own = [i for i in range(n) if i % world == rank]
    return own + [i for i in reversed(range(n)) if i % world != rank]


def _report(job: _Embedding, listings: list[SlideTiles], slides: list[SlideSource], rows: list[ManifestRow], cache_dir: Path,
            config: ExtractionConfig, loaded: LoadedBackbone) -> EmbedReport:
    by_id = {row.slide_id: row for row in rows}
    failed, skipped = [], []
    for slide in slides:
        row = by_id.get(slide.slide_id)
        if row is None:
            failed.append((slide.slide_id, "no bag and no failure record (interrupted?)"))
        elif row.status != STATUS_OK:
            failed.append((slide.slide_id, row.error or row.status))
    for slide in slides:
        row = by_id.get(slide.slide_id)
        if row is None or row.status != STATUS_OK or row.n_skipped == 0:
            continue
        attrs = read_attrs(row.file)
        for tile in json.loads(attrs.get("skipped_tiles") or "[]"):
            skipped.append(SkippedTile(slide.slide_id, tile["name"], tile["reason"]))
    counts = {kind: sum(v == kind for v in job.outcome.values()) for kind in ("embedded", "reused", "by_other")}
    return EmbedReport(
        cache_dir=cache_dir, config=config, cache_key=config.cache_key,
        slides=[by_id[s.slide_id] for s in slides if s.slide_id in by_id],
        n_embedded=counts["embedded"], n_reused=counts["reused"], n_by_others=counts["by_other"],
        failed=failed, skipped_tiles=skipped, n_ignored_files=sum(len(l.ignored) for l in listings),
        n_tiles_embedded=job.n_tiles, embed_seconds=job.seconds, plan=job.plan if job.runner else None,
        runtime=job.runner.name if job.runner else "", random_weights=loaded.is_random,
    )


def _logger(progress: bool):
    def log(message: str) -> None:
        if progress:
            tqdm.write(message, file=sys.stderr)

    return log


def _shout(message: str) -> None:
    print(f"\n*** WARNING: {message} ***\n", file=sys.stderr)


# --------------------------------------------------------------------------------------- the CLI

def format_summary(report: EmbedReport, max_names: int = 20) -> str:
    """The end-of-run summary: slides embedded / reused / failed, skipped tiles by name, cache folder."""
    lines = []
    speed = (f" ({report.n_tiles_embedded} tiles, {report.tiles_per_second:.1f} tiles/s, {report.runtime})"
             if report.n_embedded else "")
    lines.append(f"slides: {report.n_embedded} embedded{speed}, {report.n_reused} reused, "
                 f"{len(report.failed)} failed" + (f", {report.n_by_others} by other processes" if report.n_by_others else ""))
    if report.failed:
        lines.append("failed slides (no bag):")
        lines += [f"  {slide_id}: {reason}" for slide_id, reason in report.failed[:max_names]]
        if len(report.failed) > max_names:
            lines.append(f"  ... and {len(report.failed) - max_names} more (manifest.csv, status=failed)")
    if report.skipped_tiles:
        lines.append(f"skipped {len(report.skipped_tiles)} unreadable tiles:")
        lines += [f"  {t.slide_id}/{t.name}: {t.reason}" for t in report.skipped_tiles[:max_names]]
        if len(report.skipped_tiles) > max_names:
            lines.append(f"  ... and {len(report.skipped_tiles) - max_names} more (bag attribute skipped_tiles)")
    if report.n_ignored_files:
        lines.append(f"ignored {report.n_ignored_files} non-image files in the slide folders")
    if report.random_weights:
        lines.append("WARNING: weights=random: these features only test the pipeline")
    rank, world = _rank_and_world()
    if world > 1:
        lines = [f"[rank {rank}/{world}] {line}" for line in lines]
    lines.append(f"cache: {report.cache_dir}  (key {report.cache_key[:16]}..., {len(report.slides)} slides of this split)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m feature_extraction.embed",
        description="Embed every tile with a ResNet backbone into one HDF5 bag per slide (a reusable feature cache).",
    )
    parser.add_argument("--data_dir", type=Path, default=None, help="cohort folder (default: <project root>/<split>)")
    parser.add_argument("--split", choices=SPLITS, default="train", help="class-folder layout to read (default: train)")
    parser.add_argument("--max_tiles", type=int, default=100,
                        help="tiles per slide, a seeded random subset when there are more; 0 or less: all (default: 100)")
    parser.add_argument("--num_workers", type=int, default=4, help="tile-decoding worker processes (default: 4; "
                        "on a CPU at most one per 8 cores is used, the backbone needs the rest)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="tiles per forward pass (default: 256 on a GPU, 16 with ONNX Runtime, 8 eager on a CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the max_tiles subset (default: 0)")
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default=DEFAULT_BACKBONE,
                        help=f"feature extractor (default: {DEFAULT_BACKBONE}, CLAM's ResNet-50 to layer3, 1024-d)")
    parser.add_argument("--weights", default="imagenet",
                        help="imagenet (torchvision's, from the torch hub cache), random (testing only), "
                             "or the path of a state-dict file (default: imagenet)")
    parser.add_argument("--features_dir", type=Path, default=None, help="cache root (default: <project root>/features)")
    parser.add_argument("--device", default="auto", help=f"{'|'.join(DEVICES)} (default: auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: fp16 autocast on a GPU, fp32 on a CPU (default: auto)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="auto: ONNX Runtime on a CPU when installed, else PyTorch (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="re-embed this cohort's slides even if their bags are current")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines, only the summary")
    add_wsi_arguments(parser)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = embed_cohort(
        args.data_dir if args.data_dir is not None else default_data_dir(args.split), args.split,
        features_dir=args.features_dir, backbone=args.backbone, weights=args.weights, max_tiles=args.max_tiles,
        seed=args.seed, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
        precision=args.precision, runtime=args.runtime, overwrite=args.overwrite, progress=not args.quiet,
        wsi=wsi_config_from_args(args),
    )
    print(format_summary(report))
    usable = sum(row.status == STATUS_OK for row in report.slides)
    if usable == 0:
        print("error: no slide could be embedded; see the reasons above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
