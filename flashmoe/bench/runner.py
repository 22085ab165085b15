"""Running measured workers (``flashmoe.worker``), for bench and tune alike: the parent's side.

``run_worker(spec, limit, timeout, measure)`` writes the spec to a temporary file, starts
``python -m flashmoe.worker @FILE`` (inside a memory cgroup of ``limit`` bytes, or one that only
measures), and turns what comes back (the worker's progress and result lines, its exit, the cgroup's
peak and OOM kill, the timeout) into a :class:`RunRecord` whose status is ``ok``, ``TIMEOUT``,
``OOM`` or ``FAILED``, with how far a killed run got (:class:`Progress`).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from flashmoe.cgroup import LimitedResult, run_limited
from flashmoe.machine import child_env
from flashmoe.engine import RunReport
from flashmoe.sizes import format_size
from flashmoe.worker import PROGRESS_TAG, RESULT_TAG, WorkerResult, WorkerSpec

WORKER_MODULE = "flashmoe.worker"
MEASURE_ONLY_LIMIT = 1 << 50  # a cgroup that only measures (no real limit)


@dataclass
class Progress:
    """How far a run got, from its progress lines: stage, load time, prefill, decode steps done."""

    stage: str = "starting"
    load_s: Optional[float] = None
    prefill_s: Optional[float] = None
    decode_steps: int = 0
    generated: int = 0
    partial_decode_tok_s: Optional[float] = None
    last_t: Optional[float] = None

    @classmethod
    def of(cls, lines: List[Dict[str, Any]]) -> "Progress":
        out = cls()
        t_loaded = t_prefill = None
        for p in lines:
            out.last_t = p.get("t")
            if p["stage"] == "start":
                out.stage = "loading"
            elif p["stage"] == "loaded":
                out.stage, out.load_s, t_loaded = "prefill", p.get("load_s"), p["t"]
            elif p["stage"] == "eval" and p.get("i") == 1:
                out.stage, t_prefill, out.generated = "decode", p["t"], 1
                out.prefill_s = (t_prefill - t_loaded) if t_loaded is not None else None
            elif p["stage"] == "eval":
                out.decode_steps, out.generated = p["i"] - 1, p["i"]
        if out.decode_steps and t_prefill is not None and out.last_t is not None and out.last_t > t_prefill:
            out.partial_decode_tok_s = out.decode_steps / (out.last_t - t_prefill)
        return out

    def describe(self, n_prompt: int, n_gen: int) -> str:
        if self.stage == "starting":
            return "before the model load began (starting Python and the libraries)"
        if self.stage == "loading":
            return "during load"
        bits = [f"loaded in {self.load_s:.1f} s" if self.load_s is not None else "loaded"]
        if self.stage == "prefill":
            bits.append(f"during the prefill of {n_prompt} tokens")
            return ", ".join(bits)
        if self.prefill_s is not None:
            bits.append(f"prefill of {n_prompt} tokens in {self.prefill_s:.1f} s")
        bits.append(f"{self.generated}/{n_gen} tokens generated")
        if self.partial_decode_tok_s:
            bits.append(f"decoding at {self.partial_decode_tok_s:.3g} tok/s")
        return ", ".join(bits)


@dataclass
class RunRecord:
    """One worker run as the parent saw it."""

    status: str  # "ok" | "TIMEOUT" | "OOM" | "FAILED"
    returncode: int = 0
    wall_s: float = 0.0
    peak_bytes: Optional[int] = None
    peak_source: Optional[str] = None  # "cgroup" | "rss"
    oom_killed: bool = False
    timed_out: bool = False
    progress: Progress = field(default_factory=Progress)
    detail: Optional[str] = None  # what went wrong
    result: Optional[WorkerResult] = None  # what the worker reported (ok runs)
    stderr_tail: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def ok_result(self) -> WorkerResult:
        """What the worker reported, of a completed run (a ValueError for one that did not complete)."""
        if self.result is None or not self.result.ok:
            raise ValueError(f"the run did not complete ({self.status}): it has no result")
        return self.result

    @property
    def ok_report(self) -> RunReport:
        """The engine's report of a completed run (a ValueError for one that did not complete)."""
        rep = self.ok_result.report
        if rep is None:  # pragma: no cover - a successful worker result always has its report
            raise ValueError("a successful worker result has no report")
        return rep

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"returncode": self.returncode, "wall_s": self.wall_s, "peak_bytes": self.peak_bytes,
                             "peak_source": self.peak_source, "oom_killed": self.oom_killed,
                             "timed_out": self.timed_out, "progress": asdict(self.progress), "status": self.status}
        if self.result is not None and self.ok:
            d["result"] = self.result.to_dict()
        if self.detail is not None:
            d["detail"] = self.detail
        if self.stderr_tail is not None:
            d["stderr_tail"] = self.stderr_tail
        return d


