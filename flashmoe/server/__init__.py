"""`flashmoe serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on a loaded Engine.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions,
GET /flashmoe/stats, and the tokenizer (POST /tokenize, POST /detokenize, GET /tokenizer_info). All
model work runs on one worker thread, first come first served: concurrent requests wait their turn.
See docs/server.md.

The package, by concern: ``http`` (errors, the key, reading and checking a body), ``requests`` (the
request schemas and the field checks), ``worker`` (the model thread, streams), ``state`` (what the
routes share), ``routes_info`` / ``routes_chat`` / ``routes_completions`` (the endpoints),
``logprobs`` (OpenAI's log-probability formats), ``app`` (create_app), ``running`` (sockets,
uvicorn, ServerThread). FastAPI, pydantic and uvicorn are imported only when an app is made.
"""
from flashmoe.server.app import _require_server_deps, create_app
from flashmoe.server.http import MAX_BODY_BYTES, MAX_JSON_DEPTH, MAX_MESSAGES, MAX_STOP, MAX_STOP_CHARS, APIError
from flashmoe.server.running import ServerThread, bind_socket, make_server
from flashmoe.server.worker import ModelWorker

__all__ = [
    "MAX_BODY_BYTES", "MAX_JSON_DEPTH", "MAX_MESSAGES", "MAX_STOP", "MAX_STOP_CHARS", "APIError", "ModelWorker",
    "ServerThread", "_require_server_deps", "bind_socket", "create_app", "make_server",
]
