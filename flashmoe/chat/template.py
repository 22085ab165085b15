"""The model's chat template (GGUF ``tokenizer.chat_template``), rendered the way llama-cpp-python and
Hugging Face render it (llama-cpp-python's Jinja2ChatFormatter); ChatML when the model has none."""
from __future__ import annotations

import re
from typing import Any, List, Optional, Tuple

from flashmoe import llama as llama_api
from flashmoe.chat.errors import RequestError
from flashmoe.chat.tools import CALL_OPEN

FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + (message['content'] or '')"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplate:
    """The model's chat template (GGUF ``tokenizer.chat_template``), rendered with llama-cpp-python's
    Jinja2ChatFormatter."""

    def __init__(self, template: str, bos_token: str, eos_token: str, from_model: bool = True):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.source = template
        self.from_model = from_model
        self.eos_token = eos_token
        self._fmt = Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)
        # Hermes/Qwen-style templates: a forced call is written inside <tool_call> like the model's own.
        self.call_prefix = CALL_OPEN + "\n" if CALL_OPEN in template else ""

    @classmethod
    def from_llama(cls, llama) -> "ChatTemplate":
        meta = getattr(llama, "metadata", {}) or {}
        eos_id, bos_id = llama.token_eos(), llama.token_bos()
        eos = llama_api.token_text(llama, eos_id)
        bos = llama_api.token_text(llama, bos_id)
        tpl = meta.get("tokenizer.chat_template")
        if tpl:
            return cls(tpl, bos, eos)
        return cls(FALLBACK_TEMPLATE, bos, eos or "<|im_end|>", from_model=False)

    def content_spans(self, messages: List[dict], tools: Optional[List[dict]], text: str) -> Optional[List[Tuple[int, int]]]:
        """Where each message's text content is in ``text`` (this template's rendering of ``messages``):
        [(start, end)], or None when the template does not write every content once and verbatim (it
        trims, splits or repeats it). Found by rendering with a unique marker in place of each content."""
        mark = "\ue000fm{}\ue001"
        marked: List[dict] = []
        contents: List[str] = []
        for m in messages:
            c = m.get("content")
            if isinstance(c, str) and c:
                m = {**m, "content": mark.format(len(contents))}
                contents.append(c)
            marked.append(m)
        try:
            rendered = self.render(marked, tools)
        except RequestError:
            return None
        spans, out, pos, shift = [], [], 0, 0
        for k, hit in enumerate(re.finditer("\ue000fm(\\d+)\ue001", rendered)):
            if int(hit.group(1)) != k:  # a content left out, repeated or reordered
                return None
            out.append(rendered[pos:hit.start()])
            start = hit.start() + shift
            spans.append((start, start + len(contents[k])))
            out.append(contents[k])
            shift += len(contents[k]) - (hit.end() - hit.start())
            pos = hit.end()
        out.append(rendered[pos:])
        if len(spans) != len(contents) or "".join(out) != text:
            return None
        return spans

    def render(self, messages: List[dict], tools: Optional[List[dict]] = None) -> str:
        try:
            fmt: Any = self._fmt  # its annotations want llama-cpp-python's TypedDicts; these are plain dicts
            return fmt(messages=messages, tools=tools or None).prompt
        except ValueError as e:  # raise_exception() in the template
            raise RequestError(f"the model's chat template refused the conversation: {e}", param="messages")
        except Exception as e:
            raise RequestError(f"the model's chat template failed on this conversation: {type(e).__name__}: {e}",
                               param="messages")
