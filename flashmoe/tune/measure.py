"""What the tuner measures on this machine: the disk (read bandwidth against queue depth, direct and
buffered: the bench's disk test) and the compute (warm-cache runs of the engine: per-token time of
the dense part and of one expert), and the models the predictions use."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from flashmoe.bench.disk import DiskMeasurement, disk_test
from flashmoe.bench.runner import RunRecord, run_worker
from flashmoe.settings import EngineSettings
from flashmoe.trace import Trace, write_trace
from flashmoe.tune.candidates import Candidate
from flashmoe.tune.model import ModelFacts
from flashmoe.tune.options import Clock
from flashmoe.worker import WorkerSpec

CAL_PROMPT = 32  # tokens of the compute calibration runs
# tests only (tests/test_tune.py's Ctrl-C test): seconds the tuner sleeps after announcing a calibration run,
# so that a signal finds it in its own code and not in a child that may already have finished
TEST_PAUSE_ENV = "FLASHMOE_TUNE_TEST_PAUSE"
CAL_GEN = 24


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


def _curve(d: DiskMeasurement) -> List[Tuple[int, float]]:
    return sorted((int(x.qd), float(x.bytes_per_s)) for x in d.depths if x.bytes_per_s > 0)


Measured = Union[DiskMeasurement, Dict[str, Any], None]


class DiskModel:
    """Read bandwidth against queue depth (piecewise linear between the measured depths)."""

    def __init__(self, direct: Measured, buffered: Measured):
        direct, buffered = (DiskMeasurement.from_dict(d) if isinstance(d, dict) else d for d in (direct, buffered))
        self.curves: Dict[bool, List[Tuple[int, float]]] = {}
        for is_direct, d in ((True, direct), (False, buffered)):
            if d is not None and d.ok and _curve(d):
                self.curves[is_direct] = _curve(d)
        if direct is not None and direct.ok and not direct.direct:
            # the direct test fell back to buffered reads: there is no direct curve on this file system
            self.curves.pop(True, None)
            self.curves.setdefault(False, sorted((int(x.qd), float(x.bytes_per_s)) for x in direct.depths))

    @property
    def ok(self) -> bool:
        return bool(self.curves)

    def has(self, direct: bool) -> bool:
        return direct in self.curves

    def bw(self, qd: Union[float, np.ndarray], direct: bool) -> Union[float, np.ndarray]:
        pts = self.curves.get(direct) or self.curves.get(not direct)
        if not pts:
            return np.full(np.shape(qd), np.nan) if np.ndim(qd) else float("nan")
        xs = np.array([p[0] for p in pts], dtype=float)
        ys = np.array([p[1] for p in pts], dtype=float)
        return np.interp(qd, xs, ys)

    def read_time(self, misses: np.ndarray, expert_bytes: np.ndarray, n_tensors: np.ndarray, readers: int,
                  direct: bool) -> np.ndarray:
        """Seconds to read `misses` experts of each layer (arrays broadcast per layer column): the
        reader pool runs min(readers, jobs) reads at a time."""
        jobs = misses * n_tensors
        q = np.clip(np.minimum(readers, jobs), 1, None)
        bw = self.bw(q, direct)
        return np.where(misses > 0, misses * expert_bytes / bw, 0.0)


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
