"""A conversation that keeps the KV cache between turns (what `flashmoe chat` runs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from flashmoe.chat.errors import RequestError
from flashmoe.chat.model import ChatModel, Sampling
from flashmoe.chat.tools import ToolCall, normalize_tool_choice, normalize_tools
from flashmoe.chat.turns import ChatOutcome, ChatPlan, plan_chat, run_chat


@dataclass
class Turn:
    outcome: ChatOutcome
    prompt_tokens: int
    prompt_evaluated: int  # tokens of this turn's prompt that went through the model
    reused_tokens: int  # from the KV cache


class ChatSession:
    """A conversation that keeps the KV cache between turns: each turn only evaluates the new tokens.

    The model's answer is kept as its own tokens; the next prompt is the template rendering of the
    whole conversation, and when it starts with (previous prompt + answer) text, the cached tokens are
    reused verbatim and only the rest is tokenized and evaluated.
    """

    _MARK = "\ue000flashmoe-answer\ue001"

    def __init__(self, model: ChatModel, *, system: Optional[str] = None, tools: Optional[List[dict]] = None,
                 tool_choice: Any = "auto", max_tokens: int = 512, sampling: Optional[Sampling] = None):
        self.model = model
        self.system = system
        self.tools = normalize_tools(tools) if tools else []
        self.tool_choice = normalize_tool_choice(tool_choice, self.tools) if self.tools else "none"
        self.max_tokens = max_tokens
        self.sampling = sampling or Sampling(temperature=0.7)
        self.messages: List[dict] = []
        self._prefix: Optional[Tuple[str, List[int]]] = None
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._prefix = None

    def add_user(self, text: str):
        self.messages.append({"role": "user", "content": text})

    def add_tool_result(self, call: ToolCall, content: str):
        self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content})

    def respond(self, *, tool_choice: Any = None, on_content: Optional[Callable[[str], None]] = None,
                should_stop: Optional[Callable[[], bool]] = None) -> Turn:
        """The assistant's next answer to the conversation so far (appended to it)."""
        choice = self.tool_choice if tool_choice is None else tool_choice
        plan = plan_chat(self.model, self.messages, tools=self.tools, tool_choice=choice,
                         max_tokens=self.max_tokens, prefix=self._prefix)
        out = run_chat(self.model, plan, self.sampling, on_content=on_content, should_stop=should_stop)
        g = out.gen
        self.messages.append(out.message())
        self._prefix = self._next_prefix(plan, out)
        return Turn(outcome=out, prompt_tokens=g.prompt_tokens, prompt_evaluated=g.prompt_evaluated,
                    reused_tokens=g.cached_tokens)

    def _next_prefix(self, plan: ChatPlan, out: ChatOutcome) -> Optional[Tuple[str, List[int]]]:
        """(text, tokens) that the next prompt may start with: this prompt and the answer's own tokens.

        The template renders the answer in place of a marker: when what precedes the marker is this
        turn's prompt, the answer's tokens stand for its text verbatim (even where the model wrote
        bytes that do not decode cleanly). Tool calls are re-rendered by the template, so after one
        the next prompt is tokenized afresh (llama.cpp still reuses the common prefix).
        """
        g = out.gen
        if out.tool_calls or g.stopped_by_string or plan.mode != "text" or out.content is None:
            return None
        probe = self.messages[:-1] + [{"role": "assistant", "content": self._MARK}]
        try:
            text = self.model.template.render(probe, self.tools or None)
        except RequestError:
            return None
        i = text.find(self._MARK)
        if i < 0 or text[:i] != plan.prompt_text:
            return None
        return plan.prompt_text + out.content, list(plan.prompt_tokens) + list(g.tokens)

    def ask(self, text: str, **kw) -> Turn:
        self.add_user(text)
        return self.respond(**kw)