class OfRecord:
    """What wraps a run's record (a bench run, a tuner's validation run): its status is the record's."""

    record: RunRecord

    @property
    def status(self) -> str:
        return self.record.status


def parse_worker_output(stdout: str) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
    """(the result line as a dict or None, the progress lines)."""
    result, prog = None, []
    for line in stdout.splitlines():
        tag = RESULT_TAG if line.startswith(RESULT_TAG) else PROGRESS_TAG if line.startswith(PROGRESS_TAG) else None
        if tag is None:
            continue
        try:
            value = json.loads(line[len(tag):])
        except ValueError:
            continue
        if tag == RESULT_TAG:
            result = value
        else:
            prog.append(value)
    return result, prog


def _launch(spec: WorkerSpec, cg_limit: Optional[int], timeout: float) -> LimitedResult:
    fd, spec_path = tempfile.mkstemp(prefix="flashmoe-worker-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(spec.to_dict(), f)
        cmd = [sys.executable, "-m", WORKER_MODULE, "@" + spec_path]
        return run_limited(cmd, cg_limit, timeout=timeout, env=child_env())
    finally:
        try:
            os.unlink(spec_path)
        except OSError:
            pass


def run_worker(spec: WorkerSpec, limit: Optional[int], timeout: float, measure: bool) -> RunRecord:
    """One worker process; limit None: unconfined (in a measuring cgroup when `measure`)."""
    cg_limit = limit if limit is not None else (MEASURE_ONLY_LIMIT if measure else None)
    r = _launch(spec, cg_limit, timeout)
    raw, prog = parse_worker_output(r.stdout or "")
    result = WorkerResult.from_dict(raw) if raw is not None else None
    rec = RunRecord("FAILED", returncode=r.returncode, wall_s=r.wall_s, peak_bytes=r.peak_bytes,
                    peak_source="cgroup" if r.peak_bytes is not None else None,
                    oom_killed=bool(r.oom) if limit is not None else False, timed_out=r.timed_out,
                    progress=Progress.of(prog))
    how_far = rec.progress.describe(spec.prompt_tokens, spec.gen_tokens)
    if result is not None and result.ok:
        rec.status, rec.result = "ok", result
        if rec.peak_bytes is None:
            rec.peak_bytes, rec.peak_source = rec.ok_report.peak_rss_bytes, "rss"
    elif r.timed_out:
        rec.status, rec.detail = "TIMEOUT", f"killed after {timeout:g} s " + how_far
    elif limit is not None and r.oom:
        rec.status, rec.detail = "OOM", f"killed by the {format_size(limit)} memory limit " + how_far
    elif result is not None:
        rec.detail = result.error
    else:
        how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
        tail = (r.stderr or "").strip().splitlines()[-3:]
        rec.detail = f"the worker died ({how}) " + how_far + (": " + " | ".join(tail) if tail else "")
    if not rec.ok:
        rec.stderr_tail = (r.stderr or "")[-2000:]
    return rec
