"""The exact offline model of the expert cache (docs/patch.md, "Eviction, exactly").

Given a routing trace and the shape of a run (its ubatches), :func:`simulate` replays what the
hook does, layer by layer, and returns the same per-layer counters that ``Engine.stats()`` reports
(hits, misses, evictions, bytes read, tokens, waves). It is exact: the tests compare it with the
engine's own counters on real runs.

What it mirrors:

* **Routing rows.** Each MoE layer keeps a cursor in the trace; every ubatch of n tokens takes the
  next n rows (wrapping at the end of the trace). In most architectures (qwen3moe, qwen2moe) the
  model's last layer computes only the ubatch's output rows (llama.cpp drops the other tokens
  before it): those are the ubatch's last rows, the cursor still advances by the whole ubatch. A
  ubatch with no output row leaves that layer with an empty graph: ggml skips empty ops, so
  nothing is fetched and its cursor does not move. Some architectures (qwen35moe, qwen3next) drop
  the rows only after the last layer: every layer computes every row (``last_layer_of``).
* **Waves.** Per layer and ubatch: the distinct selected experts, resident ones first then the
  misses, each group by ascending id, cut into waves of ``n_slots``.
* **Eviction.** Within a wave, in that order: every access counts (``n_access``, the expert's
  count ``freq``; every ``16 * n_slots`` accesses all counts are halved), then a resident expert is
  a hit; a miss takes a free slot, else the victim among slots not used by this wave: LRU = least
  recent use; LFRU = lowest count, ties by least recent use. Each access stamps the slot.
* **Prefetch** (``prefetch=True``, a trace with predicted sets): before a layer's ubatch, while the
  layer before it computes, the distinct predicted experts of the ubatch's rows (in row order; none
  for the first layer, none when they are more than the layer's slots or the ubatch needs several
  waves) are made resident: the resident ones are protected, each other one takes a victim as a miss
  would (without counting an access) and is stamped; they are read ahead (``n_prefetched``, bytes
  read). The ubatch then finds them resident (hits); at its plan the layer books the prediction
  (``n_predicted``, ``n_predicted_right``) and the reads ahead it used or wasted, and demotes the
  wasted ones. Every read ahead completes here, as in the engine with ``FLASHMOE_PREFETCH_CANCEL=0``
  (by default the engine drops the wrong ones no reader has started, which depends on timing: the
  tuner's timing model estimates that from ``SimResult.ahead_used``, the issue order and whether each
  read ahead was used).

Page-cache mode is modelled, not exact: one LRU of expert slices shared by all layers (the OS
page cache), holding ``capacity_bytes``, accessed with the ubatch's distinct experts per layer in
ascending id (what the populate op touches).

Public API::

    Ubatch(n_tokens, n_outputs, phase)
    engine_ubatches(prompt_tokens, gen_tokens, n_batch=512, n_ubatch=512) -> [Ubatch]
    last_layer_of(arch, n_layer) -> int | None     # the layer that computes only output rows
    simulate(trace, ubatches, slots, eviction="lru", *, last_layer, expert_bytes=None) -> SimResult
    simulate_pagecache(trace, ubatches, capacity_bytes, expert_bytes, *, last_layer) -> SimResult
    layer_curves(trace, ubatches, sizes, eviction, *, last_layer) -> {slots: SimResult}
    rows_per_layer(trace, ubatches, last_layer) -> per layer, the rows each ubatch computes
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from flashmoe.errors import FlashMoEError
from flashmoe.trace import Trace

PHASES = ("prefill", "decode")
_AGE_FACTOR = 16  # counts are halved every 16 * n_slots accesses (the hook's ageing period)
_BIG = 1 << 40  # LFRU key: freq * _BIG + last_use (clock stays far below 2^40)
_CLOCK0 = 1 << 32  # the hook's use stamps start here; demoted reads ahead are stamped 1, 2, ... below them


# llama.cpp architectures whose last layer computes every row of the ubatch (the output rows are
# selected after it, `cparams.embeddings_nextn_masked` being off by default): read from the
# vendored llama.cpp's src/models/*.cpp (commit 0c1e570). Others drop the non-output rows before
# their last layer (`if (il == n_layer - 1 && inp_out_ids)`).
ALL_ROWS_ARCHES = frozenset({"qwen35moe", "qwen35", "qwen3next", "bailingmoe3", "cohere2moe", "gpt-oss", "step35",
                             "hy_v3"})


def last_layer_of(arch: str, n_layer: int) -> Optional[int]:
    """The model layer that computes only the output rows, or None when every layer computes every row."""
    return None if arch in ALL_ROWS_ARCHES else n_layer - 1


@dataclass
class Ubatch:
    """One llama.cpp ubatch: ``n_tokens`` evaluated tokens, of which the last ``n_outputs`` are output rows."""

    n_tokens: int
    n_outputs: int
    phase: str = "prefill"


def engine_ubatches(prompt_tokens: int, gen_tokens: int, n_batch: int = 512, n_ubatch: int = 512,
                    logits_all: bool = False) -> List[Ubatch]:
    """The ubatches of ``Engine.generate(prompt, gen_tokens)``: llama-cpp-python evaluates the
    prompt in chunks of ``n_batch`` tokens whose last token is an output (all of them with
    ``logits_all``); llama.cpp splits each chunk into ubatches of ``min(n_ubatch, n_batch)``
    tokens; then ``gen_tokens - 1`` decode steps of one token each (the last generated token is
    never evaluated)."""
    if prompt_tokens < 1 or gen_tokens < 1:
        raise FlashMoEError("a workload needs at least one prompt token and one generated token")
    ub = max(1, min(n_ubatch, n_batch))
    out: List[Ubatch] = []
    for c0 in range(0, prompt_tokens, n_batch):
        chunk = min(n_batch, prompt_tokens - c0)
        for u0 in range(0, chunk, ub):
            n = min(ub, chunk - u0)
            last = u0 + n == chunk
            out.append(Ubatch(n, n if logits_all else (1 if last else 0), "prefill"))
    out.extend(Ubatch(1, 1, "decode") for _ in range(gen_tokens - 1))
    return out


# the per-layer counters of Engine.stats()["layers"] that the simulation reproduces exactly
ENGINE_FIELDS = ("layer", "n_slots", "hits", "misses", "evictions", "bytes_read", "n_tokens", "n_waves", "n_predicted",
                 "n_predicted_right", "n_prefetched", "n_prefetch_used", "prefetch_wasted_bytes")


@dataclass
class LayerCounters:
    """The engine's per-layer counters (Engine.stats()["layers"][i]), plus a per-phase split."""

    layer: int
    n_slots: int
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    n_tokens: int = 0
    n_waves: int = 0
    n_predicted: int = 0
    n_predicted_right: int = 0
    n_prefetched: int = 0
    n_prefetch_used: int = 0
    prefetch_wasted_bytes: int = 0
    by_phase: Dict[str, Dict[str, int]] = field(default_factory=lambda: {p: {"hits": 0, "misses": 0} for p in PHASES})

    def engine_view(self) -> Dict[str, int]:
        """The fields Engine.stats() has, for comparison."""
        return {k: getattr(self, k) for k in ENGINE_FIELDS}

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def phase_hit_rate(self, phase: str) -> float:
        p = self.by_phase[phase]
        n = p["hits"] + p["misses"]
        return p["hits"] / n if n else 0.0


