"""Write a file under a temporary name and rename it into place only when it is complete.

A crash, a kill or a full disk at any moment leaves either the old file or the new one,
never a half-written file under the final name. A failed write removes its temporary file and
raises an OSError that names the final file (``errno`` kept), so messages name what the user
asked for, not a hidden temporary name."""

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
    tmp = temp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # gone already, or a read-only folder where it never existed
            tmp.unlink()
        if isinstance(error, OSError) and error.errno is not None and error.filename != str(path):
            # A full disk's write error names no file, a read-only one the temporary name: name the
            # file the caller is writing, for the message the user sees (same errno, same class).
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
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


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete temporary files left in ``directory`` by writers that were killed.

    Only files named like ``temp_path_for`` makes them whose process no longer exists are
    removed; a live writer's file is left alone. Returns the removed paths."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host still runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    with contextlib.suppress(OSError, IndexError):  # a zombie (killed, not yet reaped) is dead
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True
