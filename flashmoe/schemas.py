"""JSON schemas from requests (tool parameters, response_format): checked, then turned into a grammar.

Every schema a client sends is hostile until checked. ``check_schema`` refuses, with one line
(``SchemaProblem``, a ValueError):

* anything too big or too deep for the work it causes (``MAX_SCHEMA_BYTES``, ``MAX_SCHEMA_DEPTH``,
  ``MAX_SCHEMA_NODES``, lengths, counts and pattern repetitions above ``MAX_REPEAT``);
* a schema that is not a valid JSON schema (the ``jsonschema`` package's metaschema check);
* a schema no value can satisfy (an empty ``enum``, ``minLength`` > ``maxLength``, ``minimum`` >
  ``maximum``, ``minItems`` > ``maxItems``, an ``enum``/``const`` of the wrong type, ...);
* with ``grammar=True`` (the answer will be generated under a grammar): what the grammar conversion
  would not honour. The converter (llama-cpp-python's ``json_schema_to_gbnf``) picks one rule per
  schema node (``$ref``, ``anyOf``, ``const``, ``enum``, object, array, pattern, format, string
  length, primitive) and silently ignores the other constraints of that node: a grammar made that
  way can produce answers the schema rejects. So a constraint the chosen rule ignores is refused,
  naming it, as are ``not``, ``if``/``then``/``else``, ``patternProperties``, remote or unresolvable
  ``$ref``, ``oneOf`` whose alternatives may overlap, and patterns without ``^...$``.

Before conversion the schema is normalized into an equivalent one the converter handles exactly:
a list of types becomes an ``anyOf`` of one type each (with the keywords that apply to that type),
and ``enum`` values that fail the node's other constraints are dropped.

``schema_to_grammar(schema)`` converts (with the converter's string-literal escaping fixed: a quote
or backslash in a property name or constant made an unparsable grammar; and JSON strings limited to
escapes of whole characters, so lengths count as JSON Schema counts them) and checks the result with
``flashmoe.gbnf.check_grammar``, the pure-Python mirror of llama.cpp's grammar parser: a grammar
llama.cpp would refuse (which crashes the process) never reaches it.

Keywords that constrain values but that the grammar does not enforce (``minimum``, ``maximum``,
``exclusiveMinimum``, ``exclusiveMaximum``, ``multipleOf``, ``uniqueItems``, ``format`` other than
date, time, date-time and uuid) are accepted; they are checked for consistency only
(``UNENFORCED``).
"""
from __future__ import annotations

import copy
import json
import math
import re
from typing import Any, Dict, List, Optional

from flashmoe.schema_patterns import MAX_PATTERN, MAX_REPEAT, _check_pattern  # noqa: F401 (MAX_PATTERN: API)

MAX_SCHEMA_BYTES = 256 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 5000

# keywords the grammar conversion cannot express (refused when a grammar is built)
UNSUPPORTED = (
    "not", "if", "then", "else", "dependentSchemas", "dependentRequired", "dependencies", "patternProperties",
    "propertyNames", "unevaluatedProperties", "unevaluatedItems", "contains", "minContains", "maxContains",
    "minProperties", "maxProperties", "$dynamicRef", "$recursiveRef", "additionalItems",
)
# constraints the grammar does not enforce (accepted, checked for consistency)
UNENFORCED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "format")
# constraints the converter honours, each in some of its rules
_CONSTRAINTS = ("$ref", "anyOf", "oneOf", "allOf", "type", "const", "enum", "properties", "required",
                "additionalProperties", "items", "prefixItems", "minItems", "maxItems", "pattern", "minLength",
                "maxLength")
_GRAMMAR_FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")
# keywords whose value is a schema, a list of schemas, or a map of schemas
_SUB_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
            "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SUB_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUB_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")