@dataclass
class SimResult:
    """Per-layer counters, and per ubatch x layer the misses and distinct experts (for timing)."""

    mode: str
    eviction: str
    slots: Dict[int, int]
    layers: List[LayerCounters]
    ubatches: List[Ubatch]
    misses: np.ndarray  # int32 [n_ubatches, n_layers]: experts read while the layer waits
    distinct: np.ndarray  # int32 [n_ubatches, n_layers]: distinct experts computed
    waves: np.ndarray  # int32 [n_ubatches, n_layers]: graph waves (for compute)
    rows: np.ndarray  # int32 [n_ubatches, n_layers]: rows computed
    ahead: Optional[np.ndarray] = None  # int32 [n_ubatches, n_layers]: experts read ahead (during the layer before)
    # per (ubatch, layer column) with reads ahead: in the order they were issued (the prediction's), whether the
    # layer then used each one (the timing model's dropped reads ahead: flashmoe.tune.search.charged_ahead)
    ahead_used: Optional[Dict[Tuple[int, int], np.ndarray]] = None

    def total(self, phase: Optional[str] = None) -> Dict[str, float]:
        if phase is None:
            h = sum(l.hits for l in self.layers)
            m = sum(l.misses for l in self.layers)
        else:
            h = sum(l.by_phase[phase]["hits"] for l in self.layers)
            m = sum(l.by_phase[phase]["misses"] for l in self.layers)
        return {"hits": h, "misses": m, "hit_rate": h / (h + m) if h + m else 0.0}

    def hit_rate(self, phase: Optional[str] = None) -> float:
        return self.total(phase)["hit_rate"]

    def engine_view(self) -> List[Dict[str, int]]:
        return [l.engine_view() for l in self.layers]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "eviction": self.eviction, "slots": dict(self.slots),
                "layers": [asdict(l) for l in self.layers], "total": self.total(),
                "decode": self.total("decode"), "prefill": self.total("prefill")}


