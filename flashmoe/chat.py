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
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import random
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from flashmoe import llama as llama_api
from flashmoe.errors import FlashMoEError

# How many tokens past max_tokens a constrained (grammar) answer may take to close its JSON.
CLOSE_EXTRA_TOKENS = 256
# Hermes / Qwen tool-call markup.
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_TOOLS = 128  # tools per request

FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + (message['content'] or '')"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class RequestError(FlashMoEError):
    """A request the model cannot serve as asked (HTTP 400 in the server, one line in the CLI)."""

    status = 400
    code: Optional[str] = None
    param: Optional[str] = None

    def __init__(self, message: str, *, code: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.param = param


class ContextOverflow(RequestError):
    def __init__(self, message: str):
        super().__init__(message, code="context_length_exceeded", param="messages")


# ------------------------------------------------------------------------------------------ tools


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def args(self) -> Any:
        return json.loads(self.arguments)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def normalize_tools(tools: Any) -> List[dict]:
    """OpenAI ``tools`` (or bare function objects) -> [{"type": "function", "function": {...}}]."""
    if tools is None:
        return []
    if isinstance(tools, dict) and "tools" in tools:
        tools = tools["tools"]
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of function tools", param="tools")
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"too many tools ({len(tools)}, at most {MAX_TOOLS})", param="tools")
    out = []
    seen = set()
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise RequestError(f"tools[{i}] is not an object", param="tools")
        if "function" in t:
            if t.get("type", "function") != "function":
                raise RequestError(f"tools[{i}]: only type 'function' is supported", param="tools")
            fn = t["function"]
        else:
            fn = t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME_RE.match(fn["name"]):
            raise RequestError(f"tools[{i}]: a function needs a name (letters, digits, _ . : -)", param="tools")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise RequestError(f"tools[{i}] ({fn['name']}): parameters must be a JSON schema object", param="tools")
        if fn["name"] in seen:
            raise RequestError(f"tools[{i}]: duplicate function name {fn['name']!r}", param="tools")
        seen.add(fn["name"])
        f2 = {"name": fn["name"]}
        if fn.get("description"):
            f2["description"] = str(fn["description"])
        # every schema is checked (metaschema, size, impossible constraints) even when no grammar is built
        check_tool_schema(params, f"tools[{i}] ({fn['name']}) parameters", grammar=False)
        f2["parameters"] = params
        out.append({"type": "function", "function": f2})
    return out


def check_tool_schema(params: Any, where: str, grammar: bool) -> None:
    """RequestError (param "tools") unless ``params`` is a usable JSON schema (``flashmoe.schemas``);
    ``grammar``: the call will be generated under a grammar, so the schema must convert."""
    from flashmoe.schemas import SchemaProblem, check_schema

    try:
        check_schema(params, where, grammar=grammar)
    except SchemaProblem as e:
        raise RequestError(str(e), param="tools") from None


def load_tools_file(path: str) -> List[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FlashMoEError(f"no such tools file: {path}")
    except (OSError, ValueError) as e:
        raise FlashMoEError(f"{path}: not a JSON tools file ({e})")
    try:
        tools = normalize_tools(data)
    except RequestError as e:
        raise FlashMoEError(f"{path}: {e}")
    if not tools:
        raise FlashMoEError(f"{path}: no tools in the file")
    return tools


def normalize_tool_choice(tool_choice: Any, tools: List[dict]) -> Union[str, dict]:
    """-> "none" | "auto" | "required" | {"name": NAME} (a named function)."""
    names = [t["function"]["name"] for t in tools]
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice in ("none", "auto", "required"):
            if tool_choice != "none" and not tools:
                if tool_choice == "auto":
                    return "none"
                raise RequestError("tool_choice 'required' needs tools", param="tool_choice")
            return tool_choice
        name = tool_choice  # the CLI passes a bare function name
    elif isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if "function" in tool_choice else tool_choice
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise RequestError("tool_choice must be 'none', 'auto', 'required' or "
                               "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    else:
        raise RequestError("tool_choice must be a string or an object", param="tool_choice")
    if name not in names:
        raise RequestError(f"tool_choice names function {name!r}, which is not among the tools "
                           f"({', '.join(names) or 'none given'})", param="tool_choice")
    return {"name": name}


def call_schema(tools: List[dict], only: Optional[str] = None) -> dict:
    """JSON schema of one call: {"name": const, "arguments": parameters}, one alternative per tool."""
    alts = []
    for t in tools:
        fn = t["function"]
        if only is not None and fn["name"] != only:
            continue
        alts.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"],
        })
    if not alts:
        raise RequestError("no tool to call", param="tool_choice")
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", re.S)