# the keywords that apply to each instance type (for splitting a list of types)
_FOR_TYPE = {
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "integer": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "array": ("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains", "minContains",
              "maxContains", "unevaluatedItems", "additionalItems"),
    "object": ("properties", "required", "additionalProperties", "patternProperties", "propertyNames",
               "minProperties", "maxProperties", "dependentRequired", "dependentSchemas",
               "unevaluatedProperties", "dependencies"),
    "boolean": (),
    "null": (),
}
_ALL_TYPED = {k for ks in _FOR_TYPE.values() for k in ks}


class SchemaProblem(ValueError):
    """A schema that is refused (one line)."""


def _short(v: Any, n: int = 60) -> str:
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def _matches_type(v: Any, t: str) -> bool:
    if t == "string":
        return isinstance(v, str)
    if t == "integer":
        return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t == "boolean":
        return isinstance(v, bool)
    if t == "null":
        return v is None
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    return True


def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _walk(schema: Any, path: str = "#", depth: int = 0):
    """Yield (path, subschema, depth) for every schema in ``schema`` (no recursion)."""
    stack = [(path, schema, depth)]
    while stack:
        p, s, d = stack.pop()
        yield p, s, d
        if not isinstance(s, dict):
            continue
        for k in _SUB_ONE:
            if k in s and isinstance(s[k], (dict, bool)):
                stack.append((f"{p}/{k}", s[k], d + 1))
        for k in _SUB_LIST:
            if k in s and isinstance(s[k], list):
                for i, x in enumerate(s[k]):
                    stack.append((f"{p}/{k}/{i}", x, d + 1))
        if "items" in s and isinstance(s["items"], list):  # draft-7 tuples
            for i, x in enumerate(s["items"]):
                stack.append((f"{p}/items/{i}", x, d + 1))
        for k in _SUB_MAP:
            if k in s and isinstance(s[k], dict):
                for name, x in s[k].items():
                    stack.append((f"{p}/{k}/{name}", x, d + 1))


def json_depth(v: Any, limit: int) -> int:
    """The nesting depth of a JSON value, counted without recursion (stops counting past ``limit``)."""
    best = 0
    stack = [(v, 1)]
    while stack:
        x, d = stack.pop()
        if d > best:
            best = d
            if best > limit:
                return best
        if isinstance(x, dict):
            stack.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            stack.extend((y, d + 1) for y in x)
    return best


def _resolve_local(root: dict, ref: str) -> Any:
    """What the grammar converter resolves ``ref`` to (it splits on '/', without JSON-pointer unescaping)."""
    target: Any = root
    for sel in ref.split("#", 1)[1].split("/")[1:]:
        if not isinstance(target, dict) or sel not in target:
            raise KeyError(sel)
        target = target[sel]
    return target


def _problem(what: str, msg: str, where: str = "#") -> SchemaProblem:
    loc = "" if where == "#" else f" at {where}"
    return SchemaProblem(f"{what}{loc}: {msg}")


def check_schema(schema: Any, what: str = "the schema", grammar: bool = False) -> None:
    """SchemaProblem (one line, starting with ``what``) unless ``schema`` is a sound JSON schema
    that can be used here; with ``grammar=True`` also unless the grammar conversion honours it."""
    _check_basic(schema, what)
    if grammar:
        _grammar_ready(schema, what)


