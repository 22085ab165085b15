"""Reading a policy file: YAML text -> a checked :class:`Policy`.

Everything that can be checked without a model is checked here, and every error names the key
and the line (``policy.yaml:9: unknown key 'cache_sise' in expert_cache (did you mean
'cache_size'?)``). Problems that only may matter (a glob that looks like a regex, a stream rule that
would catch a non-expert tensor of some architectures, a missing catch-all) become
``Policy.warnings``.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import gguf

from gguf_tools import archs as _archs

from flashmoe.policy.patterns import Pattern, looks_like_regex
from flashmoe.policy.schema import (
    CACHE_KEYS,
    CACHE_MODES,
    EVICTIONS,
    PREFETCH_MODES,
    SOURCES,
    RULE_KEYS,
    RUNTIME_KEYS,
    STREAMABLE_HELP,
    TOP_KEYS,
    Budget,
    CacheSpec,
    Device,
    Policy,
    PolicyError,
    Rule,
    RuntimeSpec,
    did_you_mean,
    where,
)
from flashmoe.policy.yaml_lines import LineMap, LineSeq, load_yaml
from flashmoe.settings import PLACEMENTS
from flashmoe.sizes import SizeError, parse_size
from gguf_tools.reader import EXPERT_NAME_RE

SUPPORTED_ARCHES = tuple(_archs.names())  # the families flashmoe synthesizes and tests (gguf_tools/archs)

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


def _typename(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
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


def _in(section: str) -> str:
    return f" in {section}" if section else ""


class _Checker:
    """Reads typed values out of a LineMap; raises PolicyError at the value's line."""

    def __init__(self, source: str):
        self.source = source

    def err(self, line: Optional[int], msg: str) -> PolicyError:
        return PolicyError(self.source, line, msg)

    def keys(self, m: LineMap, allowed: Sequence[str], section: str) -> None:
        for k in m:
            if k in allowed:
                continue
            ks = str(k)
            hint = did_you_mean(ks, allowed, 0.6) or f" (expected one of: {', '.join(allowed)})"
            raise self.err(m.key_lines[k], f"unknown key {ks!r}{_in(section)}{hint}")

    def mapping(self, value: Any, line: int, what: str) -> LineMap:
        if not isinstance(value, LineMap):
            raise self.err(line, f"{what} must be a mapping (key: value lines), got {_typename(value)}")
        return value

    def integer(self, m: LineMap, key: str, section: str, minimum: int = 0, or_null: bool = False) -> int:
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, int):
            extra = " or null" if or_null else ""
            raise self.err(m.value_lines[key], f"{key} in {section} must be an integer{extra}, got {_show(v)}")
        if v < minimum:
            raise self.err(m.value_lines[key], f"{key} in {section} must be at least {minimum}, got {v}")
        return v

    def integer_or_null(self, m: LineMap, key: str, section: str, minimum: int = 0) -> Optional[int]:
        return None if m[key] is None else self.integer(m, key, section, minimum, or_null=True)

    def boolean(self, m: LineMap, key: str, section: str) -> bool:
        v = m[key]
        if not isinstance(v, bool):
            raise self.err(m.value_lines[key], f"{key} in {section} must be true or false, got {_show(v)}")
        return v

    def string(self, m: LineMap, key: str, section: str) -> str:
        v = m[key]
        if not isinstance(v, str):
            raise self.err(m.value_lines[key], f"{key}{_in(section)} must be a string, got {_show(v)}")
        return v

    def choice(self, m: LineMap, key: str, section: str, choices: Sequence[str], what: str) -> str:
        v = m[key]
        expected = ", ".join(choices)
        if not isinstance(v, str):
            raise self.err(m.value_lines[key], f"{key} in {section} must be one of {expected}, got {_show(v)}")
        if v not in choices:
            hint = did_you_mean(v, choices, 0.5)
            raise self.err(m.value_lines[key], f"unknown {what} {v!r}{hint}; expected one of {expected}")
        return v

    def size(self, m: LineMap, key: str, section: str) -> int:
        v = m[key]
        if isinstance(v, (dict, list)):  # say "got dict {...}", not the name of the line-keeping subclass
            v = dict(v) if isinstance(v, dict) else list(v)
        try:
            return parse_size(v)
        except SizeError as e:
            raise self.err(m.value_lines[key], f"{key}{_in(section)}: {e}") from None


