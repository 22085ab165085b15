"""The errors a chat or completion request can get: a RequestError is HTTP 400 in the server, one line in the CLI."""
from __future__ import annotations

from typing import Optional

from flashmoe.errors import FlashMoEError


class RequestError(FlashMoEError):
    """A request the model cannot serve as asked (HTTP 400 in the server, one line in the CLI)."""

    status = 400
    code: Optional[str] = None
    param: Optional[str] = None

    def __init__(self, message: str, *, code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.param = param


class ContextOverflow(RequestError):
    def __init__(self, message: str):
        super().__init__(message, code="context_length_exceeded", param="messages")