def _check_basic(schema: Any, what: str) -> None:
    def bad(msg: str, where: str = "#") -> SchemaProblem:
        return _problem(what, msg, where)

    if not isinstance(schema, dict):
        raise bad(f"a JSON schema must be an object, got {_short(schema)}")
    if json_depth(schema, MAX_SCHEMA_DEPTH * 3) > MAX_SCHEMA_DEPTH * 3:
        raise bad("the schema is nested too deeply")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError) as e:
        raise bad(f"not a JSON value ({e})") from None
    if size > MAX_SCHEMA_BYTES:
        raise bad(f"the schema is too large ({size} bytes, at most {MAX_SCHEMA_BYTES})")

    nodes = 0
    for where, s, depth in _walk(schema):
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise bad(f"the schema has too many parts (more than {MAX_SCHEMA_NODES})")
        if depth > MAX_SCHEMA_DEPTH:
            raise bad(f"the schema is nested too deeply (more than {MAX_SCHEMA_DEPTH} levels)", where)
        if isinstance(s, dict):
            for k in ("minLength", "maxLength", "minItems", "maxItems"):
                v = s.get(k)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_REPEAT:
                    raise bad(f"{k} {_short(v)} is too large (at most {MAX_REPEAT})", where)
            if "enum" in s and isinstance(s["enum"], list):
                nodes += len(s["enum"])

    # the metaschema (draft 2020-12 unless $schema names another draft)
    try:
        import jsonschema
        from jsonschema.validators import validator_for
    except ImportError:  # pragma: no cover - a server dependency; `flashmoe chat` may run without it
        jsonschema = None
    if jsonschema is None:
        pass  # the checks below still run; the server always has jsonschema (the `server` extra)
    else:
        _metaschema_check(schema, bad, jsonschema, validator_for)

    for where, s, _d in _walk(schema):
        if isinstance(s, dict):
            _check_satisfiable(s, where, bad)


def _metaschema_check(schema, bad, jsonschema, validator_for) -> None:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = validator_for(schema, default=jsonschema.Draft202012Validator)
            err = jsonschema.exceptions.best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    except RecursionError:
        raise bad("the schema is nested too deeply") from None
    except Exception as e:  # a broken $schema, or anything else the metaschema check trips on
        raise bad(f"not a valid JSON schema ({type(e).__name__})") from None
    if err is not None:
        loc = "#" + "".join(f"/{p}" for p in err.absolute_path)
        raise bad(f"not a valid JSON schema: {_short(err.message, 160)}", loc)


def _check_satisfiable(s: Dict[str, Any], where: str, bad) -> None:
    types = s.get("type")
    tlist = [types] if isinstance(types, str) else list(types) if isinstance(types, list) else None
    if "enum" in s:
        if not s["enum"]:
            raise bad("enum is empty: no value can match", where)
        if tlist and not any(_matches_type(v, t) for v in s["enum"] for t in tlist):
            raise bad(f"no enum value is of type {'/'.join(tlist)}", where)
    if "const" in s and isinstance(s.get("enum"), list):
        key = json.dumps(s["const"], sort_keys=True)
        if not any(json.dumps(v, sort_keys=True) == key for v in s["enum"]):
            raise bad(f"const {_short(s['const'])} is not one of the enum values: no value can match", where)
    if "const" in s and tlist and not any(_matches_type(s["const"], t) for t in tlist):
        raise bad(f"const {_short(s['const'])} is not of type {'/'.join(tlist)}", where)
    for lo_k, hi_k in (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"),
                       ("minContains", "maxContains")):
        lo, hi = _num(s.get(lo_k)), _num(s.get(hi_k))
        if lo is not None and hi is not None and lo > hi:
            raise bad(f"{lo_k} {s[lo_k]} is more than {hi_k} {s[hi_k]}: no value can match", where)
    lo, lo_x = _num(s.get("minimum")), _num(s.get("exclusiveMinimum"))
    hi, hi_x = _num(s.get("maximum")), _num(s.get("exclusiveMaximum"))
    lows = [(v, False) for v in (lo,) if v is not None] + [(v, True) for v in (lo_x,) if v is not None]
    highs = [(v, False) for v in (hi,) if v is not None] + [(v, True) for v in (hi_x,) if v is not None]
    for a, ax in lows:
        for b, bx in highs:
            if a > b or (a == b and (ax or bx)):
                raise bad("the minimum is above the maximum: no number can match", where)
    if tlist == ["integer"] and lows and highs:
        a = max(math.floor(v) + 1 if x else math.ceil(v) for v, x in lows)
        b = min(math.ceil(v) - 1 if x else math.floor(v) for v, x in highs)
        if a > b:
            raise bad("no integer lies between the minimum and the maximum", where)


# ------------------------------------------------------------------------------------------ grammar mode