# --------------------------------------------------------------------------------------------
# The sections of a policy file


def parse_policy(text: str, source: str = "<string>", path: Optional[Path] = None) -> Policy:
    """Parse and check a policy from YAML text. ``source`` names it in error messages."""
    data = load_yaml(text, source)
    ck = _Checker(source)
    if data is None:
        raise ck.err(None, "the policy is empty")
    if not isinstance(data, LineMap):
        raise ck.err(
            getattr(data, "line", 1) or 1, f"a policy must be a mapping (key: value lines), got {_typename(data)}"
        )
    ck.keys(data, TOP_KEYS, "")

    pol = Policy(name=path.stem if path is not None else "policy", source=source, path=path)
    _parse_header(ck, data, pol)
    if "budget" in data and data["budget"] is not None:
        pol.budget = _parse_budget(ck, data)
    if "gpu_budget" in data and data["gpu_budget"] is not None:
        pol.gpu_budget = _parse_budget(ck, data, "gpu_budget", "the GPU's memory")
    if "devices" in data and data["devices"] is not None:
        pol.devices = _parse_devices(ck, data)
    pol.rules = _parse_rules(ck, data, pol.warnings, pol.devices)
    pol.rules_line = data.key_lines["rules"]
    if "expert_cache" in data and data["expert_cache"] is not None:
        pol.expert_cache = _parse_expert_cache(ck, data, pol.warnings)
    if "runtime" in data and data["runtime"] is not None:
        pol.runtime = _parse_runtime(ck, data, pol.warnings)

    _check_against_canonical_names(pol)
    rt, c = pol.runtime, pol.expert_cache
    if rt.experts_per_token is not None:
        pol.warnings.append(
            where(source, rt.experts_per_token_line)
            + f"experts_per_token overrides the model's experts per token with {rt.experts_per_token}: "
            "this changes the model's output"
        )
    if c.given and "stream" not in pol.places:
        pol.warnings.append(where(source, c.line) + "expert_cache is set but no rule places a tensor on stream")
    used = {r.device for r in pol.rules if r.device}
    for d in pol.devices.values():
        if d.name not in used:
            pol.warnings.append(where(source, d.line) + f"device {d.name} ({d.url}) is defined but no rule places "
                                "a tensor on it")
    return pol


def _parse_header(ck: _Checker, data: LineMap, pol: Policy) -> None:
    """version, name, description."""
    if "version" in data:
        v = data["version"]
        if v != 1 or isinstance(v, bool):
            raise ck.err(
                data.value_lines["version"], f"unsupported policy version {_show(v)} (this flashmoe reads version 1)"
            )
    if "name" in data:
        pol.name = ck.string(data, "name", "")
        if not pol.name.strip():
            raise ck.err(data.value_lines["name"], "name must not be empty")
    if "description" in data and data["description"] is not None:
        pol.description = " ".join(ck.string(data, "description", "").split())


def _parse_budget(ck: _Checker, data: LineMap, key: str = "budget", of: str = "this machine's RAM") -> Budget:
    """``budget`` (of RAM) or ``gpu_budget`` (of the GPU's memory): a size, or a percentage of ``of``."""
    line = data.value_lines[key]
    v = data[key]
    b = Budget(line=line, text=str(v))
    if isinstance(v, str) and v.strip().endswith("%"):
        try:
            pct = float(v.strip()[:-1])
        except ValueError:
            raise ck.err(line, f"{key}: cannot parse percentage {v!r}") from None
        if not 0 < pct <= 100:
            raise ck.err(line, f"{key}: a percentage of {of} must be in (0, 100], got {v!r}")
        b.percent = pct
    else:
        b.bytes = ck.size(data, key, "")
        if b.bytes == 0:
            raise ck.err(line, f"{key} must be more than 0 bytes (leave it out for no budget)")
    return b


