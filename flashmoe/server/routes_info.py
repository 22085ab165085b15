"""The routes that read: /health, /v1/models, /flashmoe/stats, /openapi.json, and the tokenizer
(/tokenize, /detokenize, /tokenizer_info, as vLLM has them: lm-evaluation-harness's `remote` tokenizer
backend uses them to count a request's tokens with the model's own tokenizer)."""
# (no `from __future__ import annotations`: FastAPI reads the route functions' annotations at run time,
# and `Request` is imported where the routes are made)

from flashmoe import llama as llama_api
from flashmoe.chat import RequestError
from flashmoe.server.http import APIError
from flashmoe.server.requests import request_models
from flashmoe.server.state import ServerState
from flashmoe.server.worker import guarded

MAX_TOKENIZE_TOKENS = 1 << 16  # /tokenize refuses a text whose tokens are surely more (bounds its time)


def add_info_routes(app, st: ServerState) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    model, worker, reader = st.model, st.worker, st.reader

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        reader.check_key(request)
        return JSONResponse(app.openapi())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model.name, "queued": worker.waiting}

    @app.get("/v1/models")
    async def models(request: Request):
        reader.check_key(request)
        return {"object": "list", "data": [st.model_card()]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str, request: Request):
        reader.check_key(request)
        if name != model.name:
            raise APIError(404, f"model {name!r} is not served here (this server serves {model.name!r})",
                           code="model_not_found", param="model")
        return st.model_card()

    @app.get("/flashmoe/stats")
    async def stats(request: Request):
        reader.check_key(request)
        engine = st.engine
        return {
            "model": model.name,
            "mode": engine.mode_line() if engine is not None else None,
            "stats": (engine.stats() if engine is not None else {}) or {},
            "server": {"served": worker.served, "failed": worker.failed, "queued": worker.waiting,
                       "n_ctx": model.n_ctx(), "tokens_evaluated": model.n_evaluated},
        }

    add_tokenizer_routes(app, st)


def add_tokenizer_routes(app, st: ServerState) -> None:
    from fastapi import Request

    _, _, TokenizeRequest, DetokenizeRequest = request_models()
    model, worker, reader = st.model, st.worker, st.reader
    L = model.llama

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        reader.check_key(request)
        bos, eos = L.token_bos(), L.token_eos()
        text = lambda t: L.detokenize([t], special=True).decode("utf-8", "replace") if t >= 0 else None  # noqa: E731
        adds_bos = llama_api.adds_bos(L)  # a BOS the tokenizer never adds is not this model's (Qwen: none)
        return {"tokenizer_class": "llama.cpp (GGUF vocabulary)", "model": model.name,
                "bos_token": text(bos) if adds_bos else None, "eos_token": text(eos), "pad_token": None,
                "add_bos_token": adds_bos, "model_max_length": model.n_ctx(),
                "chat_template": model.template.source if model.template.from_model else None}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        reader.check_key(request)
        req = await reader.parse_json(request, TokenizeRequest)

        def run():
            if model.min_tokens(req.prompt, MAX_TOKENIZE_TOKENS) > MAX_TOKENIZE_TOKENS:
                raise RequestError(f"the text is more than {MAX_TOKENIZE_TOKENS} tokens", param="prompt")
            return L.tokenize(req.prompt.encode("utf-8"), add_bos=req.add_special_tokens, special=True)

        toks = await guarded(worker, run, prep=True)
        return {"count": len(toks), "max_model_len": model.n_ctx(), "tokens": toks}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        reader.check_key(request)
        req = await reader.parse_json(request, DetokenizeRequest)
        n_vocab = L.n_vocab()
        if any(not 0 <= t < n_vocab for t in req.tokens):
            raise APIError(400, f"tokens must be ids in [0, {n_vocab})", param="tokens")
        text = await guarded(worker, lambda: L.detokenize(req.tokens, special=True).decode("utf-8", "replace"),
                             prep=True)
        return {"prompt": text}
