"""Tensor-name patterns of policy rules.

A pattern is a glob matched against the whole tensor name (``*`` any run of characters, dots
included; ``?`` one character; ``[0-3]``/``[!0-3]`` a character class; ``{a,b}`` alternatives,
which may nest; ``{12..23}`` the numbers 12 to 23; ``\\x`` a literal x), or, with the ``regex:`` prefix, a Python regex searched
anywhere in the name (like llama.cpp's ``-ot``). Globs are translated to regexes once, when the
policy is parsed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Tuple

REGEX_PREFIX = "regex:"

_REGEXY = re.compile(r"\\[.dwsDWS]|\.\+|[()|+^$]")  # `.*` alone is a fine glob (blk.*.x)


class _GlobError(ValueError):
    pass


_RANGE = re.compile(r"(\d+)\.\.(\d+)\}")  # the body of {N..M}: the numbers N to M (layers: blk.{12..23}.*)


def _char_class(glob: str, i: int) -> Tuple[str, int]:
    """The regex of the ``[...]`` class whose body starts at ``glob[i]`` (just after the ``[``),
    and the index just after its ``]``."""
    n = len(glob)
    j = i
    if j < n and glob[j] in "!^":
        j += 1
    if j < n and glob[j] == "]":
        j += 1  # a leading ] is a member of the class
    j = glob.find("]", j)
    if j < 0:
        raise _GlobError("unclosed '[' in glob")
    body = glob[i:j]
    neg = body[:1] in ("!", "^") and body != ""
    if neg:
        body = body[1:]
    cls = "".join("-" if ch == "-" else re.escape(ch) for ch in body)
    return "[" + ("^" if neg else "") + cls + "]", j + 1


def glob_to_regex(glob: str) -> str:
    """Translate a tensor-name glob into a regex for ``re.fullmatch``.

    ``*`` any run of characters (dots included), ``?`` one character, ``[abc]``/``[!abc]`` a
    character class, ``{a,b}`` alternatives (may nest), ``{N..M}`` the numbers N to M, ``\\x`` a literal x.
    """
    out: List[str] = []
    depth = 0
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            while i < n and glob[i] == "*":
                i += 1
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            cls, i = _char_class(glob, i)
            out.append(cls)
        elif c == "{" and _RANGE.match(glob, i):
            m = _RANGE.match(glob, i)
            assert m is not None
            a, b = int(m.group(1)), int(m.group(2))
            if abs(b - a) > 100000:
                raise _GlobError(f"range {{{a}..{b}}} is too large")
            step = 1 if b >= a else -1
            out.append("(?:" + "|".join(str(x) for x in range(a, b + step, step)) + ")")
            i = m.end()
        elif c == "{":
            depth += 1
            out.append("(?:")
        elif c == "," and depth > 0:
            out.append("|")
        elif c == "}" and depth > 0:
            depth -= 1
            out.append(")")
        elif c == "\\" and i < n:
            out.append(re.escape(glob[i]))
            i += 1
        else:
            out.append(re.escape(c))
    if depth:
        raise _GlobError("unclosed '{' in glob")
    return "".join(out)


def looks_like_regex(text: str) -> bool:
    """Whether a glob contains regex syntax (``\\.``, ``\\d``, ``(``, ``|``, ``+``, ``^``, ``$``):
    ``policy validate`` warns that it is read as a glob."""
    return _REGEXY.search(text) is not None


def _one_line(text: str) -> str:
    """``text`` with control characters (newlines...) shown as escapes: errors stay on one line."""
    return text.translate({c: f"\\x{c:02x}" for c in list(range(32)) + [127]})


@dataclass
class Pattern:
    """One tensor-name pattern: a glob (whole name) or, with the ``regex:`` prefix, a Python
    regex searched anywhere in the name (like llama.cpp's ``-ot``)."""

    text: str
    kind: str  # "glob" or "regex"
    regex: "re.Pattern[str]"

    def matches(self, name: str) -> bool:
        if self.kind == "glob":
            return self.regex.fullmatch(name) is not None
        return self.regex.search(name) is not None

    @classmethod
    def compile(cls, text: str) -> "Pattern":
        """Raises ValueError with a readable message."""
        if text.startswith(REGEX_PREFIX):
            body = text[len(REGEX_PREFIX):]
            if not body:
                raise ValueError("empty regex")
            try:
                rx = re.compile(body)
            except re.error as e:
                pos = f" at position {e.pos}" if e.pos is not None else ""
                raise ValueError(f"invalid regex '{_one_line(body)}': {e.msg}{pos}") from None
            return cls(text, "regex", rx)
        if not text:
            raise ValueError("empty pattern")
        try:
            rx = re.compile(glob_to_regex(text), re.DOTALL)
        except (_GlobError, re.error) as e:
            raise ValueError(f"invalid glob '{_one_line(text)}': {e}") from None
        return cls(text, "glob", rx)