def _parse_devices(ck: _Checker, data: LineMap) -> Dict[str, Device]:
    """``devices: {NAME: rpc://HOST:PORT}``: remote devices (RPC workers) that rules place tensors on."""
    from flashmoe.rpc import check_device_name, parse_url

    m = data["devices"]
    if not isinstance(m, LineMap):
        raise ck.err(data.value_lines["devices"],
                     f"devices must be a mapping of NAME: rpc://HOST:PORT lines, got {_typename(m)}")
    out: Dict[str, Device] = {}
    for k in m:
        try:
            name = check_device_name(k)
        except ValueError as e:
            raise ck.err(m.key_lines[k], f"devices: {e}") from None
        try:
            ep = parse_url(m[k])
        except ValueError as e:
            raise ck.err(m.value_lines[k], f"device {name}: {e}") from None
        out[name] = Device(name=name, url=ep.url, host=ep.host, port=ep.port, index=ep.device, line=m.key_lines[k])
    seen: Dict[str, str] = {}
    for d in out.values():
        key = f"{d.address}/{d.index}"
        if key in seen:
            raise ck.err(d.line, f"device {d.name} is the same worker device as {seen[key]} ({d.url})")
        seen[key] = d.name
    return out


def _parse_rules(ck: _Checker, data: LineMap, warnings: List[str],
                 devices: Optional[Dict[str, Device]] = None) -> List[Rule]:
    if "rules" not in data:
        raise ck.err(None, "the policy has no 'rules' (a list of {match: PATTERN, place: PLACEMENT})")
    rules = data["rules"]
    if not isinstance(rules, LineSeq):
        raise ck.err(
            data.value_lines["rules"],
            f"rules must be a list of {{match: PATTERN, place: PLACEMENT}}, got {_typename(rules)}",
        )
    if not rules:
        raise ck.err(data.value_lines["rules"], "rules is empty: every tensor must match a rule")
    items = zip(rules, rules.item_lines)
    return [_parse_rule(ck, item, line, i, warnings, devices or {}) for i, (item, line) in enumerate(items, start=1)]


def _parse_place(ck: _Checker, m: LineMap, section: str, devices: Dict[str, Device]) -> Tuple[str, Optional[str]]:
    """(placement, device): a placement name, or ("remote", NAME) for a device of ``devices``."""
    local = tuple(p for p in PLACEMENTS if p != "remote")
    v = m["place"]
    if isinstance(v, str) and v in devices:
        return "remote", v
    if not isinstance(v, str) or v in local:
        return ck.choice(m, "place", section, local, "placement"), None
    hint = did_you_mean(v, list(local) + list(devices), 0.5)
    named = f"a device of devices: {', '.join(devices)}" if devices else "the name of a device defined under devices:"
    raise ck.err(m.value_lines["place"], f"unknown placement {v!r}{hint}; expected one of {', '.join(local)}, "
                 f"or {named}")


