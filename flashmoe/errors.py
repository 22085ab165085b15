"""Errors that the CLI reports as one clear line (no traceback).

FlashMoEError is gguf_tools' GGUFError under flashmoe's name (the GGUF tools stand on their own and
flashmoe builds on them): ``except FlashMoEError`` catches what either raises.
"""
from __future__ import annotations

from gguf_tools.errors import GGUFError as FlashMoEError
from gguf_tools.errors import UsageError

__all__ = ["FlashMoEError", "UsageError"]