def _normalize(schema: dict) -> dict:
    """An equivalent schema that the converter handles exactly (a private copy): lists of types
    become anyOf alternatives, enum values that fail their node's other constraints are dropped."""
    root = copy.deepcopy(schema)
    if "$ref" in root:
        # the converter never resolves the references below a node that has a $ref itself: at the
        # root, move the reference into an anyOf of one, so that its $defs are visited
        keep = {k: v for k, v in root.items() if k in ("$defs", "definitions")}
        rest = {k: v for k, v in root.items() if k not in ("$defs", "definitions")}
        root = {**keep, "anyOf": [rest]}
    for _where, s, _d in list(_walk(root)):
        if not isinstance(s, dict):
            continue
        t = s.get("type")
        if isinstance(t, list):
            types = list(dict.fromkeys(t))
            if len(types) == 1:
                s["type"] = types[0]
            else:
                common = {k: v for k, v in s.items() if k != "type" and k not in _ALL_TYPED}
                alts = []
                for ty in types:
                    alt = {"type": ty}
                    alt.update({k: copy.deepcopy(v) for k, v in common.items()
                                if k not in ("$defs", "definitions", "title", "description")})
                    alt.update({k: copy.deepcopy(s[k]) for k in _FOR_TYPE.get(ty, ()) if k in s})
                    if "enum" in alt:
                        alt["enum"] = [v for v in alt["enum"] if _matches_type(v, ty)]
                    if "const" in alt and not _matches_type(alt["const"], ty):
                        alt["enum"] = []
                        del alt["const"]
                    _filter_enum(alt)
                    if "enum" in alt and not alt["enum"]:
                        continue  # no value of this type is allowed
                    alts.append(alt)
                keep = {k: v for k, v in s.items() if k in ("$defs", "definitions", "title", "description")}
                s.clear()
                s.update(keep)
                if alts:
                    s["anyOf"] = alts
                else:
                    s["enum"] = []  # refused: no value of any of the types satisfies the rest
                continue
        _filter_enum(s)
    return root


def _filter_enum(s: Dict[str, Any]) -> None:
    """Keep only the enum values (and check the const) that the node's other constraints accept."""
    if "enum" not in s and "const" not in s:
        return
    if "enum" in s and "const" in s:  # the converter writes the const and ignores the enum
        same = [v for v in s["enum"] if json.dumps(v, sort_keys=True) == json.dumps(s["const"], sort_keys=True)]
        del s["const"]
        s["enum"] = same[:1]
    rest = {k: v for k, v in s.items() if k not in ("enum", "const", "$defs", "definitions")}
    if not rest or any(k in rest for k in ("$ref", "anyOf", "oneOf", "allOf")):
        return  # nothing to filter by (a reference or combination is refused alongside enum anyway)
    try:
        import jsonschema
    except ImportError:  # pragma: no cover
        return

    try:
        v = jsonschema.Draft202012Validator(rest)
        if "enum" in s:
            s["enum"] = [x for x in s["enum"] if v.is_valid(x)]
        if "const" in s and not v.is_valid(s["const"]):
            s["enum"] = []  # reported as "no value can match"
            del s["const"]
    except Exception:  # a value jsonschema cannot check: left as it is (refused later if it matters)
        pass


