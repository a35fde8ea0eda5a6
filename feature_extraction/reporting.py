"""How both stages report: the standard ``logging`` module, and one handler that the CLIs install.

Library code never prints. Every module logs through ``logging.getLogger(__name__)``, so the
loggers sit under ``feature_extraction`` and ``clam``, and a library user silences or redirects
all of it with the ordinary ``logging`` configuration, e.g.
``logging.getLogger("clam").setLevel(logging.WARNING)``.

The CLIs (``errors.cli_main``) call ``configure_cli_logging``: messages go to standard output as
plain lines (warnings prefixed ``warning:``), written through ``tqdm.write`` so that they never tear
a progress bar. Only the final results and errors are printed directly by the CLI modules.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

PACKAGES = ("feature_extraction", "clam")


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


class CliHandler(logging.Handler):
    """Writes each record as one plain line to the current ``sys.stdout`` (looked up at each write,
    so pytest's capture and redirections work), around any open tqdm bar."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_CliFormatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging must never raise into the pipeline
            self.handleError(record)


def configure_cli_logging(quiet: bool = False) -> None:
    """Install the CLI handler on the two package loggers, once; ``quiet`` keeps warnings only."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(h, CliHandler) for h in logger.handlers):
            logger.addHandler(CliHandler())
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
