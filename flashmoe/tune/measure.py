"""What the tuner measures on this machine: the disk (read bandwidth against queue depth, direct and
buffered: the bench's disk test), the compute (warm-cache runs of the engine: per-token time of
the dense part and of one expert), the engine's own reads (``calibrate_io``: short streamed runs under
the budget, whose reader pool's bandwidth replaces the disk test's in the predictions: direct I/O with the
smallest cache, buffered I/O with the largest buffered candidate's cache so that the page cache competes
with it as in that candidate's runs, and one page-cache-mode run whose effective bandwidth and hit rate
the page-cache candidates take), and the models the predictions use."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from flashmoe.bench.disk import DiskMeasurement, disk_test, evict_file
from flashmoe.bench.runner import RunRecord, run_worker
from flashmoe.sizes import format_size
from flashmoe.settings import EngineSettings
from flashmoe.trace import Trace, write_trace
from flashmoe.tune.candidates import Candidate
from flashmoe.tune.model import ModelFacts
from flashmoe.tune.options import Clock
from flashmoe.tune.simulate import SimResult, engine_ubatches, simulate, simulate_pagecache
from flashmoe.worker import WorkerSpec

CAL_PROMPT = 32  # tokens of the compute calibration runs
# tests only (tests/test_tune.py's Ctrl-C test): seconds the tuner sleeps after announcing a calibration run,
# so that a signal finds it in its own code and not in a child that may already have finished
TEST_PAUSE_ENV = "FLASHMOE_TUNE_TEST_PAUSE"
CAL_GEN = 24
IO_CAL_PROMPT = 8  # tokens of the I/O calibration runs (only their decode phase is counted)
IO_CAL_GEN = 24
IO_CAL_SHARE = 0.08  # the I/O calibration takes at most this share of the time limit ...
IO_CAL_MIN_S = 20.0  # ... or this many seconds, whichever is more
IO_CAL_RESERVE = 0.5  # ... and never more than this share of the time left (validation comes after it)
IO_CAL_MIN_MISS_SHARE = 0.05  # a buffered calibration run's cache must leave this share of its decode accesses
# missing (in the simulation of its workload) for its reads to be measured; else the next smaller cache
PC_HIT_TOLERANCE = 0.05  # the page-cache run's decode hit rate further than this from the simulation's: the
# page-cache candidates are simulated with the capacity that gives the measured one (``effective_capacity``)
ENGINE = "engine"  # DiskModel.source(): the bandwidth of the engine's own reads (calibrate_io)
ENGINE_PAGECACHE = "engine, page-cache run"  # ... the effective bandwidth of its page-cache-mode run
DISK_TEST = "disk test"  # ... the synthetic disk test (measure_disks)
PAGECACHE = "pagecache"  # DiskModel's key of page-cache mode (True: direct I/O, False: buffered)
IOKey = Union[bool, str]  # True | False | PAGECACHE


def io_key(mode: str, direct_io: bool) -> IOKey:
    """The DiskModel curve a candidate reads with: PAGECACHE for page-cache mode, else its I/O mode."""
    return PAGECACHE if mode == "pagecache" else bool(direct_io)


def io_name(key: IOKey) -> str:
    return "page cache" if key == PAGECACHE else "direct" if key else "buffered"


def measure_disks(model_path: str, depths: Sequence[int], clock: Clock) -> Tuple[DiskMeasurement, DiskMeasurement]:
    """(direct, buffered) random reads of one expert slice at these queue depths."""
    clock.log("disk: random reads of one expert slice on the model file, QD " + "/".join(map(str, depths)))
    direct = disk_test(model_path, depths=depths)
    try:
        buffered = disk_test(model_path, direct=False, depths=depths, seed=1)
    except OSError as e:
        buffered = DiskMeasurement(False, reason=e.strerror or str(e))
    for label, d in (("direct", direct), ("buffered", buffered)):
        if d.ok:
            clock.log(f"  {label}: " + ", ".join(f"QD{x.qd} {x.bytes_per_s / 1e6:.0f} MB/s" for x in d.depths))
        else:
            clock.log(f"  {label}: failed ({d.reason})")
    return direct, buffered


def _curve(d: DiskMeasurement) -> List[Tuple[float, float]]:
    return sorted((float(x.qd), float(x.bytes_per_s)) for x in d.depths if x.bytes_per_s > 0)


Measured = Union[DiskMeasurement, Dict[str, Any], None]


def _mbs(b: Optional[float]) -> str:
    return "-" if b is None or not np.isfinite(b) else f"{b / 1e6:.0f} MB/s"


@dataclass
class EngineRead:
    """One run of the I/O calibration: the engine streaming (direct I/O: with the smallest cache, k slots per
    layer; buffered: with the largest buffered candidate's cache; or in page-cache mode, ``pagecache``), its
    decode phase's reads from the hook's counters. ``bytes_per_s`` = bytes read / the reader pool's busy time
    (``read_wall_s``): the bandwidth the engine's own read pattern got; ``qd``: the reads in flight it kept,
    min(readers, slices a layer's fetch read on average). A page-cache run also has ``effective_bytes_per_s``:
    bytes read / (decode time - the compute the model predicts for it): every cost of its misses (the matmuls'
    page faults when the cgroup reclaims what was just read, too), and its decode hit rate (``hit_rate``,
    mincore) beside the simulation's (``sim_hit_rate``)."""

    direct: bool
    readers: int
    slots: int
    status: str = "not run"  # "ok" | "TIMEOUT" | "OOM" | "FAILED" | "not run" (no time)
    detail: Optional[str] = None
    decode_tokens: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    read_wall_s: float = 0.0
    read_s: float = 0.0
    stall_s: float = 0.0
    decode_s: float = 0.0
    qd: Optional[float] = None
    bytes_per_s: Optional[float] = None
    wall_s: float = 0.0
    timeout_s: Optional[float] = None
    confined: bool = False
    model_evicted: bool = False
    pagecache: bool = False  # a page-cache-mode run (``direct`` False, ``slots`` 0)
    hit_rate: Optional[float] = None  # decode hits / accesses (the hook's counters)
    sim_hit_rate: Optional[float] = None  # page cache: the simulation of its workload at the modelled capacity
    compute_s: Optional[float] = None  # page cache: the compute of its decode phase, by the compute model
    effective_bytes_per_s: Optional[float] = None  # page cache: bytes read / (decode time - compute)

    @property
    def key(self) -> IOKey:
        return PAGECACHE if self.pagecache else self.direct

    @property
    def label(self) -> str:
        return f"{io_name(self.key)}, {self.readers} readers"

    def take(self, rec: RunRecord, mf: ModelFacts, in_flight: Optional[float] = None) -> None:
        """The figures of a finished run (its status and, when it completed, its decode phase's reads).
        in_flight: the reads in flight its fetches kept, from the simulation of its workload (None: from its
        counters, the mean over every layer's fetch)."""
        self.status, self.detail, self.wall_s = rec.status, rec.detail, rec.wall_s
        if not rec.ok:
            return
        dec = rec.ok_result.decode
        c = dec.cache
        self.decode_tokens, self.decode_s = dec.tokens, dec.s
        self.hits, self.misses, self.bytes_read = c.hits, c.misses, c.bytes_read
        self.read_wall_s, self.read_s, self.stall_s = c.read_wall_s, c.read_s, c.stall_s
        self.hit_rate = c.hits / (c.hits + c.misses) if c.hits + c.misses else None
        if self.direct and (rec.ok_result.info or {}).get("direct_io") == 0:
            # O_DIRECT refused by the file system: the engine read buffered, as direct candidates would here
            self.detail = "the engine fell back to buffered reads (O_DIRECT refused)"
        if c.bytes_read > 0 and c.read_wall_s > 0:
            self.bytes_per_s = c.bytes_read / c.read_wall_s
            if in_flight is not None:
                self.qd = float(in_flight)
            else:
                nt = float(np.mean(list(mf.n_tensors.values()))) if mf.n_tensors else 1.0
                fetches = max(1, dec.tokens * len(mf.moe_layers))
                self.qd = float(min(self.readers, max(1.0, c.misses * nt / fetches)))
        else:
            self.detail = "the run read nothing during its decode phase"

    def take_effective(self, compute_s: Optional[float]) -> None:
        """A page-cache run's effective bandwidth: its decode bytes over the decode time less ``compute_s``
        (the compute model's time for its decode; None: not calibrated, nothing taken off), never more than
        over the time the fetches stalled."""
        self.compute_s = compute_s
        if self.bytes_read <= 0:
            return
        io_s = max(self.decode_s - (compute_s or 0.0), self.stall_s)
        if io_s > 0:
            self.effective_bytes_per_s = self.bytes_read / io_s

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class IOCalibration:
    """The engine's own reads (``calibrate_io``): one run per I/O mode and reader count measured."""

    runs: List[EngineRead] = field(default_factory=list)
    note: str = ""  # why it was not made, or not all of it
    s: float = 0.0  # seconds it took
    prompt_tokens: int = IO_CAL_PROMPT
    gen_tokens: int = IO_CAL_GEN
    allowance_s: float = 0.0  # the most it could take
    buffered_slots: Optional[int] = None  # slots per layer of its buffered runs, and why that many
    buffered_why: str = ""
    pc_capacity: Optional[int] = None  # the page cache's modelled room, the page-cache run was simulated with
    pc_effective_capacity: Optional[int] = None  # the room that gives the run's measured hit rate (when far)

    def points(self, direct: bool) -> List[Tuple[float, float]]:
        """(queue depth, bytes/s) of the completed runs in this I/O mode (page-cache runs aside)."""
        return sorted((float(r.qd), float(r.bytes_per_s)) for r in self.runs
                      if r.direct == direct and not r.pagecache and r.bytes_per_s and r.qd)

    @property
    def pagecache_run(self) -> Optional[EngineRead]:
        return next((r for r in self.runs if r.pagecache), None)

    def pagecache_point(self) -> Optional[Tuple[float, float]]:
        """(queue depth, effective bytes/s) of the page-cache run, when it measured one."""
        r = self.pagecache_run
        if r is None or not r.effective_bytes_per_s or not r.qd:
            return None
        return float(r.qd), float(r.effective_bytes_per_s)

    @property
    def ok(self) -> bool:
        return bool(self.points(True) or self.points(False) or self.pagecache_point())

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "IOCalibration":
        """The inverse of ``to_dict`` (fields missing or null take their defaults)."""
        kw = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        kw["runs"] = [EngineRead(**r) for r in kw.get("runs") or []]
        return cls(**kw)


def calibrated_curve(engine: List[Tuple[float, float]],
                     synthetic: Optional[List[Tuple[float, float]]] = None) -> List[Tuple[float, float]]:
    """Bandwidth against queue depth from the engine's runs (one point per reader count; two at one depth are
    averaged), linear between them. Outside them, the disk test's curve scaled to meet the nearest one (its
    shape, the engine's level): below the lowest, scaled to the lowest; above the highest, to the highest.
    Without a disk test, the ends are held (``np.interp``)."""
    by_q: Dict[float, List[float]] = {}
    for q, b in engine:
        by_q.setdefault(float(q), []).append(float(b))
    pts = sorted((q, float(np.mean(bs))) for q, bs in by_q.items())
    if not pts or not synthetic:
        return pts
    xs = np.array([p[0] for p in synthetic], dtype=float)
    ys = np.array([p[1] for p in synthetic], dtype=float)

    def scaled(q_end: float, b_end: float, keep: Callable[[float], bool]) -> List[Tuple[float, float]]:
        s_end = float(np.interp(q_end, xs, ys))
        return [(float(q), float(b) * b_end / s_end) for q, b in synthetic if keep(q)] if s_end > 0 else []

    (q0, b0), (q1, b1) = pts[0], pts[-1]
    return scaled(q0, b0, lambda q: q < q0) + pts + scaled(q1, b1, lambda q: q > q1)


class DiskModel:
    """Read bandwidth against queue depth (piecewise linear between the measured depths), direct, buffered and
    page-cache mode (keys True, False, PAGECACHE): the engine's own reads where the I/O calibration measured them
    (``engine``), else the disk test's; page-cache mode: the effective bandwidth of the calibration's page-cache
    run, else buffered I/O's curve. ``synthetic`` keeps the disk test's curves, ``sources`` says where each
    curve came from."""

    FALLBACK: Dict[IOKey, Tuple[IOKey, ...]] = {True: (True, False), False: (False, True),
                                                PAGECACHE: (PAGECACHE, False, True)}

    def __init__(self, direct: Measured, buffered: Measured,
                 engine: Union["IOCalibration", Dict[str, Any], None] = None):
        direct, buffered = (DiskMeasurement.from_dict(d) if isinstance(d, dict) else d for d in (direct, buffered))
        self.synthetic: Dict[bool, List[Tuple[float, float]]] = {}
        for is_direct, d in ((True, direct), (False, buffered)):
            if d is not None and d.ok and _curve(d):
                self.synthetic[is_direct] = _curve(d)
        if direct is not None and direct.ok and not direct.direct:
            # the direct test fell back to buffered reads: there is no direct curve on this file system
            self.synthetic.pop(True, None)
            self.synthetic.setdefault(False, sorted((float(x.qd), float(x.bytes_per_s)) for x in direct.depths))
        self.engine = IOCalibration.from_dict(engine) if isinstance(engine, dict) else engine
        self.curves: Dict[IOKey, List[Tuple[float, float]]] = {d: c for d, c in self.synthetic.items()}
        self.sources: Dict[IOKey, str] = {d: DISK_TEST for d in self.curves}
        if self.engine is not None:
            for is_direct in (True, False):
                pts = self.engine.points(is_direct)
                if pts:
                    self.curves[is_direct] = calibrated_curve(pts, self.synthetic.get(is_direct))
                    self.sources[is_direct] = ENGINE
            pc = self.engine.pagecache_point()
            if pc is not None:  # one point: buffered I/O's shape (the disk test's) at the run's level
                self.curves[PAGECACHE] = calibrated_curve([pc], self.synthetic.get(False) or self.synthetic.get(True))
                self.sources[PAGECACHE] = ENGINE_PAGECACHE

    @property
    def ok(self) -> bool:
        return bool(self.curves)

    def has(self, key: IOKey) -> bool:
        return key in self.curves

    def _used(self, key: IOKey) -> Optional[IOKey]:
        """The curve ``key`` reads: its own, else the next in FALLBACK's order (None: no curve at all)."""
        return next((k for k in self.FALLBACK[key] if k in self.curves), None)

    def source(self, key: IOKey) -> Optional[str]:
        """Where the curve that ``bw(q, key)`` reads came from: ENGINE, ENGINE_PAGECACHE, DISK_TEST, None."""
        k = self._used(key)
        return None if k is None else self.sources[k]

    def bw(self, qd: Union[float, np.ndarray], key: IOKey) -> Union[float, np.ndarray]:
        k = self._used(key)
        if k is None:
            return np.full(np.shape(qd), np.nan) if np.ndim(qd) else float("nan")
        pts = self.curves[k]
        xs = np.array([p[0] for p in pts], dtype=float)
        ys = np.array([p[1] for p in pts], dtype=float)
        return np.interp(qd, xs, ys)

    def synthetic_bw(self, qd: float, direct: IOKey) -> Optional[float]:
        """The disk test's bandwidth at this queue depth (None: not measured; page cache: buffered's)."""
        d = bool(direct) if direct != PAGECACHE else False
        pts = self.synthetic.get(d) or self.synthetic.get(not d)
        if not pts:
            return None
        return float(np.interp(qd, [p[0] for p in pts], [p[1] for p in pts]))

    def read_time(self, misses: np.ndarray, expert_bytes: np.ndarray, n_tensors: np.ndarray, readers: int,
                  key: IOKey) -> np.ndarray:
        """Seconds to read `misses` experts of each layer (arrays broadcast per layer column): the
        reader pool runs min(readers, jobs) reads at a time."""
        jobs = misses * n_tensors
        q = np.clip(np.minimum(readers, jobs), 1, None)
        bw = self.bw(q, key)
        return np.where(misses > 0, misses * expert_bytes / bw, 0.0)

    def describe(self, key: IOKey, readers: Sequence[int] = ()) -> str:
        """One mode's bandwidth and its source, at these reader counts: 'engine: 1612 MB/s at 8 readers, ...
        (disk test: 909 MB/s at QD8, ...)'; page-cache mode without its own curve: 'buffered I/O's (engine): ...'."""
        src = self.source(key)
        if src is None:
            return "not measured"
        rs = sorted(set(int(r) for r in readers)) or [1, 4, 8]
        used = ", ".join(f"{_mbs(float(self.bw(r, key)))} at {r} reader{'s' if r != 1 else ''}" for r in rs)
        if key == PAGECACHE:
            if self.has(PAGECACHE):
                return f"{src} (effective: every cost of a miss, the reads and the faults): {used}"
            return f"{io_name(self._used(key) or False)} I/O's ({src}): {used}"
        if src != ENGINE:
            return f"{src}: {used}"
        syn = ", ".join(f"{_mbs(self.synthetic_bw(r, key))} at QD{r}" for r in rs)
        return f"{src}: {used}" + (f" (disk test: {syn})" if self.synthetic else "")

    def to_dict(self) -> Dict[str, Any]:
        """The curves the predictions use and their sources (the document's ``disk.used``)."""
        out: Dict[str, Any] = {}
        for d in (True, False, PAGECACHE):
            k = self._used(d)
            pts = self.curves[k] if k is not None else []
            out["direct" if d is True else "buffered" if d is False else "pagecache"] = {
                "source": self.source(d), "own_curve": d in self.curves, "curve": [list(p) for p in pts]}
        return out


@dataclass
class ComputeModel:
    """Seconds per token of the dense part and of one expert (per MoE layer), decode and prefill."""

    dense_decode_s: float = 0.0
    expert_decode_s: float = 0.0
    dense_prefill_s: float = 0.0
    expert_prefill_s: float = 0.0
    startup_s: float = 0.0  # process start + load, outside the timed phases
    non_cache_rss: Optional[int] = None  # peak RSS of a calibration run less its cache slots
    ok: bool = False
    note: str = ""
    runs: List[Dict[str, Any]] = field(default_factory=list)

    def decode_s(self, distinct: np.ndarray) -> np.ndarray:
        """Per ubatch: distinct [n_ub, n_layers] experts computed."""
        return self.dense_decode_s + distinct.sum(axis=1) * self.expert_decode_s

    def prefill_s(self, n_tokens: np.ndarray, rows: np.ndarray, waves: np.ndarray, k: int) -> np.ndarray:
        # each row's k experts are computed once whatever the waves (the CPU skips the zero slot's rows)
        return n_tokens * self.dense_prefill_s + rows.sum(axis=1) * k * self.expert_prefill_s

    def fit(self, got: Dict[int, Dict[str, float]], mf: ModelFacts) -> None:
        """From per-token times with k (the model's) and 1 experts per token: the dense part and one
        expert's share (with one point only, everything counts as dense)."""
        n_moe = max(1, len(mf.moe_layers))
        K = mf.n_used
        if K not in got:
            return
        self.ok = True
        if 1 in got and K > 1:
            self.expert_decode_s = max(0.0, (got[K]["decode_s"] - got[1]["decode_s"]) / ((K - 1) * n_moe))
            self.expert_prefill_s = max(0.0, (got[K]["prefill_s"] - got[1]["prefill_s"]) / ((K - 1) * n_moe))
        else:
            self.note = self.note or "one calibration point: the expert share of compute is unknown (counted as dense)"
        self.dense_decode_s = max(0.0, got[K]["decode_s"] - K * n_moe * self.expert_decode_s)
        self.dense_prefill_s = max(0.0, got[K]["prefill_s"] - K * n_moe * self.expert_prefill_s)


def constant_trace(path: str, mf: ModelFacts, k: int, n_tokens: int) -> None:
    """A routing trace that picks experts 0..k-1 in every layer for every token."""
    ids = np.tile(np.arange(k, dtype=np.int32), (n_tokens, len(mf.moe_layers), 1))
    write_trace(path, Trace(list(mf.moe_layers), mf.n_expert, ids, kind="constant"))


def _per_token(rec: RunRecord) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """A calibration run's compute per decode and prefill token (its stalls taken out), and its row."""
    rep, dec = rec.ok_report, rec.ok_result.decode
    tot = (rep.cache or {}).get("total") or {}
    dstall = dec.cache.stall_s
    pstall = max(0.0, tot.get("stall_s", 0.0) - dstall)
    t_dec = max(1e-9, (dec.s - dstall) / max(1, dec.tokens))
    t_pf = max(1e-9, (rep.prefill_s - pstall) / max(1, rep.prompt_tokens))
    row = {"decode_ms_per_token": 1000 * t_dec, "prefill_ms_per_token": 1000 * t_pf, "decode_stall_s": dstall,
           "prefill_stall_s": pstall, "load_s": rep.load_s, "wall_s": rec.wall_s, "peak_bytes": rec.peak_bytes}
    return {"decode_s": t_dec, "prefill_s": t_pf}, row


def calibrate_compute(settings_for: Callable[[Candidate], EngineSettings], mf: ModelFacts, threads: Optional[int],
                      n_ctx: int, tmp: str, clock: Clock, timeout: float) -> ComputeModel:
    """Warm-cache runs (constant routing: every access after the first token hits) with k and 1
    experts per token: per-token compute of the dense part and of one expert. Their peak RSS less
    their cache slots is what the process needs besides the experts on this machine."""
    cm = ComputeModel()
    got: Dict[int, Dict[str, float]] = {}
    for k in [mf.n_used] + ([1] if mf.n_used > 1 else []):
        if clock.left < 8:
            cm.note = "no time left for the compute calibration"
            break
        tpath = os.path.join(tmp, f"constant-k{k}.trace")
        constant_trace(tpath, mf, k, CAL_PROMPT + CAL_GEN)
        cand = Candidate("calibration", "cache", slots=max(mf.n_used, k), eviction="lru", readers=4, direct_io=False)
        s = settings_for(cand)
        if k != mf.n_used:
            s.runtime.n_expert_used = k
        spec = WorkerSpec(mf.path, s, prompt_tokens=CAL_PROMPT, gen_tokens=CAL_GEN, threads=threads,
                          n_ctx=n_ctx, routing_trace=tpath)
        clock.log(f"compute: warm-cache run with {k} expert{'s' if k > 1 else ''} per token ...")
        if os.environ.get(TEST_PAUSE_ENV):  # tests only: a fixed point where the tuner itself is busy
            time.sleep(float(os.environ[TEST_PAUSE_ENV]))
        rec = run_worker(spec, None, max(3.0, min(timeout, clock.left - 5)), measure=False)
        if not rec.ok:
            cm.note = f"calibration run with k={k} {rec.status}: {rec.detail or ''}"
            clock.log("  " + cm.note)
            break
        got[k], row = _per_token(rec)
        cm.runs.append({"k": k, **row})
        rep = rec.ok_report
        cm.startup_s = max(cm.startup_s, rec.wall_s - rep.prefill_s - rep.decode_s)
        if rep.peak_rss_bytes:
            cm.non_cache_rss = max(cm.non_cache_rss or 0, rep.peak_rss_bytes - cand.slots * mf.bytes_per_slot)
        clock.log(f"  {row['decode_ms_per_token']:.2f} ms per decode token, {row['prefill_ms_per_token']:.2f} ms per "
                  f"prefill token (load {rep.load_s:.1f} s)")
    cm.fit(got, mf)
    return cm


def _io_estimate(mf: ModelFacts, cm: ComputeModel, disk: DiskModel, key: IOKey, readers: int) -> float:
    """Seconds an I/O calibration run should take if every selection missed, at the disk test's bandwidth
    (200 MB/s where it has none): what its timeout is made from."""
    K, P, G = mf.n_used, IO_CAL_PROMPT, IO_CAL_GEN
    io_tok = io_pf = 0.0
    for l in mf.moe_layers:
        eb, nt = mf.expert_bytes[l], mf.n_tensors.get(l, 1)
        bw = float(disk.bw(min(readers, K * nt), key)) if disk.ok else float("nan")
        bw = bw if np.isfinite(bw) and bw > 0 else 200e6
        io_tok += K * eb / bw
        io_pf += min(mf.n_expert, P * K) * eb / bw
    n_moe = max(1, len(mf.moe_layers))
    comp_tok = (cm.dense_decode_s + K * n_moe * cm.expert_decode_s) if cm.ok else 0.05
    comp_pf = P * (cm.dense_prefill_s + K * n_moe * cm.expert_prefill_s) if cm.ok else 0.05 * P
    return (cm.startup_s or 5.0) + io_pf + comp_pf + G * (io_tok + comp_tok)


def calibration_sim(trace: Optional[Trace], mf: ModelFacts, slots: Optional[int] = None,
                    pc_capacity: Optional[int] = None) -> Optional[SimResult]:
    """The exact simulation of an I/O calibration run's workload on the trace: an LRU cache of ``slots`` per layer
    (None: k), or page-cache mode with ``pc_capacity`` bytes. None without a trace, or one the simulator cannot
    take."""
    if trace is None:
        return None
    try:
        ubs = engine_ubatches(IO_CAL_PROMPT, IO_CAL_GEN)
        if pc_capacity is not None:
            return simulate_pagecache(trace, ubs, int(pc_capacity), mf.expert_bytes, last_layer=mf.last_layer)
        return simulate(trace, ubs, int(slots or mf.n_used), "lru", last_layer=mf.last_layer,
                        expert_bytes=mf.expert_bytes)
    except Exception:  # noqa: BLE001 - a trace the simulator cannot take: the counters' estimate instead
        return None


def reads_in_flight(trace: Optional[Trace], mf: ModelFacts, readers: int, slots: Optional[int] = None,
                    pc_capacity: Optional[int] = None, sim: Optional[SimResult] = None) -> Optional[float]:
    """The reads in flight of an I/O calibration run's decode fetches: min(readers, slices to read) of each layer
    fetch that reads, weighted by its bytes, from the exact simulation of the run (``calibration_sim``: slots
    per layer, LRU, or page-cache mode; its workload on the trace). None without a trace, or when the simulation
    reads nothing. ``sim``: that simulation, when the caller has it already."""
    sim = sim if sim is not None else calibration_sim(trace, mf, slots, pc_capacity)
    if sim is None:
        return None
    sel = np.array([u.phase == "decode" for u in sim.ubatches])
    layers = [lc.layer for lc in sim.layers]
    nt = np.array([mf.n_tensors.get(l, 1) for l in layers], dtype=float)
    eb = np.array([mf.expert_bytes.get(l, 0) for l in layers], dtype=float)
    m = sim.misses[sel].astype(float)
    w = m * eb
    if not sel.any() or w.sum() <= 0:
        return None
    q = np.clip(np.minimum(readers, m * nt), 1, None)
    return float((q * w).sum() / w.sum())


def buffered_calibration_slots(sizes: Sequence[int], trace: Optional[Trace], mf: ModelFacts) -> Tuple[int, str]:
    """(slots per layer, why) of the buffered calibration runs: the largest cache of a buffered candidate
    (``sizes``), so that the page cache its buffered reads fill competes with the cache in the budget as in
    that candidate's runs; a cache whose run would read too little to be measured (the simulation of its
    workload misses under IO_CAL_MIN_MISS_SHARE of its decode accesses) gives way to the next smaller; k
    when none reads enough (or there is none)."""
    K = mf.n_used
    big = sorted({int(s) for s in sizes if int(s) > K}, reverse=True)
    share = f"{100 * IO_CAL_MIN_MISS_SHARE:.0f}%"
    too_little: List[str] = []
    for s in big:
        sim = calibration_sim(trace, mf, slots=s)
        if sim is None or 1.0 - sim.hit_rate("decode") >= IO_CAL_MIN_MISS_SHARE:
            if not too_little:
                return s, "the largest buffered candidate's cache"
            return s, ("the largest buffered candidate's cache whose run reads enough: with "
                       + ", ".join(too_little) + f" slots it would miss under {share} of its decode accesses")
        too_little.append(str(s))
    if not too_little:
        return K, "k: no buffered candidate has a larger cache"
    return K, ("k: with the buffered candidates' caches (" + ", ".join(too_little)
               + f" slots) it would miss under {share} of its decode accesses")


def effective_capacity(trace: Trace, mf: ModelFacts, hit_rate: float) -> int:
    """The page-cache room (bytes) whose simulation of the calibration's workload gives this decode hit rate (the
    smallest that reaches it, to one expert; a hit rate above what the whole model gives: every expert's
    bytes)."""
    ubs = engine_ubatches(IO_CAL_PROMPT, IO_CAL_GEN)

    def hit(cap: int) -> float:
        return simulate_pagecache(trace, ubs, cap, mf.expert_bytes, last_layer=mf.last_layer).hit_rate("decode")

    step = max(1, min(mf.expert_bytes.values()))
    lo, hi = 0, mf.n_expert * sum(mf.expert_bytes.values())
    if hit(hi) < hit_rate:
        return hi
    while hi - lo > step:
        mid = (lo + hi) // 2
        if hit(mid) >= hit_rate:
            hi = mid
        else:
            lo = mid
    return hi


def _decode_compute(cm: ComputeModel, sim: Optional[SimResult], mf: ModelFacts, tokens: int) -> Optional[float]:
    """The compute model's seconds for a calibration run's decode phase of ``tokens`` tokens (None: no model)."""
    if not cm.ok:
        return None
    if sim is not None:
        sel = np.array([u.phase == "decode" for u in sim.ubatches])
        if sel.any():
            return float(np.mean(cm.decode_s(sim.distinct[sel].astype(float)))) * tokens
    return (cm.dense_decode_s + mf.n_used * len(mf.moe_layers) * cm.expert_decode_s) * tokens


def _io_worker(spec: WorkerSpec, limit: Optional[int], timeout: float) -> RunRecord:
    """One I/O calibration run (a seam for the tests: a run that fails)."""
    return run_worker(spec, limit, timeout, measure=limit is not None)


def io_plan(readers: Sequence[int], modes: Sequence[bool], pagecache: bool = False) -> List[Tuple[IOKey, int]]:
    """(I/O mode, readers) of the I/O calibration runs, most useful first: the main mode (direct I/O when the
    disk has it) at the most readers, the other mode at the most readers, page-cache mode at the most readers
    (with ``pagecache``), then the main mode at the other reader counts (the other modes' other counts follow
    the disk test's shape: ``calibrated_curve``)."""
    rs = sorted(set(int(r) for r in readers), reverse=True)
    ms = [m for m in (True, False) if m in modes]
    if not rs:
        return []
    pc: List[Tuple[IOKey, int]] = [(PAGECACHE, rs[0])] if pagecache else []
    if not ms:
        return pc
    first: List[Tuple[IOKey, int]] = [(m, rs[0]) for m in ms]
    rest: List[Tuple[IOKey, int]] = [(ms[0], r) for r in rs[1:]]
    return first + pc + rest


def calibrate_io(settings_for: Callable[[Candidate], EngineSettings], mf: ModelFacts, threads: Optional[int],
                 n_ctx: int, trace_path: str, readers: Sequence[int], modes: Sequence[bool], limit: Optional[int],
                 disk: DiskModel, cm: ComputeModel, clock: Clock, allowance: float,
                 trace: Optional[Trace] = None, buffered_slots: Optional[int] = None,
                 pc_capacity: Optional[int] = None, buffered_why: str = "") -> IOCalibration:
    """The engine's own reads: short runs routed by the tune's trace, reads ahead off, one per (I/O mode, reader
    count) of ``io_plan``, each in a fresh process confined to ``limit`` bytes (None: not confined) with the model
    file evicted from the page cache first, as the validation runs are. Direct I/O streams with k slots per layer
    (nearly every selection a miss); buffered I/O with ``buffered_slots`` (None: k): the largest buffered
    candidate's cache, so that the page cache its reads fill competes with the cache in the budget as in that
    candidate's runs; with ``pc_capacity`` (the page cache's modelled room), one page-cache-mode run. Of each, the
    decode phase's bytes read over the reader pool's busy time, at the reads in flight its fetches kept
    (``reads_in_flight`` from the trace when given); of the page-cache run also its effective bandwidth (bytes
    over the decode time less the compute model's) and its decode hit rate against the simulation's: further
    apart than PC_HIT_TOLERANCE, ``pc_effective_capacity`` is the room that gives the measured one. The runs stop
    when ``allowance`` seconds are spent (those not run are said in ``note``)."""
    cal = IOCalibration(allowance_s=allowance)
    t0 = clock.elapsed
    plan = io_plan(readers, modes, pagecache=pc_capacity is not None and pc_capacity > 0)
    K = mf.n_used
    b_slots = int(buffered_slots or K)
    if any(k is False for k, _ in plan):
        cal.buffered_slots, cal.buffered_why = b_slots, buffered_why
    if not plan:
        cal.note = "nothing to calibrate"
        return cal

    def slots_of(key: IOKey) -> int:
        return 0 if key == PAGECACHE else b_slots if key is False else K

    what = ", ".join(f"{io_name(k)} x{r}" + (f" ({slots_of(k)} slots)" if k != PAGECACHE else "") for k, r in plan)
    clock.log(f"disk (engine): short runs, {IO_CAL_PROMPT}-token prompt, {IO_CAL_GEN} generated"
              + (f", under {format_size(limit)}" if limit is not None else "")
              + f", at most {allowance:.0f} s: {what} ...")
    if any(k is True for k, _ in plan):
        clock.log(f"  direct I/O with {K} slots per layer (nearly every expert read)")
    if cal.buffered_slots is not None:
        clock.log(f"  buffered I/O with {b_slots} slots per layer" + (f" ({buffered_why})" if buffered_why else "")
                  + ": the page cache its reads fill competes with that cache under the budget, as in the buffered "
                  "candidates' runs")
    done: List[float] = []
    skipped: List[str] = []
    for key, r in plan:
        pcm = key == PAGECACHE
        direct = key is True
        run = EngineRead(direct, r, slots_of(key), confined=limit is not None, pagecache=pcm)
        cal.runs.append(run)
        left = allowance - (clock.elapsed - t0)
        est = _io_estimate(mf, cm, disk, key, r)
        if done:
            est = min(est, 1.5 * max(done) + 2.0)
        if left < 3.0 or est > left:
            run.detail = f"not run: about {est:.0f} s needed, {max(0.0, left):.0f} s left of the calibration's share"
            skipped.append(run.label)
            continue
        cand = (Candidate("io-calibration", "pagecache", readers=r, direct_io=False) if pcm else
                Candidate("io-calibration", "cache", slots=run.slots, eviction="lru", readers=r, direct_io=direct))
        try:
            settings = settings_for(cand)
        except Exception as e:  # noqa: BLE001 - a policy that does not resolve: this run fails, the tune goes on
            run.status, run.detail = "FAILED", f"its policy does not resolve: {e}"
            clock.log(f"  {run.label}: {run.status}: {run.detail}")
            continue
        spec = WorkerSpec(mf.path, settings, prompt_tokens=IO_CAL_PROMPT, gen_tokens=IO_CAL_GEN,
                          threads=threads, n_ctx=n_ctx, routing_trace=trace_path)
        run.model_evicted = evict_file(mf.model.files) is None
        run.timeout_s = float(min(left, max(10.0, 2.5 * est + 5.0)))
        rec = _io_worker(spec, limit, run.timeout_s)
        sim = calibration_sim(trace, mf, pc_capacity=pc_capacity) if pcm else calibration_sim(trace, mf, slots=run.slots)
        run.take(rec, mf, reads_in_flight(trace, mf, r, sim=sim) if sim is not None else None)
        if rec.ok:
            done.append(rec.wall_s)
        if pcm and rec.ok:
            _take_pagecache(cal, run, sim, trace, mf, cm, int(pc_capacity or 0), clock)
        elif run.bytes_per_s:
            syn = disk.synthetic_bw(run.qd or r, direct)
            clock.log(f"  {run.label}: {_mbs(run.bytes_per_s)} ({format_size(run.bytes_read)} in "
                      f"{run.read_wall_s:.2f} s of reader time over {run.decode_tokens} tokens, "
                      f"{run.qd:.1f} reads in flight; disk test {_mbs(syn)}), run {rec.wall_s:.1f} s")
        else:
            clock.log(f"  {run.label}: {run.status}: {run.detail or ''}")
    cal.s = clock.elapsed - t0
    if skipped:
        cal.note = "no time for " + "; ".join(skipped)
    return cal


def _take_pagecache(cal: IOCalibration, run: EngineRead, sim: Optional[SimResult], trace: Optional[Trace],
                    mf: ModelFacts, cm: ComputeModel, capacity: int, clock: Clock) -> None:
    """The page-cache run's effective bandwidth, its hit rate against the simulation's (``sim``: the simulation of
    its workload, ``calibration_sim``) and, when they are far apart, the effective capacity; said in the progress
    lines."""
    run.take_effective(_decode_compute(cm, sim, mf, run.decode_tokens))
    cal.pc_capacity = capacity
    if sim is not None:
        run.sim_hit_rate = sim.hit_rate("decode")
    hit = "-" if run.hit_rate is None else f"{100 * run.hit_rate:.1f}%"
    sim_hit = "-" if run.sim_hit_rate is None else f"{100 * run.sim_hit_rate:.1f}%"
    if run.effective_bytes_per_s:
        comp = f", {run.compute_s:.2f} s of it compute by the model" if run.compute_s is not None else ""
        clock.log(f"  {run.label}: effective {_mbs(run.effective_bytes_per_s)} ({format_size(run.bytes_read)} read "
                  f"over {run.decode_tokens} tokens in {run.decode_s:.2f} s of decode{comp}; the reader pool "
                  f"{_mbs(run.bytes_per_s)}, {run.qd or 0:.1f} reads in flight), decode hit {hit} (simulated "
                  f"{sim_hit} with {format_size(capacity)} of page cache), run {run.wall_s:.1f} s")
    else:
        clock.log(f"  {run.label}: no bandwidth ({run.detail or 'nothing read'}), decode hit {hit} (simulated "
                  f"{sim_hit} with {format_size(capacity)} of page cache), run {run.wall_s:.1f} s")
    if (trace is not None and run.hit_rate is not None and run.sim_hit_rate is not None
            and abs(run.hit_rate - run.sim_hit_rate) > PC_HIT_TOLERANCE):
        cal.pc_effective_capacity = cap = effective_capacity(trace, mf, run.hit_rate)
        whole = cap >= mf.n_expert * sum(mf.expert_bytes.values())
        clock.log(f"  the page cache hit {hit} where the simulation says {sim_hit}: the page-cache candidates are "
                  f"simulated with {format_size(cap)} " + ("(every expert: no room gives that much in the simulation)"
                                                          if whole else f"(the room that gives {hit})")
                  + f" instead of {format_size(capacity)}")
