"""The chat template of the synthetic models, and rendering a conversation with it.

    from gguf_tools.chat_template import CHAT_TEMPLATE, render_chat

    text = render_chat([{"role": "user", "content": "hi"}], tools=None)

Written into every model ``gguf_tools.synth`` makes (``tokenizer.chat_template``); its special tokens
are in the vocabulary of ``gguf_tools.vocab``.
"""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence

# ChatML with tool calls the way Qwen models do it: tools listed in the system turn inside
# <tools></tools>, assistant calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>,
# tool results (role "tool") grouped into a user turn inside <tool_response></tool_response>.
# Literal text is only emitted from {{- ... -}} so that trim_blocks/lstrip_blocks don't matter.
CHAT_TEMPLATE = r"""{#- flashmoe synthetic model: ChatML with tool calls -#}
{%- macro text_of(content) -%}
{%- if content is none -%}
{%- elif content is string -%}{{- content -}}
{%- else -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- set first = 1 if has_system else 0 -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if has_system -%}{{- text_of(messages[0].content) + '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou may call the functions described below. Their signatures are listed inside <tools></tools>:\n<tools>' -}}
{%- for tool in tools -%}
{{- '\n' -}}{{- tool | tojson -}}
{%- endfor -%}
{{- '\n</tools>\n\nTo call a function, reply with a JSON object holding its name and arguments inside <tool_call></tool_call>:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif has_system -%}
{{- '<|im_start|>system\n' + text_of(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages[first:] -%}
{%- set i = first + loop.index0 -%}
{%- if message.role == 'tool' -%}
{%- if i == 0 or messages[i - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + text_of(message.content) + '\n</tool_response>' -}}
{%- if loop.last or messages[i + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- elif message.role == 'assistant' -%}
{%- set body = text_of(message.content) -%}
{{- '<|im_start|>assistant\n' + body -}}
{%- if message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- if body or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message.role + '\n' + text_of(message.content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""


def render_chat(messages: Sequence[Dict[str, Any]], tools: Optional[Sequence[Dict[str, Any]]] = None,
                add_generation_prompt: bool = True, template: str = CHAT_TEMPLATE) -> str:
    """Render a conversation with the chat template the way HF / llama-cpp-python do (jinja2 sandbox,
    trim_blocks, lstrip_blocks, tojson without HTML escaping)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template).render(messages=list(messages), tools=list(tools) if tools else None,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token="<s>", eos_token="<|im_end|>")
