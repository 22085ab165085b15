"""YAML placement policies: which tensor of a MoE GGUF model lives where, and how experts stream.

A policy file (schema in docs/policies.md) is loaded with :func:`load_policy`, which checks the
file alone (keys, types, patterns, sizes) and reports errors as ``file:line: message``.
:meth:`Policy.resolve` applies it to one model (a path or an opened model) and gives a
:class:`Resolution`: the placement of every tensor, the bytes per placement, the expert-cache plan,
the memory estimate against the budget and this machine, warnings, and
:meth:`Resolution.engine_settings` for the engine.

Public API::

    find_config(name) -> Path                       # shipped config by name ("stream") or a path
    list_configs() -> dict[str, Path]
    load_policy(path_or_name) -> Policy
    parse_policy(text, source="<string>") -> Policy
    Policy.resolve(model, *, budget=None, machine=None) -> Resolution
    Resolution.placements / .bytes_by_placement / .count_by_placement / .warnings / .errors
    Resolution.engine_settings() -> EngineSettings  # raises PolicyError if the policy cannot load
    Resolution.expected_report() -> dict            # what the engine's report should show
    Resolution.to_dict() -> dict                    # the JSON of `flashmoe policy show --json`
    MachineInfo.detect() -> MachineInfo
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from flashmoe.errors import FlashMoEError
from flashmoe.machine import cgroup_memory_limit, memlock_hint, memlock_limit, physical_ram  # noqa: F401
from flashmoe.machine import has_cap_ipc_lock as _has_cap_ipc_lock
from flashmoe.machine import read_int_file as _read_int_file  # noqa: F401
from flashmoe.settings import (
    EXPERT_TENSOR_REGEX,
    PLACEMENTS,
    EngineSettings,
    RuntimeSettings,
    StreamSettings,
)
from flashmoe.sizes import MiB, SizeError, format_size, parse_size

# --------------------------------------------------------------------------------------------
# Constants of the schema

PLACEMENT_HELP = {
    "pin": "RAM, locked (mlock)",
    "ram": "RAM, not locked",
    "stream": "disk -> expert cache",
    "mmap": "mmap (OS page cache)",
    "gpu": "device memory",
}
CACHE_MODES = ("cache", "pagecache")
EVICTIONS = ("lru", "lfru")

TOP_KEYS = ("version", "name", "description", "budget", "rules", "expert_cache", "runtime")
RULE_KEYS = ("match", "place")
CACHE_KEYS = ("mode", "cache_size", "cache_slots", "eviction", "readers", "direct_io")
RUNTIME_KEYS = ("threads", "n_ctx", "n_batch", "n_ubatch", "experts_per_token", "repack", "overhead")

DEFAULT_READERS = 4
DEFAULT_OVERHEAD = 256 * MiB  # the process itself: interpreter, libraries, small llama.cpp buffers
DEFAULT_BUDGET_PERCENT = 90.0  # what `cache_size: auto` uses when the policy has no budget
REGEX_PREFIX = "regex:"

# A routed expert tensor: the only tensors that may be streamed.
EXPERT_NAME_RE = re.compile(r"^blk\.(\d+)" + EXPERT_TENSOR_REGEX)
STREAMABLE_HELP = "routed expert tensors blk.N.ffn_{gate,up,down,gate_up}_exps.weight"
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
_CONFIG_EXT = ".yaml"


class PolicyError(FlashMoEError):
    """An error in a policy file (or in applying it to a model), reported as ``file:line: msg``."""

    def __init__(self, source: Optional[str], line: Optional[int], message: str):
        self.source = source
        self.line = line
        self.detail = message
        super().__init__(_where(source, line) + message)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _where(source: Optional[str], line: Optional[int]) -> str:
    if source and line:
        return f"{source}:{line}: "
    if source:
        return f"{source}: "
    return ""


# --------------------------------------------------------------------------------------------
# YAML with line numbers


class _Map(dict):
    """A YAML mapping that remembers the line (1-based) of itself, of each key and each value."""

    line: int = 0

    def __init__(self):
        super().__init__()
        self.key_lines: Dict[Any, int] = {}
        self.value_lines: Dict[Any, int] = {}


class _Seq(list):
    line: int = 0

    def __init__(self):
        super().__init__()
        self.item_lines: List[int] = []


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    m = _Map()
    m.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        kline = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise PolicyError(loader._flashmoe_source, kline, "a key must be a plain word") from None
        if key in m:
            raise PolicyError(
                loader._flashmoe_source, kline, f"duplicate key {key!r} (first at line {m.key_lines[key]})"
            )
        m[key] = loader.construct_object(value_node, deep=True)
        m.key_lines[key] = kline
        m.value_lines[key] = value_node.start_mark.line + 1
    return m


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    s = _Seq()
    s.line = node.start_mark.line + 1
    for item in node.value:
        s.append(loader.construct_object(item, deep=True))
        s.item_lines.append(item.start_mark.line + 1)
    return s


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _load_yaml(text: str, source: str) -> Any:
    loader = _LineLoader(text)
    loader._flashmoe_source = source
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        what = e.problem or e.context or "syntax error"
        raise PolicyError(source, line, f"invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise PolicyError(source, None, f"invalid YAML: {e}") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------------
# Patterns


class _GlobError(ValueError):
    pass


def glob_to_regex(glob: str) -> str:
    """Translate a tensor-name glob into a regex for ``re.fullmatch``.

    ``*`` any run of characters (dots included), ``?`` one character, ``[abc]``/``[!abc]`` a
    character class, ``{a,b}`` alternatives (may nest), ``\\x`` a literal x.
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
            j = i
            if j < n and glob[j] in "!^":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            j = glob.find("]", j)
            if j < 0:
                raise _GlobError("unclosed '[' in glob")
            body = glob[i:j]
            i = j + 1
            neg = body[:1] in ("!", "^") and body != ""
            if neg:
                body = body[1:]
            cls = "".join("-" if ch == "-" else re.escape(ch) for ch in body)
            out.append("[" + ("^" if neg else "") + cls + "]")
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


_REGEXY = re.compile(r"\\[.dwsDWS]|\.\+|[()|+^$]")  # `.*` alone is a fine glob (blk.*.x)


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
                raise ValueError(f"invalid regex '{body}': {e.msg}{pos}") from None
            return cls(text, "regex", rx)
        if not text:
            raise ValueError("empty pattern")
        try:
            rx = re.compile(glob_to_regex(text), re.DOTALL)
        except (_GlobError, re.error) as e:
            raise ValueError(f"invalid glob '{text}': {e}") from None
        return cls(text, "glob", rx)


@dataclass
class Rule:
    index: int  # 1-based position in `rules`
    line: int
    patterns: List[Pattern]
    place: str

    def matches(self, name: str) -> bool:
        return any(p.matches(name) for p in self.patterns)

    def describe(self) -> str:
        pats = ", ".join(p.text for p in self.patterns)
        return f"rule {self.index} (line {self.line}: {pats} -> {self.place})"

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "line": self.line,
            "match": [p.text for p in self.patterns],
            "place": self.place,
        }


# --------------------------------------------------------------------------------------------
# The policy


@dataclass
class Budget:
    """A memory budget: ``bytes`` or ``percent`` of this machine's RAM (None = no budget)."""

    bytes: Optional[int] = None
    percent: Optional[float] = None
    line: Optional[int] = None
    text: str = ""

    def resolve(self, machine_ram: Optional[int]) -> Optional[int]:
        if self.bytes is not None:
            return self.bytes
        if self.percent is not None and machine_ram:
            return int(machine_ram * self.percent / 100.0)
        return None