def parse_tool_calls(text: str, tools: Optional[List[dict]] = None) -> Tuple[Optional[str], List[ToolCall]]:
    """Split a free answer into (content, [tool calls]) from its ``<tool_call>{...}</tool_call>`` blocks.

    A block whose body is not a JSON object with a "name" (and "arguments"/"parameters") stays in the
    content. With ``tools``, a call must name one of them.
    """
    if CALL_OPEN not in text:
        return text, []
    calls: List[ToolCall] = []
    kept: List[str] = []
    pos = 0
    names = {t["function"]["name"] for t in tools} if tools else None
    for m in _CALL_BLOCK.finditer(text):
        call = _call_from_json(m.group(1), names)
        if call is None:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    if not calls:
        return text, []
    content = "".join(kept).strip()
    return (content or None), calls


def _call_from_json(body: str, names: Optional[set]) -> Optional[ToolCall]:
    try:
        obj = json.loads(body.strip(), strict=False)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        if names is not None and obj["name"] not in names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            args = json.loads(args, strict=False)
        return ToolCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's stack: not a call
        return None


def strict_json(text: str) -> Optional[str]:
    """``text`` if it is strict JSON; else a strict re-encoding of what it holds; None if it is not JSON."""
    try:
        json.loads(text)
        return text
    except (ValueError, RecursionError):
        pass
    try:
        return json.dumps(json.loads(text, strict=False), ensure_ascii=False)
    except (ValueError, RecursionError):
        return None


# ------------------------------------------------------------------------------------------ messages


def _text_of(content: Any, where: str) -> Optional[str]:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif isinstance(p, dict) and p.get("type") in ("text", "input_text") and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise RequestError(f"{where}: content part of type {kind!r} is not supported (text only)",
                                   param="messages")
        return "".join(parts)
    raise RequestError(f"{where}: content must be a string or a list of text parts", param="messages")


