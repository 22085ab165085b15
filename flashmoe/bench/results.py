"""The figures of a run and of a configuration: per-run metrics (decode phase per token, I/O bound),
the bench's run records, and the summary row of each configuration at each budget (median, min,
max over the completed runs)."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from flashmoe.bench.configs import Plan, budget_text, planned_mode_line
from flashmoe.bench.disk import DiskMeasurement, disk_bw_for
from flashmoe.bench.runner import OfRecord, RunRecord
from flashmoe.sizes import MiB

METRICS = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "disk_mib_per_token", "major_faults_per_token",
           "hit_rate", "stall_ms_per_token", "expert_mib_per_token", "peak_mib", "io_bound_tok_s", "io_fraction")


@dataclass
class RunMetrics:
    """The reported figures of one completed run (per token figures are of the decode phase)."""

    load_s: float
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    generated_tokens: int
    decode_tokens: int
    disk_mib_per_token: float
    major_faults_per_token: float
    hit_rate: Optional[float] = None  # None: no expert cache
    stall_ms_per_token: Optional[float] = None
    expert_mib_per_token: Optional[float] = None
    peak_mib: Optional[float] = None
    # the I/O bound of decode: tokens / the time the engine's reader pool was busy with their reads
    # ("engine reads": the bandwidth the engine's own read pattern got, so a run never exceeds it), or,
    # without the engine's read timing (page-cache mode), disk-test bandwidth / bytes read per token
    io_bound_tok_s: Optional[float] = None
    io_fraction: Optional[float] = None  # decode tok/s / io_bound_tok_s: the share of decode time spent reading
    io_bound_qd: Optional[int] = None
    io_bound_source: Optional[str] = None  # "engine reads" | "disk test"
    disk_bound_tok_s: Optional[float] = None  # the disk test's bound, for comparison
    read_mb_s: Optional[float] = None  # bandwidth of the engine's reads while the pool was busy

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def run_metrics(rec: RunRecord, streaming: bool, readers: int, disk: Optional[DiskMeasurement]) -> RunMetrics:
    """The figures of a completed run; the I/O bound of a streaming run from the disk measurement."""
    rep, dec = rec.ok_report, rec.ok_result.decode
    n = max(1, dec.tokens)
    c = dec.cache
    acc = c.hits + c.misses
    has_cache = bool((rep.cache or {}).get("total")) and acc > 0
    m = RunMetrics(
        load_s=rep.load_s, ttft_s=rep.ttft_s, prefill_tok_s=rep.prefill_tok_s, decode_tok_s=rep.decode_tok_s,
        generated_tokens=rep.generated_tokens, decode_tokens=dec.tokens,
        disk_mib_per_token=dec.disk_read_bytes / n / MiB, major_faults_per_token=dec.major_faults / n,
        hit_rate=(c.hits / acc) if has_cache else None,
        stall_ms_per_token=(1000 * c.stall_s / n) if has_cache else None,
        expert_mib_per_token=(c.bytes_read / n / MiB) if has_cache else None,
        peak_mib=rec.peak_bytes / MiB if rec.peak_bytes else None,
    )
    if streaming:
        per_tok = c.bytes_read / n if has_cache and c.bytes_read else dec.disk_read_bytes / n
        bw, m.io_bound_qd = disk_bw_for(disk, readers)
        if bw and per_tok > 0:
            m.disk_bound_tok_s = bw / per_tok
        if has_cache and c.read_wall_s > 0 and c.bytes_read > 0:
            m.io_bound_tok_s, m.io_bound_source = n / c.read_wall_s, "engine reads"
            m.read_mb_s = c.bytes_read / c.read_wall_s / 1e6
        elif m.disk_bound_tok_s:
            m.io_bound_tok_s, m.io_bound_source = m.disk_bound_tok_s, "disk test"
        if m.io_bound_tok_s:
            m.io_fraction = rep.decode_tok_s / m.io_bound_tok_s
    return m


def first_difference(a: List[int], b: List[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class BenchRun(OfRecord):
    """One run of the bench: the worker's record, where it stands in the alternation, its figures and
    whether its output equals the reference's."""

    record: RunRecord
    seq: int
    round: int
    config: str
    budget: Optional[int]
    page_cache: Dict[str, Any] = field(default_factory=dict)  # what was done to the page cache before it
    mode_line: Optional[str] = None
    metrics: Optional[RunMetrics] = None
    identical: Optional[bool] = None  # None: no reference to compare with
    first_difference: Optional[int] = None

    @property
    def tokens(self) -> List[int]:
        return self.record.result.tokens if self.record.result is not None else []

    def to_dict(self) -> Dict[str, Any]:
        d = self.record.to_dict()
        d.update(seq=self.seq, round=self.round, config=self.config, budget=self.budget, page_cache=self.page_cache)
        if not self.record.ok:
            d["mode_line"] = self.mode_line
            return d
        d.update(metrics=self.metrics.to_dict() if self.metrics is not None else None, tokens=self.tokens,
                 mode_line=self.mode_line, identical=self.identical)
        if self.identical is not None:
            d["first_difference"] = self.first_difference
        return d


def aggregate(values: List[Optional[float]]) -> Optional[Dict[str, float]]:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def _status(counts: Dict[str, int]) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return "MIXED" if counts else "not run"


def _failures(s: Dict[str, Any], bad: List[BenchRun]) -> None:
    """The summary's detail, partial decode rate and peak from the runs that did not complete."""
    s["detail"] = "; ".join(f"run #{r.seq}: {r.status}: {r.record.detail or ''}" for r in bad[:3]) + (
        f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
    partial = [r.record.progress.partial_decode_tok_s for r in bad if r.status == "TIMEOUT"]
    to = [x for x in partial if x]
    if to:
        s["partial_decode_tok_s"] = statistics.median(to)
    s["peak_mib_failed"] = aggregate([r.record.peak_bytes / MiB if r.record.peak_bytes else None for r in bad])


def summarize(p: Plan, runs: List[BenchRun], routing_trace: Optional[str], n_expert_used: int) -> Dict[str, Any]:
    """The summary row (JSON) of one configuration at one budget."""
    s: Dict[str, Any] = {"config": p.config.name, "budget": p.budget, "budget_text": budget_text(p.budget),
                         "kind": p.config.kind, "runs": len(runs), "counts": {}, "metrics": {},
                         "identical": None, "first_difference": None, "detail": None, "mode_line": None}
    if not p.config.applicable:
        s["status"], s["detail"] = "n/a", p.config.reason
        return s
    if p.error:
        s["status"], s["detail"] = "POLICY ERROR", p.error
        return s
    for r in runs:
        s["counts"][r.status] = s["counts"].get(r.status, 0) + 1
    ok = [r for r in runs if r.record.ok]
    if ok:
        s["mode_line"] = ok[0].mode_line
    elif p.settings is not None:
        s["mode_line"] = planned_mode_line(p.settings, routing_trace, n_expert_used)
    s["status"] = _status(s["counts"])
    for k in METRICS:
        s["metrics"][k] = aggregate([getattr(r.metrics, k) for r in ok])
    idents = [r.identical for r in ok]
    if any(i is False for i in idents):
        s["identical"] = False
        s["first_difference"] = min(r.first_difference for r in ok
                                    if r.identical is False and r.first_difference is not None)
    elif ok and all(i is True for i in idents):
        s["identical"] = True
    bad = [r for r in runs if not r.record.ok]
    if bad:
        _failures(s, bad)
    return s
