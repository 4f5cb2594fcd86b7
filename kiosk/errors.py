"""Error types that map onto the CLI's exit codes.

An operator's mistake (bad config, bad photo, missing model file) is a
`UsageError`: the CLI prints its message and exits 2, never a traceback.
A `RuntimeFailure` is something that went wrong while doing valid work
(exit 1).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2


class KioskError(Exception):
    """Base class: carries the exit code the CLI should return."""

    exit_code = EXIT_RUNTIME


class UsageError(KioskError):
    """Bad usage, configuration or input: exit 2."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A configuration file or key is wrong."""


class ModelError(UsageError):
    """A model file is missing, unreadable or of an unknown kind."""


class ProviderError(UsageError):
    """An execution provider that was asked for explicitly cannot be used."""


class ImageError(UsageError):
    """An input image cannot be read."""


class RuntimeFailure(KioskError):
    """Valid work that failed while running: exit 1."""

    exit_code = EXIT_RUNTIME
