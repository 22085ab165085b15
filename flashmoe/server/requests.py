"""The request bodies (pydantic models, made on first use: pydantic is a server extra) and the checks of
their fields that answer 400 with the field named (logprobs, echo, the prompt)."""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Tuple, Union

from flashmoe.chat import MAX_TOP, Sampling
from flashmoe.server.http import APIError


@functools.lru_cache(maxsize=None)
def request_models() -> tuple:
    """(ChatRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest)."""
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
        logprobs: Any = None  # checked by chat_logprobs (a 400 naming the field)
        top_logprobs: Any = None

    class CompletionRequest(_Base):
        prompt: Union[str, List[str], List[int], List[List[int]]]
        max_tokens: Optional[int] = Field(16, ge=0)  # 0: nothing generated (with echo: the prompt's logprobs)
        echo: Any = False  # checked by completion_logprobs
        suffix: Optional[str] = None
        logprobs: Any = None
        best_of: Optional[int] = None

    class TokenizeRequest(BaseModel):
        model_config = ConfigDict(extra="allow")

        model: Optional[str] = None
        prompt: str
        add_special_tokens: bool = True

    class DetokenizeRequest(BaseModel):
        model_config = ConfigDict(extra="allow")

        model: Optional[str] = None
        tokens: List[int]

    return ChatRequest, CompletionRequest, TokenizeRequest, DetokenizeRequest


def _top_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP:
        raise APIError(400, f"{name} must be an integer from 0 to {MAX_TOP} (the number of most likely tokens "
                            f"listed at each position), not {str(value)[:40]!r}", param=name)
    return value


def completion_logprobs(req) -> Tuple[Optional[int], bool]:
    """(logprobs: the number of alternatives per token, or None for no log-probabilities; echo)."""
    if not isinstance(req.echo, bool):
        raise APIError(400, f"echo must be true or false, not {str(req.echo)[:40]!r}", param="echo")
    if req.logprobs is None:
        return None, req.echo
    return _top_count(req.logprobs, "logprobs"), req.echo


def chat_logprobs(req) -> Optional[int]:
    """The number of alternatives per token (top_logprobs, default 0) when logprobs is true, else None."""
    if req.logprobs is not None and not isinstance(req.logprobs, bool):
        raise APIError(400, f"logprobs must be true or false, not {str(req.logprobs)[:40]!r} (the number of "
                            f"alternatives is top_logprobs)", param="logprobs")
    top = None if req.top_logprobs is None else _top_count(req.top_logprobs, "top_logprobs")
    if top is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (top or 0) if req.logprobs else None


def single_prompt(prompt: Any) -> Union[str, List[int]]:
    """The one prompt of a completion request: a string, or a list of token ids (also as a list of one
    string or one list of ids, the form lm-evaluation-harness sends)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request ({len(prompt)} given)", param="prompt")
        return prompt[0]
    return prompt
