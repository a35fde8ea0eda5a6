"""The feature cache: one folder per extraction configuration, its key, its manifest and its locks.

    <features_dir>/<backbone>-<weights>-<size>px-max<max_tiles>-seed<seed>-<key[:8]>/
        cache.json      the configuration and its full cache key
        manifest.csv    one row per slide (MANIFEST_FIELDS), rebuilt from the bags on disk
        <slide_id>.h5   one bag per slide (format: feature_extraction/bags.py)
        .failed/        <slide_id>.json for slides that produced no bag, with the reason
        .locks/         <slide_id>.lock while a process embeds that slide

The cache key is a digest of everything that changes a feature (``ExtractionConfig``):
backbone, weight digest, transform, input size, and the tile subset rule (``max_tiles``,
``seed``). The weights *label* is not part of it: the same weights loaded from the torch
hub or from a file give the same features. Train and test slides of one configuration
share the folder; the manifest's ``split`` column tells them apart.

The manifest is never edited in place: it is derived from the bags and failure records on
disk and replaced atomically under the lock ``.locks/manifest.csv.lock``, so concurrent
processes cannot corrupt it and the temporary file of a writer killed mid-write is known to be
dead. Per-slide lock files (``O_CREAT | O_EXCL``) keep two processes from embedding the same
slide; a lock whose process is gone (or that has not been refreshed for ``LOCK_STALE_SECONDS``)
is taken over.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from feature_extraction.atomic import atomic_write_json, atomic_write_text, pid_alive
from feature_extraction.bags import BAG_SUFFIX, bag_path, read_attrs
from feature_extraction.errors import BagError, PipelineError

CACHE_FORMAT = 1  # bump when the meaning of a cached feature changes without a config change
CACHE_JSON = "cache.json"
MANIFEST_CSV = "manifest.csv"
FAILED_DIR = ".failed"
LOCK_DIR = ".locks"
LOCK_STALE_SECONDS = 600.0  # a live holder refreshes its locks every LOCK_REFRESH_SECONDS
LOCK_REFRESH_SECONDS = 60.0
# ".<slide_id>.h5.<pid>.tmp" (atomic.temp_path_for of a bag) or ".<slide_id>.spill.<pid>.tmp"
_SLIDE_TEMPORARY = re.compile(rf"^\.(.+)\.(?:{re.escape(BAG_SUFFIX[1:])}|spill)\.\d+\.tmp$")
MANIFEST_LOCK = "manifest.csv"  # held (in LOCK_DIR) while manifest.csv is replaced; slide ids all hold "__"
MANIFEST_LOCK_WAIT_SECONDS = 60.0
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

    @property
    def cache_key(self) -> str:
        """sha256 (hex) of the fields that change a feature."""
        # An empty wsi_tiling is left out, so tile-folder caches keep the key they had without it.
        keyed = {k: v for k, v in asdict(self).items() if k != "weights" and not (k == "wsi_tiling" and not v)}
        keyed["cache_format"] = CACHE_FORMAT
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode("utf-8")).hexdigest()

    @property
    def folder_name(self) -> str:
        tiles = f"max{self.max_tiles}" if self.max_tiles > 0 else "maxall"
        return (f"{self.backbone}-{self.weights}-{self.input_size}px-{tiles}-seed{self.seed}-"
                f"{self.cache_key[:8]}")

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
            "`python -m feature_extraction.embed` printed, e.g. features/resnet50_trunc-imagenet-224px-...") from None
    except (OSError, ValueError) as error:
        raise PipelineError(f"cannot read {path} ({error}); rerun the embedding to rewrite it") from error


# ----------------------------------------------------------------------------------------- manifest

MANIFEST_FIELDS = (
    "slide_id", "patient_id", "class_folder", "label", "split", "n_tiles", "file", "status",
    "tiles_digest", "n_available", "n_skipped", "source", "error",
)
STATUS_OK, STATUS_FAILED, STATUS_INVALID = "ok", "failed", "invalid"


@dataclass(frozen=True)
class ManifestRow:
    """One slide of the cache. ``status`` is "ok" (bag present and valid), "failed" (no
    readable tile; ``error`` says why) or "invalid" (a bag that cannot be read or belongs to
    another key). ``n_tiles`` is the number of instances in the bag (0 without a bag);
    ``file`` is the bag's absolute path."""

    slide_id: str
    patient_id: str
    class_folder: str
    label: int
    split: str
    n_tiles: int
    file: Path
    status: str
    tiles_digest: str = ""
    n_available: int = 0
    n_skipped: int = 0
    source: str = ""
    error: str = ""


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
            attrs = read_attrs(path)
        except BagError as error:
            class_folder, _, patient_id = slide_id.partition("__")  # layout.slide_id_for's convention
            rows[slide_id] = ManifestRow(slide_id, patient_id, class_folder, -1, "", 0, path, STATUS_INVALID,
                                         error=str(error))
            continue
        row = _row_from_attrs(slide_id, path, attrs)
        if attrs.get("cache_key") != cache_key:
            row = _replace(row, status=STATUS_INVALID, error=f"cache key {attrs.get('cache_key')!r} is not this cache's")
        rows[slide_id] = row
    for record in read_failures(cache_dir):
        if record.get("slide_id") in rows:
            continue  # a bag written after the failure wins
        rows[record["slide_id"]] = ManifestRow(
            slide_id=record["slide_id"], patient_id=record.get("patient_id", ""),
            class_folder=record.get("class_folder", ""), label=int(record.get("label", -1)),
            split=record.get("split", ""), n_tiles=0, file=bag_path(cache_dir, record["slide_id"]),
            status=STATUS_FAILED, tiles_digest=record.get("tiles_digest", ""),
            n_available=int(record.get("n_available", 0)), n_skipped=int(record.get("n_skipped", 0)),
            source=record.get("source", ""), error=record.get("reason", ""),
        )
    return sorted(rows.values(), key=lambda r: (r.split, r.slide_id))


