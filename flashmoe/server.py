"""`flashmoe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on a loaded Engine.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
GET /flashmoe/stats. All model work runs on one worker thread, first come first served:
concurrent requests wait their turn. See docs/server.md.
"""
import asyncio
import hmac
import json
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Union

from flashmoe.chat import (
    ChatModel,
    ContextOverflow,
    RequestError,
    Sampling,
    normalize_messages,
    normalize_tools,
    plan_chat,
    run_chat,
)
from flashmoe.errors import FlashMoEError


def _require_server_deps():
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise FlashMoEError(f"the server needs FastAPI, pydantic and uvicorn ({e}); "
                            f"install them with: pip install 'flashmoe[server]'")


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _from_request_error(e: RequestError) -> APIError:
    return APIError(400, str(e), code=e.code, param=e.param)


# ------------------------------------------------------------------------------------------ requests


def _request_models():
    from pydantic import BaseModel, ConfigDict, Field

    class _Base(BaseModel):
        model_config = ConfigDict(extra="allow")

        model: Optional[str] = None
        max_tokens: Optional[int] = Field(None, ge=1)
        temperature: float = Field(0.8, ge=0.0, le=2.0)
        top_p: float = Field(0.95, gt=0.0, le=1.0)
        top_k: int = Field(40, ge=0, le=(1 << 31) - 1)
        min_p: float = Field(0.05, ge=0.0, le=1.0)
        repeat_penalty: float = Field(1.0, gt=0.0)
        presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
        frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
        seed: Optional[int] = None
        stop: Optional[Union[str, List[str]]] = None
        stream: bool = False
        stream_options: Optional[Dict[str, Any]] = None
        n: int = Field(1, ge=1)
        user: Optional[str] = None

        def sampling(self) -> Sampling:
            return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                            repeat_penalty=self.repeat_penalty, presence_penalty=self.presence_penalty,
                            frequency_penalty=self.frequency_penalty, seed=self.seed)

        def include_usage(self) -> bool:
            return bool(self.stream_options and self.stream_options.get("include_usage"))

    class ChatRequest(_Base):
        messages: List[Dict[str, Any]] = Field(..., min_length=1)
        tools: Optional[List[Dict[str, Any]]] = None
        tool_choice: Optional[Union[str, Dict[str, Any]]] = None
        functions: Optional[List[Dict[str, Any]]] = None  # legacy
        function_call: Optional[Union[str, Dict[str, Any]]] = None  # legacy
        response_format: Optional[Dict[str, Any]] = None
        max_completion_tokens: Optional[int] = Field(None, ge=1)
        parallel_tool_calls: Optional[bool] = None
        logprobs: Optional[bool] = None
        top_logprobs: Optional[int] = None

    class CompletionRequest(_Base):
        prompt: Union[str, List[str], List[int]]
        max_tokens: Optional[int] = Field(16, ge=1)
        echo: bool = False
        suffix: Optional[str] = None
        logprobs: Optional[int] = None
        best_of: Optional[int] = None

    return ChatRequest, CompletionRequest