def _rule_of(s: Dict[str, Any]) -> tuple:
    """(the converter's rule for this node, the constraint keywords that rule honours)."""
    t = s.get("type")
    if "$ref" in s:
        return "$ref", {"$ref"}
    if "oneOf" in s or "anyOf" in s:
        return ("oneOf" if s.get("oneOf") else "anyOf"), {"oneOf" if s.get("oneOf") else "anyOf"}
    if isinstance(t, list):
        return "type list", {"type"}
    # enum values (and a const) that fail the node's other constraints were dropped (_filter_enum)
    if "const" in s:
        return "const", set(_CONSTRAINTS) - {"allOf"}
    if "enum" in s:
        return "enum", set(_CONSTRAINTS) - {"allOf"}
    if t in (None, "object") and ("properties" in s or ("additionalProperties" in s
                                                        and s["additionalProperties"] is not True)):
        return "object", {"type", "properties", "required", "additionalProperties"}
    if t in (None, "object") and "allOf" in s:
        return "allOf", {"type", "allOf"}
    if t in (None, "array") and ("items" in s or "prefixItems" in s):
        if isinstance(s.get("items"), dict) and s.get("items"):
            return "array", {"type", "items", "minItems", "maxItems"}
        return "tuple", {"type", "prefixItems", "items"}
    if t in (None, "string") and "pattern" in s:
        return "pattern", {"type", "pattern"}
    fmt = s.get("format") or ""
    if t in (None, "string") and isinstance(fmt, str) and (re.match(r"^uuid[1-5]?$", fmt) or fmt in _GRAMMAR_FORMATS):
        return "format", {"type", "format"}
    if t == "string" and ("minLength" in s or "maxLength" in s):
        return "string", {"type", "minLength", "maxLength"}
    return f"type {t or 'any'}", {"type"}


def _grammar_ready(schema: dict, what: str) -> dict:
    """The normalized schema; SchemaProblem for what the grammar conversion would not honour."""
    root = _normalize(schema)
    for where, s, _d in _walk(root):
        def bad(msg: str) -> SchemaProblem:
            return _problem(what, msg, where)

        if isinstance(s, bool):
            if not where.endswith("/additionalProperties"):
                raise bad(f"the boolean schema {str(s).lower()} is not supported here (use {{}} for any value)")
            continue
        if ("enum" in s or "const" in s) and not s.get("enum", [0]) and (schema_enum_nonempty(schema, where)):
            raise bad("no enum value (or const) satisfies the other constraints")
        _check_satisfiable(s, where, lambda m, w: _problem(what, m, w))
        for k in UNSUPPORTED:
            if k in s:
                raise bad(f"'{k}' is not supported when the answer is generated under a grammar")
        rule, honoured = _rule_of(s)
        if rule == "type any" and any(k in s for k in ("minLength", "maxLength", "minItems", "maxItems")) \
                or (rule.startswith("type ") and s.get("type") is None and "required" in s):
            raise bad("constraints without a 'type' are not supported here: add the type")
        ignored = [k for k in _CONSTRAINTS if k in s and k not in honoured]
        if rule == "object" and s.get("additionalProperties") not in (None, False) and s.get("properties"):
            raise bad("additionalProperties other than false alongside properties is not supported here "
                      "(extra keys could repeat declared ones): set it to false")
        if ignored:
            raise bad(f"'{ignored[0]}' cannot be combined with '{rule}' here (the grammar would ignore it)")
        if rule == "$ref":
            ref = s["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#/"):
                raise bad(f"$ref {_short(ref)}: only local references ('#/$defs/NAME') are supported")
            try:
                target = _resolve_local(root, ref)
            except KeyError:
                raise bad(f"$ref {_short(ref)} does not resolve") from None
            if not isinstance(target, dict):
                raise bad(f"$ref {_short(ref)} does not point to a schema object")
        elif rule == "oneOf":
            if "anyOf" in s:
                raise bad("oneOf and anyOf together are not supported here")
            if not _disjoint(s["oneOf"]):
                raise bad("oneOf alternatives that may overlap are not supported (a grammar can only "
                          "generate 'any of'): use anyOf, or alternatives of different types or constants")
        elif rule == "allOf":
            seen = set()
            for i, sub in enumerate(s["allOf"]):
                if not isinstance(sub, dict) or set(sub) - {"type", "properties", "required", "title",
                                                            "description"} or sub.get("type", "object") != "object":
                    raise _problem(what, "allOf is supported only as a list of object schemas with properties",
                                   f"{where}/allOf/{i}")
                for name in sub.get("properties", {}):
                    if name in seen:
                        raise _problem(what, f"property {_short(name)} is described twice in allOf",
                                       f"{where}/allOf/{i}")
                    seen.add(name)
        elif rule == "tuple":
            if isinstance(s.get("items"), list):
                raise bad("'items' as a list (draft-7 tuples) is not supported: use prefixItems")
            if "prefixItems" not in s:
                raise bad("'items' must be a non-empty schema here")
        elif rule == "object":
            props = s.get("properties") if isinstance(s.get("properties"), dict) else {}
            missing = [r for r in s.get("required", []) if r not in props]
            if missing:
                raise bad(f"required property {_short(missing[0])} is not described in properties "
                          f"(the grammar could never write it)")
        elif rule == "pattern":
            s["pattern"] = _check_pattern(s["pattern"], bad)  # the private copy: made JSON-safe
    return root