def _row_from_attrs(slide_id: str, path: Path, attrs: dict[str, Any]) -> ManifestRow:
    return ManifestRow(
        slide_id=slide_id, patient_id=str(attrs.get("patient_id", "")), class_folder=str(attrs.get("class_folder", "")),
        label=int(attrs.get("label", -1)), split=str(attrs.get("split", "")),
        n_tiles=int(attrs.get("n_instances", 0)), file=path, status=STATUS_OK,
        tiles_digest=str(attrs.get("tiles_digest", "")), n_available=int(attrs.get("n_available", 0)),
        n_skipped=int(attrs.get("n_skipped", 0)), source=str(attrs.get("source", "")),
    )


def _replace(row: ManifestRow, **changes: Any) -> ManifestRow:
    return ManifestRow(**{**{f.name: getattr(row, f.name) for f in fields(row)}, **changes})


def write_manifest(cache_dir: str | Path, rows: list[ManifestRow]) -> Path:
    """Replace ``manifest.csv`` atomically; ``file`` is stored relative to the cache folder.

    A manifest that already reads so is left alone, so a complete cache on a read-only
    file system can be reused; any other failure to write raises PipelineError naming the path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        values = {f: getattr(row, f) for f in MANIFEST_FIELDS}
        values["file"] = Path(row.file).name
        writer.writerow(values)
    path = Path(cache_dir) / MANIFEST_CSV
    text = buffer.getvalue()
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if path.read_text(encoding="utf-8") == text:
            return path
    try:
        # Under a lock, so that the sweep can tell a killed writer's temporary file from a live one's.
        locks = SlideLocks(Path(cache_dir))
        deadline = time.monotonic() + MANIFEST_LOCK_WAIT_SECONDS
        while not locks.try_acquire(MANIFEST_LOCK):
            if time.monotonic() > deadline:
                raise PipelineError(f"{locks.directory / (MANIFEST_LOCK + '.lock')} has been held for "
                                    f"{MANIFEST_LOCK_WAIT_SECONDS:.0f} s; delete it if no other run is active, "
                                    "then rerun")
            time.sleep(0.05)
        try:
            atomic_write_text(path, text)
        finally:
            locks.release(MANIFEST_LOCK)
    except OSError as error:
        raise PipelineError(f"cannot write {path} ({error}); pass a writable --features_dir") from error
    return path


def read_manifest(cache_dir: str | Path) -> list[ManifestRow]:
    """The rows of ``manifest.csv`` with ``file`` made absolute. Raises PipelineError if absent."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST_CSV
    if not path.is_file():
        raise PipelineError(f"{path} does not exist: run `python -m feature_extraction.embed` to build the cache")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_FIELDS[:8]) - set(reader.fieldnames or ())
        if missing:
            raise PipelineError(f"{path} lacks columns {sorted(missing)}; rerun the embedding to rebuild it")
        rows = []
        for record in reader:
            rows.append(ManifestRow(
                slide_id=record["slide_id"], patient_id=record["patient_id"], class_folder=record["class_folder"],
                label=int(record["label"]), split=record["split"], n_tiles=int(record["n_tiles"]),
                file=cache_dir / record["file"], status=record["status"],
                tiles_digest=record.get("tiles_digest", ""), n_available=int(record.get("n_available") or 0),
                n_skipped=int(record.get("n_skipped") or 0), source=record.get("source", ""),
                error=record.get("error", ""),
            ))
    return rows


# ------------------------------------------------------------------------------- per-slide state

