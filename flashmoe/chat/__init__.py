"""Conversations, tool calls and constrained generation: what `flashmoe chat` and `flashmoe serve` share.

The prompt is the model's own chat template (``tokenizer.chat_template`` in the GGUF metadata),
rendered the way llama-cpp-python and Hugging Face do (llama-cpp-python's Jinja2ChatFormatter).

Tool calls:

* ``tool_choice`` "auto": the model writes freely; ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``
  blocks in its answer (the Hermes/Qwen convention) are parsed into structured calls.
* ``tool_choice`` "required" or a named function: the answer is generated under a grammar built from
  the JSON schema of the tools' parameters (``{"name": const, "arguments": schema}``, one alternative
  per tool), so the call always parses and matches the schema, even from a tiny or heavily quantized
  model. When the token budget runs out inside a constrained answer, closing tokens are favoured and
  generation goes on (at most ``CLOSE_EXTRA_TOKENS`` more) until the JSON is complete.
* ``response_format`` ``json_schema`` / ``json_object``: the same constrained generation for the content.

One generation runs at a time on a model: callers serialize (the server has a single worker thread).

The package, by concern: ``errors`` (RequestError, ContextOverflow), ``tools`` (tools, tool_choice,
``<tool_call>`` parsing), ``messages`` (OpenAI messages -> template form), ``template`` (the chat
template), ``vocab`` (vocabulary facts: token-count bound, closing bias, UTF-8 guard), ``logprobs``
(log-softmax of the engine's logits), ``model`` (ChatModel and its generation loop), ``turns``
(plan_chat / run_chat), ``session`` (ChatSession, for `flashmoe chat`). Everything is importable from
``flashmoe.chat``.
"""
from flashmoe.chat.errors import ContextOverflow, RequestError
from flashmoe.chat.logprobs import MAX_TOP, TokenLogprob, log_softmax, pick
from flashmoe.chat.messages import normalize_messages
from flashmoe.chat.model import CLOSE_EXTRA_TOKENS, ChatModel, GenResult, Sampling, _StopFilter
from flashmoe.chat.session import ChatSession, Turn
from flashmoe.chat.template import FALLBACK_TEMPLATE, ChatTemplate
from flashmoe.chat.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    MAX_TOOLS,
    ToolCall,
    call_schema,
    check_tool_schema,
    load_tools_file,
    normalize_tool_choice,
    normalize_tools,
    parse_tool_calls,
    strict_json,
)
from flashmoe.chat.turns import ChatOutcome, ChatPlan, plan_chat, response_format_schema, run_chat

__all__ = [
    "CALL_CLOSE", "CALL_OPEN", "CLOSE_EXTRA_TOKENS", "FALLBACK_TEMPLATE", "MAX_TOOLS", "MAX_TOP",
    "ChatModel", "ChatOutcome", "ChatPlan", "ChatSession", "ChatTemplate", "ContextOverflow", "GenResult",
    "RequestError", "Sampling", "TokenLogprob", "ToolCall", "Turn", "_StopFilter", "call_schema",
    "check_tool_schema", "load_tools_file", "log_softmax", "normalize_messages", "normalize_tool_choice",
    "normalize_tools", "parse_tool_calls", "pick", "plan_chat", "response_format_schema", "run_chat",
    "strict_json",
]
