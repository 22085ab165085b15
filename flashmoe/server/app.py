"""The FastAPI application: error handlers that always answer OpenAI-shaped JSON, and the routes."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Optional

from flashmoe.errors import FlashMoEError
from flashmoe.server.http import MAX_BODY_BYTES, MAX_MESSAGES, APIError
from flashmoe.server.state import ServerState


def _require_server_deps():
    try:
        import fastapi  # noqa: F401
        import pydantic  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise FlashMoEError(f"the server needs FastAPI, pydantic and uvicorn ({e}); "
                            f"install them with: pip install 'flashmoe[server]'")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flashmoe")
    except Exception:
        return "0"


def create_app(engine_or_llama, *, api_key: Optional[str] = None, model_name: Optional[str] = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_messages: int = MAX_MESSAGES):
    """The FastAPI application serving ``engine_or_llama`` (a flashmoe Engine or a llama_cpp.Llama).

    ``max_body_bytes``: larger request bodies get 413; ``max_messages``: more chat messages get 400."""
    _require_server_deps()
    from fastapi import FastAPI

    from flashmoe.server.routes_chat import add_chat_routes
    from flashmoe.server.routes_completions import add_completion_routes
    from flashmoe.server.routes_info import add_info_routes

    st = ServerState.make(engine_or_llama, api_key=api_key, model_name=model_name, max_body_bytes=max_body_bytes,
                          max_messages=max_messages)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        st.worker.close()

    # no public /docs, /redoc or /openapi.json: the API description is served behind the key (routes_info)
    app = FastAPI(title="flashmoe", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = st.worker
    app.state.model = st.model
    _add_error_handlers(app, st)
    add_info_routes(app, st)
    add_chat_routes(app, st)
    add_completion_routes(app, st)
    return app


def _add_error_handlers(app, st: ServerState) -> None:
    from fastapi.responses import JSONResponse

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
        st.worker.failed += 1
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)

    @app.exception_handler(405)
    async def _not_allowed(request, _exc):
        return JSONResponse(APIError(405, f"method {request.method} not allowed on {request.url.path}").body(),
                            status_code=405)
