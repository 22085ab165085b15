"""POST /v1/chat/completions: plain answers, server-sent-event streams, tool calls, JSON output and
the answer's token log-probabilities."""
# (no `from __future__ import annotations`: FastAPI reads the route functions' annotations at run time,
# and `Request` is imported where the routes are made)

import secrets
import time
from typing import Optional

from flashmoe.chat import ChatOutcome, normalize_messages, normalize_tools, plan_chat, run_chat
from flashmoe.server.http import APIError
from flashmoe.server.logprobs import chat_logprobs as format_logprobs
from flashmoe.server.requests import chat_logprobs, request_models
from flashmoe.server.state import ServerState
from flashmoe.server.worker import SSE_HEADERS, guarded, run_streaming, sse


def _tools_and_choice(req):
    """``tools``/``tool_choice``, or the legacy ``functions``/``function_call`` as such."""
    tools_in, choice = req.tools, req.tool_choice
    if tools_in is None and req.functions is not None:
        tools_in = [{"type": "function", "function": f} for f in req.functions]
        if req.function_call is not None:
            fc = req.function_call
            choice = fc if isinstance(fc, str) else {"type": "function", "function": {"name": fc.get("name")}}
    return tools_in, choice


def add_chat_routes(app, st: ServerState) -> None:
    from fastapi import Request
    from fastapi.responses import StreamingResponse

    ChatRequest = request_models()[0]
    model, worker, reader = st.model, st.worker, st.reader

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        reader.check_key(request)
        req = await reader.parse(request, ChatRequest)
        top_n = chat_logprobs(req)
        if len(req.messages) > st.max_messages:
            raise APIError(400, f"too many messages ({len(req.messages)}, at most {st.max_messages})",
                           code="too_many_messages", param="messages")
        tools_in, choice = _tools_and_choice(req)
        max_tokens = req.max_completion_tokens or req.max_tokens

        def plan():
            messages = normalize_messages(req.messages)
            tools = normalize_tools(tools_in)  # every tool schema is checked (flashmoe.schemas)
            return plan_chat(model, messages, tools=tools, tool_choice=choice, response_format=req.response_format,
                             max_tokens=max_tokens, stop=req.stop)

        p = await guarded(worker, plan, prep=True)
        sampling = req.sampling()
        base = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": model.name,
                "system_fingerprint": None}
        lp = (lambda out: format_logprobs(model, out.gen)) if top_n is not None else (lambda out: None)

        if not req.stream:
            out = await guarded(worker, lambda: run_chat(model, p, sampling, should_stop=worker.closing.is_set,
                                                         logprobs=top_n))
            worker.served += 1
            return {**base, "object": "chat.completion",
                    "choices": [{"index": 0, "message": out.openai_message(), "logprobs": lp(out),
                                 "finish_reason": out.finish_reason}],
                    "usage": out.usage()}

        def job(emit, cancelled):
            return run_chat(model, p, sampling, on_content=lambda s: emit(("content", s)), should_stop=cancelled,
                            logprobs=top_n)

        events = _chat_events(st, base, job, lp, req.include_usage())
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def _chat_events(st: ServerState, base: dict, job, lp, include_usage: bool):
    """The chunks of a streamed chat answer: the role, the content as it comes, the tool calls, the
    finish reason (with all the answer's log-probabilities, when asked for), the usage, [DONE]."""

    def chunk(delta: dict, finish: Optional[str] = None, logprobs: Optional[dict] = None) -> str:
        return sse({**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    yield chunk({"role": "assistant", "content": ""})
    async for kind, val in run_streaming(st.worker, job):
        if kind == "content":
            yield chunk({"content": val})
        elif kind == "error":
            yield sse(val.body())
            break
        else:
            out: ChatOutcome = val
            for i, c in enumerate(out.tool_calls):
                yield chunk({"tool_calls": [{"index": i, **c.to_openai()}]})
            yield chunk({}, out.finish_reason, lp(out))
            if include_usage:
                yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": out.usage()})
    yield "data: [DONE]\n\n"
