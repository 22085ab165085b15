"""The HTTP side of a request, before any model work: OpenAI-shaped errors, the API key, the body (its
size, its JSON, its nesting and its strings) and the request schema."""
from __future__ import annotations

import hmac
import json
from typing import Any, Optional

from flashmoe.chat import RequestError

# Limits on what one request may ask for, checked before any work (create_app can change some).
MAX_BODY_BYTES = 8 << 20  # the request body
MAX_MESSAGES = 4096  # chat messages per request
MAX_JSON_DEPTH = 64  # nesting of the body's JSON
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 1024  # characters of one stop string


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_request_error(e: RequestError) -> APIError:
    return APIError(400, str(e), code=e.code, param=e.param)


def validation_message(err) -> str:
    errors = err.errors()
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
        msg = str(e.get("msg", "invalid"))
        parts.append(f"{loc[:80]}: {msg[:160]}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ("; ".join(parts) or "invalid request") + more


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def check_json(obj: Any) -> None:
    """APIError 400 when the body nests too deeply or holds strings that are not valid Unicode (lone
    surrogates from \\ud800 escapes: they cannot be encoded for the tokenizer). Iterative: no recursion."""
    stack = [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if d > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")
        if isinstance(x, dict):
            for k, v in x.items():
                _check_text(k)
                stack.append((v, d + 1))
        elif isinstance(x, list):
            stack.extend((v, d + 1) for v in x)
        elif isinstance(x, str):
            _check_text(x)


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request body holds a string that is not valid Unicode (a lone surrogate escape "
                            "such as \\ud800)", code="invalid_json") from None


class RequestReader:
    """Checks the key and reads a request's body into a request model, refusing what is too large,
    not JSON, too deep or off schema before anything else is done."""

    def __init__(self, api_key: Optional[str], max_body_bytes: int):
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    def check_key(self, request) -> None:
        if not self.api_key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def body(self, request) -> bytes:
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        too_large = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        if length is not None:
            try:
                if int(length) > limit:
                    raise too_large
            except ValueError:
                raise APIError(400, "bad Content-Length header", code="invalid_request") from None
        chunks, n = [], 0
        async for chunk in request.stream():  # stop reading as soon as the limit is passed
            n += len(chunk)
            if n > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse_json(self, request, cls):
        """The body as an instance of the pydantic model ``cls``."""
        from pydantic import ValidationError

        raw = await self.body(request)
        if not raw.strip():
            raise APIError(400, "the request body is empty (a JSON object is expected)", code="invalid_json")
        try:
            obj = json.loads(raw, parse_constant=_reject_constant)
        except RecursionError:
            raise APIError(400, "the request body is not valid JSON: it nests too deeply", code="invalid_json")
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json")
        if not isinstance(obj, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        check_json(obj)
        try:
            return cls.model_validate(obj)
        except ValidationError as e:
            raise APIError(422, validation_message(e), code="invalid_request")
        except RecursionError:
            raise APIError(400, "the request body nests too deeply", code="invalid_json")

    async def parse(self, request, cls):
        """A completion request (chat or text): ``parse_json`` plus the checks of ``n`` and ``stop``."""
        req = await self.parse_json(request, cls)
        if req.n != 1:
            raise APIError(400, "n > 1 is not supported (one choice per request)", param="n")
        if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if any(len(x) > MAX_STOP_CHARS for x in stops):
            raise APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
        return req