def schema_enum_nonempty(schema: dict, where: str) -> bool:
    """True unless the original schema's node at ``where`` has an empty enum of its own."""
    try:
        node = _resolve_local(schema, where) if where != "#" else schema
    except KeyError:
        return True
    return not (isinstance(node, dict) and node.get("enum") == [])


def _disjoint(alts: List[Any]) -> bool:
    """True when no JSON value can match two of the alternatives (single distinct types, or constants)."""
    types: set = set()
    consts: List[str] = []
    for a in alts:
        if not isinstance(a, dict):
            return False
        if "const" in a:
            consts.append(json.dumps(a["const"], sort_keys=True))
        elif "enum" in a:
            consts.extend(json.dumps(v, sort_keys=True) for v in a["enum"])
        elif isinstance(a.get("type"), str):
            t = a["type"]
            if t in types or (t in ("integer", "number") and types & {"integer", "number"}):
                return False
            types.add(t)
        else:
            return False
    if consts and types:
        return False
    return len(consts) == len(set(consts))


# ------------------------------------------------------------------------------------------ conversion


def _literal_escape(text: str) -> str:
    """A GBNF string literal for ``text`` (every backslash, quote and control character escaped)."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02X}")
        elif 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _converter():
    from llama_cpp.llama_grammar import SchemaConverter

    class _Converter(SchemaConverter):
        def _format_literal(self, literal):  # the upstream one leaves backslashes unescaped
            return _literal_escape(literal)

    return _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


# JSON string characters: no raw control characters (strict JSON), and \u escapes only of whole
# characters (no surrogate halves), so that a length counts characters as JSON Schema counts them
_CHAR_RULE = 'char ::= [^"\\\\] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
_STRICT_CHAR_RULE = ('char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" ([0-9a-cA-CefEF] [0-9a-fA-F] '
                     '| [dD] [0-7]) [0-9a-fA-F] [0-9a-fA-F])')


def schema_to_grammar(schema: Optional[dict], what: str = "the schema") -> str:
    """GBNF for JSON matching ``schema`` (None: any JSON object), checked like llama.cpp would parse it.
    SchemaProblem (one line) when the schema is refused or the grammar would not parse."""
    from flashmoe.gbnf import GrammarError, check_grammar

    if schema is None:
        schema = {"type": "object"}
    _check_basic(schema, what)
    root = _grammar_ready(schema, what)
    try:
        conv = _converter()
        s = conv.resolve_refs(root, "stdin")
        conv.visit(s, "")
        gbnf = conv.format_grammar()
    except RecursionError:
        raise SchemaProblem(f"{what}: the schema is nested too deeply") from None
    except Exception as e:  # the converter asserts and raises on what it does not handle
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SchemaProblem(f"{what}: cannot build a grammar from it ({type(e).__name__}: {_short(msg, 120)})") from None
    if _CHAR_RULE in gbnf:
        gbnf = gbnf.replace(_CHAR_RULE, _STRICT_CHAR_RULE, 1)
    # a pattern's '.' never writes what a JSON string must escape either
    gbnf = gbnf.replace("dot ::= [^\\x0A\\x0D]", 'dot ::= [^"\\\\\\x7F\\x00-\\x1F]', 1)
    try:
        check_grammar(gbnf)
    except GrammarError as e:
        raise SchemaProblem(f"{what}: the grammar made from it would not parse in llama.cpp ({e})") from None
    return gbnf
