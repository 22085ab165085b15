"""The candidate search: every expert-cache configuration that fits, simulated on the trace
(:mod:`flashmoe.tune.simulate`) and its decode and prefill speed predicted.

**Prediction.** A layer's fetch waits for its misses, so a decode token takes compute (dense + k
experts per layer) plus, per layer, the time to read its misses at the queue depth the readers
reach (``DiskModel``: the bandwidth the engine's own reads got in the I/O calibration, else the
disk test's; page-cache candidates: the effective bandwidth of the calibration's page-cache run, else
buffered I/O's; ``prediction["disk_source"]`` says which, ``prediction["decode"]["read_mb_s"]`` the
bandwidth the readers get in this prediction). Reads ahead (prefetch, simulated from the trace's
predicted sets) run while the layer before computes: only the part of their read time that the
previous layer's compute (its experts and this layer's share of the dense part) does not cover is
waited for. Prefill: each row's
experts are computed once (the zero-slot skip: rows of other waves cost nothing), plus the reads;
the time to first token is the whole prefill.

**Dropped reads ahead** (``charged_ahead``). The engine drops the reads ahead of experts the layer
does not use that no reader has started when the layer's routing is known (its fetch); the wrong
ones already read are demoted. The reads ahead are issued in the prediction's order (each expert's
slices one after the other) as the layer before starts computing; with R readers each slice takes
``slice bytes x q / bandwidth(q)`` (q = min(R, slices) read at once), so by the end of the compute
window q slices have started at each multiple of that time. Charged disk time: every slice started
in the window, plus the slices of right predictions not started yet (the fetch waits for them); the
wrong ones not started cost nothing. Ignored: the cache state (the simulator keeps a dropped wrong
expert resident and demoted where the engine evicts it; with LRU the next miss takes that slot in
both, so they differ when the expert is used before then: a hit here, a miss in the engine; LFRU
may evict another expert here), jitter in the readers' start times and a window that is not the
same for every layer of a token. ``predict(..., drop_ahead=False)`` charges
every read ahead (what ``FLASHMOE_PREFETCH_CANCEL=0`` runs, and the simulator's counters, do).

**n_ubatch** (``choose_ubatches``). A ubatch of a long prompt touches nearly every expert of a layer,
so a streamed prompt reads the experts about once per ubatch; a larger ubatch reads them fewer times
but its compute buffer (the attention scores grow with n_ubatch x n_ctx) comes out of the expert
cache. Each candidate is simulated again with every n_ubatch worth considering (``model.ubatch_plans``:
the base policy's, then 1024, 2048, 4096 while the prompt is longer than the one before and the
context allows), its cache cut to what fits beside that compute buffer. The rule: decode first, so a
choice whose predicted decode tok/s is more than ``UBATCH_DECODE_MARGIN`` (2%) below the base
n_ubatch's is out; of the others, a larger n_ubatch replaces a smaller one only when its predicted
time to first token is at least ``UBATCH_TTFT_GAIN`` (5%) lower. A 64-token prompt (the default
workload) has one choice: the base policy's.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from flashmoe.sizes import MiB, format_size
from flashmoe.trace import Trace
from flashmoe.tune.candidates import Candidate
from flashmoe.tune.measure import ComputeModel, DiskModel, IOKey, io_key
from flashmoe.tune.model import MemoryPlan, ModelFacts, UbatchPlan
from flashmoe.tune.options import Clock
from flashmoe.tune.simulate import PHASES, SimResult, Ubatch, rows_per_layer, simulate, simulate_pagecache

EVICTIONS = ("lru", "lfru")
UBATCH_DECODE_MARGIN = 0.02  # a larger n_ubatch may cost decode at most 2% (predicted)
UBATCH_TTFT_GAIN = 0.05  # ... and must cut the predicted time to first token by at least 5%


def predict(sim: SimResult, cand: Candidate, mf: ModelFacts, disk: DiskModel, cm: ComputeModel, *,
            drop_ahead: bool = True) -> Dict[str, Any]:
    """Decode and prefill tok/s of a simulated candidate, the time to first token (the whole prefill) and
    how many times the prompt read the streamed experts (see the module docstring). drop_ahead: the
    engine's dropping of unstarted wrong reads ahead (False: every read ahead is charged)."""
    layers = [lc.layer for lc in sim.layers]
    eb = np.array([mf.expert_bytes[l] for l in layers], dtype=float)
    nt = np.array([mf.n_tensors[l] for l in layers], dtype=float)
    key = io_key(cand.mode, cand.direct_io)  # page-cache mode: its own (effective) bandwidth, else buffered's
    io = disk.read_time(sim.misses.astype(float), eb, nt, cand.readers, key) if disk.ok else \
        np.zeros(sim.misses.shape)
    exposed, charged, t_ahead = _exposed_ahead(sim, eb, nt, cand, mf, disk, cm, key, drop_ahead)
    # what the readers read and how long they were busy (before the reads ahead overlap compute): the
    # bandwidth the prediction assumes, to set beside the validation runs' own
    read_bytes = ((sim.misses + charged) * eb).sum(axis=1)
    read_busy = (io + t_ahead).sum(axis=1)
    io = io + exposed
    io_tok = io.sum(axis=1)
    phase = np.array([u.phase for u in sim.ubatches])
    ntok = np.array([u.n_tokens for u in sim.ubatches], dtype=float)
    ahead = sim.ahead if sim.ahead is not None else np.zeros(sim.misses.shape, dtype=np.int32)
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
            "s": total,
            "reads_ahead_per_token": float(ahead[sel].sum()) / n,
            "reads_ahead_dropped_per_token": float((ahead[sel] - charged[sel]).sum()) / n,
            "read_mb_s": (float(read_bytes[sel].sum()) / float(read_busy[sel].sum()) / 1e6
                          if float(read_busy[sel].sum()) > 0 else None),
        }
    d = out.get("decode", {})
    pf = out.get("prefill", {})
    out["decode_tok_s"] = d.get("tok_s")
    out["prefill_tok_s"] = pf.get("tok_s")
    out["ttft_s"] = pf.get("s") if pf.get("s") else None
    sel = phase == "prefill"
    every_expert = float(mf.n_expert * eb.sum())
    out["prompt_reads"] = (float(((sim.misses[sel] + ahead[sel]) * eb).sum()) / every_expert
                           if sel.any() and every_expert else None)
    out["decode_hit_rate"] = d.get("hit_rate")
    out["bound"] = ("I/O" if d.get("io_s_per_token", 0) > d.get("compute_s_per_token", 0) else "compute") if d else None
    out["disk_source"] = disk.source(key) if disk.ok else None  # where the bandwidth came from
    return out