def rows_per_layer(trace: Trace, ubatches: Sequence[Ubatch],
                   last_layer: Optional[int]) -> List[List[Optional[np.ndarray]]]:
    """For every layer column, the trace rows (as id arrays) each ubatch computes: a list per ubatch."""
    n_rows = trace.n_tokens
    cols = []
    for li, il in enumerate(trace.layers):
        cursor = 0
        per: List[Optional[np.ndarray]] = []
        for ub in ubatches:
            if last_layer is not None and il == last_layer:
                n_comp = min(ub.n_outputs, ub.n_tokens)
                if n_comp == 0:  # empty op: ggml skips it, the cursor stays
                    per.append(None)
                    continue
                skip = ub.n_tokens - n_comp
            else:
                n_comp, skip = ub.n_tokens, 0
            idx = (cursor + skip + np.arange(n_comp)) % n_rows
            per.append(trace.ids[idx, li])
            cursor += skip + n_comp
        cols.append(per)
    return cols


def predicted_rows_per_layer(trace: Trace, ubatches: Sequence[Ubatch],
                             last_layer: Optional[int]) -> List[List[Optional[np.ndarray]]]:
    """For every layer column, the predicted ids the layer before it reads ahead with at each ubatch
    (its rows of ``trace.pred`` from the layer's cursor, one per token of the ubatch), or None: no
    predicted sets, or the first layer (nothing runs before it to predict with)."""
    n_rows = trace.n_tokens
    first = min(trace.layers)
    cols: List[List[Optional[np.ndarray]]] = []
    for li, il in enumerate(trace.layers):
        per: List[Optional[np.ndarray]] = []
        cursor = 0
        for ub in ubatches:
            if trace.pred is None or il == first:
                per.append(None)
            else:
                per.append(trace.pred[(cursor + np.arange(ub.n_tokens)) % n_rows, li])
            if last_layer is not None and il == last_layer and min(ub.n_outputs, ub.n_tokens) == 0:
                continue  # the layer's empty op: its cursor stays
            cursor += ub.n_tokens
        cols.append(per)
    return cols


def _slots_map(trace, slots: Union[int, Mapping[int, int]]) -> Dict[int, int]:
    if isinstance(slots, Mapping):
        out = {il: int(slots[il]) for il in trace.layers}
    else:
        out = {il: int(slots) for il in trace.layers}
    for il, s in out.items():
        if s < trace.n_used:
            raise FlashMoEError(f"layer {il}: {s} cache slots, but a token needs {trace.n_used} (experts per token)")
        out[il] = min(s, trace.n_expert)
    return out


