"""The feature cache: one folder per extraction configuration, its key, its manifest and its locks.

    <features_dir>/<backbone>-<weights>-<size>px-max<max_tiles>-seed<seed>-<key[:8]>/
        cache.json      the configuration and its full cache key
        manifest.csv    one row per slide (MANIFEST_FIELDS), rebuilt from the bags on disk
        <slide_id>.h5   one bag per slide (format: feature_extraction/bags.py)
        .failed/        <slide_id>.json for slides that produced no bag, with the reason
        .locks/         <slide_id>.lock while a process embeds that slide

The cache key is a digest of everything that changes a feature (``ExtractionConfig``):
backbone, weight digest, transform, input size, the tile subset rule (``max_tiles``,
``seed``), and how the features are stored (``feature_dtype``, left out when float32). The weights *label* is not part of it: the same weights loaded from the torch
hub or from a file give the same features. Train and test slides of one configuration
share the folder; the manifest's ``split`` column tells them apart.

The manifest is never edited in place: ``collect_manifest`` derives its rows from the bags and
failure records on disk, and ``feature_extraction.manifest`` (its columns, reading it, and
replacing it atomically under the lock ``.locks/manifest.csv.lock``) writes them, so concurrent
processes cannot corrupt it and the temporary file of a writer killed mid-write is known to be
dead. Per-slide lock files (``feature_extraction.locks``) keep two processes from embedding
the same slide; ``sweep_leftovers`` removes what a killed process left.

Freshness is decided here and nowhere else: ``current_bag`` and ``slide_status`` (is this
slide's bag current, or has it failed in this run?) for stage 1; ``is_cache_dir``,
``is_usable``, ``covered_slides``, ``cache_is_current``, ``holds_every_tile`` and ``find_cache``
(which cache serves a cohort, which slides does it lack?) for the trainer and the evaluator.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from feature_extraction.atomic import atomic_write_json
from feature_extraction.bags import BAG_SUFFIX, BagAttrs, bag_path, read_bag_attrs
from feature_extraction.errors import BagError, PipelineError
from feature_extraction.layout import list_slide_tiles
from feature_extraction.locks import LOCK_DIR, LOCK_STALE_SECONDS, SlideLocks
from feature_extraction.manifest import (
    MANIFEST_LOCK,
    STATUS_FAILED,
    STATUS_INVALID,
    STATUS_OK,
    ManifestRow,
    read_manifest,
)
from feature_extraction.sources import SlideSource

CACHE_FORMAT = 1  # bump when the meaning of a cached feature changes without a config change
CACHE_JSON = "cache.json"
FAILED_DIR = ".failed"
# ".<slide_id>.h5.<pid>.tmp" (atomic.temp_path_for of a bag) or ".<slide_id>.spill.<pid>.tmp"
_SLIDE_TEMPORARY = re.compile(rf"^\.(.+)\.(?:{re.escape(BAG_SUFFIX[1:])}|spill)\.\d+\.tmp$")
_FAILURE_TEMPORARY = re.compile(r"^\.(.+)\.json\.\d+\.tmp$")  # in .failed/: atomic.temp_path_for of a record
_MANIFEST_TEMPORARY = re.compile(r"^\.manifest\.csv\.\d+\.tmp$")  # atomic.temp_path_for of manifest.csv


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything that decides the features of a tile, plus the weights' human label."""

    backbone: str
    weights: str  # "imagenet", "random" or "file-<stem>": for folder names, not in the key
    weights_digest: str  # sha256 of the weight values
    transform: str  # TileTransform.describe()
    input_size: int  # pixels fed to the backbone (tiles are resized to it)
    max_tiles: int  # 0 = all tiles
    seed: int
    feature_dim: int
    subset_rule: str
    wsi_tiling: str = ""  # JSON of wsi.WsiConfig when the cohort has whole-slide images, else ""
    feature_dtype: str = "float32"  # how bags store the features (bags.FEATURE_DTYPES); read as float32

    @property
    def cache_key(self) -> str:
        """sha256 (hex) of the fields that change a feature."""
        # An empty wsi_tiling and the default float32 are left out, so caches keep the key they had
        # before these fields existed.
        defaults = {"wsi_tiling": "", "feature_dtype": "float32"}
        keyed = {
            k: v
            for k, v in asdict(self).items()
            if k != "weights" and not (k in defaults and v == defaults[k])
        }
        keyed["cache_format"] = CACHE_FORMAT
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode("utf-8")).hexdigest()

    @property
    def folder_name(self) -> str:
        tiles = f"max{self.max_tiles}" if self.max_tiles > 0 else "maxall"
        return (
            f"{self.backbone}-{self.weights}-{self.input_size}px-{tiles}-seed{self.seed}-{self.cache_key[:8]}"
        )

    def to_json(self) -> dict[str, Any]:
        return {"cache_key": self.cache_key, "cache_format": CACHE_FORMAT, **asdict(self)}


