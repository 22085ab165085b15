"""What a policy is: the dataclasses a policy file parses into, the schema's constants, and
:class:`PolicyError` (``file:line: message``) with the helpers that word every policy message.

Parsing YAML into these is ``parse.py``; applying a :class:`Policy` to a model is ``resolve.py``.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from flashmoe.errors import FlashMoEError
from flashmoe.policy.machine_info import MachineInfo
from flashmoe.policy.patterns import Pattern
from flashmoe.settings import RuntimeSettings
from flashmoe.sizes import MiB, format_size
from gguf_tools.reader import GGUFModel

if TYPE_CHECKING:  # annotations only: resolve.py imports this module
    from flashmoe.policy.resolve import Resolution

PLACEMENT_HELP = {
    "pin": "RAM, locked (mlock)",
    "ram": "RAM, not locked",
    "stream": "disk -> expert cache",
    "mmap": "mmap (OS page cache)",
    "gpu": "device memory",
    "remote": "another host (RPC worker)",
}
CACHE_MODES = ("cache", "pagecache")
EVICTIONS = ("lru", "lfru")

TOP_KEYS = ("version", "name", "description", "budget", "gpu_budget", "devices", "rules", "expert_cache", "runtime")
RULE_KEYS = ("match", "place")
CACHE_KEYS = ("mode", "cache_size", "cache_slots", "eviction", "readers", "direct_io", "prefetch", "source")
PREFETCH_MODES = ("next-layer", "off")
SOURCES = ("disk", "ram")  # expert_cache.source: where cache misses come from
RUNTIME_KEYS = ("threads", "n_ctx", "n_batch", "n_ubatch", "experts_per_token", "repack", "overhead")

DEFAULT_READERS = 4
DEFAULT_OVERHEAD = 256 * MiB  # the process itself: interpreter, libraries, small llama.cpp buffers
DEFAULT_BUDGET_PERCENT = 90.0  # what `cache_size: auto` uses when the policy has no budget
DEFAULT_GPU_BUDGET_PERCENT = 90.0  # of a discrete GPU's memory, when the policy has no gpu_budget
DEFAULT_GPU_BUDGET_TEXT = f"{DEFAULT_GPU_BUDGET_PERCENT:g}% of the GPU's memory"

# Routed expert tensors (gguf_tools.reader's EXPERT_NAME_RE, TensorInfo.is_expert) are the only
# tensors that may be streamed.
STREAMABLE_HELP = "routed expert tensors blk.N.ffn_{gate,up,down,gate_up}_exps.weight"


class PolicyError(FlashMoEError):
    """An error in a policy file (or in applying it to a model), reported as ``file:line: msg``."""

    def __init__(self, source: Optional[str], line: Optional[int], message: str):
        self.source = source
        self.line = line
        self.detail = message
        super().__init__(where(source, line) + message)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def where(source: Optional[str], line: Optional[int]) -> str:
    """The ``file:line: `` prefix of a message (``file: `` without a line, nothing without a file)."""
    if source and line:
        return f"{source}:{line}: "
    if source:
        return f"{source}: "
    return ""


def did_you_mean(word: str, choices: Sequence[str], cutoff: float) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or "" when none is close."""
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {near[0]!r}?)" if near else ""


# --------------------------------------------------------------------------------------------
# The parts of a policy


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

    def to_value(self) -> Union[int, str, None]:
        """Bytes, "90%" or None (as in ``Policy.to_dict``)."""
        if self.bytes is not None:
            return self.bytes
        return f"{self.percent:g}%" if self.percent is not None else None


@dataclass
class CacheSpec:
    """The ``expert_cache`` section as written."""

    mode: str = "cache"
    size: str = "auto"  # "auto" | "bytes" | "slots"
    size_bytes: int = 0
    slots: int = 0
    eviction: str = "lru"
    readers: int = DEFAULT_READERS
    direct_io: bool = False
    prefetch: str = "off"  # "next-layer": read the next layer's predicted experts while a layer computes
    # "ram": every streamed expert is read into host RAM at load (page-locked with a GPU) and misses are copied
    # from there; "disk": read from the model's file
    source: str = "disk"
    source_line: Optional[int] = None
    # cache_slots given as a mapping: (layers, slots, line) per entry besides `default` (= slots)
    layer_slots: List[Tuple[List[int], int, int]] = field(default_factory=list)
    line: Optional[int] = None  # of the expert_cache section
    size_line: Optional[int] = None
    given: bool = False  # the section is present in the file

    def describe_size(self) -> str:
        if self.mode == "pagecache":
            return "OS page cache"
        if self.size == "slots":
            extra = f" ({len(self.layer_slots)} layer ranges differ)" if self.layer_slots else ""
            return f"{plural(self.slots, 'slot')} per layer{extra}"
        if self.size == "bytes":
            return format_size(self.size_bytes)
        return "auto"

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "cache_size": "auto" if self.size == "auto" else (self.size_bytes if self.size == "bytes" else None),
            "cache_slots": self.slots if self.size == "slots" else None,
            "layer_slots": {",".join(map(str, ls)): n for ls, n, _ in self.layer_slots} or None,
            "eviction": self.eviction,
            "readers": self.readers,
            "direct_io": self.direct_io,
            "source": self.source,
        }


