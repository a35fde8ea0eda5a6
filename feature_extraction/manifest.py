"""``manifest.csv`` of a feature cache: its columns, its rows, reading it and replacing it.

One row per slide of the cache (``ManifestRow``, columns ``MANIFEST_FIELDS``), with ``file``
stored relative to the cache folder. The rows are derived from the bags and failure records on
disk by ``feature_extraction.cache.collect_manifest``; this module only reads and writes them.

The file is never edited in place: ``write_manifest`` replaces it atomically under the lock
``.locks/manifest.csv.lock`` (``MANIFEST_LOCK``), so concurrent processes cannot corrupt it and
the temporary file of a writer killed mid-write is known to be dead (``cache.sweep_leftovers``
removes it).
"""

from __future__ import annotations

import contextlib
import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

from feature_extraction.atomic import atomic_write_text
from feature_extraction.errors import PipelineError
from feature_extraction.locks import SlideLocks

MANIFEST_CSV = "manifest.csv"
MANIFEST_LOCK = "manifest.csv"  # held (in LOCK_DIR) while manifest.csv is replaced; slide ids all hold "__"
MANIFEST_LOCK_WAIT_SECONDS = 60.0

MANIFEST_FIELDS = (
    "slide_id",
    "patient_id",
    "class_folder",
    "label",
    "split",
    "n_tiles",
    "file",
    "status",
    "tiles_digest",
    "n_available",
    "n_skipped",
    "source",
    "error",
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
                raise PipelineError(
                    f"{locks.directory / (MANIFEST_LOCK + '.lock')} has been held for "
                    f"{MANIFEST_LOCK_WAIT_SECONDS:.0f} s; delete it if no other run is active, "
                    "then rerun"
                )
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
        raise PipelineError(
            f"{path} does not exist: run `python -m feature_extraction.embed` to build the cache"
        )
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = set(MANIFEST_FIELDS[:8]) - set(reader.fieldnames or ())
        if missing:
            raise PipelineError(f"{path} lacks columns {sorted(missing)}; rerun the embedding to rebuild it")
        rows = []
        for record in reader:
            rows.append(
                ManifestRow(
                    slide_id=record["slide_id"],
                    patient_id=record["patient_id"],
                    class_folder=record["class_folder"],
                    label=int(record["label"]),
                    split=record["split"],
                    n_tiles=int(record["n_tiles"]),
                    file=cache_dir / record["file"],
                    status=record["status"],
                    tiles_digest=record.get("tiles_digest", ""),
                    n_available=int(record.get("n_available") or 0),
                    n_skipped=int(record.get("n_skipped") or 0),
                    source=record.get("source", ""),
                    error=record.get("error", ""),
                )
            )
    return rows
