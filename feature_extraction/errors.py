"""The one exception type for problems a user can cause and fix."""

from __future__ import annotations

import functools
import sys


class PipelineError(Exception):
    """A problem with the user's input or set-up: bad folder, corrupt bag, mismatched cache,
    missing weights. The message says what was found and what to do; command-line entry
    points print it without a traceback and exit non-zero."""


class BagError(PipelineError):
    """An HDF5 bag that cannot be used: missing, truncated, malformed or from another cache."""


def cli_main(main):
    """Wrap a CLI ``main(argv) -> int`` so a PipelineError prints its message and exits 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted: rerun the same command to resume", file=sys.stderr)
            return 130

    return wrapper
