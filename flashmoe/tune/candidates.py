"""A configuration the tuner considers (``Candidate``) and the policy YAML that says it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from flashmoe.policy import DEFAULT_OVERHEAD, Policy, Resolution, parse_policy
from flashmoe.policy.cache import layer_runs
from flashmoe.sizes import GiB, KiB, MiB
from gguf_tools.reader import GGUFModel

if TYPE_CHECKING:  # a type only: validate imports this module
    from flashmoe.tune.validate import ValidationRun


@dataclass
class Candidate:
    """One configuration the tuner considers."""

    name: str
    mode: str  # "cache" | "pagecache"
    slots: int = 0  # per layer (cache mode, uniform)
    eviction: str = "lru"
    readers: int = 4
    direct_io: bool = True
    per_layer: Optional[Dict[int, int]] = None  # slots per layer (cache_slots: {default: N, "a-b": M})
    prefetch: bool = False  # reads ahead of the next layer's predicted experts (modelled when the trace has them)
    overhead: Optional[int] = None  # runtime.overhead written in the policy (None: the base policy's)
    n_ubatch: Optional[int] = None  # runtime.n_ubatch written in the policy (None: the base policy's)
    n_batch: Optional[int] = None  # runtime.n_batch (>= n_ubatch; None: the base policy's)
    ubatch_choices: List[Dict[str, Any]] = field(default_factory=list)  # the n_ubatch values weighed (search)
    supported: bool = True
    note: str = ""
    prediction: Dict[str, Any] = field(default_factory=dict)
    runs: List["ValidationRun"] = field(default_factory=list)
    measured: Optional[Dict[str, Any]] = None  # medians of the validation runs that completed

    @property
    def failed(self) -> bool:
        """Validated and never completed (OOM, crash, timeout)."""
        return bool(self.runs) and self.measured is None

    @property
    def family(self) -> str:
        if self.mode == "pagecache":
            return "pagecache"
        return f"cache-{self.eviction}" + ("-per-layer" if self.per_layer else "")

    def describe(self) -> str:
        if self.mode == "pagecache":
            return f"page cache, {self.readers} readers" + self._ubatch_text()
        sl = (f"per-layer slots {min(self.per_layer.values())}-{max(self.per_layer.values())}" if self.per_layer
              else f"{self.slots} slots/layer")
        return f"expert cache {sl}, {self.eviction.upper()}, {self.readers} readers, " \
               f"{'direct I/O' if self.direct_io else 'buffered I/O'}" + (", reads ahead" if self.prefetch else "") \
               + self._ubatch_text()

    def _ubatch_text(self) -> str:
        """The n_ubatch when the tuner weighed more than one (a long prompt)."""
        return f", n_ubatch {self.n_ubatch}" if self.n_ubatch is not None and len(self.ubatch_choices) > 1 else ""

    def to_dict(self) -> Dict[str, Any]:
        d = {"name": self.name, "family": self.family, "description": self.describe(), "mode": self.mode,
             "slots": self.slots, "eviction": self.eviction, "readers": self.readers, "direct_io": self.direct_io,
             "prefetch": self.prefetch, "n_ubatch": self.n_ubatch, "n_batch": self.n_batch,
             "supported": self.supported, "note": self.note, "prediction": self.prediction}
        if self.ubatch_choices:
            d["ubatch_choices"] = self.ubatch_choices
        if self.per_layer:
            d["per_layer"] = {str(k): v for k, v in self.per_layer.items()}
        if self.runs:
            d["runs"] = [r.to_dict() for r in self.runs]
        if self.measured is not None or self.runs:
            d["measured"] = self.measured
        return d


def size_text(n: int) -> str:
    """A size for the policy YAML, exact: the largest unit that divides it (``64MiB``), else bytes."""
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(int(n))


def slots_text(cand: Candidate) -> str:
    """``cache_slots`` for the policy: one count, or ``{default: N, "a-b": M, ...}`` for per-layer slots
    (the most common count is the default, consecutive layers with one count make a range)."""
    if not cand.per_layer:
        return str(cand.slots)
    counts: Dict[int, int] = {}
    for n in cand.per_layer.values():
        counts[n] = counts.get(n, 0) + 1
    default = max(counts, key=lambda n: (counts[n], n))
    runs = layer_runs({il: n for il, n in cand.per_layer.items() if n != default})
    parts = [f"default: {default}"] + [f'"{a}-{b}": {n}' if a != b else f'"{a}": {n}' for a, b, n in runs]
    return "{" + ", ".join(parts) + "}"


def _q(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def policy_text(base: Policy, cand: Candidate, *, budget: Optional[int], n_ctx: int, threads: Optional[int],
                header: Sequence[str] = (), name: str = "tuned", description: str = "") -> str:
    """A policy YAML: the base policy's rules and runtime, the candidate's expert cache."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines += ["version: 1", f"name: {_q(name)}"]
    if description:
        lines.append(f"description: {_q(description)}")
    if budget is not None:
        lines.append(f"budget: {size_text(budget)}")
    lines += ["", "rules:"]
    for r in base.rules:
        pats = [p.text for p in r.patterns]
        m = _q(pats[0]) if len(pats) == 1 else "[" + ", ".join(_q(p) for p in pats) + "]"
        lines += [f"  - match: {m}", f"    place: {r.place}"]
    lines += ["", "expert_cache:", f"  mode: {cand.mode}"]
    if cand.mode == "cache":
        lines += [f"  cache_slots: {slots_text(cand)}", f"  eviction: {cand.eviction}"]
    lines.append(f"  readers: {cand.readers}")
    if cand.mode == "cache":
        lines.append(f"  direct_io: {'true' if cand.direct_io else 'false'}")
        lines.append(f"  prefetch: {'next-layer' if cand.prefetch else 'off'}")
    rt = base.runtime
    lines += ["", "runtime:"]
    if threads:
        lines.append(f"  threads: {threads}")
    n_ubatch = cand.n_ubatch if cand.n_ubatch is not None else rt.n_ubatch
    n_batch = max(cand.n_batch if cand.n_batch is not None else rt.n_batch, n_ubatch)
    lines += [f"  n_ctx: {n_ctx}", f"  n_batch: {n_batch}", f"  n_ubatch: {n_ubatch}"]
    if rt.experts_per_token is not None:
        lines.append(f"  experts_per_token: {rt.experts_per_token}")
    if not rt.repack:
        lines.append("  repack: false")
    overhead = cand.overhead if cand.overhead is not None else rt.overhead
    if overhead != DEFAULT_OVERHEAD or cand.overhead is not None:
        lines.append(f"  overhead: {size_text(overhead)}")
    return "\n".join(lines) + "\n"


def resolve_text(text: str, model: GGUFModel, budget: Optional[int], source: str = "<tuned policy>") -> Resolution:
    return parse_policy(text, source=source).resolve(model, budget=budget)
