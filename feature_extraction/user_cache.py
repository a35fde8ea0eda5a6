"""The per-user cache: derived files that every run of this user may share, whatever its --features_dir.

It holds what is costly to make and the same for every cohort: the ONNX export of a backbone
(``onnx_export.export_onnx``) and the BatchNorm statistics of the seeded ``--weights random`` backbones
(``backbones.load_backbone``). Everything in it can be deleted at any time; it is rebuilt on the next
run that needs it.

Where: ``$CLAM_EGFR_CACHE`` when set, else ``$XDG_CACHE_HOME/clam-egfr``, else
``~/.cache/clam-egfr``.

Each entry is a file named by a digest of everything it depends on (its key), next to a
``<file>.json`` sidecar holding that key, the file's size and its sha256. A reader trusts a file
only when its sidecar matches: a truncated or corrupt file (a full disk, a copy cut short, a
changed byte) reads as missing and is rebuilt. Both are written atomically (``atomic.atomic_output``),
the file first, and a builder holds a lock (``filelock``) while it builds, so two processes never
build the same entry at once: the second waits and then finds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from feature_extraction.atomic import atomic_write_json

CACHE_ENV = "CLAM_EGFR_CACHE"
BUILD_LOCK_SECONDS = 1800.0  # the longest wait for another process's build before building anyway
log = logging.getLogger(__name__)


def user_cache_dir() -> Path:
    """``$CLAM_EGFR_CACHE``, else ``$XDG_CACHE_HOME/clam-egfr``, else ``~/.cache/clam-egfr`` (not created)."""
    override = os.environ.get(CACHE_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "clam-egfr"


def key_digest(key: Mapping[str, Any]) -> str:
    """A stable sha256 of a JSON-able key (sorted keys): the name of the entry it identifies."""
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def verified(path: Path, key: Mapping[str, Any]) -> bool:
    """Whether ``path`` is a complete entry for ``key``: its sidecar names this key, size and sha256."""
    try:
        record = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        if record.get("key") != json.loads(json.dumps(dict(key), default=str)):
            return False
        if path.stat().st_size != record.get("size"):
            return False
        return file_sha256(path) == record.get("sha256")
    except (OSError, ValueError, AttributeError):
        return False


def record(path: Path, key: Mapping[str, Any]) -> None:
    """Write ``path``'s sidecar (after ``path`` itself is in place): key, size and sha256."""
    atomic_write_json(
        sidecar_path(path),
        {"key": dict(key), "size": path.stat().st_size, "sha256": file_sha256(path)},
    )


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` while building ``path``; after BUILD_LOCK_SECONDS of waiting, build anyway
    (the writes are atomic, so two builders only cost time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.with_name(path.name + ".lock")))
    try:
        lock.acquire(timeout=BUILD_LOCK_SECONDS)
    except Timeout:
        log.warning(f"{lock.lock_file} is held for more than {BUILD_LOCK_SECONDS:.0f} s; building anyway")
        yield
        return
    try:
        yield
    finally:
        lock.release()


def writable_dir(directory: Path) -> bool:
    """Whether ``directory`` exists or can be created, and a file can be written in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # A unique name: two threads of one process probing at once must not remove each other's probe.
        handle, probe = tempfile.mkstemp(prefix=".probe.", dir=directory)
        os.close(handle)
        os.unlink(probe)
        return True
    except OSError:
        return False
