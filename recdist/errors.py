"""The one error type users see: what went wrong, where, and how to fix it."""

from __future__ import annotations


class RecdistError(Exception):
    """A problem with the user's input or environment; the CLI prints it and exits with status 2."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"  where: {self.where}")
        if self.fix:
            parts.append(f"  fix:   {self.fix}")
        return "\n".join(parts)


class DataError(RecdistError):
    """Bad ratings input: malformed line, bad value, missing column, empty file."""


class ConfigError(RecdistError):
    """A config key or value that does not fit the config tree."""


class StorageError(RecdistError):
    """A path, bucket or credential problem, or an existing output that must not be overwritten."""


class IntegrityError(StorageError):
    """A committed directory that no longer holds what its manifest lists (or was made from a redone input)."""
