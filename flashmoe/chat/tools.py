"""Tools: normalizing OpenAI ``tools`` and ``tool_choice``, the JSON schema of one call, and parsing the
``<tool_call>{...}</tool_call>`` blocks (the Hermes/Qwen convention) of a free answer."""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

from flashmoe.chat.errors import RequestError
from flashmoe.errors import FlashMoEError

# Hermes / Qwen tool-call markup.
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
MAX_TOOLS = 128  # tools per request


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
    name: Any
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
