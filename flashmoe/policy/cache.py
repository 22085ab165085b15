"""The expert cache of a resolved policy: which layers stream, how many slots each holds.

With ``mode: cache`` a streamed layer has ``slots`` slots, each holding one expert of the layer
(its gate, up and down slices). The number comes from ``cache_slots``, from ``cache_size`` divided
by one slot in every streamed layer, or (``auto``) from what the budget leaves after the resident
weights and runtime buffers; it is capped at the model's experts and must be at least the experts
per token. ``mode: pagecache`` leaves experts to the OS page cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Tuple

from flashmoe.policy.model import unloaded_layers
from flashmoe.policy.schema import (DEFAULT_BUDGET_PERCENT, DEFAULT_GPU_BUDGET_TEXT, DEFAULT_READERS, PolicyError,
                                    plural, where)
from flashmoe.sizes import MiB, format_size

if TYPE_CHECKING:  # annotations only: resolve.py imports this module
    from flashmoe.policy.resolve import Resolution


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
    prefetch: str = "off"
    source: str = "disk"  # "ram": the streamed experts are held in host RAM too (read once at load)
    layer_slots: Dict[int, int] = field(default_factory=dict)  # streamed layers whose slots differ from `slots`

    def slots_of(self, layer: int) -> int:
        return self.layer_slots.get(layer, self.slots)

    @property
    def bytes_per_slot_all_layers(self) -> int:
        return sum(self.slot_bytes_by_layer.values())


def layer_runs(layer_slots: Dict[int, int]) -> List[Tuple[int, int, int]]:
    """Per-layer slot counts as runs of consecutive layers with one count: [(first, last, slots)]."""
    runs: List[Tuple[int, int, int]] = []
    for il in sorted(layer_slots):
        n = layer_slots[il]
        if runs and runs[-1][1] + 1 == il and runs[-1][2] == n:
            runs[-1] = (runs[-1][0], il, n)
        else:
            runs.append((il, il, n))
    return runs


def page_cache_reserve(budget: int) -> int:
    """What `cache_size: auto` leaves free of a budget: 8%, at least 128 MiB and at most 2 GiB (the page
    cache and file-backed pages that a cgroup counts with the process; docs/BENCHMARKS.md has the B1 runs
    that set it)."""
    return int(min(2048 * MiB, max(128 * MiB, 0.08 * budget)))


def _reserve(res: "Resolution", budget: int) -> int:
    """The page-cache reserve that the memory holding the process leaves beyond the budget does not
    already give: all of it when a cgroup limit is the budget, none when 90% of a machine's RAM is."""
    m = res.machine
    holder = m.cgroup_limit if m.cgroup_limit is not None else (m.physical_ram or m.ram_bytes)
    beyond = max(0, holder - budget) if holder else 0
    return max(0, page_cache_reserve(budget) - beyond)


def plan_cache(res: "Resolution", budget_where: str, below_pinned: bool) -> bool:
    """Fill ``res.cache`` (and ``res.memory.cache``) from the policy's expert_cache section, the
    streamed tensors and the memory left. ``res.memory`` must hold the weights, runtime buffers and
    budget already. Returns whether a too-small cache was reported in ``res.errors``."""
    spec, c = res.policy.expert_cache, res.cache
    c.eviction, c.readers, c.direct_io, c.prefetch = spec.eviction, spec.readers, spec.direct_io, spec.prefetch
    c.source = spec.source
    c.experts_used = res.experts_used
    c.n_expert = res.model.n_expert
    by_layer: Dict[int, int] = {}
    unloaded = set(unloaded_layers(res.model))  # next-token-prediction layers: llama.cpp skips them, no cache
    for t in res.model.tensors:
        if res.placements.get(t.name) == "stream" and t.layer is not None and t.layer not in unloaded:
            by_layer[t.layer] = by_layer.get(t.layer, 0) + t.expert_stride
    if by_layer:
        c.slot_bytes_by_layer = dict(sorted(by_layer.items()))
        c.streamed_layers = sorted(by_layer)
        c.mode = spec.mode
    else:
        c.mode = "off"
        if spec.given:
            res.notes.append("no tensor is streamed: the expert_cache settings are not used")
    if c.mode == "pagecache":
        c.requested = "OS page cache"
    if c.mode != "cache":
        return False
    if c.source == "ram":  # every streamed expert in host RAM: counted with the resident weights
        res.memory.tier = sum(t.nbytes for t in res.model.tensors
                              if res.placements.get(t.name) == "stream" and t.layer in by_layer)
    return _size_cache(res, budget_where, below_pinned)


def _size_cache(res: "Resolution", budget_where: str, below_pinned: bool) -> bool:
    spec, c = res.policy.expert_cache, res.cache
    per_slot = c.bytes_per_slot_all_layers  # one slot in every streamed layer
    need_slots = max(c.experts_used, 1)
    cache_error = False
    if spec.size == "slots":
        c.sized_by, c.requested = "slots", spec.describe_size()
        slots = spec.slots
        cache_error = _layer_slots(res, need_slots)
    elif spec.size == "bytes":
        c.sized_by, c.requested = "bytes", format_size(spec.size_bytes)
        slots = spec.size_bytes // per_slot if per_slot else 0
    else:
        c.sized_by = "auto"
        slots, cache_error = _auto_slots(res, budget_where, below_pinned, need_slots)
    if c.n_expert and slots > c.n_expert:
        if spec.size != "auto":
            res.notes.append(
                f"the expert cache ({c.requested}) can hold every expert: {c.n_expert} slots per layer are enough"
            )
        slots = c.n_expert
    if spec.size != "auto" and slots < need_slots:
        cache_error = True
        got = f"{plural(slots, 'slot')} per layer"
        if spec.size != "slots":
            got = f"{c.requested} ({got})"
        res.errors.append(
            where(res.policy.source, spec.size_line or spec.line)
            + f"an expert cache of {got} is too small: a token needs {need_slots} slots (experts per token) "
            f"in every streamed layer, at least {format_size(need_slots * per_slot)}"
        )
    c.slots = slots
    c.bytes = sum(c.slots_of(l) * b for l, b in c.slot_bytes_by_layer.items())
    if res.memory.on_device:  # the hook allocates the slots in the layer's device memory
        res.memory.device_cache = c.bytes
    else:
        res.memory.cache = c.bytes
    return cache_error


