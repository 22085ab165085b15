"""POST /v1/completions: raw-text completion, with ``echo`` and ``logprobs`` (the prompt's and the
answer's token log-probabilities: what lm-evaluation-harness's loglikelihood tasks read)."""
# (no `from __future__ import annotations`: FastAPI reads the route functions' annotations at run time,
# and `Request` is imported where the routes are made)

import secrets
import time
from dataclasses import dataclass
from typing import List, Optional, Union

from flashmoe import llama as llama_api
from flashmoe.chat import ChatModel, ContextOverflow, GenResult, RequestError
from flashmoe.server.http import APIError
from flashmoe.server.logprobs import completion_logprobs as format_logprobs
from flashmoe.server.requests import completion_logprobs, request_models, single_prompt
from flashmoe.server.state import ServerState
from flashmoe.server.worker import SSE_HEADERS, guarded, run_streaming, sse

DEFAULT_MAX_TOKENS = 16  # OpenAI's, for a completion that does not say


@dataclass
class _Prompt:
    tokens: List[int]
    added_bos: bool  # the first token is a BOS the tokenizer added (no text in the prompt)


def _prompt_tokens(model: ChatModel, prompt: Union[str, List[int]]) -> _Prompt:
    """The prompt's tokens (a string is tokenized with the model's BOS rule, special tokens parsed);
    RequestError / ContextOverflow when empty, out of the vocabulary or longer than the context."""
    n_ctx = model.n_ctx()
    L = model.llama
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("the prompt is empty", param="prompt")
        lower = model.min_tokens(prompt, n_ctx)
        if lower >= n_ctx:  # refused before tokenizing (that could take long)
            raise ContextOverflow(f"the prompt is at least {lower} tokens; this model's context is {n_ctx} tokens")
        toks = L.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        added = bool(toks) and llama_api.adds_bos(L) and toks[0] == L.token_bos()
    else:
        n_vocab = L.n_vocab()
        if not prompt or any(not (0 <= t < n_vocab) for t in prompt):
            raise RequestError(f"prompt tokens must be a non-empty list of ids in [0, {n_vocab})", param="prompt")
        toks, added = list(prompt), False
    if len(toks) >= n_ctx:
        raise ContextOverflow(f"the prompt is {len(toks)} tokens; this model's context is {n_ctx} tokens")
    return _Prompt(toks, added)


def _usage(g: GenResult) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": g.cached_tokens}}


def add_completion_routes(app, st: ServerState) -> None:
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    CompletionRequest = request_models()[1]
    model, worker, reader = st.model, st.worker, st.reader

    @app.post("/v1/completions")
    async def completions(request: Request):
        reader.check_key(request)
        req = await reader.parse(request, CompletionRequest)
        top_n, echo = completion_logprobs(req)
        if req.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of")
        prompt = single_prompt(req.prompt)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        sampling = req.sampling()
        p = await guarded(worker, lambda: _prompt_tokens(model, prompt), prep=True)
        echo_text = ""
        if echo:
            # token ids: their text, special tokens spelled out (as /detokenize; text_offset counts them)
            echo_text = prompt if isinstance(prompt, str) else await guarded(
                worker, lambda: model.llama.detokenize(p.tokens, special=True).decode("utf-8", "replace"), prep=True)
        base = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
                "model": model.name, "system_fingerprint": None}

        def lp(g: GenResult) -> Optional[dict]:
            if top_n is None:
                return None
            return format_logprobs(model, g, echo=echo, echo_text=echo_text, skip_bos=p.added_bos)

        def job(emit=None, cancelled=worker.closing.is_set):
            return model.generate(p.tokens, max_tokens=max_tokens, sampling=sampling, stop=stops,
                                  on_text=(lambda s: emit(("content", s))) if emit else None, should_stop=cancelled,
                                  logprobs=top_n, prompt_logprobs=top_n if echo else None)

        if not req.stream:
            g = await guarded(worker, job)
            worker.served += 1
            return {**base, "choices": [{"index": 0, "text": echo_text + g.text, "logprobs": lp(g),
                                         "finish_reason": g.finish_reason}], "usage": _usage(g)}
        events = _completion_events(st, base, job, echo_text, lp, req.include_usage())
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def _completion_events(st: ServerState, base: dict, job, echo_text: str, lp, include_usage: bool):
    """The chunks of a streamed completion: the echoed prompt, the text as it comes, the finish reason
    (with all the log-probabilities, prompt's and answer's, when asked for), the usage, [DONE]."""

    def chunk(text: str, finish: Optional[str] = None, logprobs: Optional[dict] = None) -> str:
        return sse({**base, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    if echo_text:
        yield chunk(echo_text)
    async for kind, val in run_streaming(st.worker, job):
        if kind == "content":
            yield chunk(val)
        elif kind == "error":
            yield sse(val.body())
            break
        else:
            yield chunk("", val.finish_reason, lp(val))
            if include_usage:
                yield sse({**base, "choices": [], "usage": _usage(val)})
    yield "data: [DONE]\n\n"
