"""Regular-expression ``pattern``s of JSON schemas, made safe for a grammar-constrained JSON string
(``flashmoe.schemas``): llama-cpp-python's converter copies a pattern's characters into the JSON string
unescaped, so a pattern that could write a quote, a backslash or a control character is refused, and
negated classes are narrowed to exclude them."""
from __future__ import annotations

import re

MAX_REPEAT = 1000  # minLength, maxLength, minItems, maxItems, {m,n} in patterns
MAX_PATTERN = 1000  # characters

_UNSAFE = '"\\' + "".join(chr(i) for i in range(32)) + "\x7f"  # what a JSON string cannot hold raw
_CLASS_EXCLUDE = '"\\\\\\x00-\\x1f\\x7f'  # the same, inside a [^...] class (regex and GBNF syntax)
_LITERAL_ESCAPES = set("[](){}*+?|-")  # \X that the converter turns into the character X
# shorthand classes, written out (\s: a space only, since a JSON string holds no raw tab or newline)
_SHORTHAND = {"d": "0-9", "w": "A-Za-z0-9_", "s": " ", ".": "."}


def _check_pattern(pat: str, bad) -> str:
    """The pattern made safe for a JSON string (negated classes also exclude what JSON must escape),
    or SchemaProblem. The converter copies a pattern's characters into the JSON string unescaped, so
    a pattern that can produce a quote, a backslash or a control character is refused."""
    if len(pat) > MAX_PATTERN:
        raise bad(f"the pattern is too long ({len(pat)} characters, at most {MAX_PATTERN})")
    if not (pat.startswith("^") and pat.endswith("$")) or pat.endswith("\\$"):
        raise bad("a pattern must be anchored: start with ^ and end with $")
    try:
        re.compile(pat)
    except re.error as e:
        raise bad(f"the pattern is not a valid regular expression ({e})") from None
    body = pat[1:-1]
    out = []
    i, n = 0, len(body)
    while i < n:
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1] if i + 1 < n else ""
            if nxt in _SHORTHAND:
                out.append("[" + _SHORTHAND[nxt] + "]")
                i += 2
                continue
            if nxt not in _LITERAL_ESCAPES:
                hint = " (write a class such as [0-9])" if nxt in "dDwWsS" else ""
                raise bad(f"the escape \\{nxt} is not supported in patterns{hint}")
            out.append(body[i:i + 2])
            i += 2
        elif ch == "[":
            j = i + 1
            while j < n and body[j] != "]":
                j += 2 if body[j] == "\\" else 1
            if j >= n:
                raise bad("unbalanced [ in the pattern")
            cls = re.sub(r"\\([dws.])", lambda mm: _SHORTHAND[mm.group(1)], body[i:j + 1])
            inner = cls[2:-1] if cls.startswith("[^") else cls[1:-1]
            m = re.search(r"\\(.)", inner)
            if m and m.group(1) not in "-[]":
                raise bad(f"the escape \\{m.group(1)} is not supported in pattern classes")
            if cls.startswith("[^"):
                cls = cls[:-1] + _CLASS_EXCLUDE + "]"  # never a character a JSON string must escape
            else:
                try:
                    rx = re.compile(cls)
                except re.error as e:
                    raise bad(f"the pattern class {cls} is not valid ({e})") from None
                hit = next((c for c in _UNSAFE if rx.fullmatch(c)), None)
                if hit is not None:
                    raise bad(f"the pattern class {cls} can produce {hit!r}, which a JSON string must escape")
            out.append(cls)
            i = j + 1
        elif ch in "^$":
            raise bad("^ and $ are supported only at the ends of a pattern")
        elif ch in _UNSAFE:
            raise bad(f"the pattern holds {ch!r}, which a JSON string must escape")
        elif ch == "(" and body[i + 1:i + 2] == "?":
            raise bad("(?...) groups (lookarounds, flags, named groups) are not supported in patterns")
        else:
            out.append(ch)
            i += 1
            continue
    safe = "".join(out)
    if re.search(r"[*+?}]\?", safe) or re.search(r"[*+?}][*+{]", safe):
        raise bad("lazy or stacked quantifiers are not supported in patterns")
    for m in re.finditer(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}", safe):
        for g in m.groups():
            if g and int(g) > MAX_REPEAT:
                raise bad(f"pattern repetition {m.group(0)} is too large (at most {MAX_REPEAT})")
    return "^(" + safe + ")$"  # grouped: the converter would not bind a top-level | inside the quotes
