"""The errors a user can cause and fix, and how a command line reports them.

``PipelineError`` (with ``BagError`` for an unusable bag and ``WriteError`` for a file that could
not be written) carries a message saying what was found and what to do; ``write_error`` builds a
``WriteError`` from an OSError. ``Interrupted`` is a Ctrl-C with what to run to continue.
``cli_main`` wraps every command's ``main``: it installs the logging handler
(``reporting.configure_cli_logging``) and prints these errors without a traceback."""

from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path

from feature_extraction.reporting import configure_cli_logging

# Errors of writing a file that the user fixes outside the program: a full disk (or quota, or a
# file-size limit), a read-only file system, no permission.
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
WRITE_ERRNOS = FULL_DISK_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM}


class PipelineError(Exception):
    """A problem with the user's input or set-up: bad folder, corrupt bag, mismatched cache,
    missing weights. The message says what was found and what to do; command-line entry
    points print it without a traceback and exit non-zero."""


class BagError(PipelineError):
    """An HDF5 bag that cannot be used: missing, truncated, malformed or from another cache."""


class WriteError(PipelineError):
    """A file could not be written (full disk, read-only file system, no permission). ``path``
    is the file; ``errno`` the cause's."""

    def __init__(self, message: str, path: str | Path | None = None, errno_: int | None = None) -> None:
        super().__init__(message)
        self.path, self.errno = (Path(path) if path is not None else None), errno_


def os_error_text(error: OSError) -> str:
    """``[Errno 28] No space left on device`` rather than a library's multi-line report."""
    if error.errno:
        return f"[Errno {error.errno}] {os.strerror(error.errno)}"
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def write_advice(folder: str | Path, error: OSError) -> str:
    """What to do when writing into ``folder`` failed with ``error``."""
    if error.errno in FULL_DISK_ERRNOS:
        return f"the disk holding {folder} is full: free space there"
    if error.errno == errno.EROFS:
        return f"{folder} is on a read-only file system: write somewhere writable"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission: make {folder} writable, or write elsewhere"
    return f"check the disk and the permissions of {folder}"


def write_error(path: str | Path, error: OSError, then: str = "", what: str = "cannot write") -> WriteError:
    """A WriteError: ``what`` ``path``, the cause, what to do about it and, if given, ``then``
    (what the user does next, e.g. how to resume)."""
    folder = Path(path) if what != "cannot write" else Path(path).parent
    message = f"{what} {path} ({os_error_text(error)}); {write_advice(folder, error)}."
    return WriteError(f"{message} {then}".strip(), path, error.errno)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what to run to continue (the default, rerunning the command, suits stage 1)."""


def cli_main(main):
    """Wrap a CLI ``main(argv) -> int`` so a PipelineError prints its message and exits 2; so does
    an OSError of a full disk, a read-only file system or a missing permission on a named file
    (atomic writes name the final file), with what to do."""

    @functools.wraps(main)
    def wrapper(argv=None):
        configure_cli_logging()
        try:
            return main(argv)
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            if error.errno not in WRITE_ERRNOS or not error.filename:
                raise
            failure = write_error(
                error.filename,
                error,
                "Files written before it are intact; run the command again once that is fixed.",
            )
            print(f"error: {failure}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as error:
            print(f"interrupted: {error or 'rerun the same command to resume'}", file=sys.stderr)
            return 130

    return wrapper
