"""Write a file under a temporary name and rename it into place only when it is complete.

A crash, a kill or a full disk at any moment leaves either the old file or the new one,
never a half-written file under the final name."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def temp_path_for(path: Path) -> Path:
    # Hidden, pid-unique and ending in .tmp, so no reader or glob mistakes it for the real file.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_output(path: str | Path):
    """Yield a temporary path next to ``path``; on a clean exit fsync it and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
