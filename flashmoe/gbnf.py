"""A pure-Python check of GBNF grammars: what llama.cpp's grammar parser accepts, decided before it sees one.

llama.cpp parses a grammar when a sampler is made from it (``llama_sampler_init_grammar``). When
the grammar does not parse, that returns NULL, and llama-cpp-python adds the NULL sampler to its
chain: the process dies (SIGSEGV) at the next token. Some grammars are worse: a repetition
``x{5,3}`` makes the parser loop until memory runs out. So a grammar must never reach llama.cpp
unchecked. ``check_grammar(text)`` raises ``GrammarError`` (one line) unless llama.cpp would accept
the grammar; it follows ``llama_grammar_parser::parse`` and ``llama_grammar_init_impl`` of the
vendored llama.cpp (src/llama-grammar.cpp) step by step:

* the syntax (rules ``name ::= alternates``, literals, character classes and escapes, groups,
  ``* + ? {m} {m,} {m,n}``, comments), with the C string's end at the first NUL byte;
* the repetition limits (``MAX_REPETITION_THRESHOLD``: at most 2000 repetitions, and at most 2000
  rules repeated times the repetition count);
* every referenced rule defined, a ``root`` rule, no left recursion.

It is stricter than llama.cpp in three ways, all refused with a clear message: token references
(``<...>``, ``!<...>``: they need the vocabulary), a repetition whose minimum exceeds its maximum
(llama.cpp would loop), and grammars over ``MAX_GRAMMAR_BYTES`` or ``MAX_ELEMENTS`` parsed elements.
The parser is iterative: nesting depth costs no Python recursion.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

MAX_REPETITION_THRESHOLD = 2000  # llama-grammar.cpp
MAX_GRAMMAR_BYTES = 1 << 20
MAX_ELEMENTS = 1 << 21

# element types (llama.h: enum llama_gretype)
END, ALT, RULE_REF, CHAR, CHAR_NOT, CHAR_RNG_UPPER, CHAR_ALT, CHAR_ANY = range(8)

_UINT64_MAX = (1 << 64) - 1


class GrammarError(ValueError):
    """A grammar llama.cpp would not accept (or that would make it loop)."""


def _is_word(c: int) -> bool:
    return (97 <= c <= 122) or (65 <= c <= 90) or c == 45 or (48 <= c <= 57)


def _is_digit(c: int) -> bool:
    return 48 <= c <= 57


class _Frame:
    """One alternates being parsed: a rule, or a group (...) nested in one."""

    __slots__ = ("name", "rule_id", "rule", "nested", "last_sym_start", "n_prev_rules", "n_rules_before")

    def __init__(self, name: bytes, rule_id: int, nested: bool):
        self.name = name
        self.rule_id = rule_id
        self.rule: List[Tuple[int, int]] = []
        self.nested = nested
        self.last_sym_start = 0
        self.n_prev_rules = 1
        self.n_rules_before = 0


class _Parser:
    def __init__(self, src: bytes):
        self.s = src
        self.n = len(src)
        self.symbol_ids: Dict[bytes, int] = {}
        self.rules: List[Optional[List[Tuple[int, int]]]] = []
        self.n_elements = 0

    # --- helpers (positions past the end read as NUL, like the C string)
    def c(self, pos: int) -> int:
        return self.s[pos] if pos < self.n else 0

    def at(self, pos: int) -> str:
        return self.s[pos:pos + 24].decode("utf-8", "replace")

    def err(self, msg: str, pos: Optional[int] = None) -> GrammarError:
        where = f" at {self.at(pos)!r}" if pos is not None and pos < self.n else (
            " at the end" if pos is not None else "")
        return GrammarError(msg + where)

    def space(self, pos: int, newline_ok: bool) -> int:
        c = self.c
        while True:
            ch = c(pos)
            if ch in (32, 9, 35) or (newline_ok and ch in (13, 10)):
                if ch == 35:  # '#': a comment to the end of the line
                    while c(pos) and c(pos) not in (13, 10):
                        pos += 1
                else:
                    pos += 1
            else:
                return pos

    def name(self, pos: int) -> int:
        start = pos
        while _is_word(self.c(pos)):
            pos += 1
        if pos == start:
            raise self.err("expecting name", start)
        return pos

    def integer(self, pos: int) -> Tuple[int, int]:
        start = pos
        while _is_digit(self.c(pos)):
            pos += 1
        if pos == start:
            raise self.err("expecting integer", start)
        v = int(self.s[start:pos])
        if v > _UINT64_MAX:
            raise self.err("integer out of range", start)  # std::stoull throws
        return v, pos

    def decode_utf8(self, pos: int) -> Tuple[int, int]:
        first = self.c(pos)
        length = (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4)[first >> 4]
        mask = (1 << (8 - length)) - 1
        value = first & mask
        end = pos + length
        p = pos + 1
        while p < end and self.c(p):
            value = (value << 6) + (self.c(p) & 0x3F)
            p += 1
        return value, p

    def hex(self, pos: int, size: int) -> Tuple[int, int]:
        end = pos + size
        value = 0
        p = pos
        while p < end and self.c(p):
            ch = self.c(p)
            value <<= 4
            if 97 <= ch <= 102:
                value += ch - 97 + 10
            elif 65 <= ch <= 70:
                value += ch - 65 + 10
            elif 48 <= ch <= 57:
                value += ch - 48
            else:
                break
            p += 1
        if p != end:
            raise self.err(f"expecting {size} hex chars", pos)
        return value, p

    def char(self, pos: int) -> Tuple[int, int]:
        ch = self.c(pos)
        if ch == 92:  # backslash
            nxt = self.c(pos + 1)
            if nxt == 120:
                return self.hex(pos + 2, 2)
            if nxt == 117:
                return self.hex(pos + 2, 4)
            if nxt == 85:
                return self.hex(pos + 2, 8)
            if nxt == 116:
                return 9, pos + 2
            if nxt == 114:
                return 13, pos + 2
            if nxt == 110:
                return 10, pos + 2
            if nxt in (92, 34, 91, 93, 45):
                return nxt, pos + 2
            raise self.err("unknown escape", pos)
        if ch:
            return self.decode_utf8(pos)
        raise self.err("unexpected end of input")

    def symbol_id(self, name: bytes) -> int:
        if name not in self.symbol_ids:
            self.symbol_ids[name] = len(self.symbol_ids)
        return self.symbol_ids[name]

    def generate_symbol_id(self, base: bytes) -> int:
        next_id = len(self.symbol_ids)
        self.symbol_ids[base + b"_" + str(next_id).encode()] = next_id
        return next_id

    def add_rule(self, rule_id: int, rule: List[Tuple[int, int]]) -> None:
        self.n_elements += len(rule)
        if self.n_elements > MAX_ELEMENTS:
            raise GrammarError("the grammar is too large")
        if len(self.rules) <= rule_id:
            self.rules.extend([None] * (rule_id + 1 - len(self.rules)))
        self.rules[rule_id] = rule

    # --- the grammar (llama_grammar_parser::parse_alternates / parse_sequence, made iterative)
    def alternates(self, pos: int, rule_name: bytes, rule_id: int) -> int:
        stack = [_Frame(rule_name, rule_id, False)]
        while True:
            f = stack[-1]
            if self.c(pos) == 40:  # '(' group: a nested alternates frame
                pos = self.space(pos + 1, True)
                n_before = len(self.symbol_ids)
                sub = self.generate_symbol_id(f.name)
                f.n_rules_before = n_before
                stack.append(_Frame(f.name, sub, True))
                continue
            nxt = self.element(f, pos)
            if nxt is None:  # the end of this frame's alternates
                pos = self.end_frame(stack, pos)
                if not stack:
                    return pos
            else:
                pos = nxt
            if len(f.rule) > MAX_ELEMENTS:
                raise GrammarError("the grammar is too large")

    @staticmethod
    def _new_symbol(f: _Frame) -> None:
        f.last_sym_start = len(f.rule)
        f.n_prev_rules = 1

    def element(self, f: _Frame, pos: int) -> Optional[int]:
        """Parses one element of frame ``f``'s sequence at ``pos`` (a literal, a class, a rule reference,
        ``.``, a repetition operator, ``|``); the position after it, or None at the end of the frame."""
        ch = self.c(pos)
        if ch == 34:  # '"' literal
            return self.literal(f, pos + 1)
        if ch == 91:  # '[' character class
            return self.char_class(f, pos + 1)
        if ch in (60, 33):  # '<' or '!': token references
            raise self.err("token references (<...>) are not supported here", pos)
        if _is_word(ch):
            end = self.name(pos)
            ref = self.symbol_id(self.s[pos:end])
            pos = self.space(end, f.nested)
            self._new_symbol(f)
            f.rule.append((RULE_REF, ref))
            return pos
        if ch == 46:  # '.'
            self._new_symbol(f)
            f.rule.append((CHAR_ANY, 0))
            return self.space(pos + 1, f.nested)
        if ch in (42, 43, 63):  # * + ?
            pos = self.space(pos + 1, f.nested)
            self.repetitions(f, pos, *{42: (0, None), 43: (1, None), 63: (0, 1)}[ch])
            return pos
        if ch == 123:  # '{'
            return self.braces(f, self.space(pos + 1, f.nested))
        if ch == 124:  # '|': the next alternate of this frame
            f.rule.append((ALT, 0))
            pos = self.space(pos + 1, True)
            self._new_symbol(f)
            return pos
        return None

    def literal(self, f: _Frame, pos: int) -> int:
        """A '"..."' literal whose text starts at ``pos``."""
        c = self.c
        self._new_symbol(f)
        while c(pos) != 34:
            if not c(pos):
                raise self.err("unexpected end of input")
            v, pos = self.char(pos)
            f.rule.append((CHAR, v))
        return self.space(pos + 1, f.nested)

    def char_class(self, f: _Frame, pos: int) -> int:
        """A '[...]' character class whose body starts at ``pos``."""
        c, rule = self.c, f.rule
        start_type = CHAR
        if c(pos) == 94:
            pos += 1
            start_type = CHAR_NOT
        self._new_symbol(f)
        while c(pos) != 93:
            if not c(pos):
                raise self.err("unexpected end of input")
            v, pos = self.char(pos)
            rule.append((CHAR_ALT if f.last_sym_start < len(rule) else start_type, v))
            if c(pos) == 45 and c(pos + 1) != 93:
                if not c(pos + 1):
                    raise self.err("unexpected end of input")
                v2, pos = self.char(pos + 1)
                rule.append((CHAR_RNG_UPPER, v2))
        return self.space(pos + 1, f.nested)

    def braces(self, f: _Frame, pos: int) -> int:
        """A '{m}', '{m,}' or '{m,n}' repetition whose body starts at ``pos``."""
        c, nested = self.c, f.nested
        if not _is_digit(c(pos)):
            raise self.err("expecting an int", pos)
        lo, pos = self.integer(pos)
        pos = self.space(pos, nested)
        hi: Optional[int]
        if c(pos) == 125:
            hi = lo
            pos = self.space(pos + 1, nested)
        elif c(pos) == 44:
            pos = self.space(pos + 1, nested)
            hi = None
            if _is_digit(c(pos)):
                hi, pos = self.integer(pos)
                pos = self.space(pos, nested)
            if c(pos) != 125:
                raise self.err("expecting '}'", pos)
            pos = self.space(pos + 1, nested)
        else:
            raise self.err("expecting ','", pos)
        if lo > MAX_REPETITION_THRESHOLD:
            raise GrammarError("number of repetitions exceeds sane defaults")
        if hi is not None and hi > MAX_REPETITION_THRESHOLD:
            hi = None
        if hi is not None and lo > hi:
            raise GrammarError(f"repetition {{{lo},{hi}}}: the minimum exceeds the maximum")
        self.repetitions(f, pos, lo, hi)
        return pos

    def end_frame(self, stack: List[_Frame], pos: int) -> int:
        """Closes the innermost frame: its rule is added; a group becomes a reference in its parent,
        followed by ')'."""
        f = stack[-1]
        f.rule.append((END, 0))
        self.add_rule(f.rule_id, f.rule)
        stack.pop()
        if not stack:
            return pos
        p = stack[-1]
        p.n_prev_rules = max(1, len(self.symbol_ids) - p.n_rules_before)
        p.last_sym_start = len(p.rule)
        p.rule.append((RULE_REF, f.rule_id))
        if self.c(pos) != 41:
            raise self.err("expecting ')'", pos)
        return self.space(pos + 1, p.nested)

    def repetitions(self, f: _Frame, pos: int, lo: int, hi: Optional[int]) -> None:
        name, rule, last = f.name, f.rule, f.last_sym_start
        if last == len(rule):
            raise self.err("expecting preceding item to */+/?/{", pos)
        prev = rule[last:]
        total = 1
        if hi is not None and hi > 0:
            total = hi
        elif lo > 0:
            total = lo
        if f.n_prev_rules * total > MAX_REPETITION_THRESHOLD:
            raise GrammarError("number of rules that are going to be repeated multiplied by the new repetition "
                               "exceeds sane defaults")
        if (lo - 1) * len(prev) + len(rule) > MAX_ELEMENTS:
            raise GrammarError("the grammar is too large")
        if lo == 0:
            del rule[last:]
        else:
            for _ in range(1, lo):
                rule.extend(prev)
        n_opt = 1 if hi is None else hi - lo
        last_rec = 0
        for i in range(n_opt):
            rec_id = self.generate_symbol_id(name)
            rec = list(prev)
            if i > 0 or hi is None:
                rec.append((RULE_REF, rec_id if hi is None else last_rec))
            rec.append((ALT, 0))
            rec.append((END, 0))
            self.add_rule(rec_id, rec)
            last_rec = rec_id
        if n_opt > 0:
            rule.append((RULE_REF, last_rec))
        f.n_prev_rules *= total

    def rule(self, pos: int) -> int:
        end = self.name(pos)
        name = self.s[pos:end]
        pos = self.space(end, False)
        rule_id = self.symbol_id(name)
        if self.s[pos:pos + 3] != b"::=":
            raise self.err("expecting ::=", pos)
        pos = self.space(pos + 3, True)
        pos = self.alternates(pos, name, rule_id)
        ch = self.c(pos)
        if ch == 13:
            pos += 2 if self.c(pos + 1) == 10 else 1
        elif ch == 10:
            pos += 1
        elif ch:
            raise self.err("expecting newline or end", pos)
        return self.space(pos, True)

    def parse(self) -> None:
        pos = self.space(0, True)
        while self.c(pos):
            pos = self.rule(pos)
        names = {v: k for k, v in self.symbol_ids.items()}
        for i, r in enumerate(self.rules):
            if not r:
                raise GrammarError(f"undefined rule {names.get(i, b'?').decode('utf-8', 'replace')!r}")
            for t, v in r:
                if t == RULE_REF and (v >= len(self.rules) or not self.rules[v]):
                    raise GrammarError(f"undefined rule identifier {names.get(v, b'?').decode('utf-8', 'replace')!r}")


def _end_of_seq(t: int) -> bool:
    return t in (END, ALT)


MAX_LEFT_PATHS = 1 << 20


def _left_recursion(rules: List[List[Tuple[int, int]]]) -> Optional[str]:
    """llama_grammar_detect_left_recursion over every rule, without recursion: why the grammar is
    refused (left recursion, or so many left-most paths that llama.cpp's unmemoized search and its
    stack expansion would take exponential time), or None."""
    n = len(rules)
    may_be_empty = [False] * n
    for i, rule in enumerate(rules):  # an alternate that is empty (the same test as llama.cpp)
        at_start = True
        for t, _v in rule:
            if _end_of_seq(t):
                if at_start:
                    may_be_empty[i] = True
                    break
                at_start = True
            else:
                at_start = False
    # the left-most references of each rule (llama.cpp recurses into these)
    left: List[List[int]] = []
    for rule in rules:
        refs = []
        rec = True
        for t, v in rule:
            if t == RULE_REF and rec:
                refs.append(v)
                if not may_be_empty[v]:
                    rec = False
            elif _end_of_seq(t):
                rec = True
            else:
                rec = False
        left.append(refs)
    # cycle search (white/grey/black) and, for the acyclic graph, the number of left-most paths
    state = [0] * n  # 0 new, 1 in progress, 2 done
    paths = [1] * n
    for start in range(n):
        if state[start]:
            continue
        state[start] = 1
        stack = [(start, 0)]
        while stack:
            i, k = stack[-1]
            if k < len(left[i]):
                stack[-1] = (i, k + 1)
                v = left[i][k]
                if state[v] == 1:
                    return "left recursion in the grammar (llama.cpp does not support it)"
                if state[v] == 0:
                    state[v] = 1
                    stack.append((v, 0))
                continue
            total = 1
            for v in left[i]:
                total += paths[v]
            paths[i] = min(total, MAX_LEFT_PATHS + 1)
            if paths[i] > MAX_LEFT_PATHS:
                return "the grammar is too complex (too many alternatives at the start of a rule)"
            state[i] = 2
            stack.pop()
    return None


def check_grammar(text: str, root: str = "root") -> None:
    """GrammarError (one line) unless llama.cpp would parse ``text`` into a usable grammar."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise GrammarError("the grammar is not valid UTF-8 (it holds lone surrogates)") from None
    nul = data.find(b"\0")
    if nul >= 0:
        data = data[:nul]  # the C string ends here
    if len(data) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is too large ({len(data)} bytes, at most {MAX_GRAMMAR_BYTES})")
    p = _Parser(data)
    p.parse()
    if not p.rules:
        raise GrammarError("the grammar is empty")
    if root.encode() not in p.symbol_ids:
        raise GrammarError(f"the grammar has no {root!r} rule")
    rules = [list(r or []) for r in p.rules]  # llama_grammar_init_impl copies each rule up to its END
    bad = _left_recursion(rules)
    if bad is not None:
        raise GrammarError(bad)
