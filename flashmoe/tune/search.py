"""The candidate search: every expert-cache configuration that fits, simulated on the trace
(:mod:`flashmoe.tune.simulate`) and its decode and prefill speed predicted.

**Prediction.** A layer's fetch waits for its misses, so a decode token takes compute (dense + k
experts per layer) plus, per layer, the time to read its misses at the queue depth the readers
reach (``DiskModel``). Reads ahead (prefetch, simulated from the trace's predicted sets) run while
the layer before computes: only the part of their read time that the previous layer's compute (its
experts and this layer's share of the dense part) does not cover is waited for. Prefill: each row's
experts are computed once (the zero-slot skip: rows of other waves cost nothing), plus the reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from flashmoe.sizes import MiB, format_size
from flashmoe.trace import Trace
from flashmoe.tune.candidates import Candidate
from flashmoe.tune.measure import ComputeModel, DiskModel
from flashmoe.tune.model import MemoryPlan, ModelFacts
from flashmoe.tune.options import Clock
from flashmoe.tune.simulate import PHASES, SimResult, Ubatch, rows_per_layer, simulate, simulate_pagecache

EVICTIONS = ("lru", "lfru")


def predict(sim: SimResult, cand: Candidate, mf: ModelFacts, disk: DiskModel, cm: ComputeModel) -> Dict[str, Any]:
    """Decode and prefill tok/s of a simulated candidate (see the module docstring)."""
    layers = [lc.layer for lc in sim.layers]
    eb = np.array([mf.expert_bytes[l] for l in layers], dtype=float)
    nt = np.array([mf.n_tensors[l] for l in layers], dtype=float)
    direct = cand.direct_io and cand.mode == "cache"
    io = disk.read_time(sim.misses.astype(float), eb, nt, cand.readers, direct) if disk.ok else \
        np.zeros(sim.misses.shape)
    io = io + _exposed_ahead(sim, eb, nt, cand, mf, disk, cm, direct)
    io_tok = io.sum(axis=1)
    phase = np.array([u.phase for u in sim.ubatches])
    ntok = np.array([u.n_tokens for u in sim.ubatches], dtype=float)
    out: Dict[str, Any] = {}
    for ph in PHASES:
        sel = phase == ph
        if not sel.any():
            continue
        t = sim.total(ph)
        n = float(ntok[sel].sum())
        io_s = float(io_tok[sel].sum())
        if ph == "decode":
            comp = float(cm.decode_s(sim.distinct[sel].astype(float)).sum()) if cm.ok else 0.0
        else:
            comp = float(cm.prefill_s(ntok[sel], sim.rows[sel].astype(float), sim.waves[sel].astype(float),
                                      mf.n_used).sum()) if cm.ok else 0.0
        total = io_s + comp
        out[ph] = {
            "hit_rate": t["hit_rate"],
            "hits": t["hits"],
            "misses": t["misses"],
            "tok_s": (n / total) if total > 0 else None,
            "io_s_per_token": io_s / n,
            "compute_s_per_token": comp / n,
            "mib_per_token": float((sim.misses[sel] * eb).sum()) / n / MiB,
            "tokens": int(n),
        }
    d = out.get("decode", {})
    out["decode_tok_s"] = d.get("tok_s")
    out["prefill_tok_s"] = out.get("prefill", {}).get("tok_s")
    out["decode_hit_rate"] = d.get("hit_rate")
    out["bound"] = ("I/O" if d.get("io_s_per_token", 0) > d.get("compute_s_per_token", 0) else "compute") if d else None
    return out


def _exposed_ahead(sim: SimResult, eb: np.ndarray, nt: np.ndarray, cand: Candidate, mf: ModelFacts, disk: DiskModel,
                   cm: ComputeModel, direct: bool) -> np.ndarray:
    """Per ubatch and layer: the time the layer waits for its reads ahead, i.e. their read time less the
    compute they overlap (the layer before: its experts, and a layer's share of the dense part)."""
    if sim.ahead is None or not disk.ok or not sim.ahead.any():
        return np.zeros(sim.misses.shape)
    t_ahead = disk.read_time(sim.ahead.astype(float), eb, nt, cand.readers, direct)
    if not cm.ok:
        return t_ahead
    n_moe = max(1, len(mf.moe_layers))
    rows = np.maximum(sim.rows.astype(float), 1.0)
    dense = np.where(rows > 1, cm.dense_prefill_s * rows, cm.dense_decode_s) / n_moe
    experts = sim.distinct.astype(float) * np.where(rows > 1, cm.expert_prefill_s * mf.n_used, cm.expert_decode_s)
    window = dense + np.concatenate([np.zeros((experts.shape[0], 1)), experts[:, :-1]], axis=1)
    return np.maximum(0.0, t_ahead - window)


def size_grid(k: int, n_expert: int, extra: Sequence[int] = ()) -> List[int]:
    """Cache sizes (slots per layer) for the hit-rate curve: every size up to 16 steps, else ~16
    points from k to n_expert, plus `extra`."""
    if n_expert - k <= 16:
        pts = set(range(k, n_expert + 1))
    else:
        pts = {int(round(x)) for x in np.geomspace(k, n_expert, 14)}
        pts |= {int(round(x)) for x in np.linspace(k, n_expert, 8)}
    pts |= {int(x) for x in extra if k <= x <= n_expert}
    return sorted(pts)


def working_set(trace: Trace, ubatches: Sequence[Ubatch], mf: ModelFacts, window: int = 32) -> Dict[int, float]:
    """Per layer: the mean number of distinct experts in a window of `window` consecutive decode
    tokens (Denning's working set), from the rows the decode phase computes."""
    cols = rows_per_layer(trace, ubatches, mf.last_layer)
    out = {}
    for li, il in enumerate(trace.layers):
        rows = [r for r, ub in zip(cols[li], ubatches) if ub.phase == "decode" and r is not None]
        if not rows:
            rows = [r for r in cols[li] if r is not None]
        seq = [set(int(x) for x in r.ravel()) for r in rows]
        w = max(1, min(window, len(seq)))
        vals = []
        for i in range(0, max(1, len(seq) - w + 1)):
            s: set = set()
            for x in seq[i:i + w]:
                s |= x
            vals.append(len(s))
        out[il] = float(np.mean(vals)) if vals else float(mf.n_used)
    return out


def proportional_split(ws: Dict[int, float], mf: ModelFacts, cache_bytes: int) -> Dict[int, int]:
    """Slots per layer proportional to the working set, within the same bytes, at least k each."""
    k, n = mf.n_used, mf.n_expert
    layers = sorted(ws)
    total_ws = sum(ws.values()) or 1.0
    # the uniform equivalent in slots (for equal expert sizes) scaled by each layer's share
    uniform = cache_bytes // mf.bytes_per_slot if mf.bytes_per_slot else 0
    alloc = {l: int(min(n, max(k, math.floor(ws[l] / total_ws * uniform * len(layers))))) for l in layers}

    def used() -> int:
        return sum(alloc[l] * mf.expert_bytes[l] for l in layers)

    while used() > cache_bytes:  # trim the largest
        l = max((x for x in layers if alloc[x] > k), key=lambda x: alloc[x] / max(ws[x], 1e-9), default=None)
        if l is None:
            break
        alloc[l] -= 1
    grew = True
    while grew:  # hand out what rounding left, most needing first
        grew = False
        for l in sorted(layers, key=lambda x: alloc[x] / max(ws[x], 1e-9)):
            if alloc[l] < n and used() + mf.expert_bytes[l] <= cache_bytes:
                alloc[l] += 1
                grew = True
                break
    return alloc


def greedy_split(curves: Dict[int, SimResult], mf: ModelFacts, cache_bytes: int,
                 phase: str = "decode") -> Dict[int, int]:
    """Slots per layer by marginal misses saved per byte, from the per-layer curves (layers are
    independent). Sizes are those of the curve grid."""
    sizes = sorted(curves)
    idx = {lc.layer: j for j, lc in enumerate(curves[sizes[0]].layers)}

    def misses(l: int, s: int) -> int:
        return curves[s].layers[idx[l]].by_phase[phase]["misses"]

    alloc = {l: sizes[0] for l in idx}
    used = sum(alloc[l] * mf.expert_bytes[l] for l in idx)
    while True:
        best, gain_best = None, 0.0
        for l in idx:
            i = sizes.index(alloc[l])
            if i + 1 >= len(sizes):
                continue
            nxt = sizes[i + 1]
            cost = (nxt - alloc[l]) * mf.expert_bytes[l]
            if used + cost > cache_bytes:
                continue
            gain = (misses(l, alloc[l]) - misses(l, nxt)) / cost
            if best is None or gain > gain_best:
                best, gain_best = (l, nxt, cost), gain
        if best is None:
            break
        l, nxt, cost = best
        alloc[l] = nxt
        used += cost
    return alloc


@dataclass
class Sizing:
    """What the calibration runs measured of the process's own memory: a larger cache that fits
    (``tight_slots`` with the policy overhead that says so; 0: none) and the page cache's room."""

    tight_slots: int = 0
    tight_overhead: Optional[int] = None
    pc_capacity: int = 0


def measured_sizing(cm: ComputeModel, mp: MemoryPlan, mf: ModelFacts, budget: int, clock: Clock) -> Sizing:
    """From the calibration runs' peak RSS less their cache: the slots that really fit (a margin
    kept), and the memory the page cache really has."""
    out = Sizing(pc_capacity=mp.cache_space)
    if not cm.non_cache_rss:
        return out
    margin = max(32 * MiB, cm.non_cache_rss // 10)
    real_left = budget - cm.non_cache_rss
    if real_left > 0:
        out.pc_capacity = real_left
    ts = min(mf.n_expert, max(0, real_left - margin) // mp.bytes_per_slot) if mp.bytes_per_slot else 0
    ov = (budget - mp.weights - mp.kv_cache - mp.compute - ts * mp.bytes_per_slot) // MiB * MiB
    if ts > mp.max_slots and ts >= mf.n_used and ov > 0:
        out.tight_slots, out.tight_overhead = int(ts), int(ov)
    clock.log(f"memory: the calibration runs needed {format_size(cm.non_cache_rss)} besides their cache "
              f"(estimate: {format_size(mp.weights + mp.runtime)})" +
              (f": {out.tight_slots} slots per layer fit with a {format_size(margin)} margin" if out.tight_slots
               else ""))
    return out


@dataclass
class Search:
    """The simulations and every candidate, best predicted first."""

    grid: List[int]
    curves: Dict[str, Dict[int, SimResult]]  # eviction -> slots -> simulation
    pc_sim: SimResult
    ws: Dict[int, float]
    cands: List[Candidate]  # what the engine supports, best first
    per_layer: List[Candidate]  # the per-layer ones (also among cands)


@dataclass
class _Inputs:
    trace: Trace
    ubs: List[Ubatch]
    mf: ModelFacts
    disk: DiskModel
    cm: ComputeModel

    def sim(self, slots: Union[int, Dict[int, int]], eviction: str, prefetch: bool = False) -> SimResult:
        # reads ahead can be modelled where the trace has predicted sets (recorded with the real
        # routers, or drawn by `trace gen --predict-accuracy`)
        return simulate(self.trace, self.ubs, slots, eviction, last_layer=self.mf.last_layer,
                        expert_bytes=self.mf.expert_bytes, prefetch=prefetch and self.trace.pred is not None)

    @property
    def prefetch_choices(self) -> Tuple[bool, ...]:
        """Reads ahead off, and on when the trace says what would be predicted: the tuner keeps the one
        predicted faster (wasted reads ahead cost disk time that an I/O-bound run does not have)."""
        return (False, True) if self.trace.pred is not None else (False,)

    def predicted(self, c: Candidate, sim: SimResult) -> Candidate:
        c.prediction = predict(sim, c, self.mf, self.disk, self.cm)
        return c


def _cache_sizes(mp: MemoryPlan, k: int, sizing: Sizing) -> List[Tuple[int, Optional[int], str]]:
    """(slots, policy overhead, note) of the uniform caches to consider."""
    sizes: List[Tuple[int, Optional[int], str]] = []
    if mp.max_slots >= k:
        sizes.append((mp.max_slots, None, ""))
        safe = int(mp.max_slots * 0.85)
        if k <= safe < mp.max_slots:
            sizes.append((safe, None, "85% of the largest cache: a margin on the estimate"))
    if sizing.tight_slots:
        sizes.append((sizing.tight_slots, sizing.tight_overhead,
                      f"sized from the memory measured on this machine (runtime.overhead "
                      f"{format_size(sizing.tight_overhead)} instead of {format_size(mp.overhead)})"))
    return sizes


def _uniform_candidates(x: _Inputs, curves: Dict[str, Dict[int, SimResult]], mp: MemoryPlan, sizing: Sizing,
                        readers: List[int]) -> List[Candidate]:
    io_modes = (True, False) if x.disk.has(True) else (False,)
    out = []
    for slots, ov, note in _cache_sizes(mp, x.mf.n_used, sizing):
        for ev in EVICTIONS:
            for pf in x.prefetch_choices:
                sim = x.sim(slots, ev, True) if pf else curves[ev][slots]
                for d in io_modes:
                    for r in readers:
                        name = (f"{ev}-{slots}-r{r}{'' if d else '-buffered'}{'-tight' if ov else ''}"
                                f"{'-prefetch' if pf else ''}")
                        c = Candidate(name, "cache", slots=slots, eviction=ev, readers=r, direct_io=d, overhead=ov,
                                      note=note, prefetch=pf)
                        out.append(x.predicted(c, sim))
    return out


def _per_layer_candidates(x: _Inputs, curves: Dict[str, Dict[int, SimResult]], ws: Dict[int, float],
                          cache_bytes: int, readers: int) -> List[Candidate]:
    """Slots per layer: proportional to each layer's working set, and greedy by misses saved per byte."""
    direct = x.disk.has(True)
    out = []
    alloc = proportional_split(ws, x.mf, cache_bytes)
    for ev in EVICTIONS:
        c = Candidate(f"{ev}-proportional", "cache", eviction=ev, readers=readers, direct_io=direct, per_layer=alloc,
                      slots=min(alloc.values()), note="slots per layer proportional to the working set")
        out.append(x.predicted(c, x.sim(alloc, ev)))
    for ev in EVICTIONS:
        g = greedy_split(curves[ev], x.mf, cache_bytes)
        c = Candidate(f"{ev}-greedy", "cache", eviction=ev, readers=readers, direct_io=direct, per_layer=g,
                      slots=min(g.values()), note="slots per layer by misses saved per byte")
        out.append(x.predicted(c, x.sim(g, ev)))
    return out


def _rank_key(c: Candidate) -> Tuple:
    # ties (within about 1%): the exact explicit cache before the page-cache model, fewer readers
    p = c.prediction
    dec = p.get("decode_tok_s") or 0.0
    return (round(math.log(dec), 2) if dec > 0 else -1e9, c.mode == "cache", p.get("prefill_tok_s") or 0.0,
            c.direct_io, -c.readers)


def search(trace: Trace, ubs: List[Ubatch], mf: ModelFacts, mp: MemoryPlan, sizing: Sizing, disk: DiskModel,
           cm: ComputeModel, readers: Sequence[int]) -> Search:
    """Simulate the hit-rate curves and every candidate; the supported ones best predicted first."""
    x = _Inputs(trace, ubs, mf, disk, cm)
    K = mf.n_used
    grid = size_grid(K, mf.n_expert, [mp.max_slots, int(mp.max_slots * 0.85), sizing.tight_slots])
    curves = {ev: {s: x.sim(s, ev) for s in grid} for ev in EVICTIONS}
    readers = sorted(set(int(r) for r in readers))
    cands = _uniform_candidates(x, curves, mp, sizing, readers)
    pc_sim = simulate_pagecache(trace, ubs, sizing.pc_capacity, mf.expert_bytes, last_layer=mf.last_layer)
    for r in readers:
        c = Candidate(f"pagecache-r{r}", "pagecache", readers=r, direct_io=False,
                      note="modelled: one LRU of the leftover memory shared by all layers")
        cands.append(x.predicted(c, pc_sim))
    ws = working_set(trace, ubs, mf)
    per_layer = (_per_layer_candidates(x, curves, ws, mp.max_slots * mp.bytes_per_slot, readers[-1])
                 if mp.max_slots >= K else [])
    cands += per_layer
    cands.sort(key=_rank_key, reverse=True)
    return Search(grid, curves, pc_sim, ws, cands, per_layer)
