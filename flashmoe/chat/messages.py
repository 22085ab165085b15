"""OpenAI chat messages -> what chat templates expect."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from flashmoe.chat.errors import RequestError


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
            tcid = m.get("tool_call_id")
            if tcid is not None:
                msg["tool_call_id"] = str(tcid)
            name = m.get("name") or call_names.get(str(tcid))
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