def open_cache(features_dir: str | Path, config: ExtractionConfig) -> Path:
    """Create (or find) the cache folder of ``config`` and return it.

    Raises PipelineError if the folder exists but belongs to another key, or cannot be created."""
    cache_dir = Path(features_dir) / config.folder_name
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / FAILED_DIR).mkdir(exist_ok=True)
        (cache_dir / LOCK_DIR).mkdir(exist_ok=True)
    except OSError as error:  # read-only, a file in the way, disk full: say which folder and what to do
        raise PipelineError(
            f"cannot create the feature cache {cache_dir} ({error}); pass a writable --features_dir"
        ) from error
    path = cache_dir / CACHE_JSON
    if path.is_file():
        found = read_cache_config(cache_dir)
        if found.get("cache_key") != config.cache_key:
            raise PipelineError(
                f"{path} records cache key {found.get('cache_key')!r}, but this configuration's key is "
                f"{config.cache_key!r}. The folder was renamed or edited by hand; move it away."
            )
    else:
        with contextlib.suppress(FileNotFoundError):  # another process may write the same file right now
            atomic_write_json(path, config.to_json())
    return cache_dir


def read_cache_config(cache_dir: str | Path) -> dict[str, Any]:
    """The cache's configuration: cache_key, backbone, weights, weights_digest, feature_dim,
    max_tiles, seed, transform, input_size, subset_rule, cache_format."""
    path = Path(cache_dir) / CACHE_JSON
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(
            f"{cache_dir} is not a feature cache (no {CACHE_JSON}). Pass the folder that "
            "`python -m feature_extraction.embed` printed, e.g. features/resnet50_trunc-imagenet-224px-..."
        ) from None
    except (OSError, ValueError) as error:
        raise PipelineError(f"cannot read {path} ({error}); rerun the embedding to rewrite it") from error


# ----------------------------------------------------------------------------------------- manifest


def collect_manifest(cache_dir: str | Path) -> list[ManifestRow]:
    """Derive the manifest from the bags and failure records on disk, sorted by (split, slide_id)."""
    cache_dir = Path(cache_dir)
    cache_key = read_cache_config(cache_dir).get("cache_key")
    rows: dict[str, ManifestRow] = {}
    for path in sorted(cache_dir.glob(f"*{BAG_SUFFIX}")):
        if path.name.startswith("."):
            continue
        slide_id = path.name[: -len(BAG_SUFFIX)]
        try:
            attrs = read_bag_attrs(path)
        except BagError as error:
            class_folder, _, patient_id = slide_id.partition("__")  # layout.slide_id_for's convention
            rows[slide_id] = ManifestRow(
                slide_id, patient_id, class_folder, -1, "", 0, path, STATUS_INVALID, error=str(error)
            )
            continue
        row = _row_from_attrs(slide_id, path, attrs)
        if attrs.cache_key != cache_key:
            error = f"cache key {attrs.cache_key!r} is not this cache's"
            row = replace(row, status=STATUS_INVALID, error=error)
        rows[slide_id] = row
    for record in read_failures(cache_dir):
        if record.get("slide_id") in rows:
            continue  # a bag written after the failure wins
        rows[record["slide_id"]] = ManifestRow(
            slide_id=record["slide_id"],
            patient_id=record.get("patient_id", ""),
            class_folder=record.get("class_folder", ""),
            label=int(record.get("label", -1)),
            split=record.get("split", ""),
            n_tiles=0,
            file=bag_path(cache_dir, record["slide_id"]),
            status=STATUS_FAILED,
            tiles_digest=record.get("tiles_digest", ""),
            n_available=int(record.get("n_available", 0)),
            n_skipped=int(record.get("n_skipped", 0)),
            source=record.get("source", ""),
            error=record.get("reason", ""),
        )
    return sorted(rows.values(), key=lambda r: (r.split, r.slide_id))


def _row_from_attrs(slide_id: str, path: Path, attrs: BagAttrs) -> ManifestRow:
    return ManifestRow(
        slide_id=slide_id,
        patient_id=attrs.patient_id,
        class_folder=attrs.class_folder,
        label=attrs.label,
        split=attrs.split,
        n_tiles=attrs.n_instances,
        file=path,
        status=STATUS_OK,
        tiles_digest=attrs.tiles_digest,
        n_available=attrs.n_available,
        n_skipped=attrs.n_skipped,
        source=attrs.source,
    )