def _parse_rule(ck: _Checker, item: Any, line: int, index: int, warnings: List[str],
                devices: Dict[str, Device]) -> Rule:
    section = f"rule {index}"
    m = ck.mapping(item, line, section)
    ck.keys(m, RULE_KEYS, section)
    for k in RULE_KEYS:
        if k not in m:
            raise ck.err(m.line, f"{section} has no '{k}'")
    place, device = _parse_place(ck, m, section, devices)
    pats = m["match"]
    pline = m.value_lines["match"]
    if isinstance(pats, str):
        texts = [(pats, pline)]
    elif isinstance(pats, LineSeq) and pats:
        texts = list(zip(pats, pats.item_lines))
    else:
        raise ck.err(pline, f"match in {section} must be a pattern or a list of patterns, got {_show(pats)}")
    patterns = []
    for t, tl in texts:
        if not isinstance(t, str):
            raise ck.err(tl, f"match in {section}: a pattern must be a string, got {_show(t)}")
        try:
            patterns.append(Pattern.compile(t))
        except ValueError as e:
            raise ck.err(tl, f"bad pattern in {section}: {e}") from None
        if patterns[-1].kind == "glob" and looks_like_regex(t):
            warnings.append(
                where(ck.source, tl) + f"pattern {t!r} in {section} looks like a regex but is read as a glob; "
                f"write 'regex:{t}' if a regex is meant"
            )
    return Rule(index=index, line=m.line, patterns=patterns, place=place, device=device)


def _parse_expert_cache(ck: _Checker, data: LineMap, warnings: List[str]) -> CacheSpec:
    section = "expert_cache"
    m = ck.mapping(data[section], data.value_lines[section], section)
    ck.keys(m, CACHE_KEYS, section)
    c = CacheSpec(given=True, line=data.key_lines[section])
    if "mode" in m:
        c.mode = ck.choice(m, "mode", section, CACHE_MODES, "expert cache mode")
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
            c.size_bytes = ck.size(m, "cache_size", section)
            if c.size_bytes == 0:
                raise ck.err(c.size_line, "cache_size must be more than 0 bytes (or auto)")
    if "cache_slots" in m:
        c.size_line = m.value_lines["cache_slots"]
        c.size = "slots"
        if isinstance(m["cache_slots"], LineMap):
            c.slots, c.layer_slots = _parse_layer_slots(ck, m["cache_slots"], c.size_line)
        else:
            c.slots = ck.integer(m, "cache_slots", section, minimum=1)
    if "eviction" in m:
        c.eviction = ck.choice(m, "eviction", section, EVICTIONS, "eviction")
    if "readers" in m:
        c.readers = ck.integer(m, "readers", section, minimum=1)
        if c.readers > 256:
            raise ck.err(m.value_lines["readers"], f"readers in expert_cache must be at most 256, got {c.readers}")
    if "direct_io" in m:
        c.direct_io = ck.boolean(m, "direct_io", section)
    if "prefetch" in m:
        if isinstance(m["prefetch"], bool):  # YAML reads a bare off/on as a boolean
            c.prefetch = "next-layer" if m["prefetch"] else "off"
        else:
            c.prefetch = ck.choice(m, "prefetch", section, PREFETCH_MODES, "prefetch")
    if "source" in m:
        c.source = ck.choice(m, "source", section, SOURCES, "source")
        c.source_line = m.value_lines["source"]
    if c.mode == "pagecache":
        ignored = [k for k in ("cache_size", "cache_slots", "eviction", "direct_io", "prefetch", "source") if k in m]
        if ignored:
            warnings.append(
                where(ck.source, m.key_lines[ignored[0]])
                + f"{', '.join(ignored)} ignored in pagecache mode (the OS page cache holds the experts)"
            )
    return c