@dataclass
class CacheSpec:
    mode: str = "cache"
    size: str = "auto"  # "auto" | "bytes" | "slots"
    size_bytes: int = 0
    slots: int = 0
    eviction: str = "lru"
    readers: int = DEFAULT_READERS
    direct_io: bool = False
    line: Optional[int] = None  # of the expert_cache section
    size_line: Optional[int] = None
    given: bool = False  # the section is present in the file

    def describe_size(self) -> str:
        if self.mode == "pagecache":
            return "OS page cache"
        if self.size == "slots":
            return f"{plural(self.slots, 'slot')} per layer"
        if self.size == "bytes":
            return format_size(self.size_bytes)
        return "auto"


@dataclass
class RuntimeSpec:
    threads: Optional[int] = None
    n_ctx: int = RuntimeSettings.n_ctx
    n_batch: int = RuntimeSettings.n_batch
    n_ubatch: int = RuntimeSettings.n_ubatch
    experts_per_token: Optional[int] = None
    experts_per_token_line: Optional[int] = None
    repack: bool = True
    overhead: int = DEFAULT_OVERHEAD


@dataclass
class Policy:
    name: str
    description: str = ""
    source: str = "<string>"
    path: Optional[Path] = None
    budget: Budget = field(default_factory=Budget)
    rules: List[Rule] = field(default_factory=list)
    rules_line: Optional[int] = None
    expert_cache: CacheSpec = field(default_factory=CacheSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    warnings: List[str] = field(default_factory=list)  # found by checking the file alone

    # -- matching ----------------------------------------------------------------------------
    def rule_for(self, name: str, skip_gpu: bool = False) -> Optional[Rule]:
        """The first rule matching ``name`` (first match wins), or None."""
        for r in self.rules:
            if skip_gpu and r.place == "gpu":
                continue
            if r.matches(name):
                return r
        return None

    @property
    def places(self) -> List[str]:
        return [r.place for r in self.rules]

    def error(self, line: Optional[int], message: str) -> PolicyError:
        return PolicyError(self.source, line, message)

    # -- resolution ---------------------------------------------------------------------------
    def resolve(
        self,
        model: Any,
        *,
        budget: Union[None, int, str] = None,
        machine: Optional["MachineInfo"] = None,
    ) -> "Resolution":
        """Apply the policy to ``model`` (a GGUF path or an opened model).

        budget: overrides the policy's budget (bytes or a size string such as "32GiB").
        machine: the machine to check against (default: this one, MachineInfo.detect()).
        Raises PolicyError when a tensor matches no rule or a non-expert tensor would be streamed.
        Budget problems do not raise here: they are in Resolution.errors, and
        Resolution.engine_settings() raises them.
        """
        view = open_model_view(model)
        if machine is None:
            machine = MachineInfo.detect()
        override = None
        if budget is not None:
            try:
                override = parse_size(budget, "--budget")
            except SizeError as e:
                raise FlashMoEError(str(e)) from None
        return _resolve(self, view, override, machine)

    def to_dict(self) -> dict:
        c = self.expert_cache
        r = self.runtime
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "budget": (
                self.budget.bytes
                if self.budget.bytes is not None
                else (f"{self.budget.percent:g}%" if self.budget.percent is not None else None)
            ),
            "rules": [x.to_dict() for x in self.rules],
            "expert_cache": {
                "mode": c.mode,
                "cache_size": "auto" if c.size == "auto" else (c.size_bytes if c.size == "bytes" else None),
                "cache_slots": c.slots if c.size == "slots" else None,
                "eviction": c.eviction,
                "readers": c.readers,
                "direct_io": c.direct_io,
            },
            "runtime": {
                "threads": r.threads,
                "n_ctx": r.n_ctx,
                "n_batch": r.n_batch,
                "n_ubatch": r.n_ubatch,
                "experts_per_token": r.experts_per_token,
                "repack": r.repack,
                "overhead": r.overhead,
            },
            "warnings": list(self.warnings),
        }


