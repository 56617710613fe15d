"""The library's error and warning types: the bottom floor, importing nothing of ours, so that any module can
raise or catch them without importing the module that usually does."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be used; the message lists every problem, one `field: message` per line."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = problems if problems is not None else [message]
        """The individual `field: message` problems."""


class ConfigWarning(UserWarning):
    """A setting was changed to one this machine can run (see `hardware.resolve_for_hardware`)."""


class DataError(ValueError):
    """Data that cannot be used; the message names the source, the row or line, and the field."""


class DataWarning(UserWarning):
    """Examples were dropped or truncated, or part of a file was ignored; the message says how many."""