def current_bag_attrs(cache_dir: Path, slide_id: str, cache_key: str, tiles_digest: str,
                      newer_than: float | None = None) -> dict[str, Any] | None:
    """The attrs of the slide's bag if it is complete, of this key and of these tiles (and,
    with ``newer_than``, written after that time); else None."""
    path = bag_path(cache_dir, slide_id)
    try:
        if newer_than is not None and path.stat().st_mtime < newer_than:
            return None
        attrs = read_attrs(path)
    except (OSError, BagError):
        return None
    if attrs.get("cache_key") != cache_key or attrs.get("tiles_digest") != tiles_digest:
        return None
    return attrs


def write_failure(cache_dir: Path, record: dict[str, Any]) -> None:
    """Record that ``record['slide_id']`` produced no bag (and why). Call only while holding
    the slide's lock: ``SlideLocks.sweep`` removes the temporary file of a killed writer."""
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


# ----------------------------------------------------------------------------------------- locks

class SlideLocks:
    """Per-slide lock files in ``<cache_dir>/.locks``, held by this process. Thread-safe."""

    def __init__(self, cache_dir: Path) -> None:
        self.directory = Path(cache_dir) / LOCK_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = socket.gethostname()
        self.held: set[str] = set()
        self._mutex = threading.Lock()
        self._refreshed = time.monotonic()

    def _path(self, slide_id: str) -> Path:
        return self.directory / f"{slide_id}.lock"

    def try_acquire(self, slide_id: str) -> bool:
        """Take the slide's lock; False if a live process holds it. A stale lock is taken over."""
        path = self._path(slide_id)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._break_if_stale(path):
                    return False
                continue
            except OSError as error:  # a read-only or full file system, a folder without write permission
                raise PipelineError(f"cannot write to the feature cache {self.directory.parent} ({error}); "
                                    "pass a writable --features_dir") from error
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{self.host} {os.getpid()} {time.time():.3f}\n")
            with self._mutex:
                self.held.add(slide_id)
            return True
        return False

    def release(self, slide_id: str) -> None:
        with self._mutex:
            self.held.discard(slide_id)
        with contextlib.suppress(FileNotFoundError):
            self._path(slide_id).unlink()

    def release_all(self) -> None:
        for slide_id in list(self.held):
            self.release(slide_id)

    def refresh(self, force: bool = False) -> None:
        """Touch the held locks (at most every LOCK_REFRESH_SECONDS) so others see them alive."""
        if not force and time.monotonic() - self._refreshed < LOCK_REFRESH_SECONDS:
            return
        self._refreshed = time.monotonic()
        with self._mutex:
            held = list(self.held)
        for slide_id in held:
            with contextlib.suppress(OSError):
                os.utime(self._path(slide_id))

    def held_by_other(self, slide_id: str) -> bool:
        """True while another live process holds the slide's lock."""
        path = self._path(slide_id)
        with self._mutex:
            if slide_id in self.held:
                return False
        return path.exists() and not self._is_stale(path)

    def sweep(self, cache_dir: Path) -> None:
        """Remove stale locks, and the temporary files of slides (bags, spills, failure records)
        and of the manifest that no live process holds the lock of: a kill left them. Any
        other temporary file goes once older than the stale age."""
        for lock in sorted(self.directory.glob("*.lock")):
            self._break_if_stale(lock)
        failed = Path(cache_dir) / FAILED_DIR
        for path in [*Path(cache_dir).glob(".*.tmp"), *failed.glob(".*.tmp")]:
            if path.parent == failed:
                match = _FAILURE_TEMPORARY.match(path.name)
                owner = match.group(1) if match else None
            else:
                match = _SLIDE_TEMPORARY.match(path.name)
                owner = match.group(1) if match else MANIFEST_LOCK if _MANIFEST_TEMPORARY.match(path.name) else None
            with contextlib.suppress(OSError):
                if owner is not None:
                    if not self.held_by_other(owner) and owner not in self.held:
                        path.unlink()
                elif time.time() - path.stat().st_mtime > LOCK_STALE_SECONDS:
                    path.unlink()

    def _is_stale(self, path: Path) -> bool:
        try:
            text = path.read_text(encoding="utf-8").split()
            age = time.time() - path.stat().st_mtime
        except (OSError, UnicodeDecodeError):
            return False  # vanished, or being written right now
        if age > LOCK_STALE_SECONDS:
            return True
        if len(text) >= 2 and text[0] == self.host and text[1].isdigit():
            return not pid_alive(int(text[1]))
        return False

    def _break_if_stale(self, path: Path) -> bool:
        """Remove ``path`` if stale; rename first so two breakers cannot remove a fresh lock."""
        if not self._is_stale(path):
            return False
        try:
            before = path.read_text(encoding="utf-8")
            moved = path.with_name(f"{path.name}.stale.{self.host}.{os.getpid()}")
            os.rename(path, moved)
        except OSError:
            return True  # someone else broke it first: try to acquire again
        if moved.read_text(encoding="utf-8") != before:
            # We moved a lock that another process created after our check: put it back.
            with contextlib.suppress(OSError):
                os.link(moved, path)
        with contextlib.suppress(OSError):
            moved.unlink()
        return True