def _layer_slots(res: "Resolution", need_slots: int) -> bool:
    """The per-layer entries of ``cache_slots: {default: N, "a-b": M}`` for the streamed layers (capped
    at the layer's experts); an error for fewer than the experts per token."""
    spec, c = res.policy.expert_cache, res.cache
    error = False
    for layers, n, line in spec.layer_slots:
        streamed = [l for l in layers if l in c.slot_bytes_by_layer]
        what = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
        if not streamed:
            res.warnings.append(where(res.policy.source, line) + f"cache_slots: {what} streams no experts: "
                                "the entry is not used")
            continue
        if n < need_slots:
            error = True
            res.errors.append(where(res.policy.source, line) + f"cache_slots: {plural(n, 'slot')} for {what} "
                              f"is too few: a token needs {need_slots} (experts per token)")
        for l in streamed:
            c.layer_slots[l] = min(n, c.n_expert) if c.n_expert else n
    return error


def _auto_device_slots(res: "Resolution", need_slots: int) -> Tuple[int, bool]:
    """``cache_size: auto`` with the slots in device memory: what the GPU budget leaves after the gpu weights,
    the KV cache, the compute buffer and the backend's own share."""
    pol, mem, c = res.policy, res.memory, res.cache
    line = pol.expert_cache.size_line or pol.expert_cache.line
    if mem.gpu_budget is None:
        res.errors.append(where(pol.source, line) + "cache_size auto: the expert cache is in device memory and the "
                          "GPU's memory is unknown: set gpu_budget (e.g. 20GiB) or cache_slots")
        return 0, True
    what = "gpu_budget" if mem.gpu_budget_source == "policy" else DEFAULT_GPU_BUDGET_TEXT
    c.requested = f"auto: {what} {format_size(mem.gpu_budget)} minus the rest"
    per_slot = c.bytes_per_slot_all_layers
    avail = max(mem.gpu_budget - mem.gpu_device - mem.device_runtime - mem.device_overhead, 0)
    slots = avail // per_slot if per_slot else 0
    if slots >= need_slots or mem.gpu_budget < mem.gpu_device:  # the latter is reported as such
        return slots, False
    res.errors.append(
        where(pol.source, line) + f"cache_size auto: {what} {format_size(mem.gpu_budget)} leaves "
        f"{format_size(avail)} of device memory for the expert cache after the gpu weights "
        f"({format_size(mem.gpu_device)}), KV cache and compute ({format_size(mem.device_runtime)}) and the backend "
        f"({format_size(mem.device_overhead)}): {plural(slots, 'slot')} per layer, but a token needs {need_slots}; "
        "raise gpu_budget, place fewer tensors on gpu, or lower n_ctx")
    return slots, True


def _auto_slots(res: "Resolution", budget_where: str, below_pinned: bool, need_slots: int) -> Tuple[int, bool]:
    """``cache_size: auto``: the slots per layer that the budget (or 90% of RAM) leaves room for
    after the resident weights and runtime buffers; and whether that was too few (an error)."""
    pol, mem, c = res.policy, res.memory, res.cache
    spec = pol.expert_cache
    if mem.on_device:
        return _auto_device_slots(res, need_slots)
    auto_budget, auto_where = mem.budget, budget_where
    if auto_budget is None:
        if res.machine.ram_bytes is None:
            raise PolicyError(
                pol.source,
                spec.size_line or spec.line,
                "cache_size auto needs a budget and this machine's RAM is unknown: set budget or cache_size",
            )
        auto_budget = int(res.machine.ram_bytes * DEFAULT_BUDGET_PERCENT / 100)
        auto_where = where(pol.source, spec.size_line or spec.line) + "cache_size auto: "
        c.requested = f"auto: {DEFAULT_BUDGET_PERCENT:g}% of RAM ({format_size(auto_budget)}) minus the rest"
    else:
        c.requested = f"auto: budget {format_size(auto_budget)} minus the rest"
    per_slot = c.bytes_per_slot_all_layers
    mem.reserve = _reserve(res, auto_budget)
    avail = max(auto_budget - mem.weights - mem.runtime - mem.reserve, 0)
    slots = avail // per_slot if per_slot else 0
    if slots >= need_slots or below_pinned:
        return slots, False
    res.errors.append(
        auto_where
        + f"{format_size(auto_budget)} leaves {format_size(avail)} for the expert cache after the "
        + (f"resident weights ({format_size(mem.weights)}), runtime buffers ({format_size(mem.runtime)}) and the "
           f"page-cache reserve ({format_size(mem.reserve)}): " if mem.reserve else
           f"resident weights ({format_size(mem.weights)}) and runtime buffers ({format_size(mem.runtime)}): ")
        + f"{plural(slots, 'slot')} per layer, but a token needs {need_slots} (experts per token; one "
        f"slot in each of the {len(c.streamed_layers)} streamed layers takes {format_size(per_slot)}); "
        "raise the budget, pin fewer tensors (mmap them), lower n_ctx, or use cache mode pagecache"
    )
    return slots, True