class _LayerCache:
    """One layer's cache, as the hook keeps it."""

    def __init__(self, n_expert: int, n_slots: int, eviction: str):
        if eviction not in ("lru", "lfru"):
            raise FlashMoEError(f"unknown eviction {eviction!r} (lru or lfru)")
        self.n_expert = n_expert
        self.n_slots = n_slots
        self.lfru = eviction == "lfru"
        self.resident: "OrderedDict[int, int]" = OrderedDict()  # expert -> slot, in order of last use
        self.n_access = 0
        self.clock = _CLOCK0
        self.demote_clock = 0
        self.demoted: "OrderedDict[int, None]" = OrderedDict()  # wrong reads ahead still resident, oldest first
        self.age_every = n_slots * _AGE_FACTOR
        self.in_wave = np.zeros(n_slots, dtype=bool)  # slot -> used by the current wave, or protected by a read ahead
        if self.lfru:
            self.freq = np.zeros(n_expert, dtype=np.int64)
            self.expert_in = np.full(n_slots, -1, dtype=np.int64)
            self.last_use = np.zeros(n_slots, dtype=np.int64)
        self.n_used_slots = 0

    def _take_slot(self) -> Tuple[int, bool]:
        """A slot for an expert that is not resident (the hook's pick_victim) -> (slot, an expert was evicted):
        the lowest free slot, else the victim among slots not in use (``in_wave``): LRU = least recent use,
        LFRU = lowest count, ties by least recent use."""
        if self.n_used_slots < self.n_slots:
            self.n_used_slots += 1
            return self.n_used_slots - 1, False
        res = self.resident
        if self.lfru:
            key = self.freq[self.expert_in] * _BIG + self.last_use
            key[self.in_wave] = np.iinfo(np.int64).max
            s = int(np.argmin(key))
            victim = int(self.expert_in[s])
        else:  # a demoted read ahead first (oldest first), else the least recent use; never one in use
            first = next((v for v in self.demoted if not self.in_wave[res[v]]), None)
            victim = first if first is not None else next(v for v in res if not self.in_wave[res[v]])
            s = res[victim]
        del res[victim]
        self.demoted.pop(victim, None)
        return s, True

    def demote(self, experts: Iterable[int]) -> None:
        """Reads ahead that the layer did not use (in expert order): the next victims, before any expert in use
        (the hook stamps them below every use)."""
        for e in sorted(experts):
            s = self.resident.get(e)
            if s is None:
                continue
            self.demote_clock += 1
            if self.lfru:
                self.last_use[s] = self.demote_clock
            else:
                self.demoted.pop(e, None)
                self.demoted[e] = None

    def _place(self, e: int, s: int) -> None:
        self.resident[e] = s
        self.in_wave[s] = True
        if self.lfru:
            self.expert_in[s] = e
            self.last_use[s] = self.clock

    def prefetch(self, predicted: Sequence[int]) -> Tuple[int, int]:
        """Reads ahead of the distinct ``predicted`` experts (in order) -> (read ahead, evictions). The resident
        predicted experts are protected; each other one takes a slot as a miss would, without an access."""
        res = self.resident
        self.in_wave[:] = False
        for e in predicted:
            if e in res:
                self.in_wave[res[e]] = True
        read = ev = 0
        for e in predicted:
            if e in res:
                continue
            self.clock += 1
            s, evicted = self._take_slot()
            ev += evicted
            self._place(e, s)
            read += 1
        self.in_wave[:] = False
        return read, ev

    def ubatch(self, experts: Iterable[int]) -> Tuple[int, int, int, int]:
        """Distinct experts of one ubatch (any order) -> (hits, misses, evictions, waves)."""
        uniq = sorted(set(int(e) for e in experts))
        if not uniq:
            return 0, 0, 0, 0
        order = [e for e in uniq if e in self.resident] + [e for e in uniq if e not in self.resident]
        hits = misses = ev = 0
        n = self.n_slots
        waves = 0
        for w0 in range(0, len(order), n):
            waves += 1
            h, m, e = self._wave(order[w0:w0 + n])
            hits += h
            misses += m
            ev += e
        return hits, misses, ev, waves

    def _wave(self, experts: List[int]):
        hits = misses = ev = 0
        res = self.resident
        self.in_wave[:] = False
        for e in experts:
            self.n_access += 1
            if self.lfru:
                self.freq[e] += 1
                if self.n_access % self.age_every == 0:
                    self.freq >>= 1
            self.clock += 1
            s = res.get(e)
            if s is not None:
                hits += 1
                res.move_to_end(e)
                self.demoted.pop(e, None)
            else:
                misses += 1
                s, evicted = self._take_slot()
                ev += evicted
            self._place(e, s)
        return hits, misses, ev