# --------------------------------------------------------------------------------------------
# Parsing and checking a policy file


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def err(self, line: Optional[int], msg: str) -> PolicyError:
        return PolicyError(self.source, line, msg)

    def keys(self, m: _Map, allowed: Sequence[str], where: str) -> None:
        for k in m:
            if k in allowed:
                continue
            ks = str(k)
            near = difflib.get_close_matches(ks, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (expected one of: {', '.join(allowed)})"
            loc = f" in {where}" if where else ""
            raise self.err(m.key_lines[k], f"unknown key {ks!r}{loc}{hint}")

    def mapping(self, value: Any, line: int, what: str) -> _Map:
        if not isinstance(value, _Map):
            raise self.err(line, f"{what} must be a mapping (key: value lines), got {_typename(value)}")
        return value

    def integer(self, m: _Map, key: str, where: str, minimum: int = 0, allow_none: bool = False):
        v = m[key]
        if v is None and allow_none:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            extra = " or null" if allow_none else ""
            raise self.err(m.value_lines[key], f"{key} in {where} must be an integer{extra}, got {_show(v)}")
        if v < minimum:
            raise self.err(m.value_lines[key], f"{key} in {where} must be at least {minimum}, got {v}")
        return v

    def boolean(self, m: _Map, key: str, where: str) -> bool:
        v = m[key]
        if not isinstance(v, bool):
            raise self.err(m.value_lines[key], f"{key} in {where} must be true or false, got {_show(v)}")
        return v

    def string(self, m: _Map, key: str, where: str) -> str:
        v = m[key]
        if not isinstance(v, str):
            loc = f" in {where}" if where else ""
            raise self.err(m.value_lines[key], f"{key}{loc} must be a string, got {_show(v)}")
        return v

    def choice(self, m: _Map, key: str, where: str, choices: Sequence[str], what: str) -> str:
        v = m[key]
        if not isinstance(v, str):
            raise self.err(
                m.value_lines[key], f"{key} in {where} must be one of {', '.join(choices)}, got {_show(v)}"
            )
        if v not in choices:
            near = difflib.get_close_matches(v, choices, n=1, cutoff=0.5)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise self.err(
                m.value_lines[key], f"unknown {what} {v!r}{hint}; expected one of {', '.join(choices)}"
            )
        return v

    def size(self, m: _Map, key: str, where: str) -> int:
        v = m[key]
        loc = f" in {where}" if where else ""
        try:
            return parse_size(v)
        except SizeError as e:
            msg = str(e)
            raise self.err(m.value_lines[key], f"{key}{loc}: {msg}") from None


def _typename(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "a number"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def _show(v: Any) -> str:
    if isinstance(v, (list, dict)) or v is None:
        return _typename(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def parse_policy(text: str, source: str = "<string>", path: Optional[Path] = None) -> Policy:
    """Parse and check a policy from YAML text. ``source`` names it in error messages."""
    data = _load_yaml(text, source)
    ck = _Checker(source)
    if data is None:
        raise ck.err(None, "the policy is empty")
    if not isinstance(data, _Map):
        raise ck.err(getattr(data, "line", 1) or 1, f"a policy must be a mapping (key: value lines), got {_typename(data)}")
    ck.keys(data, TOP_KEYS, "")

    default_name = path.stem if path is not None else "policy"
    pol = Policy(name=default_name, source=source, path=path)

    if "version" in data:
        v = data["version"]
        if v != 1 or isinstance(v, bool):
            raise ck.err(data.value_lines["version"], f"unsupported policy version {_show(v)} (this flashmoe reads version 1)")
    if "name" in data:
        pol.name = ck.string(data, "name", "")
        if not pol.name.strip():
            raise ck.err(data.value_lines["name"], "name must not be empty")
    if "description" in data and data["description"] is not None:
        pol.description = " ".join(ck.string(data, "description", "").split())

    # budget
    if "budget" in data and data["budget"] is not None:
        line = data.value_lines["budget"]
        v = data["budget"]
        b = Budget(line=line, text=str(v))
        if isinstance(v, str) and v.strip().endswith("%"):
            try:
                pct = float(v.strip()[:-1])
            except ValueError:
                raise ck.err(line, f"budget: cannot parse percentage {v!r}") from None
            if not 0 < pct <= 100:
                raise ck.err(line, f"budget: a percentage of this machine's RAM must be in (0, 100], got {v!r}")
            b.percent = pct
        else:
            b.bytes = ck.size(data, "budget", "")
            if b.bytes == 0:
                raise ck.err(line, "budget must be more than 0 bytes (leave it out for no budget)")
        pol.budget = b

    # rules
    if "rules" not in data:
        raise ck.err(None, "the policy has no 'rules' (a list of {match: PATTERN, place: PLACEMENT})")
    rules = data["rules"]
    pol.rules_line = data.key_lines["rules"]
    if not isinstance(rules, _Seq):
        raise ck.err(data.value_lines["rules"], f"rules must be a list of {{match: PATTERN, place: PLACEMENT}}, got {_typename(rules)}")
    if not rules:
        raise ck.err(data.value_lines["rules"], "rules is empty: every tensor must match a rule")
    for i, (item, line) in enumerate(zip(rules, rules.item_lines), start=1):
        where = f"rule {i}"
        m = ck.mapping(item, line, where)
        ck.keys(m, RULE_KEYS, where)
        for k in RULE_KEYS:
            if k not in m:
                raise ck.err(m.line, f"{where} has no '{k}'")
        place = ck.choice(m, "place", where, PLACEMENTS, "placement")
        pats = m["match"]
        pline = m.value_lines["match"]
        if isinstance(pats, str):
            texts = [(pats, pline)]
        elif isinstance(pats, _Seq) and pats:
            texts = list(zip(pats, pats.item_lines))
        else:
            raise ck.err(pline, f"match in {where} must be a pattern or a list of patterns, got {_show(pats)}")
        patterns = []
        for t, tl in texts:
            if not isinstance(t, str):
                raise ck.err(tl, f"match in {where}: a pattern must be a string, got {_show(t)}")
            try:
                patterns.append(Pattern.compile(t))
            except ValueError as e:
                raise ck.err(tl, f"bad pattern in {where}: {e}") from None
            if patterns[-1].kind == "glob" and _REGEXY.search(t):
                pol.warnings.append(
                    _where(source, tl) + f"pattern {t!r} in {where} looks like a regex but is read as a glob; "
                    f"write 'regex:{t}' if a regex is meant"
                )
        pol.rules.append(Rule(index=i, line=m.line, patterns=patterns, place=place))

    # expert_cache
    c = CacheSpec()
    if "expert_cache" in data and data["expert_cache"] is not None:
        m = ck.mapping(data["expert_cache"], data.value_lines["expert_cache"], "expert_cache")
        ck.keys(m, CACHE_KEYS, "expert_cache")
        c.given = True
        c.line = data.key_lines["expert_cache"]
        if "mode" in m:
            c.mode = ck.choice(m, "mode", "expert_cache", CACHE_MODES, "expert cache mode")
        if "cache_size" in m and "cache_slots" in m:
            raise ck.err(
                m.key_lines["cache_slots"],
                f"cache_size (line {m.key_lines['cache_size']}) and cache_slots are exclusive: give one",
            )
        if "cache_size" in m:
            c.size_line = m.value_lines["cache_size"]
            v = m["cache_size"]
            if isinstance(v, str) and v.strip().lower() == "auto":
                c.size = "auto"
            else:
                c.size = "bytes"
                c.size_bytes = ck.size(m, "cache_size", "expert_cache")
                if c.size_bytes == 0:
                    raise ck.err(c.size_line, "cache_size must be more than 0 bytes (or auto)")
        if "cache_slots" in m:
            c.size_line = m.value_lines["cache_slots"]
            c.size = "slots"
            c.slots = ck.integer(m, "cache_slots", "expert_cache", minimum=1)
        if "eviction" in m:
            c.eviction = ck.choice(m, "eviction", "expert_cache", EVICTIONS, "eviction")
        if "readers" in m:
            c.readers = ck.integer(m, "readers", "expert_cache", minimum=1)
            if c.readers > 256:
                raise ck.err(m.value_lines["readers"], f"readers in expert_cache must be at most 256, got {c.readers}")
        if "direct_io" in m:
            c.direct_io = ck.boolean(m, "direct_io", "expert_cache")
        if c.mode == "pagecache":
            ignored = [k for k in ("cache_size", "cache_slots", "eviction", "direct_io") if k in m]
            if ignored:
                pol.warnings.append(
                    _where(source, m.key_lines[ignored[0]])
                    + f"{', '.join(ignored)} ignored in pagecache mode (the OS page cache holds the experts)"
                )
    pol.expert_cache = c

    # runtime
    rt = RuntimeSpec()
    if "runtime" in data and data["runtime"] is not None:
        m = ck.mapping(data["runtime"], data.value_lines["runtime"], "runtime")
        ck.keys(m, RUNTIME_KEYS, "runtime")
        if "threads" in m:
            if isinstance(m["threads"], str) and m["threads"].strip().lower() == "auto":
                rt.threads = None
            else:
                rt.threads = ck.integer(m, "threads", "runtime", minimum=1, allow_none=True)
        if "n_ctx" in m:
            rt.n_ctx = ck.integer(m, "n_ctx", "runtime", minimum=0)
        if "n_batch" in m:
            rt.n_batch = ck.integer(m, "n_batch", "runtime", minimum=1)
        if "n_ubatch" in m:
            rt.n_ubatch = ck.integer(m, "n_ubatch", "runtime", minimum=1)
        if "experts_per_token" in m:
            rt.experts_per_token = ck.integer(m, "experts_per_token", "runtime", minimum=1, allow_none=True)
            rt.experts_per_token_line = m.value_lines["experts_per_token"]
        if "repack" in m:
            rt.repack = ck.boolean(m, "repack", "runtime")
        if "overhead" in m:
            rt.overhead = ck.size(m, "overhead", "runtime")
        if rt.n_ubatch > rt.n_batch:
            pol.warnings.append(
                _where(source, m.key_lines.get("n_ubatch"))
                + f"n_ubatch {rt.n_ubatch} is larger than n_batch {rt.n_batch}; llama.cpp caps it at n_batch"
            )
            rt.n_ubatch = rt.n_batch
    pol.runtime = rt

    _check_against_canonical_names(pol)
    if rt.experts_per_token is not None:
        pol.warnings.append(
            _where(source, rt.experts_per_token_line)
            + f"experts_per_token overrides the model's experts per token with {rt.experts_per_token}: "
            "this changes the model's output"
        )
    if c.given and "stream" not in pol.places:
        pol.warnings.append(_where(source, c.line) + "expert_cache is set but no rule places a tensor on stream")
    return pol


SUPPORTED_ARCHES = ("qwen3moe", "qwen2moe", "qwen35moe")


def _canonical_names() -> Tuple[List[str], List[str]]:
    """Non-expert tensor names (layer 0) of MoE architectures gguf-py knows:
    (names of the supported architectures, ".weight" only; names of the others and biases).

    Used to check a policy file without a model: a stream rule that catches a non-expert tensor
    of a supported architecture is an error for any such model; for other names, a warning.
    """
    global _CANON
    if _CANON is not None:
        return _CANON
    core, other = set(), set()
    try:
        import gguf

        moe_tensors = {gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_UP_EXP, gguf.MODEL_TENSOR.FFN_DOWN_EXP}
        for arch, tensors in gguf.MODEL_TENSORS.items():
            if not moe_tensors & set(tensors):
                continue
            supported = gguf.MODEL_ARCH_NAMES.get(arch) in SUPPORTED_ARCHES
            for t in tensors:
                base = gguf.TENSOR_NAMES[t]
                if "{" in base and "{bid}" not in base:
                    continue  # names with other fields (e.g. per-xid)
                base = base.replace("{bid}", "0")
                for suffix in (".weight", ".bias"):
                    n = base + suffix
                    if EXPERT_NAME_RE.match(n):
                        continue
                    (core if supported and suffix == ".weight" else other).add(n)
    except Exception:  # gguf-py changed shape: skip the file-level check, resolution still checks
        pass
    _CANON = (sorted(core), sorted(other - core))
    return _CANON


_CANON: Optional[Tuple[List[str], List[str]]] = None

# Names that every MoE model of the supported architectures has: a policy that leaves one of them
# unmatched cannot resolve for those models.
_CORE_NAMES = (
    "token_embd.weight",
    "output_norm.weight",
    "output.weight",
    "blk.0.attn_norm.weight",
    "blk.0.ffn_gate_inp.weight",
    "blk.0.ffn_gate_exps.weight",
    "blk.0.ffn_up_exps.weight",
    "blk.0.ffn_down_exps.weight",
    "blk.0.ffn_gate_up_exps.weight",
    "blk.0.ffn_up_shexp.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.0.attn_v.weight",
    "blk.0.attn_output.weight",
    "blk.0.ffn_norm.weight",
)


def _check_against_canonical_names(pol: Policy) -> None:
    core, other = _canonical_names()
    for n in core:
        r = pol.rule_for(n)
        if r is not None and r.place == "stream":
            raise pol.error(
                r.line,
                f"rule {r.index} places non-expert tensors such as {n!r} on stream; "
                f"stream only applies to {STREAMABLE_HELP}",
            )
    warned = set()
    for n in other:
        r = pol.rule_for(n)
        if r is not None and r.place == "stream" and r.index not in warned:
            warned.add(r.index)
            pol.warnings.append(
                _where(pol.source, r.line)
                + f"rule {r.index} would also place {n!r} on stream: models that have such tensors will not "
                f"resolve (stream only applies to {STREAMABLE_HELP})"
            )
    unmatched = [n for n in _CORE_NAMES if pol.rule_for(n) is None]
    if unmatched:
        more = f" (and {len(unmatched) - 3} more)" if len(unmatched) > 3 else ""
        pol.warnings.append(
            _where(pol.source, pol.rules_line)
            + f"no rule matches tensors such as {', '.join(repr(x) for x in unmatched[:3])}{more}: "
            "models that have them will not resolve; end the rules with a catch-all such as "
            "{match: '*', place: mmap}"
        )


# --------------------------------------------------------------------------------------------
# Finding and loading policies


def _source_configs_dir() -> Optional[Path]:
    """<checkout>/configs when flashmoe runs from a source checkout (next to pyproject.toml)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return root / "configs"
    return None


def _package_configs_dir() -> Optional[Path]:
    try:
        from importlib import resources

        p = resources.files("flashmoe") / "configs"
        if p.is_dir():
            return Path(str(p))
    except Exception:
        pass
    return None


def config_dirs() -> List[Path]:
    """Where shipped configs are looked for: the checkout's configs/, then the package data."""
    out = []
    for d in (_source_configs_dir(), _package_configs_dir()):
        if d is not None and d.is_dir() and d not in out:
            out.append(d)
    return out


def list_configs() -> Dict[str, Path]:
    """Shipped configs by name (the first directory of config_dirs() wins)."""
    found: Dict[str, Path] = {}
    for d in config_dirs():
        for p in sorted(d.glob("*" + _CONFIG_EXT)):
            found.setdefault(p.stem, p)
    return dict(sorted(found.items()))


def find_config(name: Union[str, os.PathLike]) -> Path:
    """A policy path: ``name`` itself if it is a file, else the shipped config of that name
    (``stream`` -> configs/stream.yaml) from the checkout or the installed package."""
    p = Path(name)
    if p.is_file():
        return p
    s = str(name)
    looks_like_path = os.sep in s or "/" in s or s.endswith((".yaml", ".yml"))
    stem = s[: -len(_CONFIG_EXT)] if s.endswith(_CONFIG_EXT) else s
    if not ("/" in s or os.sep in s):
        for d in config_dirs():
            cand = d / (stem + _CONFIG_EXT)
            if cand.is_file():
                return cand
    shipped = list_configs()
    if looks_like_path:
        if p.exists():
            raise FlashMoEError(f"{s}: not a file")
        raise FlashMoEError(f"no such policy file: {s}")
    near = difflib.get_close_matches(stem, list(shipped), n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    names = ", ".join(shipped) if shipped else "none found"
    raise FlashMoEError(f"no policy {s!r}: not a file and not a shipped config{hint}; shipped configs: {names}")


def load_policy(path_or_name: Union[str, os.PathLike]) -> Policy:
    """Load and check a policy file (a path or a shipped config name). Raises PolicyError."""
    path = find_config(path_or_name)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FlashMoEError(f"{path}: not a text (UTF-8) file") from None
    except OSError as e:
        raise FlashMoEError(f"cannot read policy {path}: {e.strerror or e}") from None
    if Path(path_or_name).is_file():
        shown = str(path_or_name)
    else:  # a shipped config: show it relative to the working directory when it is below it
        try:
            shown = str(path.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            shown = str(path)
    return parse_policy(text, source=shown, path=path)


# --------------------------------------------------------------------------------------------
# The model, seen through whatever reader is available


@dataclass
class TensorView:
    name: str
    type_name: str
    shape: Tuple[int, ...]  # ggml order (ne0 first)
    nbytes: int
    layer: Optional[int]
    is_expert: bool  # a routed expert tensor (streamable)
    expert_bytes: int  # bytes of one expert's slice (0 if not an expert tensor)
    n_expert: int  # experts in the tensor (0 if not an expert tensor)


@dataclass
class ModelView:
    """What a policy needs from a model: tensors and a few hyperparameters."""

    path: str
    arch: str
    metadata: Dict[str, Any]
    tensors: List[TensorView]
    n_layer: int
    n_expert: int
    n_expert_used: int

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def meta(self, key: str, default: Any = None) -> Any:
        v = self.metadata.get(key.replace("{arch}", self.arch))
        return default if v is None else v

    def meta_int(self, key: str, default: int = 0) -> int:
        v = self.meta(key, default)
        if isinstance(v, (list, tuple)):  # per-layer arrays (e.g. head_count_kv): take the max
            v = max((int(x) for x in v), default=default)
        try:
            return int(v)
        except (TypeError, ValueError):
            return default


def _make_tensor_view(name, type_name, shape, nbytes, n_expert_model, expert_stride=None) -> TensorView:
    m = _LAYER_RE.match(name)
    layer = int(m.group(1)) if m else None
    is_expert = EXPERT_NAME_RE.match(name) is not None
    shape = tuple(int(x) for x in shape)
    n_exp = 0
    ebytes = 0
    if is_expert:
        n_exp = shape[-1] if len(shape) >= 3 else (n_expert_model or 1)
        ebytes = int(expert_stride) if expert_stride else (int(nbytes) // max(n_exp, 1))
    return TensorView(name, str(type_name), shape, int(nbytes), layer, is_expert, ebytes, n_exp)


def open_model_view(model: Any) -> ModelView:
    """A ModelView of ``model``: a path (str/PathLike), a gguf_tools GGUFModel, a gguf.GGUFReader,
    or a ModelView."""
    if isinstance(model, ModelView):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise FlashMoEError(f"no such model file: {path}")
        if path.is_dir():
            raise FlashMoEError(f"{path}: is a directory, not a GGUF file")
        opener = _project_reader()
        if opener is not None:
            try:
                m = opener(str(path))
                try:
                    return _view_of_model(m, str(path))
                finally:
                    if hasattr(m, "close"):
                        m.close()
            except FlashMoEError:
                raise
            except Exception as e:  # the project reader failed: say why, in one line
                raise FlashMoEError(f"cannot read model {path}: {e}") from None
        return _view_with_gguf_reader(path)
    try:
        import gguf

        if isinstance(model, gguf.GGUFReader):
            return _view_of_reader_list([model], str(getattr(model, "path", "<model>")))
    except ImportError:
        pass
    if hasattr(model, "tensors"):
        return _view_of_model(model, str(getattr(model, "path", "<model>")))
    raise FlashMoEError(f"cannot use {type(model).__name__} as a model (give a GGUF path)")


def _project_reader():
    """gguf_tools.reader.open_model when the project's reader exists, else None."""
    try:
        from gguf_tools.reader import open_model  # type: ignore
    except ImportError:
        return None
    return open_model


def _view_of_model(m: Any, path: str) -> ModelView:
    """From the project's GGUFModel (gguf_tools.reader)."""
    tensors = m.tensors
    if isinstance(tensors, dict):
        tensors = list(tensors.values())
    n_expert = int(getattr(m, "n_expert", 0) or 0)
    views = [
        _make_tensor_view(
            t.name,
            getattr(t, "type_name", None) or str(getattr(t, "ggml_type", "?")),
            t.shape,
            t.nbytes,
            n_expert,
            getattr(t, "expert_stride", None) if EXPERT_NAME_RE.match(t.name) else None,
        )
        for t in tensors
    ]
    meta = {k: _plain_value(v) for k, v in dict(getattr(m, "metadata", {}) or {}).items()}
    arch = str(getattr(m, "arch", None) or meta.get("general.architecture", "?"))
    return _finish_view(path, arch, meta, views, getattr(m, "n_layer", None), n_expert, getattr(m, "n_expert_used", None))


def _plain_value(v: Any) -> Any:
    """A metadata value as plain Python, whatever wrapper the reader used."""
    if isinstance(v, (int, float, str, bool, list, tuple)) or v is None:
        return v
    if hasattr(v, "contents"):
        try:
            return v.contents()
        except Exception:
            return None
    if hasattr(v, "value"):
        return v.value
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


_SPLIT_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


def _view_with_gguf_reader(path: Path) -> ModelView:
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise FlashMoEError("the gguf package is needed to read models (pip install gguf)") from None
    paths = [path]
    m = _SPLIT_RE.match(str(path))
    if m:
        count = int(m.group(3))
        paths = [Path(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FlashMoEError(f"split model {path}: missing shard {missing[0]}")
    readers = []
    for p in paths:
        try:
            readers.append(gguf.GGUFReader(str(p)))
        except Exception as e:
            raise FlashMoEError(f"{p}: not a readable GGUF file ({e})") from None
    return _view_of_reader_list(readers, str(path))


def _view_of_reader_list(readers: list, path: str) -> ModelView:
    meta: Dict[str, Any] = {}
    for f in readers[0].fields.values():
        if f.name.startswith("tokenizer.ggml.") and f.name not in ("tokenizer.ggml.model",):
            continue  # big arrays, not needed
        try:
            meta[f.name] = f.contents()
        except Exception:
            continue
    views: List[TensorView] = []
    arch = str(meta.get("general.architecture", "?"))
    n_expert = int(meta.get(f"{arch}.expert_count", 0) or 0)
    for r in readers:
        for t in r.tensors:
            views.append(
                _make_tensor_view(t.name, t.tensor_type.name, [int(x) for x in t.shape], int(t.n_bytes), n_expert)
            )
    return _finish_view(path, arch, meta, views, None, n_expert, None)


def _finish_view(path, arch, meta, views, n_layer, n_expert, n_expert_used) -> ModelView:
    def mi(key, default=0):
        v = meta.get(f"{arch}.{key}")
        try:
            return int(v) if v is not None else default
        except (TypeError, ValueError):
            return default

    layers = [t.layer for t in views if t.layer is not None]
    n_layer = int(n_layer or mi("block_count") or (max(layers) + 1 if layers else 0))
    n_expert = int(n_expert or mi("expert_count") or max((t.n_expert for t in views), default=0))
    n_expert_used = int(n_expert_used or mi("expert_used_count") or 0)
    return ModelView(path, arch, meta, views, n_layer, n_expert, n_expert_used)


# --------------------------------------------------------------------------------------------
# This machine


# physical_ram, cgroup_memory_limit and _has_cap_ipc_lock are flashmoe.machine's (imported at the top,
# one copy for policy, tune, bench and cgroup); they stay importable from here.


def detect_gpu_backend() -> Optional[str]:
    """The GPU backend of the installed llama.cpp build: "metal", "gpu" (CUDA/ROCm/Vulkan) or
    None for a CPU build (or when llama_cpp is not installed)."""
    try:
        import llama_cpp  # type: ignore

        if not llama_cpp.llama_supports_gpu_offload():
            return None
    except Exception:
        return None
    return "metal" if sys.platform == "darwin" else "gpu"


_DETECT = "detect"


@dataclass
class MachineInfo:
    """The machine a policy is checked against. ``MachineInfo.detect()`` reads this one; tests and
    "what if" reports build one by hand."""

    ram_bytes: Optional[int] = None  # usable RAM: min(physical RAM, cgroup limit)
    physical_ram: Optional[int] = None
    cgroup_limit: Optional[int] = None
    memlock_limit: Optional[int] = None  # soft RLIMIT_MEMLOCK in bytes; None = unlimited
    can_lock_unlimited: bool = False  # CAP_IPC_LOCK (root in most setups)
    gpu_backend: Optional[str] = _DETECT  # None = CPU build, "metal", "gpu"; "detect" = ask llama_cpp

    @classmethod
    def detect(cls) -> "MachineInfo":
        phys = physical_ram()
        cg = cgroup_memory_limit()
        ram = min(x for x in (phys, cg) if x is not None) if (phys or cg) else None
        return cls(ram, phys, cg, memlock_limit(), _has_cap_ipc_lock(), _DETECT)

    def gpu(self) -> Optional[str]:
        if self.gpu_backend == _DETECT:
            self.gpu_backend = detect_gpu_backend()
        return self.gpu_backend

    def describe_ram(self) -> str:
        if self.ram_bytes is None:
            return "unknown"
        if self.cgroup_limit is not None and self.cgroup_limit == self.ram_bytes and self.physical_ram != self.ram_bytes:
            return f"{format_size(self.ram_bytes)} (cgroup limit; {format_size(self.physical_ram)} physical)"
        return format_size(self.ram_bytes)


# --------------------------------------------------------------------------------------------
# Resolution


@dataclass
class CachePlan:
    """How routed experts are held. ``slots`` per layer; ``bytes`` for all streamed layers."""

    mode: str  # "cache", "pagecache" or "off" (nothing streamed)
    slots: int = 0
    bytes: int = 0
    sized_by: str = ""  # "slots", "bytes", "auto", "" (pagecache/off)
    requested: str = ""  # what the policy asked, readable
    slot_bytes_by_layer: Dict[int, int] = field(default_factory=dict)  # one expert of the layer
    streamed_layers: List[int] = field(default_factory=list)
    n_expert: int = 0
    experts_used: int = 0
    eviction: str = "lru"
    readers: int = DEFAULT_READERS
    direct_io: bool = False

    @property
    def bytes_per_slot_all_layers(self) -> int:
        return sum(self.slot_bytes_by_layer.values())


@dataclass
class MemoryEstimate:
    pinned: int = 0
    ram: int = 0
    gpu_host: int = 0  # gpu tensors that live in RAM (unified memory, Metal)
    gpu_device: int = 0  # gpu tensors in device memory (CUDA & co)
    cache: int = 0
    kv_cache: int = 0
    recurrent_state: int = 0
    compute: int = 0
    overhead: int = 0
    budget: Optional[int] = None
    budget_source: str = ""  # "policy", "--budget", "" (none)
    machine_ram: Optional[int] = None
    n_ctx: int = 0

    @property
    def weights(self) -> int:
        return self.pinned + self.ram + self.gpu_host

    @property
    def runtime(self) -> int:
        return self.kv_cache + self.recurrent_state + self.compute + self.overhead

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.runtime


class Resolution:
    """A policy applied to one model."""

    def __init__(self, policy: Policy, model: ModelView, machine: MachineInfo):
        self.policy = policy
        self.model = model
        self.machine = machine
        self.placements: Dict[str, str] = {}  # tensor name -> placement, in file order
        self.rule_of: Dict[str, Optional[Rule]] = {}  # tensor name -> the rule that placed it
        self.bytes_by_placement: Dict[str, int] = {p: 0 for p in PLACEMENTS}
        self.count_by_placement: Dict[str, int] = {p: 0 for p in PLACEMENTS}
        self.warnings: List[str] = []
        self.errors: List[str] = []  # the policy cannot load this model as asked (budget)
        self.notes: List[str] = []
        self.cache = CachePlan(mode="off")
        self.memory = MemoryEstimate()
        self.experts_used = model.n_expert_used
        self.experts_used_override: Optional[int] = None
        self.gpu_ignored = False

    # -- for the engine -----------------------------------------------------------------------
    def check(self) -> None:
        """Raise PolicyError for the first error (a policy that cannot load as asked)."""
        if self.errors:
            raise FlashMoEError(self.errors[0])

    def engine_settings(self) -> EngineSettings:
        """The settings the engine runs with. Raises if the resolution has errors."""
        self.check()
        pol = self.policy
        c = self.cache
        if c.mode == "off":
            stream = StreamSettings(mode="off")
        else:
            stream = StreamSettings(
                mode=c.mode,
                cache_slots=c.slots,
                cache_bytes=c.bytes,
                eviction=c.eviction,
                readers=c.readers,
                direct_io=c.direct_io and c.mode == "cache",
            )
        placed = set(self.placements.values())
        load_mode = "ram" if placed and placed <= {"pin", "ram"} else "mmap"
        rt = pol.runtime
        runtime = RuntimeSettings(
            n_ctx=rt.n_ctx,
            n_threads=rt.threads,
            n_batch=rt.n_batch,
            n_ubatch=rt.n_ubatch,
            n_expert_used=self.experts_used_override,
            use_extra_bufts=rt.repack,
            load_mode=load_mode,
        )
        es = EngineSettings(
            policy_name=pol.name,
            stream=stream,
            runtime=runtime,
            placements=dict(self.placements),
            memory_budget=self.memory.budget,
        )
        es.policy_path = str(pol.path) if pol.path else None
        es.policy_warnings = list(self.warnings)
        return es

    def expected_report(self) -> dict:
        """What the engine's report must show when it ran with this resolution: the hook for tests
        that check the engine really used the placement. Keys:

        policy, stream_mode ("off"|"cache"|"pagecache"), cache_slots (per layer), cache_bytes,
        eviction, readers, direct_io, streamed_layers, n_expert_used (effective per token),
        n_expert_used_override (None when the model's own), n_ctx, count_by_placement,
        bytes_by_placement, placements (tensor -> placement), gpu_ignored.
        """
        c = self.cache
        return {
            "policy": self.policy.name,
            "stream_mode": c.mode,
            "cache_slots": c.slots,
            "cache_bytes": c.bytes,
            "eviction": c.eviction if c.mode == "cache" else None,
            "readers": c.readers if c.mode != "off" else None,
            "direct_io": bool(c.direct_io and c.mode == "cache"),
            "streamed_layers": list(c.streamed_layers),
            "n_expert_used": self.experts_used,
            "n_expert_used_override": self.experts_used_override,
            "n_ctx": self.policy.runtime.n_ctx,
            "count_by_placement": {k: v for k, v in self.count_by_placement.items() if v},
            "bytes_by_placement": {k: v for k, v in self.bytes_by_placement.items() if v},
            "placements": dict(self.placements),
            "gpu_ignored": self.gpu_ignored,
        }

    # -- reporting ----------------------------------------------------------------------------
    def to_dict(self, tensors: bool = True) -> dict:
        mv = self.model
        mem = self.memory
        c = self.cache
        d = {
            "policy": {"name": self.policy.name, "source": self.policy.source, "description": self.policy.description},
            "model": {
                "path": mv.path,
                "arch": mv.arch,
                "n_layer": mv.n_layer,
                "n_expert": mv.n_expert,
                "n_expert_used": mv.n_expert_used,
                "tensors": len(mv.tensors),
                "bytes": mv.total_bytes,
            },
            "placements": {
                p: {"tensors": self.count_by_placement[p], "bytes": self.bytes_by_placement[p]} for p in PLACEMENTS
            },
            "expert_cache": {
                "mode": c.mode,
                "sized_by": c.sized_by or None,
                "slots_per_layer": c.slots,
                "bytes": c.bytes,
                "n_expert": c.n_expert,
                "experts_used": c.experts_used,
                "streamed_layers": len(c.streamed_layers),
                "bytes_per_slot_all_layers": c.bytes_per_slot_all_layers,
                "eviction": c.eviction,
                "readers": c.readers,
                "direct_io": c.direct_io,
            },
            "memory": {
                "pinned": mem.pinned,
                "ram": mem.ram,
                "gpu_host": mem.gpu_host,
                "gpu_device": mem.gpu_device,
                "expert_cache": mem.cache,
                "kv_cache": mem.kv_cache,
                "recurrent_state": mem.recurrent_state,
                "compute": mem.compute,
                "overhead": mem.overhead,
                "total": mem.total,
                "budget": mem.budget,
                "budget_source": mem.budget_source or None,
                "machine_ram": mem.machine_ram,
                "n_ctx": mem.n_ctx,
            },
            "runtime": {
                "threads": self.policy.runtime.threads,
                "n_ctx": self.policy.runtime.n_ctx,
                "n_batch": self.policy.runtime.n_batch,
                "n_ubatch": self.policy.runtime.n_ubatch,
                "experts_per_token": self.experts_used,
                "experts_per_token_override": self.experts_used_override,
                "repack": self.policy.runtime.repack,
            },
            "warnings": list(self.warnings),
            "errors": list(self.errors),
            "notes": list(self.notes),
        }
        if tensors:
            d["tensors"] = [
                {
                    "name": t.name,
                    "type": t.type_name,
                    "shape": list(t.shape),
                    "bytes": t.nbytes,
                    "placement": self.placements[t.name],
                    "rule": self.rule_of[t.name].index if self.rule_of[t.name] else None,
                }
                for t in mv.tensors
            ]
        return d


def _resolve(pol: Policy, mv: ModelView, budget_override: Optional[int], machine: MachineInfo) -> Resolution:
    res = Resolution(pol, mv, machine)
    src = pol.source
    has_gpu_rule = "gpu" in pol.places
    skip_gpu = has_gpu_rule and machine.gpu() is None

    unmatched: List[str] = []
    bad_stream: List[Tuple[TensorView, Rule]] = []
    fell_through: Dict[str, int] = {}
    for t in mv.tensors:
        rule = pol.rule_for(t.name, skip_gpu=skip_gpu)
        place = rule.place if rule else None
        gi = _first_gpu_rule_index(pol, t.name) if skip_gpu else None
        if gi is not None and (rule is None or rule.index > gi):
            # a gpu rule came first: ignored on this build, the tensor falls through
            if rule is None:
                place = "mmap"  # only a gpu rule matched: llama.cpp's stock behaviour
            fell_through[place] = fell_through.get(place, 0) + 1
        if place is None:
            unmatched.append(t.name)
            continue
        if place == "stream" and not t.is_expert:
            bad_stream.append((t, rule))
        res.placements[t.name] = place
        res.rule_of[t.name] = rule
        res.count_by_placement[place] += 1
        res.bytes_by_placement[place] += t.nbytes

    if unmatched:
        more = f" (and {len(unmatched) - 1} more)" if len(unmatched) > 1 else ""
        raise PolicyError(
            src,
            pol.rules_line,
            f"no rule matches tensor {unmatched[0]!r}{more} of {_model_name(mv)}: every tensor must match a rule; "
            "add a catch-all such as {match: '*', place: mmap} at the end",
        )
    if bad_stream:
        t, r = bad_stream[0]
        more = f" (and {len(bad_stream) - 1} more)" if len(bad_stream) > 1 else ""
        raise PolicyError(
            src,
            r.line,
            f"rule {r.index} places {t.name!r}{more} on stream, but stream only applies to {STREAMABLE_HELP}",
        )
    if skip_gpu:
        res.gpu_ignored = True
        moved = ", ".join(f"{n} to {p}" for p, n in sorted(fell_through.items()))
        lines = ", ".join(str(r.line) for r in pol.rules if r.place == "gpu")
        res.warnings.append(
            _where(src, None)
            + f"this llama.cpp build has no GPU backend: gpu rules ignored ({'lines' if ',' in lines else 'line'} {lines})"
            + (f"; their tensors fall through to the next matching rule: {moved}" if moved else "")
        )

    # rules that placed nothing
    used = {id(r) for r in res.rule_of.values() if r is not None}
    for r in pol.rules:
        if id(r) not in used and not (skip_gpu and r.place == "gpu"):
            res.notes.append(f"{r.describe()} matches no tensor of this model")

    # experts per token
    rt = pol.runtime
    if rt.experts_per_token is not None:
        k = rt.experts_per_token
        if mv.n_expert and k > mv.n_expert:
            raise PolicyError(
                src,
                rt.experts_per_token_line,
                f"experts_per_token {k} is more than the model's {mv.n_expert} experts",
            )
        res.experts_used_override = k
        res.experts_used = k
        if k != mv.n_expert_used:
            res.warnings.append(
                _where(src, rt.experts_per_token_line)
                + f"experts_per_token override: {k} instead of the model's {mv.n_expert_used} experts per token; "
                "this changes the model's output"
            )
        else:
            res.notes.append(f"experts_per_token {k} is the model's own value (no change)")

    _plan_memory(res, budget_override)
    return res


def _first_gpu_rule_index(pol: Policy, name: str) -> Optional[int]:
    for r in pol.rules:
        if r.place == "gpu" and r.matches(name):
            return r.index
    return None


def _model_name(mv: ModelView) -> str:
    return Path(mv.path).name


def _estimate_runtime(mv: ModelView, rt: RuntimeSpec, experts_used: int) -> Tuple[int, int, int, int]:
    """(kv_cache, recurrent_state, compute, n_ctx) estimates in bytes, for one sequence.

    KV cache: f16 K and V for n_ctx tokens in every attention layer (n_head_kv x head dim).
    Recurrent state (hybrid models such as qwen35moe): f32 conv and SSM states per recurrent layer.
    Compute buffer: the largest of the output (logits for n_ubatch tokens), attention and MoE
    phases, plus the residual stream; llama.cpp reuses the buffer between phases.
    """
    n_embd = mv.meta_int("{arch}.embedding_length")
    n_head = mv.meta_int("{arch}.attention.head_count")
    n_head_kv = mv.meta_int("{arch}.attention.head_count_kv") or n_head
    head_k = mv.meta_int("{arch}.attention.key_length") or (n_embd // n_head if n_head else 0)
    head_v = mv.meta_int("{arch}.attention.value_length") or head_k
    n_ctx = rt.n_ctx or mv.meta_int("{arch}.context_length") or 4096
    n_layer = mv.n_layer
    interval = mv.meta_int("{arch}.full_attention_interval")
    ssm_inner = mv.meta_int("{arch}.ssm.inner_size")
    if interval > 0 and ssm_inner:
        n_attn = sum(1 for il in range(n_layer) if (il + 1) % interval == 0)
    else:
        n_attn = n_layer
    n_rec = n_layer - n_attn if ssm_inner else 0
    kv = n_ctx * n_attn * n_head_kv * (head_k + head_v) * 2  # f16

    rec = 0
    if n_rec:
        d_state = mv.meta_int("{arch}.ssm.state_size")
        d_conv = mv.meta_int("{arch}.ssm.conv_kernel")
        n_group = mv.meta_int("{arch}.ssm.group_count")
        conv = max(d_conv - 1, 0) * (ssm_inner + 2 * n_group * d_state) * 4
        state = d_state * ssm_inner * 4
        rec = n_rec * (conv + state)

    n_vocab = 0
    for t in mv.tensors:
        if t.name == "token_embd.weight" and len(t.shape) >= 2:
            n_vocab = t.shape[1]
            break
    n_vocab = n_vocab or mv.meta_int("{arch}.vocab_size")
    ub = max(1, min(rt.n_ubatch, rt.n_batch))
    n_ff_exp = mv.meta_int("{arch}.expert_feed_forward_length")
    n_ff_sh = mv.meta_int("{arch}.expert_shared_feed_forward_length")
    f32 = 4
    logits = n_vocab * ub * f32
    attn = (n_head * head_k + 2 * n_head_kv * head_k) * ub * f32 * 3 + n_head * head_v * ub * f32
    moe = ub * experts_used * n_ff_exp * f32 * 3 + ub * max(mv.n_expert, 1) * f32 * 3 + ub * n_ff_sh * f32 * 3
    compute = max(logits, attn, moe) + n_embd * ub * f32 * 4
    return kv, rec, compute, n_ctx


def _plan_memory(res: Resolution, budget_override: Optional[int]) -> None:
    pol, mv, machine = res.policy, res.model, res.machine
    src = pol.source
    mem = res.memory
    rt = pol.runtime
    spec = pol.expert_cache

    mem.pinned = res.bytes_by_placement["pin"]
    mem.ram = res.bytes_by_placement["ram"]
    gpu_bytes = res.bytes_by_placement["gpu"]
    if gpu_bytes:
        if machine.gpu() == "metal":
            mem.gpu_host = gpu_bytes  # unified memory: device buffers are RAM
        else:
            mem.gpu_device = gpu_bytes
    mem.kv_cache, mem.recurrent_state, mem.compute, mem.n_ctx = _estimate_runtime(mv, rt, res.experts_used)
    mem.overhead = rt.overhead
    mem.machine_ram = machine.ram_bytes

    if budget_override is not None:
        mem.budget, mem.budget_source = budget_override, "--budget"
        budget_where = "--budget "
    else:
        mem.budget = pol.budget.resolve(machine.ram_bytes)
        mem.budget_source = "policy" if mem.budget is not None else ""
        budget_where = _where(src, pol.budget.line) + "budget "
        if pol.budget.percent is not None and mem.budget is None:
            res.warnings.append(
                _where(src, pol.budget.line) + f"budget {pol.budget.text} of this machine's RAM: RAM size unknown"
            )

    below_pinned = mem.budget is not None and mem.budget < mem.pinned
    if below_pinned:
        res.errors.append(
            budget_where
            + f"{format_size(mem.budget)} is below the pinned weights of {_model_name(mv)} "
            f"({format_size(mem.pinned)}): the model cannot load; raise the budget or pin fewer tensors"
        )

    # -- the expert cache
    streamed = [t for t in mv.tensors if res.placements.get(t.name) == "stream"]
    c = res.cache
    c.eviction, c.readers, c.direct_io = spec.eviction, spec.readers, spec.direct_io
    c.experts_used = res.experts_used
    c.n_expert = mv.n_expert or max((t.n_expert for t in streamed), default=0)
    if streamed:
        by_layer: Dict[int, int] = {}
        for t in streamed:
            by_layer[t.layer] = by_layer.get(t.layer, 0) + t.expert_bytes
        c.slot_bytes_by_layer = dict(sorted(by_layer.items()))
        c.streamed_layers = sorted(by_layer)
        c.mode = spec.mode
    else:
        c.mode = "off"
        if spec.given:
            res.notes.append("no tensor is streamed: the expert_cache settings are not used")

    per_slot = c.bytes_per_slot_all_layers  # one slot in every streamed layer
    need_slots = max(c.experts_used, 1)
    cache_error = False
    if c.mode == "cache":
        if spec.size == "slots":
            c.sized_by, c.requested = "slots", f"{plural(spec.slots, 'slot')} per layer"
            slots = spec.slots
        elif spec.size == "bytes":
            c.sized_by, c.requested = "bytes", format_size(spec.size_bytes)
            slots = spec.size_bytes // per_slot if per_slot else 0
        else:
            c.sized_by = "auto"
            auto_budget = mem.budget
            auto_where = budget_where
            if auto_budget is None:
                if machine.ram_bytes is None:
                    raise PolicyError(
                        src,
                        spec.size_line or spec.line,
                        "cache_size auto needs a budget and this machine's RAM is unknown: set budget or cache_size",
                    )
                auto_budget = int(machine.ram_bytes * DEFAULT_BUDGET_PERCENT / 100)
                auto_where = _where(src, spec.size_line or spec.line) + "cache_size auto: "
                c.requested = f"auto: {DEFAULT_BUDGET_PERCENT:g}% of RAM ({format_size(auto_budget)}) minus the rest"
            else:
                c.requested = f"auto: budget {format_size(auto_budget)} minus the rest"
            avail = max(auto_budget - mem.weights - mem.runtime, 0)
            slots = avail // per_slot if per_slot else 0
            if slots < need_slots and not below_pinned:
                cache_error = True
                res.errors.append(
                    auto_where
                    + f"{format_size(auto_budget)} leaves {format_size(avail)} for the expert cache after the "
                    f"resident weights ({format_size(mem.weights)}) and runtime buffers ({format_size(mem.runtime)}): "
                    f"{plural(slots, 'slot')} per layer, but a token needs {need_slots} (experts per token; one "
                    f"slot in each of the {len(c.streamed_layers)} streamed layers takes {format_size(per_slot)}); "
                    "raise the budget, pin fewer "
                    "tensors (mmap them), lower n_ctx, or use cache mode pagecache"
                )
        if c.n_expert and slots > c.n_expert:
            if spec.size != "auto":
                res.notes.append(
                    f"the expert cache ({c.requested}) can hold every expert: {c.n_expert} slots per layer are enough"
                )
            slots = c.n_expert
        if spec.size != "auto" and slots < need_slots:
            cache_error = True
            got = f"{plural(slots, 'slot')} per layer" if spec.size == "slots" else f"{c.requested} ({plural(slots, 'slot')} per layer)"
            res.errors.append(
                _where(src, spec.size_line or spec.line)
                + f"an expert cache of {got} is too small: a token needs {need_slots} slots (experts per token) "
                f"in every streamed layer, at least {format_size(need_slots * per_slot)}"
            )
        c.slots = slots
        c.bytes = slots * per_slot
        mem.cache = c.bytes
    elif c.mode == "pagecache":
        c.requested = "OS page cache"

    # -- checks against the budget and the machine
    if mem.budget is not None and not below_pinned and not cache_error and mem.total > mem.budget:
        res.errors.append(
            budget_where
            + f"{format_size(mem.budget)} is below what the policy needs ({format_size(mem.total)}: "
            f"weights {format_size(mem.weights)}, expert cache {format_size(mem.cache)}, "
            f"runtime {format_size(mem.runtime)})"
        )
    if mem.budget is not None and machine.ram_bytes and mem.budget > machine.ram_bytes:
        res.warnings.append(
            budget_where + f"{format_size(mem.budget)} is more than this machine's RAM ({machine.describe_ram()})"
        )
    if machine.ram_bytes and mem.total > machine.ram_bytes:
        res.warnings.append(
            f"the policy needs {format_size(mem.total)}, more than this machine's RAM ({machine.describe_ram()})"
        )
    if mem.pinned and not machine.can_lock_unlimited and machine.memlock_limit is not None:
        if mem.pinned > machine.memlock_limit:
            res.warnings.append(
                f"RLIMIT_MEMLOCK is {format_size(machine.memlock_limit)} but the policy pins "
                f"{format_size(mem.pinned)}: locking will fail; raise it ({memlock_hint()}) or use place: ram"
            )
    if mem.gpu_device:
        res.notes.append(f"{format_size(mem.gpu_device)} of weights in device memory (not counted in RAM)")
    if c.mode == "cache" and not spec.direct_io:
        res.notes.append(
            "direct_io is off: expert reads also fill the OS page cache, which competes with the cache for memory"
        )
    if c.mode == "pagecache":
        left = (mem.budget or machine.ram_bytes or 0) - mem.total
        if left > 0:
            res.notes.append(f"about {format_size(left)} is left for the OS page cache to hold experts")