# ----------------------------------------------------------------------------------- freshness
# Whether a bag is current is decided here only: stage 1 (what to embed) and stage 2 (clam.data:
# which cache to train from, what is missing; clam.cohort: is a folder a cache) ask these functions.


def is_cache_dir(path: str | Path) -> bool:
    """Whether ``path`` is a feature cache folder (it holds ``cache.json``)."""
    return (Path(path) / CACHE_JSON).is_file()


def current_bag(
    cache_dir: Path, slide_id: str, cache_key: str, tiles_digest: str, newer_than: float | None = None
) -> BagAttrs | None:
    """The attributes of the slide's bag if it is complete, of this key and of these tiles (and,
    with ``newer_than``, written after that time); else None (the slide is to be embedded)."""
    path = bag_path(cache_dir, slide_id)
    try:
        if newer_than is not None and path.stat().st_mtime < newer_than:
            return None
        attrs = read_bag_attrs(path)
    except (OSError, BagError):
        return None
    if attrs.cache_key != cache_key or attrs.tiles_digest != tiles_digest:
        return None
    return attrs


def slide_status(
    cache_dir: Path,
    slide_id: str,
    cache_key: str,
    tiles_digest: str,
    *,
    newer_than: float | None = None,
    failed_since: float | None = None,
) -> str | None:
    """STATUS_OK if the slide's bag is current (``current_bag``); STATUS_FAILED if a failure of
    this key and these tiles was recorded at or after ``failed_since`` (2 s of slack for coarse
    file-system clocks; an older record is retried); else None: the slide is still to be done."""
    if current_bag(cache_dir, slide_id, cache_key, tiles_digest, newer_than) is not None:
        return STATUS_OK
    record = read_failure(cache_dir, slide_id)
    if (
        failed_since is not None
        and record
        and record.get("cache_key") == cache_key
        and record.get("tiles_digest") == tiles_digest
        and float(record.get("written_at", 0)) >= failed_since - 2.0
    ):
        return STATUS_FAILED
    return None


def is_usable(row: ManifestRow) -> bool:
    """A manifest row whose bag can be trained on: status ok and the file present."""
    return row.status == STATUS_OK and Path(row.file).is_file()


def covered_slides(cache_dir: Path, slide_ids: Iterable[str]) -> set[str]:
    """The slides of ``slide_ids`` that have a usable bag in this cache (by its manifest)."""
    wanted = set(slide_ids)
    try:
        rows = read_manifest(cache_dir)
    except (PipelineError, OSError, ValueError, KeyError):
        return set()
    return {r.slide_id for r in rows if r.slide_id in wanted and is_usable(r)}


def cache_is_current(cache_dir: Path, slides: Sequence[SlideSource]) -> bool:
    """Every slide has a usable bag, embedded from the tiles its folder holds now (the tile
    listing digest that stage 1 records; whole-slide files and bags without it are not checked)."""
    try:
        rows = {r.slide_id: r for r in read_manifest(cache_dir)}
    except (PipelineError, OSError, ValueError, KeyError):
        return False
    for slide in slides:
        row = rows.get(slide.slide_id)
        if row is None or not is_usable(row):
            return False
        if (
            row.tiles_digest
            and slide.kind == "tiles"
            and list_slide_tiles(slide, 0).tiles_digest != row.tiles_digest
        ):
            return False
    return True


def holds_every_tile(cache_dir: Path, slides: Sequence[SlideSource], max_tiles: int) -> bool:
    """Whether the bag of every slide of ``slides`` holds all the slide's tiles: no ``max_tiles``
    subset was drawn (it found at most ``max_tiles`` tiles; every tile when ``max_tiles <= 0``).
    A bag that records no tile count (``n_available``) does not count as whole."""
    if max_tiles <= 0:
        return True
    try:
        rows = {r.slide_id: r for r in read_manifest(cache_dir)}
    except (PipelineError, OSError, ValueError, KeyError):
        return False
    return all(s.slide_id in rows and 0 < rows[s.slide_id].n_available <= max_tiles for s in slides)


