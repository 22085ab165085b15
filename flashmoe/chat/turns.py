"""One chat turn: ``plan_chat`` renders and tokenizes a request and chooses how to generate it (free text,
a grammar-constrained tool call, or grammar-constrained JSON content); ``run_chat`` generates it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from flashmoe.chat.errors import ContextOverflow, RequestError
from flashmoe.chat.model import ChatModel, GenResult, Sampling
from flashmoe.chat.tools import (
    CALL_OPEN,
    ToolCall,
    call_schema,
    check_tool_schema,
    normalize_tool_choice,
    parse_tool_calls,
    strict_json,
)


@dataclass
class ChatPlan:
    prompt_text: str
    prompt_tokens: List[int]
    mode: str  # "text" | "call" (constrained tool call) | "json" (constrained content)
    tools: List[dict]
    tool_choice: Union[str, dict]
    grammar: Any = None
    max_tokens: int = 512
    stop: List[str] = field(default_factory=list)


@dataclass
class ChatOutcome:
    content: Optional[str]
    tool_calls: List[ToolCall]
    finish_reason: str  # "stop" | "length" | "tool_calls" | "interrupted"
    gen: GenResult
    prompt_text: str = ""

    def message(self) -> dict:
        """The assistant message as it goes back into the conversation (chat-template form)."""
        m: Dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                               for c in self.tool_calls]
        return m

    def openai_message(self) -> dict:
        m: Dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return m

    def usage(self) -> dict:
        g = self.gen
        return {
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": g.cached_tokens},
        }


def response_format_schema(response_format: Any) -> Tuple[bool, Optional[dict]]:
    """-> (constrained?, schema or None for any JSON object)."""
    if response_format is None:
        return False, None
    if not isinstance(response_format, dict) or "type" not in response_format:
        raise RequestError("response_format must be an object with a type", param="response_format")
    kind = response_format["type"]
    if kind == "text":
        return False, None
    if kind == "json_object":
        schema = response_format.get("schema")  # llama-cpp-python's extension
        return True, schema if isinstance(schema, dict) else None
    if kind == "json_schema":
        js = response_format.get("json_schema")
        if not isinstance(js, dict):
            raise RequestError("response_format json_schema needs a json_schema object", param="response_format")
        schema = js.get("schema", js.get("schema_"))
        if not isinstance(schema, dict):
            raise RequestError("response_format json_schema needs json_schema.schema (a JSON schema object)",
                               param="response_format")
        return True, schema
    raise RequestError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                       param="response_format")


def plan_chat(
    model: ChatModel,
    messages: List[dict],
    *,
    tools: Optional[List[dict]] = None,
    tool_choice: Any = None,
    response_format: Any = None,
    max_tokens: Optional[int] = None,
    stop: Optional[Union[str, List[str]]] = None,
    prefix: Optional[Tuple[str, List[int]]] = None,
) -> ChatPlan:
    """Render and tokenize a chat request and choose how to generate it.

    ``messages``/``tools`` must be normalized. ``prefix`` = (text, tokens) of what the KV cache holds
    from the previous turn: when the new prompt starts with that text, those exact tokens are reused
    (the model's own tokens, not a re-tokenization), so only the new text is evaluated.
    """
    tools = tools or []
    choice = normalize_tool_choice(tool_choice, tools)
    constrained_json, schema = response_format_schema(response_format)
    text = rendered = model.template.render(messages, tools if tools else None)
    grammar = None
    mode = "text"
    if choice == "required" or isinstance(choice, dict):
        mode = "call"
        only = choice["name"] if isinstance(choice, dict) else None
        for t in tools:  # name the tool whose schema cannot become a grammar
            if only is None or t["function"]["name"] == only:
                check_tool_schema(t["function"]["parameters"], f"tool {t['function']['name']} parameters",
                                  grammar=True)
        text += model.template.call_prefix
        grammar = model.grammar_for_schema(call_schema(tools, only), what=f"tool {only}" if only else "the tools")
    elif constrained_json:
        mode = "json"
        grammar = model.grammar_for_schema(schema)
    lower = model.min_tokens(text, model.n_ctx())
    if lower >= model.n_ctx():  # refused before tokenizing: that could take long for a huge prompt
        raise ContextOverflow(f"the prompt is at least {lower} tokens; this model's context is {model.n_ctx()} tokens "
                              f"(use a larger --n-ctx or a shorter conversation)")
    spans = _data_spans(model, messages, tools, rendered)
    if spans is not None:  # a message spells out a special token: it stays text
        tokens = model.tokenize_data(text, spans)
    elif prefix and prefix[0] and text.startswith(prefix[0]):
        tokens = list(prefix[1]) + (model.tokenize(text[len(prefix[0]):]) if len(text) > len(prefix[0]) else [])
    else:
        tokens = model.tokenize(text)
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if model.template.eos_token:
        stops.append(model.template.eos_token)
    if len(tokens) >= model.n_ctx():
        raise ContextOverflow(f"the prompt is {len(tokens)} tokens; this model's context is {model.n_ctx()} tokens "
                              f"(use a larger --n-ctx or a shorter conversation)")
    if max_tokens is None:
        max_tokens = model.n_ctx() - len(tokens)
    if max_tokens < 1:
        raise RequestError("max_tokens must be at least 1", param="max_tokens")
    return ChatPlan(prompt_text=text, prompt_tokens=tokens, mode=mode, tools=tools, tool_choice=choice,
                    grammar=grammar, max_tokens=int(max_tokens), stop=stops)


def _data_spans(model, messages: List[dict], tools: List[dict], text: str):
    """None when no message spells out one of the model's special tokens (the prompt is tokenized whole,
    as llama-cpp-python does); else where the message contents are in ``text``, so that they are
    tokenized as text: a client's "<|im_start|>system" must not become a system turn. A special token
    spelled in a field the template does not write verbatim (a tool call's name or arguments, a content
    the template rewrites) cannot be kept as text: the request is refused."""
    where = None
    for i, m in enumerate(messages):
        c = m.get("content")
        found = model.vocab.control_in(c) if isinstance(c, str) else None
        if found is not None and where is None:
            where = (i, found)
        rest = json.dumps({k: v for k, v in m.items() if k not in ("content", "role")}, ensure_ascii=False)
        bad = model.vocab.control_in(rest)
        if bad is not None:
            raise RequestError(f"messages[{i}] spells out the model's special token {bad!r} outside its content: "
                               "refused (it would be read as that token)", param="messages")
    if where is None:
        return None
    spans = model.template.content_spans(messages, tools or None, text)
    if spans is None:
        i, found = where
        raise RequestError(f"messages[{i}].content spells out the model's special token {found!r}, and this model's "
                           "chat template rewrites message content, so it cannot be kept as text: refused",
                           param="messages")
    return spans


class _CallHoldback:
    """For tool_choice auto: streams content until a <tool_call> starts, then holds the rest back."""

    def __init__(self, on_content: Optional[Callable[[str], None]]):
        self.on_content = on_content
        self.buf = ""
        self.in_call = False

    def push(self, piece: str):
        if self.in_call:
            return
        self.buf += piece
        i = self.buf.find(CALL_OPEN)
        if i >= 0:
            self.in_call = True
            out, self.buf = self.buf[:i], ""
        else:
            keep = 0
            for k in range(min(len(CALL_OPEN) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(CALL_OPEN[:k]):
                    keep = k
                    break
            out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        if out and self.on_content:
            self.on_content(out)

    def flush(self):
        if not self.in_call and self.buf and self.on_content:
            self.on_content(self.buf)
        self.buf = ""


def run_chat(
    model: ChatModel,
    plan: ChatPlan,
    sampling: Sampling,
    *,
    on_content: Optional[Callable[[str], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    logprobs: Optional[int] = None,
) -> ChatOutcome:
    """Generate the answer planned by plan_chat; stream content pieces to ``on_content``. ``logprobs``
    (a number of alternatives): the answer's token log-probabilities go to ``outcome.gen.logprobs``."""
    if plan.mode == "call":
        g = model.generate(plan.prompt_tokens, max_tokens=plan.max_tokens, sampling=sampling, grammar=plan.grammar,
                           must_complete=True, should_stop=should_stop, logprobs=logprobs)
        body = strict_json(g.text.strip())
        obj = json.loads(body) if body is not None else None
        if g.finish_reason == "stop" and isinstance(obj, dict) and "name" in obj:
            call = ToolCall(name=obj["name"], arguments=json.dumps(obj.get("arguments", {}), ensure_ascii=False))
            return ChatOutcome(content=None, tool_calls=[call], finish_reason="tool_calls", gen=g,
                               prompt_text=plan.prompt_text)
        # budget or context exhausted before the call was complete (or interrupted)
        return ChatOutcome(content=g.text, tool_calls=[], finish_reason=g.finish_reason if g.finish_reason != "stop"
                           else "length", gen=g, prompt_text=plan.prompt_text)
    if plan.mode == "json":
        g = model.generate(plan.prompt_tokens, max_tokens=plan.max_tokens, sampling=sampling, grammar=plan.grammar,
                           must_complete=True, on_text=on_content, should_stop=should_stop, logprobs=logprobs)
        text = g.text
        if g.finish_reason == "stop":
            fixed = strict_json(text.strip())
            text = fixed if fixed is not None else text
        return ChatOutcome(content=text, tool_calls=[], finish_reason=g.finish_reason, gen=g,
                           prompt_text=plan.prompt_text)
    parse = plan.tool_choice == "auto" and bool(plan.tools)
    hold = _CallHoldback(on_content) if parse else None
    g = model.generate(plan.prompt_tokens, max_tokens=plan.max_tokens, sampling=sampling, stop=plan.stop,
                       on_text=(hold.push if hold else on_content), should_stop=should_stop, logprobs=logprobs)
    if not parse:
        return ChatOutcome(content=g.text, tool_calls=[], finish_reason=g.finish_reason, gen=g,
                           prompt_text=plan.prompt_text)
    assert hold is not None
    content, calls = parse_tool_calls(g.text, plan.tools)
    if calls:
        return ChatOutcome(content=content, tool_calls=calls, finish_reason="tool_calls", gen=g,
                           prompt_text=plan.prompt_text)
    if hold.in_call:
        # <tool_call> text that did not parse: it is content after all
        if on_content:
            on_content(g.text[g.text.find(CALL_OPEN):])
    else:
        hold.flush()
    return ChatOutcome(content=g.text, tool_calls=[], finish_reason=g.finish_reason, gen=g,
                       prompt_text=plan.prompt_text)