def _validation_message(err) -> str:
    errors = err.errors()
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ())) or "body"
        msg = str(e.get("msg", "invalid"))
        parts.append(f"{loc[:80]}: {msg[:160]}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ("; ".join(parts) or "invalid request") + more


# Limits on what one request may ask for, checked before any work (create_app can change them).
MAX_BODY_BYTES = 8 << 20  # the request body
MAX_MESSAGES = 4096  # chat messages per request
MAX_JSON_DEPTH = 64  # nesting of the body's JSON
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 1024  # characters of one stop string


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _check_json(obj: Any) -> None:
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


# ------------------------------------------------------------------------------------------ the worker


class ModelWorker:
    """One thread that runs all model work, in arrival order."""

    def __init__(self, model: ChatModel):
        self.model = model
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashmoe-model")
        # request preparation (schema checks, template, tokenization) runs beside the model thread: a
        # large or hostile request is refused without making the others wait behind it
        self.prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashmoe-prep")
        self.closing = threading.Event()
        self.waiting = 0  # requests queued or running
        self.served = 0
        self.failed = 0

    async def run(self, fn: Callable, *args):
        loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            return await loop.run_in_executor(self.pool, fn, *args)
        finally:
            self.waiting -= 1

    def close(self):
        self.closing.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.prep_pool.shutdown(wait=False, cancel_futures=True)

    async def prep(self, fn: Callable, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prep_pool, fn, *args)


# ------------------------------------------------------------------------------------------ the app


def create_app(engine_or_llama, *, api_key: Optional[str] = None, model_name: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_messages: int = MAX_MESSAGES):
    """The FastAPI application serving ``engine_or_llama`` (a flashmoe Engine or a llama_cpp.Llama).

    ``max_body_bytes``: larger request bodies get 413; ``max_messages``: more chat messages get 400."""
    _require_server_deps()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError

    ChatRequest, CompletionRequest = _request_models()
    model = ChatModel(engine_or_llama, name=model_name)
    worker = ModelWorker(model)
    engine = model.engine
    path = engine.model_path if engine is not None else getattr(model.llama, "model_path", "")
    try:
        created = int(os.path.getmtime(path))
    except OSError:
        created = int(time.time())

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        worker.close()

    # no public /docs, /redoc or /openapi.json: the API description is served below, behind the key
    app = FastAPI(title="flashmoe", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = worker
    app.state.model = model

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status,
                            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @app.exception_handler(404)
    async def _not_found(request, _exc):
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}",
                                     code="not_found").body(), status_code=404)

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc: Exception):  # never a plain-text 500 with a traceback
        worker.failed += 1
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)

    @app.exception_handler(405)
    async def _not_allowed(request, _exc):
        return JSONResponse(APIError(405, f"method {request.method} not allowed on {request.url.path}").body(),
                            status_code=405)

    def check_key(request: Request):
        if not api_key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not given:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        too_large = APIError(413, f"the request body is larger than {max_body_bytes} bytes",
                             code="request_too_large")
        if length is not None:
            try:
                if int(length) > max_body_bytes:
                    raise too_large
            except ValueError:
                raise APIError(400, "bad Content-Length header", code="invalid_request") from None
        chunks, n = [], 0
        async for chunk in request.stream():  # stop reading as soon as the limit is passed
            n += len(chunk)
            if n > max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request: Request, cls):
        raw = await read_body(request)
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
        _check_json(obj)
        try:
            req = cls.model_validate(obj)
        except ValidationError as e:
            raise APIError(422, _validation_message(e), code="invalid_request")
        except RecursionError:
            raise APIError(400, "the request body nests too deeply", code="invalid_json")
        if req.n != 1:
            raise APIError(400, "n > 1 is not supported (one choice per request)", param="n")
        if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if any(len(x) > MAX_STOP_CHARS for x in stops):
            raise APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
        return req

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        check_key(request)
        return JSONResponse(app.openapi())

    # ---------------------------------------------------------------- info
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model.name, "queued": worker.waiting}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [_model_card(model.name, created)]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str, request: Request):
        check_key(request)
        if name != model.name:
            raise APIError(404, f"model {name!r} is not served here (this server serves {model.name!r})",
                           code="model_not_found", param="model")
        return _model_card(model.name, created)

    @app.get("/flashmoe/stats")
    async def stats(request: Request):
        check_key(request)
        return {
            "model": model.name,
            "mode": engine.mode_line() if engine is not None else None,
            "stats": (engine.stats() if engine is not None else {}) or {},
            "server": {"served": worker.served, "failed": worker.failed, "queued": worker.waiting,
                       "n_ctx": model.n_ctx(), "tokens_evaluated": model.n_evaluated},
        }

    # ---------------------------------------------------------------- chat
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = await parse(request, ChatRequest)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if len(req.messages) > max_messages:
            raise APIError(400, f"too many messages ({len(req.messages)}, at most {max_messages})",
                           code="too_many_messages", param="messages")
        tools_in, choice = req.tools, req.tool_choice
        if tools_in is None and req.functions is not None:
            tools_in = [{"type": "function", "function": f} for f in req.functions]
            if req.function_call is not None:
                fc = req.function_call
                choice = fc if isinstance(fc, str) else {"type": "function", "function": {"name": fc.get("name")}}
        max_tokens = req.max_completion_tokens or req.max_tokens

        def plan():
            messages = normalize_messages(req.messages)
            tools = normalize_tools(tools_in)  # every tool schema is checked (flashmoe.schemas)
            return plan_chat(model, messages, tools=tools, tool_choice=choice, response_format=req.response_format,
                             max_tokens=max_tokens, stop=req.stop)

        p = await _guarded(worker, plan, prep=True)
        sampling = req.sampling()
        cid = "chatcmpl-" + secrets.token_hex(12)
        now = int(time.time())
        base = {"id": cid, "created": now, "model": model.name, "system_fingerprint": None}

        if not req.stream:
            out = await _guarded(worker, lambda: run_chat(model, p, sampling, should_stop=worker.closing.is_set))
            worker.served += 1
            return {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": out.openai_message(), "logprobs": None,
                                 "finish_reason": out.finish_reason}],
                    "usage": out.usage()}

        def chunk(delta: dict, finish: Optional[str] = None) -> str:
            return _sse({**base, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        def job(emit, cancelled):
            return run_chat(model, p, sampling, on_content=lambda s: emit(("content", s)), should_stop=cancelled)

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            async for kind, val in _run_streaming(worker, job):
                if kind == "content":
                    yield chunk({"content": val})
                elif kind == "error":
                    yield _sse(val.body())
                    break
                else:
                    out = val
                    for i, c in enumerate(out.tool_calls):
                        yield chunk({"tool_calls": [{"index": i, **c.to_openai()}]})
                    yield chunk({}, out.finish_reason)
                    if req.include_usage():
                        yield _sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": out.usage()})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---------------------------------------------------------------- completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        req = await parse(request, CompletionRequest)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if req.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request", param="prompt")
            prompt = prompt[0]
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sampling = req.sampling()

        def prep():
            if isinstance(prompt, str):
                if not prompt:
                    raise RequestError("the prompt is empty", param="prompt")
                lower = model.min_tokens(prompt, model.n_ctx())
                if lower >= model.n_ctx():  # refused before tokenizing (that could take long)
                    raise ContextOverflow(f"the prompt is at least {lower} tokens; this model's context is "
                                          f"{model.n_ctx()} tokens")
                toks = model.llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            else:
                n_vocab = model.llama.n_vocab()
                if not prompt or any(not (0 <= t < n_vocab) for t in prompt):
                    raise RequestError(f"prompt tokens must be a non-empty list of ids in [0, {n_vocab})",
                                       param="prompt")
                toks = list(prompt)
            if len(toks) >= model.n_ctx():
                raise ContextOverflow(f"the prompt is {len(toks)} tokens; this model's context is "
                                      f"{model.n_ctx()} tokens")
            return toks

        toks = await _guarded(worker, prep, prep=True)
        echo = (prompt if isinstance(prompt, str) else model.llama.detokenize(toks).decode("utf-8", "replace")) \
            if req.echo else ""
        cid = "cmpl-" + secrets.token_hex(12)
        base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model.name,
                "system_fingerprint": None}

        def usage(g):
            return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                    "total_tokens": g.prompt_tokens + g.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": g.cached_tokens}}

        if not req.stream:
            g = await _guarded(worker, lambda: model.generate(toks, max_tokens=req.max_tokens, sampling=sampling,
                                                              stop=stops, should_stop=worker.closing.is_set))
            worker.served += 1
            return {**base, "choices": [{"index": 0, "text": echo + g.text, "logprobs": None,
                                         "finish_reason": g.finish_reason}], "usage": usage(g)}

        def chunk(text: str, finish: Optional[str] = None) -> str:
            return _sse({**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]})

        def job(emit, cancelled):
            return model.generate(toks, max_tokens=req.max_tokens, sampling=sampling, stop=stops,
                                  on_text=lambda s: emit(("content", s)), should_stop=cancelled)

        async def events():
            if echo:
                yield chunk(echo)
            async for kind, val in _run_streaming(worker, job):
                if kind == "content":
                    yield chunk(val)
                elif kind == "error":
                    yield _sse(val.body())
                    break
                else:
                    yield chunk("", val.finish_reason)
                    if req.include_usage():
                        yield _sse({**base, "choices": [], "usage": usage(val)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "flashmoe"}


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flashmoe")
    except Exception:
        return "0"


async def _guarded(worker: ModelWorker, fn: Callable, prep: bool = False):
    """Run ``fn`` on the model thread (``prep``: on the preparation thread); request errors become 400s,
    anything else a 500."""
    try:
        return await (worker.prep(fn) if prep else worker.run(fn))
    except RequestError as e:
        raise _from_request_error(e)
    except APIError:
        raise
    except Exception as e:
        worker.failed += 1
        raise APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


async def _run_streaming(worker: ModelWorker, job: Callable):
    """Run ``job(emit, cancelled)`` on the model thread; yield ("content", text) as it emits, then
    ("done", result) or ("error", APIError). When the client goes away, the job is told to stop."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def emit(item):
        loop.call_soon_threadsafe(q.put_nowait, item)

    def cancelled() -> bool:
        return cancel.is_set() or worker.closing.is_set()

    def body():
        if cancelled():
            emit(("error", APIError(503, "the request was cancelled before it ran", type="server_error")))
            return None
        try:
            emit(("done", job(emit, cancelled)))
        except RequestError as e:
            emit(("error", _from_request_error(e)))
        except Exception as e:
            worker.failed += 1
            emit(("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")))

    fut = asyncio.ensure_future(worker.run(body))
    fut.add_done_callback(lambda f: q.put_nowait(("error", APIError(503, "the server is shutting down",
                                                                    type="server_error")))
                          if f.cancelled() else None)
    try:
        while True:
            item = await q.get()
            yield item
            if item[0] != "content":
                if item[0] == "done":
                    worker.served += 1
                break
    finally:
        cancel.set()
        if not fut.done():
            fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)


# ------------------------------------------------------------------------------------------ running


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise FlashMoEError(f"cannot resolve host {host!r}: {e}")
    err = None
    for family, stype, proto, _name, addr in infos:
        s = socket.socket(family, stype, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(128)
            s.set_inheritable(True)
            return s
        except OSError as e:
            err = e
            s.close()
    raise FlashMoEError(f"cannot listen on {host}:{port}: {err}")


def make_server(app, sock: socket.socket, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("debug", "info"),
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


class ServerThread:
    """The server in a background thread (tests, notebooks): ``with ServerThread(app) as s: s.url``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        h, p = self.sock.getsockname()[:2]
        self.url = f"http://{'[' + h + ']' if ':' in h else h}:{p}"
        self.port = p
        self.server = make_server(app, self.sock, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if not self.thread.is_alive():
                raise FlashMoEError("the server thread stopped while starting")
            if time.time() - t0 > timeout:
                raise FlashMoEError("the server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0):
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