def find_cache(
    features_dir: Path, backbone: str, weights: str, max_tiles: int, seed: int, slides: Sequence[SlideSource]
) -> Path | None:
    """A cache folder under ``features_dir`` of this backbone and weights whose bags hold this
    ``max_tiles`` and ``seed``'s subset of every slide of ``slides`` (or more, cut to it by
    ``clam.data.limit_tiles``), current for each of them (``cache_is_current``).

    That is a cache of (``max_tiles``, ``seed``) itself; one of the same seed embedded with more
    tiles (the subset rule is nested: its subset holds this one); one of every tile
    (``max_tiles`` 0); and one of another seed only when, for every slide of ``slides``, its bag
    holds all the slide's tiles (``holds_every_tile``): another seed's subset of a slide with
    more tiles is not this seed's. Prefers the exact (max_tiles, seed), then float32 over
    float16 features, then the fewest tiles.

    Weights are matched by their label ("imagenet", "random"); for a weights file this finds
    nothing, and ``embed_cohort``, which knows the file's digest, picks the cache instead."""
    if not Path(features_dir).is_dir():
        return None
    candidates = []
    for cache_dir in sorted(p for p in Path(features_dir).iterdir() if is_cache_dir(p)):
        try:
            config = read_cache_config(cache_dir)
        except PipelineError:
            continue
        cached_tiles = as_int(config.get("max_tiles"))
        if config.get("backbone") != backbone or str(config.get("weights")) != str(weights):
            continue
        if not (cached_tiles <= 0 or (max_tiles > 0 and cached_tiles >= max_tiles)):
            continue
        same_seed = as_int(config.get("seed")) == seed
        exact = cached_tiles == max_tiles and same_seed
        # Of another seed, only bags that hold every tile of their slide: then no subset was drawn.
        whole_only = cached_tiles if cached_tiles > 0 and not same_seed else 0
        fewest = cached_tiles if cached_tiles > 0 else 1 << 62
        half = config.get("feature_dtype", "float32") != "float32"  # the full-precision cache first
        candidates.append((not exact, half, fewest, cache_dir.name, cache_dir, whole_only))
    # Cheapest test first; only the preferred candidates' tile folders are listed.
    for *_, cache_dir, whole_only in sorted(candidates):
        if holds_every_tile(cache_dir, slides, whole_only) and cache_is_current(cache_dir, slides):
            return cache_dir
    return None


def as_int(value: Any) -> int:
    """``int(value)``, 0 for a missing or malformed value (a cache.json field)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


# ------------------------------------------------------------------------------- failure records


def write_failure(cache_dir: Path, record: dict[str, Any]) -> None:
    """Record that ``record['slide_id']`` produced no bag (and why). Call only while holding
    the slide's lock: ``sweep_leftovers`` removes the temporary file of a killed writer."""
    path = cache_dir / FAILED_DIR / f"{record['slide_id']}.json"
    try:
        atomic_write_json(path, record)
    except OSError as error:
        raise PipelineError(f"cannot write {path} ({error}); pass a writable --features_dir") from error


def read_failure(cache_dir: Path, slide_id: str) -> dict[str, Any] | None:
    path = cache_dir / FAILED_DIR / f"{slide_id}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_failures(cache_dir: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted((Path(cache_dir) / FAILED_DIR).glob("*.json")):
        record = read_failure(Path(cache_dir), path.stem)
        if record and "slide_id" in record:
            records.append(record)
    return records


def clear_failure(cache_dir: Path, slide_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (cache_dir / FAILED_DIR / f"{slide_id}.json").unlink()


def remove_stale_temporaries(cache_dir: Path, slide_id: str) -> None:
    """Delete half-written files of ``slide_id`` left by a killed process. Call only while
    holding the slide's lock: then nobody else can be writing them."""
    stem = glob.escape(slide_id)
    for pattern in (f".{stem}{BAG_SUFFIX}.*.tmp", f".{stem}.spill.*.tmp"):
        for path in cache_dir.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# ------------------------------------------------------------------------------------ leftovers


def sweep_leftovers(cache_dir: Path, locks: SlideLocks) -> None:
    """Remove stale locks, and the temporary files of slides (bags, spills, failure records)
    and of the manifest that no live process holds the lock of: a kill left them. Any
    other temporary file goes once older than the stale age."""
    locks.break_stale()
    failed = Path(cache_dir) / FAILED_DIR
    for path in [*Path(cache_dir).glob(".*.tmp"), *failed.glob(".*.tmp")]:
        if path.parent == failed:
            match = _FAILURE_TEMPORARY.match(path.name)
            owner = match.group(1) if match else None
        else:
            match = _SLIDE_TEMPORARY.match(path.name)
            owner = (
                match.group(1) if match else MANIFEST_LOCK if _MANIFEST_TEMPORARY.match(path.name) else None
            )
        with contextlib.suppress(OSError):
            if owner is not None:
                if not locks.held_by_other(owner) and owner not in locks.held:
                    path.unlink()
            elif time.time() - path.stat().st_mtime > LOCK_STALE_SECONDS:
                path.unlink()