def simulate(trace: Trace, ubatches: Sequence[Ubatch], slots: Union[int, Mapping[int, int]], eviction: str = "lru", *,
             last_layer: Optional[int], expert_bytes: Optional[Mapping[int, int]] = None,
             layers: Optional[Sequence[int]] = None, prefetch: bool = False) -> SimResult:
    """The explicit expert cache (mode "cache") over ``ubatches`` of ``trace``.

    slots: per layer (one int for all layers, or {model layer: slots}).
    last_layer: the layer that only computes output rows (``last_layer_of(arch, n_layer)``: the
    model's last layer index, or None when every layer computes every row).
    expert_bytes: {layer: bytes of one expert} for bytes_read (0 when not given).
    layers: only these model layers (default: all of the trace's).
    prefetch: reads ahead from the trace's predicted sets (StreamSettings.prefetch "next-layer").
    """
    smap = _slots_map(trace, slots)
    cols = rows_per_layer(trace, ubatches, last_layer)
    pcols = predicted_rows_per_layer(trace, ubatches, last_layer) if prefetch else None
    sel = [i for i, il in enumerate(trace.layers) if layers is None or il in layers]
    n_ub = len(ubatches)
    misses = np.zeros((n_ub, len(sel)), dtype=np.int32)
    distinct = np.zeros((n_ub, len(sel)), dtype=np.int32)
    waves = np.zeros((n_ub, len(sel)), dtype=np.int32)
    rows = np.zeros((n_ub, len(sel)), dtype=np.int32)
    ahead_n = np.zeros((n_ub, len(sel)), dtype=np.int32)
    ahead_used: Dict[Tuple[int, int], np.ndarray] = {}
    out: List[LayerCounters] = []
    for j, li in enumerate(sel):
        il = trace.layers[li]
        n_slots = smap[il]
        c = _LayerCache(trace.n_expert, n_slots, eviction)
        lc = LayerCounters(layer=il, n_slots=n_slots)
        eb = int(expert_bytes.get(il, 0)) if expert_bytes else 0
        predicted: List[int] = []
        ahead: set = set()
        issued: List[Tuple[int, List[int]]] = []  # (ubatch, its reads ahead in issue order) not yet planned
        for u, ub in enumerate(ubatches):
            pr = pcols[li][u] if pcols is not None else None
            if pr is not None and min(trace.n_expert, ub.n_tokens * trace.n_used) <= n_slots:
                predicted = list(dict.fromkeys(int(x) for x in pr.ravel() if x >= 0))
                if len(predicted) > n_slots:
                    predicted = []
                else:
                    before = set(c.resident)
                    r, e = c.prefetch(predicted)
                    order = [x for x in predicted if x not in before]
                    ahead |= set(order)
                    if order:
                        issued.append((u, order))
                    lc.n_prefetched += r
                    lc.evictions += e
                    lc.bytes_read += r * eb
                    ahead_n[u, j] = r
            ids = cols[li][u]
            if ids is None:
                continue
            used = set(int(x) for x in ids.ravel())
            for u_i, order in issued:
                ahead_used[(u_i, j)] = np.array([x in used for x in order], dtype=bool)
            issued = []
            lc.n_predicted += len(predicted)
            lc.n_predicted_right += len(used.intersection(predicted))
            predicted = []
            lc.n_prefetch_used += len(ahead & used)
            lc.prefetch_wasted_bytes += len(ahead - used) * eb
            c.demote(ahead - used)
            ahead = set()
            h, m, e, w = c.ubatch(ids.ravel())
            lc.hits += h
            lc.misses += m
            lc.evictions += e
            lc.n_waves += w
            lc.n_tokens += ids.shape[0]
            lc.bytes_read += m * eb
            lc.by_phase[ub.phase]["hits"] += h
            lc.by_phase[ub.phase]["misses"] += m
            misses[u, j] = m
            distinct[u, j] = h + m
            rows[u, j] = ids.shape[0]
            # graph waves: ceil(min(n_expert, rows * n_used) / n_slots), at least 1
            touched = min(trace.n_expert, ids.shape[0] * trace.n_used)
            waves[u, j] = max(1, -(-touched // n_slots))
        for u_i, order in issued:  # read ahead for a ubatch the layer never planned: none used
            ahead_used[(u_i, j)] = np.zeros(len(order), dtype=bool)
        out.append(lc)
    return SimResult("cache", eviction, {trace.layers[li]: smap[trace.layers[li]] for li in sel}, out,
                     list(ubatches), misses, distinct, waves, rows, ahead_n, ahead_used)


def simulate_pagecache(trace: Trace, ubatches: Sequence[Ubatch], capacity_bytes: int, expert_bytes: Mapping[int, int], *,
                       last_layer: Optional[int]) -> SimResult:
    """Page-cache mode, modelled as one LRU of expert slices shared by all layers holding
    ``capacity_bytes`` (the memory left after weights and runtime buffers)."""
    cols = rows_per_layer(trace, ubatches, last_layer)
    n_ub, n_lay = len(ubatches), len(trace.layers)
    lru: "OrderedDict[tuple, int]" = OrderedDict()
    used = 0
    counters = [LayerCounters(layer=il, n_slots=0) for il in trace.layers]
    misses = np.zeros((n_ub, n_lay), dtype=np.int32)
    distinct = np.zeros((n_ub, n_lay), dtype=np.int32)
    waves = np.ones((n_ub, n_lay), dtype=np.int32)
    rows = np.zeros((n_ub, n_lay), dtype=np.int32)
    for u, ub in enumerate(ubatches):
        for li, il in enumerate(trace.layers):
            ids = cols[li][u]
            if ids is None:
                waves[u, li] = 0
                continue
            eb = int(expert_bytes[il])
            lc = counters[li]
            h = m = 0
            for e in sorted(set(int(x) for x in ids.ravel())):
                key = (il, e)
                if key in lru:
                    h += 1
                    lru.move_to_end(key)
                    continue
                m += 1
                if eb <= capacity_bytes:
                    while used + eb > capacity_bytes and lru:
                        _, b = lru.popitem(last=False)
                        used -= b
                        lc.evictions += 1
                    lru[key] = eb
                    used += eb
            lc.hits += h
            lc.misses += m
            lc.bytes_read += m * eb
            lc.n_tokens += ids.shape[0]
            lc.by_phase[ub.phase]["hits"] += h
            lc.by_phase[ub.phase]["misses"] += m
            misses[u, li] = m
            distinct[u, li] = h + m
            rows[u, li] = ids.shape[0]
    return SimResult("pagecache", "lru", {il: 0 for il in trace.layers}, counters, list(ubatches), misses, distinct,
                     waves, rows)


def layer_curves(trace: Trace, ubatches: Sequence[Ubatch], sizes: Sequence[int], eviction: str, *, last_layer: Optional[int],
                 expert_bytes: Optional[Mapping[int, int]] = None) -> Dict[int, SimResult]:
    """One simulation per slot count (uniform over layers): {slots: SimResult}. Layers are
    independent, so any per-layer allocation can be put together from these results."""
    out = {}
    for s in sorted(set(int(x) for x in sizes)):
        out[s] = simulate(trace, ubatches, s, eviction, last_layer=last_layer, expert_bytes=expert_bytes)
    return out


def combine(results_by_slots: Mapping[int, SimResult], alloc: Mapping[int, int]) -> SimResult:
    """The result of a per-layer allocation {layer: slots}, from uniform runs that include every
    needed slot count (layers are independent)."""
    any_r = next(iter(results_by_slots.values()))
    layers, cols = [], []
    for j, lc in enumerate(any_r.layers):
        r = results_by_slots[alloc[lc.layer]]
        layers.append(r.layers[j])
        cols.append(j)
    def stack(name):
        return np.stack([getattr(results_by_slots[alloc[l.layer]], name)[:, j]
                         for j, l in enumerate(any_r.layers)], axis=1)

    return SimResult("cache", any_r.eviction, dict(alloc), layers, any_r.ubatches, stack("misses"),
                     stack("distinct"), stack("waves"), stack("rows"))