def _ahead_window(sim: SimResult, mf: ModelFacts, cm: ComputeModel) -> np.ndarray:
    """Per ubatch and layer: the compute that reads ahead overlap (the layer before: its experts, and a
    layer's share of the dense part); zeros without a compute model."""
    if not cm.ok:
        return np.zeros(sim.misses.shape)
    n_moe = max(1, len(mf.moe_layers))
    rows = np.maximum(sim.rows.astype(float), 1.0)
    dense = np.where(rows > 1, cm.dense_prefill_s * rows, cm.dense_decode_s) / n_moe
    experts = sim.distinct.astype(float) * np.where(rows > 1, cm.expert_prefill_s * mf.n_used, cm.expert_decode_s)
    return dense + np.concatenate([np.zeros((experts.shape[0], 1)), experts[:, :-1]], axis=1)


def charged_ahead(used: np.ndarray, n_tensors: int, expert_bytes: float, readers: int, window: float,
                  bw: Callable[[float], float]) -> float:
    """The reads ahead of one layer and ubatch that cost disk time when the engine drops the wrong ones no
    reader has started, in experts (fractional: slices). used: per read ahead, in issue order, whether the
    layer used it; bw(q): bytes/s with q reads at once. Slices are issued expert by expert; q = min(readers,
    slices) run at once, one taking ``slice x q / bw(q)``, so q more start at each multiple of that time;
    those started before the fetch (``window`` seconds after the issue) are read; of the others, the right
    ones are read too (the fetch waits for them) and the wrong ones are dropped."""
    used = np.asarray(used, dtype=bool)
    n_exp, nt = len(used), max(1, int(n_tensors))
    jobs = n_exp * nt
    if jobs == 0:
        return 0.0
    q = min(max(1, int(readers)), jobs)
    rate = float(bw(q))
    t_job = (expert_bytes / nt) * q / rate if rate > 0 and np.isfinite(rate) else 0.0
    started = jobs if t_job <= 0 else min(jobs, q * (int(math.floor(max(0.0, window) / t_job)) + 1))
    full, part = divmod(started, nt)
    wrong = ~used
    charged = int(used.sum()) * nt + int(wrong[:full].sum()) * nt + (part if full < n_exp and wrong[full] else 0)
    return charged / nt