@dataclass
class RuntimeSpec:
    """The ``runtime`` section as written."""

    threads: Optional[int] = None
    n_ctx: int = RuntimeSettings.n_ctx
    n_batch: int = RuntimeSettings.n_batch
    n_ubatch: int = RuntimeSettings.n_ubatch
    experts_per_token: Optional[int] = None
    experts_per_token_line: Optional[int] = None
    repack: bool = True
    overhead: int = DEFAULT_OVERHEAD
    # `n_ubatch: auto`: the resolution picks n_ubatch (and n_batch) for streamed prompts (policy/memory.py)
    n_ubatch_auto: bool = False
    n_ubatch_note: str = ""  # how auto chose

    def to_dict(self) -> dict:
        return {
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "n_batch": self.n_batch,
            "n_ubatch": "auto" if self.n_ubatch_auto else self.n_ubatch,
            "experts_per_token": self.experts_per_token,
            "repack": self.repack,
            "overhead": self.overhead,
        }


@dataclass
class Device:
    """One entry of ``devices``: a remote device (an RPC worker, ``rpc://HOST:PORT``) that rules may place
    tensors on by its name (flashmoe.rpc)."""

    name: str
    url: str  # normalized: rpc://HOST:PORT[/N]
    host: str
    port: int
    index: int = 0  # the device of the worker
    line: Optional[int] = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Rule:
    """One entry of ``rules``: tensors matching any of ``patterns`` go to ``place`` (``remote`` for a rule that
    names a device of ``devices``: ``device`` is its name)."""

    index: int  # 1-based position in `rules`
    line: int
    patterns: List[Pattern]
    place: str
    device: Optional[str] = None

    def matches(self, name: str) -> bool:
        return any(p.matches(name) for p in self.patterns)

    def describe(self) -> str:
        pats = ", ".join(p.text for p in self.patterns)
        return f"rule {self.index} (line {self.line}: {pats} -> {self.device or self.place})"

    def to_dict(self) -> dict:
        d = {
            "index": self.index,
            "line": self.line,
            "match": [p.text for p in self.patterns],
            "place": self.device or self.place,
        }
        if self.device:
            d["device"] = self.device
        return d


# --------------------------------------------------------------------------------------------
# The policy


@dataclass
class Policy:
    """A checked policy file (``parse_policy``/``load_policy``); :meth:`resolve` applies it to a model."""

    name: str
    description: str = ""
    source: str = "<string>"
    path: Optional[Path] = None
    budget: Budget = field(default_factory=Budget)
    gpu_budget: Budget = field(default_factory=Budget)  # device memory (discrete GPUs): a size or % of the GPU's
    rules: List[Rule] = field(default_factory=list)
    rules_line: Optional[int] = None
    expert_cache: CacheSpec = field(default_factory=CacheSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    warnings: List[str] = field(default_factory=list)  # found by checking the file alone
    devices: Dict[str, Device] = field(default_factory=dict)  # remote devices, by name

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

    def resolve(
        self,
        model: Union[str, os.PathLike, GGUFModel],
        *,
        budget: Union[None, int, str] = None,
        machine: Optional[MachineInfo] = None,
    ) -> "Resolution":
        """Apply the policy to ``model`` (a GGUF path or an opened gguf_tools GGUFModel).

        budget: overrides the policy's budget (bytes or a size string such as "32GiB").
        machine: the machine to check against (default: this one, MachineInfo.detect()).
        Raises PolicyError when a tensor matches no rule or a non-expert tensor would be streamed.
        Budget problems do not raise here: they are in Resolution.errors, and
        Resolution.engine_settings() raises them.
        """
        # resolve.py builds on this module (Policy, Rule, PolicyError): imported here to break the cycle
        from flashmoe.policy.resolve import resolve_policy

        return resolve_policy(self, model, budget=budget, machine=machine)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "budget": self.budget.to_value(),
            "gpu_budget": self.gpu_budget.to_value(),
            "rules": [x.to_dict() for x in self.rules],
            "expert_cache": self.expert_cache.to_dict(),
            "runtime": self.runtime.to_dict(),
            "devices": {n: d.url for n, d in self.devices.items()},
            "warnings": list(self.warnings),
        }
