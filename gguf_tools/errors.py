"""Errors of the GGUF tools: one clear line for the user (a CLI prints ``error: <message>`` and exits
with ``exit_code``), never a traceback. flashmoe's FlashMoEError and UsageError are these classes."""
from __future__ import annotations


class GGUFError(Exception):
    """A user-facing error: bad input, a file llama.cpp would refuse, a missing file."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(GGUFError):
    """Bad option values (out of range, unknown names)."""

    exit_code = 2
