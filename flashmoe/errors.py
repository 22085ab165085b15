from __future__ import annotations

"""Errors that the CLI reports as one clear line (no traceback)."""


class FlashMoEError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, failed build.

    The CLI prints ``error: <message>`` on stderr and exits with ``exit_code``.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(FlashMoEError):
    """Bad option values (out of range, unknown names)."""

    exit_code = 2