def _exposed_ahead(sim: SimResult, eb: np.ndarray, nt: np.ndarray, cand: Candidate, mf: ModelFacts, disk: DiskModel,
                   cm: ComputeModel, key: IOKey,
                   drop: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ubatch and layer: (the time the layer waits for its reads ahead, the reads ahead charged, their read
    time). The wait is their read time less the compute they overlap (``_ahead_window``); with ``drop``, only
    the reads ahead that ``charged_ahead`` says cost disk time are read, else all of them."""
    zeros = np.zeros(sim.misses.shape)
    if sim.ahead is None or not disk.ok or not sim.ahead.any():
        return zeros, zeros, zeros
    window = _ahead_window(sim, mf, cm)
    charged = sim.ahead.astype(float)
    if drop and sim.ahead_used is not None:
        charged = charged.copy()

        def bw(q: float) -> float:
            return float(disk.bw(q, key))

        for (u, j), used in sim.ahead_used.items():
            charged[u, j] = charged_ahead(used, int(nt[j]), float(eb[j]), cand.readers, float(window[u, j]), bw)
    t_ahead = disk.read_time(charged, eb, nt, cand.readers, key)
    return np.maximum(0.0, t_ahead - window), charged, t_ahead


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
    # where pc_capacity came from: "estimate" (the memory plan), "measured" (the budget less the calibration
    # runs' memory), "calibrated" (the room that gives the page-cache calibration run's measured hit rate)
    pc_capacity_source: str = "estimate"


def measured_sizing(cm: ComputeModel, mp: MemoryPlan, mf: ModelFacts, budget: int, clock: Clock) -> Sizing:
    """From the calibration runs' peak RSS less their cache: the slots that really fit (a margin
    kept), and the memory the page cache really has."""
    out = Sizing(pc_capacity=mp.cache_space)
    if not cm.non_cache_rss:
        return out
    margin = max(32 * MiB, cm.non_cache_rss // 10)
    real_left = budget - cm.non_cache_rss
    if real_left > 0:
        out.pc_capacity, out.pc_capacity_source = real_left, "measured"
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
    ubatch_sizes: List[int] = dataclasses.field(default_factory=list)  # the n_ubatch values weighed, base first


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

    def at(self, ubs: List[Ubatch]) -> "_Inputs":
        """The same inputs with another workload split (another n_ubatch)."""
        return dataclasses.replace(self, ubs=ubs)


def cache_sizes(mp: MemoryPlan, k: int, sizing: Sizing) -> List[Tuple[int, Optional[int], str]]:
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


def _uniform_name(c: Candidate) -> str:
    return (f"{c.eviction}-{c.slots}-r{c.readers}{'' if c.direct_io else '-buffered'}{'-tight' if c.overhead else ''}"
            f"{'-prefetch' if c.prefetch else ''}")


def _uniform_candidates(x: _Inputs, curves: Dict[str, Dict[int, SimResult]], mp: MemoryPlan, sizing: Sizing,
                        readers: List[int]) -> List[Candidate]:
    io_modes = (True, False) if x.disk.has(True) else (False,)
    out = []
    for slots, ov, note in cache_sizes(mp, x.mf.n_used, sizing):
        for ev in EVICTIONS:
            for pf in x.prefetch_choices:
                sim = x.sim(slots, ev, True) if pf else curves[ev][slots]
                for d in io_modes:
                    for r in readers:
                        c = Candidate("", "cache", slots=slots, eviction=ev, readers=r, direct_io=d, overhead=ov,
                                      note=note, prefetch=pf)
                        c.name = _uniform_name(c)
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


def _shrink(alloc: Dict[int, int], room: int, mf: ModelFacts) -> Optional[Dict[int, int]]:
    """Per-layer slots cut one at a time, from the layer with the most, until they fit ``room`` bytes (None:
    not even k slots per layer fit)."""
    a = dict(alloc)
    used = sum(a[l] * mf.expert_bytes[l] for l in a)
    while used > room:
        l = max((x for x in a if a[x] > mf.n_used), key=lambda x: (a[x], x), default=None)
        if l is None:
            return None
        a[l] -= 1
        used -= mf.expert_bytes[l]
    return a


def _room(p: UbatchPlan, c: Candidate) -> int:
    """Bytes for the expert cache at this plan's compute buffer, with the candidate's policy overhead."""
    mp = p.mp
    return mp.budget - mp.weights - mp.kv_cache - mp.compute - (c.overhead if c.overhead is not None else mp.overhead)


class _UbatchSims:
    """The simulations of the candidates at other n_ubatch values (shared by the candidates that differ
    only in readers or I/O mode)."""

    def __init__(self, x: _Inputs, sizing: Sizing, base: UbatchPlan):
        self.x, self.sizing, self.base = x, sizing, base
        self.sims: Dict[Tuple, SimResult] = {}

    def variant(self, c: Candidate, p: UbatchPlan) -> Tuple[Optional[Candidate], int, str]:
        """(c as it runs with plan p's n_ubatch, its cache bytes, why it cannot): its cache cut to what fits
        beside p's compute buffer, simulated on p's ubatches and predicted."""
        x, mf = self.x, self.x.mf
        xp = x.at(p.ubs)
        v = dataclasses.replace(c, prediction={}, runs=[], ubatch_choices=[], measured=None, n_ubatch=p.n_ubatch,
                                n_batch=p.n_batch)
        if c.mode == "pagecache":
            cap = self.sizing.pc_capacity - (p.mp.compute - self.base.mp.compute)
            if cap <= 0:
                return None, 0, "nothing left for the page cache"
            key: Tuple = ("pagecache", cap, p.n_ubatch)
            if key not in self.sims:
                self.sims[key] = simulate_pagecache(x.trace, p.ubs, cap, mf.expert_bytes, last_layer=mf.last_layer)
            return xp.predicted(v, self.sims[key]), cap, ""
        room = _room(p, c)
        if c.per_layer:
            alloc = _shrink(c.per_layer, room, mf)
            if alloc is None:
                return None, 0, f"not {mf.n_used} slots per layer beside the compute buffer"
            v.per_layer, v.slots = alloc, min(alloc.values())
            key = ("layers", tuple(sorted(alloc.items())), c.eviction, c.prefetch, p.n_ubatch)
            cache_bytes = sum(alloc[l] * mf.expert_bytes[l] for l in alloc)
            slots: Union[int, Dict[int, int]] = alloc
        else:
            per = p.mp.bytes_per_slot
            v.slots = int(min(c.slots, room // per)) if per else c.slots
            if v.slots < mf.n_used:
                return None, 0, f"not {mf.n_used} slots per layer beside the compute buffer"
            key = ("uniform", v.slots, c.eviction, c.prefetch, p.n_ubatch)
            cache_bytes = v.slots * per
            slots = v.slots
        if key not in self.sims:
            self.sims[key] = xp.sim(slots, c.eviction, c.prefetch)
        return xp.predicted(v, self.sims[key]), cache_bytes, ""


def _choice_row(p: UbatchPlan, v: Optional[Candidate], cache_bytes: int, why: str) -> Dict[str, Any]:
    pr = v.prediction if v is not None else {}
    return {"n_ubatch": p.n_ubatch, "n_batch": p.n_batch, "compute_bytes": p.mp.compute, "fits": v is not None,
            "why_not": why, "slots": v.slots if v is not None else None, "cache_bytes": cache_bytes,
            "prompt_reads": pr.get("prompt_reads"), "ttft_s": pr.get("ttft_s"),
            "prefill_tok_s": pr.get("prefill_tok_s"), "decode_tok_s": pr.get("decode_tok_s"),
            "decode_ok": False, "chosen": False}


def pick_ubatch(rows: List[Dict[str, Any]]) -> int:
    """The index of the chosen n_ubatch among ``rows`` (``_choice_row``, the base first, ascending n_ubatch):
    decode first (a choice predicted more than UBATCH_DECODE_MARGIN slower to decode than the base is out),
    then a larger n_ubatch replaces a smaller one when its predicted time to first token is at least
    UBATCH_TTFT_GAIN lower. Marks ``decode_ok`` and ``chosen``."""
    d0 = rows[0].get("decode_tok_s")
    for r in rows:
        d = r.get("decode_tok_s")
        r["decode_ok"] = bool(r["fits"]) and (d0 is None or (d is not None and d >= d0 * (1 - UBATCH_DECODE_MARGIN)))
    rows[0]["decode_ok"] = True
    best = 0
    for i, r in enumerate(rows[1:], 1):
        t, tb = r.get("ttft_s"), rows[best].get("ttft_s")
        if r["decode_ok"] and t is not None and tb is not None and t < tb * (1 - UBATCH_TTFT_GAIN):
            best = i
    rows[best]["chosen"] = True
    return best


def choose_ubatches(x: _Inputs, cands: List[Candidate], plans: Sequence[UbatchPlan], sizing: Sizing) -> None:
    """Each candidate's n_ubatch (``pick_ubatch`` over ``plans``, the base plan first): the candidate takes the
    chosen variant's cache, n_ubatch, n_batch, prediction and name (``-ubN`` when not the base's); every
    choice weighed is kept in ``ubatch_choices`` for the report."""
    base = plans[0]
    sims = _UbatchSims(x, sizing, base)
    for c in cands:
        c.n_ubatch, c.n_batch = base.n_ubatch, base.n_batch
        cache_bytes = (sizing.pc_capacity if c.mode == "pagecache" else
                       sum(n * x.mf.expert_bytes[l] for l, n in c.per_layer.items()) if c.per_layer
                       else c.slots * base.mp.bytes_per_slot)
        variants: List[Optional[Candidate]] = [c]
        rows = [_choice_row(base, c, cache_bytes, "")]
        for p in plans[1:]:
            v, nbytes, why = sims.variant(c, p)
            variants.append(v)
            rows.append(_choice_row(p, v, nbytes, why))
        i = pick_ubatch(rows)
        c.ubatch_choices = rows
        w = variants[i]
        if i == 0 or w is None:
            continue
        c.slots, c.per_layer, c.prediction = w.slots, w.per_layer, w.prediction
        c.n_ubatch, c.n_batch = w.n_ubatch, w.n_batch
        stem = _uniform_name(c) if c.mode == "cache" and not c.per_layer else c.name
        c.name = f"{stem}-ub{c.n_ubatch}"


def _rank_key(c: Candidate) -> Tuple:
    # ties (within about 1%): the exact explicit cache before the page-cache model, fewer readers
    p = c.prediction
    dec = p.get("decode_tok_s") or 0.0
    return (round(math.log(dec), 2) if dec > 0 else -1e9, c.mode == "cache", p.get("prefill_tok_s") or 0.0,
            c.direct_io, -c.readers)


def search(trace: Trace, ubs: List[Ubatch], mf: ModelFacts, mp: MemoryPlan, sizing: Sizing, disk: DiskModel,
           cm: ComputeModel, readers: Sequence[int], plans: Sequence[UbatchPlan] = ()) -> Search:
    """Simulate the hit-rate curves and every candidate; the supported ones best predicted first.
    ubs: the workload with the base policy's n_ubatch (``mp``); plans: the n_ubatch values to weigh
    (``model.ubatch_plans``, the base first; none: the base alone)."""
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
    choose_ubatches(x, cands, list(plans) or [UbatchPlan(mp.n_ubatch, mp.n_batch, mp, list(ubs))], sizing)
    cands.sort(key=_rank_key, reverse=True)
    seen: set = set()
    unique = []
    for c in cands:  # two sizes cut to the same cache by a larger n_ubatch: the same configuration
        if c.name not in seen:
            seen.add(c.name)
            unique.append(c)
    kept = {id(c) for c in unique}
    per_layer = [c for c in per_layer if id(c) in kept]
    return Search(grid, curves, pc_sim, ws, unique, per_layer, [p.n_ubatch for p in plans] or [mp.n_ubatch])
