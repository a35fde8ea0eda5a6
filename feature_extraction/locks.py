"""Per-slide lock files: which process embeds which slide of a feature cache.

A lock is ``<cache_dir>/.locks/<name>.lock``, created with ``O_CREAT | O_EXCL`` and holding
"host pid time". A lock whose process is gone (same host), or that has not been refreshed for
``LOCK_STALE_SECONDS`` (any host), is stale and taken over. ``cache.sweep_leftovers`` uses the
locks to tell a killed writer's temporary files from a live one's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

from feature_extraction.atomic import pid_alive
from feature_extraction.errors import PipelineError

LOCK_DIR = ".locks"
LOCK_STALE_SECONDS = 600.0  # a live holder refreshes its locks every LOCK_REFRESH_SECONDS
LOCK_REFRESH_SECONDS = 60.0


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
                raise PipelineError(
                    f"cannot write to the feature cache {self.directory.parent} ({error}); "
                    "pass a writable --features_dir"
                ) from error
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

    def break_stale(self) -> None:
        """Remove every stale lock of the folder (its holder is gone or stopped refreshing it)."""
        for lock in sorted(self.directory.glob("*.lock")):
            self._break_if_stale(lock)

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