def normalize_messages(messages: Any) -> List[dict]:
    """OpenAI messages -> what chat templates expect (text content, tool-call arguments as objects)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    out: List[dict] = []
    call_names: Dict[str, str] = {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} is not an object", param="messages")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise RequestError(f"{where}: unknown role {role!r} (system, user, assistant, tool)", param="messages")
        msg: Dict[str, Any] = {"role": role, "content": _text_of(m.get("content"), where)}
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise RequestError(f"{where}.tool_calls must be a list of tool calls", param="messages")
            calls = []
            for j, c in enumerate(m["tool_calls"]):
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise RequestError(f"{where}.tool_calls[{j}]: needs function.name", param="messages")
                args = fn.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except (ValueError, RecursionError):
                        pass  # left as text: the template shows it as is
                cid = str(c.get("id") or f"call_{i}_{j}")
                call_names[cid] = fn["name"]
                calls.append({"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}})
            msg["tool_calls"] = calls
        elif role == "tool":
            cid = m.get("tool_call_id")
            if cid is not None:
                msg["tool_call_id"] = str(cid)
            name = m.get("name") or call_names.get(str(cid))
            name = str(name) if name else name
            if name:
                msg["name"] = name
            if msg["content"] is None:
                msg["content"] = ""
        elif m.get("name") and role != "assistant":
            msg["name"] = str(m["name"])
        if role in ("system", "user") and msg["content"] is None:
            raise RequestError(f"{where}: a {role} message needs content", param="messages")
        out.append(msg)
    return out


# ------------------------------------------------------------------------------------------ template


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

    def render(self, messages: List[dict], tools: Optional[List[dict]] = None) -> str:
        try:
            return self._fmt(messages=messages, tools=tools or None).prompt
        except ValueError as e:  # raise_exception() in the template
            raise RequestError(f"the model's chat template refused the conversation: {e}", param="messages")
        except Exception as e:
            raise RequestError(f"the model's chat template failed on this conversation: {type(e).__name__}: {e}",
                               param="messages")


# ------------------------------------------------------------------------------------------ generation


@dataclass
class Sampling(llama_api.Sampling):
    """The token loop's sampling settings, with chat's default temperature."""

    temperature: float = 0.8


@dataclass
class GenResult:
    text: str
    tokens: List[int]
    finish_reason: str  # "stop" (end of turn / stop string / grammar complete), "length", "interrupted"
    prompt_tokens: int
    prompt_evaluated: int  # prompt tokens run through the model (the others were reused from the KV cache)
    seconds: float = 0.0
    stopped_by_string: bool = False

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.prompt_evaluated


class _StopFilter:
    """Streams text while holding back anything that could be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0

    def push(self, piece: str) -> Tuple[str, bool]:
        self.text += piece
        if self.stops:
            # a stop string cannot start before `sent`: whatever could begin one is held back
            hit = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)
            if hit >= 0:
                out = self.text[self.sent:hit]
                self.text = self.text[:hit]
                self.sent = hit
                return out, True
        safe = len(self.text)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        safe = max(safe, self.sent)
        out = self.text[self.sent:safe]
        self.sent = safe
        return out, False

    def flush(self) -> str:
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out