def _parse_layer_slots(ck: _Checker, m: LineMap, line: int) -> Tuple[int, List[Tuple[List[int], int, int]]]:
    """``cache_slots: {default: 20, "0-3": 32, 40: 16}``: slots per layer, with ranges of model layers
    (``a-b`` inclusive, or one layer) that differ from ``default``."""
    section = "expert_cache.cache_slots"
    if "default" not in m:
        raise ck.err(line, 'cache_slots as a mapping needs a default: {default: 20, "0-3": 32}')
    default = ck.integer(m, "default", section, minimum=1)
    out: List[Tuple[List[int], int, int]] = []
    seen: Dict[int, int] = {}
    for key in m:
        if key == "default":
            continue
        kl = m.key_lines[key]
        text = str(key).strip()
        mt = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
        if not mt or isinstance(key, bool):
            raise ck.err(kl, f"bad layer range {text!r} in cache_slots: write a layer (12) or a range (\"0-3\")")
        a, b = int(mt.group(1)), int(mt.group(2) if mt.group(2) is not None else mt.group(1))
        if b < a:
            raise ck.err(kl, f"layer range {text!r} in cache_slots runs backwards")
        if b - a > 100_000:
            raise ck.err(kl, f"layer range {text!r} in cache_slots is too large")
        layers = list(range(a, b + 1))
        for il in layers:
            if il in seen:
                raise ck.err(kl, f"layer {il} is in two ranges of cache_slots (lines {seen[il]} and {kl})")
            seen[il] = kl
        out.append((layers, ck.integer(m, key, section, minimum=1), kl))
    return default, out


def _parse_runtime(ck: _Checker, data: LineMap, warnings: List[str]) -> RuntimeSpec:
    section = "runtime"
    m = ck.mapping(data[section], data.value_lines[section], section)
    ck.keys(m, RUNTIME_KEYS, section)
    rt = RuntimeSpec()
    if "threads" in m:
        if isinstance(m["threads"], str) and m["threads"].strip().lower() == "auto":
            rt.threads = None
        else:
            rt.threads = ck.integer_or_null(m, "threads", section, minimum=1)
    for key, minimum in (("n_ctx", 0), ("n_batch", 1), ("n_ubatch", 1)):
        if key in m:
            if key == "n_ubatch" and isinstance(m[key], str) and m[key].strip().lower() == "auto":
                rt.n_ubatch_auto = True
                continue
            setattr(rt, key, ck.integer(m, key, section, minimum=minimum))
    if "experts_per_token" in m:
        rt.experts_per_token = ck.integer_or_null(m, "experts_per_token", section, minimum=1)
        rt.experts_per_token_line = m.value_lines["experts_per_token"]
    if "repack" in m:
        rt.repack = ck.boolean(m, "repack", section)
    if "overhead" in m:
        rt.overhead = ck.size(m, "overhead", section)
    if rt.n_ubatch > rt.n_batch:
        warnings.append(
            where(ck.source, m.key_lines.get("n_ubatch"))
            + f"n_ubatch {rt.n_ubatch} is larger than n_batch {rt.n_batch}; llama.cpp caps it at n_batch"
        )
        rt.n_ubatch = rt.n_batch
    return rt


# --------------------------------------------------------------------------------------------
# Checking the rules against the tensor names of known architectures (no model needed)


@functools.lru_cache(maxsize=None)
def _canonical_names() -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """Non-expert tensor names (layer 0) of MoE architectures gguf-py knows:
    (names of the supported architectures, ".weight" only; names of the others and biases).

    Used to check a policy file without a model: a stream rule that catches a non-expert tensor
    of a supported architecture is an error for any such model; for other names, a warning.
    """
    core: Set[str] = set()
    other: Set[str] = set()
    try:
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
    return tuple(sorted(core)), tuple(sorted(other - core))


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
                where(pol.source, r.line)
                + f"rule {r.index} would also place {n!r} on stream: models that have such tensors will not "
                f"resolve (stream only applies to {STREAMABLE_HELP})"
            )
    unmatched = [n for n in _CORE_NAMES if pol.rule_for(n) is None]
    if unmatched:
        more = f" (and {len(unmatched) - 3} more)" if len(unmatched) > 3 else ""
        pol.warnings.append(
            where(pol.source, pol.rules_line)
            + f"no rule matches tensors such as {', '.join(repr(x) for x in unmatched[:3])}{more}: "
            "models that have them will not resolve; end the rules with a catch-all such as "
            "{match: '*', place: mmap}"
        )