class ChatModel:
    """A loaded model (an Engine or a llama_cpp.Llama) with its chat template.

    Not thread-safe: one generation at a time.
    """

    def __init__(self, engine_or_llama, name: Optional[str] = None):
        from flashmoe.engine import Engine

        if isinstance(engine_or_llama, Engine):
            self.engine = engine_or_llama
            self.llama = engine_or_llama.llama
            path = engine_or_llama.model_path
        else:
            self.engine = None
            self.llama = engine_or_llama
            path = getattr(engine_or_llama, "model_path", "model")
        import os

        self.name = name or os.path.splitext(os.path.basename(str(path)))[0]
        self.template = ChatTemplate.from_llama(self.llama)
        self.n_evaluated = 0  # tokens run through the model since load (prompt + generated)
        self._bias_ids = None
        self._vocab_facts = None
        self._utf8 = None
        self._install_eval_counter()

    # --- plumbing
    def _install_eval_counter(self):
        L = self.llama
        orig = L.eval

        engine = self.engine

        def counting_eval(tokens):
            self.n_evaluated += len(tokens)
            try:
                return orig(tokens)
            except RuntimeError as e:  # a failed decode: the hook says why (an expert read error, ...)
                if engine is not None:
                    raise engine.decode_error(e) from None
                raise

        L.eval = counting_eval  # instance attribute: Llama.generate calls self.eval

    def n_ctx(self) -> int:
        return self.llama.n_ctx()

    def tokenize(self, text: str) -> List[int]:
        return self.llama.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=True)

    def _vocab_bounds(self):
        """(the longest token text in bytes, the special tokens llama.cpp's tokenizer splits on first:
        [(text, lstrip, rstrip)] longest first), read from the vocabulary once."""
        if self._vocab_facts is None:
            lc = llama_api.lowlevel()

            vocab = llama_api.vocab_ptr(self.llama)
            special = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_USER_DEFINED | lc.LLAMA_TOKEN_ATTR_UNKNOWN
            longest, specials = 1, []
            for i in range(lc.llama_vocab_n_tokens(vocab)):
                text = lc.llama_vocab_get_text(vocab, i) or b""
                longest = max(longest, len(text))
                attr = int(lc.llama_vocab_get_attr(vocab, i))
                if attr & special and text:
                    specials.append((bytes(text), bool(attr & lc.LLAMA_TOKEN_ATTR_LSTRIP),
                                     bool(attr & lc.LLAMA_TOKEN_ATTR_RSTRIP)))
            specials.sort(key=lambda x: -len(x[0]))
            self._vocab_facts = (longest, specials)
        return self._vocab_facts

    def min_tokens(self, text: str, limit: int) -> int:
        """A lower bound of ``len(self.tokenize(text))``, in time linear in the text (llama.cpp's own
        special-token split is quadratic in their number): the special tokens it would split off
        (the same longest-first partition), plus the other bytes over 4x the longest token. Stops
        counting once past ``limit``. Used to refuse a prompt that cannot fit before tokenizing it."""
        longest, specials = self._vocab_bounds()
        b = text.encode("utf-8", "replace")
        per = 4 * longest  # a token never covers more bytes than its text has, x4 for normalization
        if len(b) // per > limit:
            return len(b) // per
        ws = b" \t\n\v\f\r"
        segs = [(0, len(b))]
        matched = 0
        for t, lstrip, rstrip in specials:
            if t not in b:
                continue
            out = []
            tl = len(t)
            for a, e in segs:
                pos = a
                while True:
                    m = b.find(t, pos, e)
                    if m < 0:
                        break
                    left = m
                    if lstrip:
                        while left > pos and b[left - 1] in ws:
                            left -= 1
                    if left > pos:
                        out.append((pos, left))
                    matched += 1
                    if matched > limit:
                        return matched
                    pos = m + tl
                    if rstrip:
                        while pos < e and b[pos] in ws:
                            pos += 1
                if pos < e:
                    out.append((pos, e))
            segs = out
        raw = sum(e - a for a, e in segs)
        return matched + (raw + per - 1) // per

    def is_eog(self, tok: int) -> bool:
        return llama_api.is_eog(self.llama, tok)

    def _closing_bias(self):
        """(ids, biases) favouring tokens that close JSON (and the end of turn), computed once."""
        if self._bias_ids is None:
            import numpy as np

            L = self.llama
            ids, bias = [], []
            for i in range(L.n_vocab()):
                if self.is_eog(i):
                    ids.append(i)
                    bias.append(100.0)
                    continue
                try:
                    piece = L.detokenize([i]).decode("utf-8")
                except (UnicodeDecodeError, Exception):
                    continue
                s = piece.strip()
                if not s or not set(s) <= set('"}],'):
                    continue
                # first close the string being written (inside a string } and ] are just text),
                # then objects and arrays; a comma (next member) only when nothing closes
                if "," in s:
                    b = 20.0
                elif s[0] == '"':
                    b = 80.0 + len(s)
                else:
                    b = 50.0 + len(s)
                ids.append(i)
                bias.append(b)
            self._bias_ids = (np.array(ids, dtype=np.int64), np.array(bias, dtype=np.float32))
        return self._bias_ids

    # UTF-8 validity, byte by byte: the state says what the next byte may be (RFC 3629's table)
    _U8_NEXT = {1: (0x80, 0xBF, 0), 2: (0x80, 0xBF, 1), 3: (0xA0, 0xBF, 1), 4: (0x80, 0x9F, 1),
                5: (0x80, 0xBF, 2), 6: (0x90, 0xBF, 2), 7: (0x80, 0x8F, 2)}

    @classmethod
    def _u8_step(cls, state: int, b: int) -> int:
        """The next UTF-8 state after byte ``b`` (0: between characters), or -1 for an invalid byte."""
        if state:
            lo, hi, nxt = cls._U8_NEXT[state]
            return nxt if lo <= b <= hi else -1
        if b < 0x80:
            return 0
        if 0xC2 <= b <= 0xDF:
            return 1
        if b == 0xE0:
            return 3
        if b == 0xED:
            return 4
        if 0xE1 <= b <= 0xEF:
            return 2
        if b == 0xF0:
            return 6
        if 0xF1 <= b <= 0xF3:
            return 5
        if b == 0xF4:
            return 7
        return -1

    def _utf8_tables(self):
        """(tokens invalid between characters, {state: tokens valid in that state}, {token: [next state
        per state]} for the tokens that are not whole UTF-8 text), computed once per model."""
        if self._utf8 is None:
            import numpy as np

            L = self.llama
            n_states = 8
            bad0, allowed, trans = [], {s: [] for s in range(1, n_states)}, {}
            for i in range(L.n_vocab()):
                b = L.detokenize([i])
                try:
                    b.decode("utf-8")
                    whole = True
                except UnicodeDecodeError:
                    whole = False
                if whole and b:
                    continue  # from between characters to between characters; never inside one
                row = []
                for st in range(n_states):
                    cur = st
                    for byte in b:
                        cur = self._u8_step(cur, byte)
                        if cur < 0:
                            break
                    row.append(cur)
                trans[i] = row
                if row[0] < 0:
                    bad0.append(i)
                for st in range(1, n_states):
                    if row[st] >= 0:
                        allowed[st].append(i)
            self._utf8 = (np.array(bad0, dtype=np.int64),
                          {k: np.array(v, dtype=np.int64) for k, v in allowed.items()}, trans)
        return self._utf8

    def _utf8_guard(self, out: List[int]):
        """A logits processor that only lets through tokens keeping the answer's bytes valid UTF-8."""
        import numpy as np

        bad0, allowed, trans = self._utf8_tables()
        st = [0, 0]  # UTF-8 state, tokens of ``out`` accounted for

        def guard(_input_ids, scores):
            for tok in out[st[1]:]:
                row = trans.get(tok)
                st[0] = (0 if st[0] == 0 else -1) if row is None else row[st[0]]
                if st[0] < 0:
                    st[0] = 0  # cannot happen under the mask; start over rather than block everything
            st[1] = len(out)
            if st[0] == 0:
                if len(bad0):
                    scores[bad0] = -np.inf
            else:
                ok = allowed[st[0]]
                keep = scores[ok].copy()
                scores[:] = -np.inf
                scores[ok] = keep
            return scores

        return guard

    def grammar_for_schema(self, schema: Optional[dict], what: str = "response_format"):
        """A llama.cpp grammar for JSON matching ``schema`` (None: any JSON object).

        Strings exclude raw control characters, so that the output is strict JSON.
        """
        from llama_cpp.llama_grammar import LlamaGrammar

        from flashmoe.schemas import SchemaProblem, schema_to_grammar

        # the schema is checked (metaschema, impossible or unsupported constructs) and the grammar is
        # parsed by a pure-Python mirror of llama.cpp's parser first: a grammar llama.cpp cannot parse
        # would crash the process (llama-cpp-python adds the NULL sampler it gets)
        try:
            gbnf = schema_to_grammar(schema, what)
        except SchemaProblem as e:
            raise RequestError(str(e), param="tools" if "tool" in what else "response_format") from None
        return LlamaGrammar.from_string(gbnf, verbose=False)

    # --- the one generation loop
    def generate(
        self,
        prompt_tokens: List[int],
        *,
        max_tokens: int,
        sampling: Sampling,
        grammar=None,
        must_complete: bool = False,
        stop: Sequence[str] = (),
        on_text: Optional[Callable[[str], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
    ) -> GenResult:
        """Generate after ``prompt_tokens`` (the common prefix with the previous call is reused from
        the KV cache). ``must_complete``: a grammar answer is carried on past ``max_tokens`` (favouring
        closing tokens) until the grammar is complete, at most CLOSE_EXTRA_TOKENS more."""
        from llama_cpp import LogitsProcessorList

        L = self.llama
        n_ctx = L.n_ctx()
        n_prompt = len(prompt_tokens)
        if n_prompt == 0:
            raise RequestError("the prompt is empty", param="messages")
        room = n_ctx - n_prompt
        if room < 1:
            raise ContextOverflow(f"the prompt is {n_prompt} tokens; this model's context is {n_ctx} tokens "
                                  f"(serve/chat with a larger --ctx, or shorten the conversation)")
        max_tokens = max(1, min(int(max_tokens), room))
        cap = min(room, max_tokens + CLOSE_EXTRA_TOKENS) if (grammar is not None and must_complete) else max_tokens
        n_out = [0]
        processors = None
        if grammar is not None and must_complete:
            ids, bias = self._closing_bias()
            wrap_from = max(0, max_tokens - min(16, max_tokens // 4))

            def close_json(_input_ids, scores):
                if n_out[0] >= wrap_from and len(ids):
                    scores[ids] += bias
                return scores

            processors = LogitsProcessorList([close_json])
        out: List[int] = []
        if grammar is not None:
            # a constrained answer is strict JSON: its bytes must be valid UTF-8 too (llama.cpp's grammar
            # accepts surrogates and overlong forms that byte-level tokens can spell, which decode to
            # U+FFFD and break length limits)
            utf8 = self._utf8_guard(out)
            processors = LogitsProcessorList(list(processors or []) + [utf8])
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=random.getrandbits(31))
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        filt = _StopFilter(() if grammar is not None else stop)  # a grammar answer ends with its grammar
        finish = "length"
        by_string = False
        ev0 = self.n_evaluated
        prompt_eval = None
        t0 = time.perf_counter()
        # the one token loop (flashmoe/llama.py); the KV cache's common prefix with the last call is reused
        gen = llama_api.tokens(L, prompt_tokens, sampling, grammar=grammar, logits_processor=processors,
                               keep_prefix=True)
        try:
            for step in gen:
                tok = step.token
                if prompt_eval is None:
                    prompt_eval = self.n_evaluated - ev0
                if self.is_eog(tok):
                    finish = "stop"
                    break
                out.append(tok)
                n_out[0] = len(out)
                piece = dec.decode(L.detokenize([tok]))
                if piece:
                    emit, hit = filt.push(piece)
                    if emit and on_text:
                        on_text(emit)
                    if hit:
                        finish, by_string = "stop", True
                        break
                if len(out) >= cap:
                    finish = "length"
                    break
                if should_stop is not None and should_stop():
                    finish = "interrupted"
                    break
        finally:
            gen.close()
        if not by_string:
            tail = dec.decode(b"", final=True)
            if tail:
                filt.text += tail
            rest = filt.flush()
            if rest and on_text:
                on_text(rest)
        if prompt_eval is None:
            prompt_eval = self.n_evaluated - ev0
        return GenResult(text=filt.text, tokens=out, finish_reason=finish, prompt_tokens=n_prompt,
                         prompt_evaluated=prompt_eval, seconds=time.perf_counter() - t0,
                         stopped_by_string=by_string)


# ------------------------------------------------------------------------------------------ chat turns


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
    text = model.template.render(messages, tools if tools else None)
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
    if prefix and prefix[0] and text.startswith(prefix[0]):
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
) -> ChatOutcome:
    """Generate the answer planned by plan_chat; stream content pieces to ``on_content``."""
    if plan.mode == "call":
        g = model.generate(plan.prompt_tokens, max_tokens=plan.max_tokens, sampling=sampling, grammar=plan.grammar,
                           must_complete=True, should_stop=should_stop)
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
                           must_complete=True, on_text=on_content, should_stop=should_stop)
        content = g.text
        if g.finish_reason == "stop":
            fixed = strict_json(content.strip())
            content = fixed if fixed is not None else content
        return ChatOutcome(content=content, tool_calls=[], finish_reason=g.finish_reason, gen=g,
                           prompt_text=plan.prompt_text)
    parse = plan.tool_choice == "auto" and bool(plan.tools)
    hold = _CallHoldback(on_content) if parse else None
    g = model.generate(plan.prompt_tokens, max_tokens=plan.max_tokens, sampling=sampling, stop=plan.stop,
                       on_text=(hold.push if hold else on_content), should_stop=should_stop)
    if not parse:
        return ChatOutcome(content=g.text, tool_calls=[], finish_reason=g.finish_reason, gen=g,
                           prompt_text=plan.prompt_text)
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


# ------------------------------------------------------------------------------------------ a session


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
