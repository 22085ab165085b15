"""One measured run in a fresh process: load, prefill, decode, report as JSON on stdout.

    python -m flashmoe.worker @spec.json
    python -m flashmoe.worker '{"model": "...", "settings": {...}, "prompt_tokens": 64, "gen_tokens": 128}'

Started by ``flashmoe.bench.runner.run_worker`` for every measured run of bench and tune (bench runs,
the reference run, tune's calibration, recording and validation runs), inside a memory cgroup when
there is a budget. It imports no more than the engine needs: its start is part of every run's time.

The protocol, both sides: the spec is a :class:`WorkerSpec` as a dict; the worker prints
``PROGRESS_TAG{json}`` lines while it runs (stage "start", "loaded", then "eval" after each llama.cpp
evaluation: i=1 is the prefill, i>=2 decode steps), flushed, so a run killed by the memory limit or
the timeout still says how far it got, and one ``RESULT_TAG{json}`` line at the end: a
:class:`WorkerResult` (tokens, the RunReport, the decode phase's own figures, the engine's info and
mode line, the settings as run; or ok false and the error).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional

from flashmoe.engine import Engine, RunReport
from flashmoe.errors import FlashMoEError
from flashmoe.metrics import ProcessCounters
from flashmoe.settings import EngineSettings, RuntimeSettings, StreamSettings

RESULT_TAG = "@@FLASHMOE_RESULT@@"
PROGRESS_TAG = "@@FLASHMOE_PROGRESS@@"
_T0 = time.perf_counter()  # wall_s and the progress lines' times count from here (the imports done)


def settings_from_dict(d: Dict[str, Any]) -> EngineSettings:
    """An EngineSettings from its asdict() form."""
    d = dict(d)
    stream = StreamSettings(**d.pop("stream", {}) or {})
    runtime = RuntimeSettings(**d.pop("runtime", {}) or {})
    return EngineSettings(stream=stream, runtime=runtime, **d)


@dataclass
class WorkerSpec:
    """What one worker runs: load the model with ``settings``, prefill, generate ``gen_tokens``."""

    model: str
    settings: EngineSettings
    prompt_tokens: int = 64  # a deterministic prompt of exactly this many tokens; with `prompt`, at most
    gen_tokens: int = 128
    threads: Optional[int] = None
    n_ctx: Optional[int] = None  # None: max(256, prompt + generated + 16)
    routing_trace: Optional[str] = None  # force the routing from this trace
    prompt: Optional[str] = None  # a text prompt instead of the deterministic one
    record_trace: Optional[str] = None  # record the routing and save it to this path

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "WorkerSpec":
        return cls(**{**d, "settings": settings_from_dict(d["settings"])})


@dataclass
class CacheTotals:
    """The expert cache's counters summed over the layers (Engine.stats()["total"])."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    stall_s: float = 0.0
    read_wall_s: float = 0.0  # wall time the reader pool was busy (overlapping batches share it)
    n_prefetched: int = 0
    n_prefetch_used: int = 0
    n_prefetch_cancelled: int = 0
    n_predicted: int = 0
    n_predicted_right: int = 0

    @classmethod
    def of(cls, stats: Optional[Dict[str, Any]]) -> "CacheTotals":
        t = (stats or {}).get("total") or {}
        return cls(**{k: t.get(k, 0) for k in _CACHE_KEYS})

    def minus(self, other: "CacheTotals") -> "CacheTotals":
        return CacheTotals(**{k: getattr(self, k) - getattr(other, k) for k in _CACHE_KEYS})


_CACHE_KEYS = tuple(f.name for f in fields(CacheTotals))  # the counters summed over layers, as Engine.stats() names them


@dataclass
class DecodeFigures:
    """The decode phase alone: from the first generated token to the last."""

    tokens: int = 0
    s: float = 0.0
    disk_read_bytes: int = 0
    major_faults: int = 0
    cache: CacheTotals = field(default_factory=CacheTotals)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DecodeFigures":
        return cls(**{**d, "cache": CacheTotals(**d["cache"])})


@dataclass
class WorkerResult:
    """A worker's result line: the run's tokens and figures, or ``ok`` False and ``error``."""

    ok: bool
    error: Optional[str] = None
    tokens: List[int] = field(default_factory=list)
    report: Optional[RunReport] = None
    decode: DecodeFigures = field(default_factory=DecodeFigures)
    info: Optional[Dict[str, Any]] = None  # the engine's (None for a stock run without the hook)
    mode_line: Optional[str] = None
    settings: Dict[str, Any] = field(default_factory=dict)  # as run; placements counted, not listed
    wall_s: float = 0.0  # since the worker module was loaded (its imports done)
    trace_tokens: Optional[int] = None  # tokens of the recorded routing trace (spec.record_trace)

    def to_dict(self) -> Dict[str, Any]:
        if not self.ok:
            return {"ok": False, "error": self.error}
        if self.report is None:  # pragma: no cover - run() gives every successful result its report
            raise ValueError("a successful worker result has no report")
        d = {"ok": True, "tokens": self.tokens, "report": self.report.to_dict(), "decode": asdict(self.decode),
             "info": self.info, "mode_line": self.mode_line, "settings": self.settings, "wall_s": self.wall_s}
        if self.trace_tokens is not None:
            d["trace_tokens"] = self.trace_tokens
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "WorkerResult":
        if not d.get("ok"):
            return cls(False, error=d.get("error", "failed"))
        return cls(True, tokens=d["tokens"], report=RunReport(**d["report"]),
                   decode=DecodeFigures.from_dict(d["decode"]), info=d.get("info"), mode_line=d["mode_line"],
                   settings=d.get("settings") or {}, wall_s=d.get("wall_s", 0.0), trace_tokens=d.get("trace_tokens"))


def progress(stage: str, **kw: Any) -> None:
    sys.stdout.write(PROGRESS_TAG + json.dumps({"stage": stage, "t": time.perf_counter() - _T0, **kw}) + "\n")
    sys.stdout.flush()


def prompt_token_ids(engine: Engine, n: int) -> List[int]:
    """A deterministic prompt of exactly n tokens (text tokens, BOS first)."""
    text = ("In the beginning the universe was created. This has made a lot of people very angry "
            "and been widely regarded as a bad move. ") * (1 + n // 8)
    toks = engine.tokenize(text)
    while len(toks) < n:
        toks = toks + toks[1:]
    return toks[:n]


class _DecodeProbe:
    """Wraps the model's eval: a progress line after each evaluation, and the process and cache
    counters when the decode phase starts (before the second evaluation)."""

    def __init__(self, eng: Engine):
        self.eng = eng
        self.llama = eng.llama
        self.n_eval = 0
        self.at_decode: Dict[str, Any] = {}
        self._eval = self.llama.eval

    def __enter__(self) -> "_DecodeProbe":
        self.llama.eval = self._wrapped
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            del self.llama.eval
        except AttributeError:
            pass

    def _wrapped(self, tokens):
        self.n_eval += 1
        if self.n_eval == 2:  # the first decode step: the prefill and the first token are done
            self.at_decode = {"counters": ProcessCounters.now(), "cache": CacheTotals.of(self.eng.stats())}
        r = self._eval(tokens)
        progress("eval", i=self.n_eval, n=len(tokens))
        return r

    def decode_figures(self, report: Dict[str, Any]) -> DecodeFigures:
        d = DecodeFigures(tokens=max(0, self.n_eval - 1), s=report["decode_s"])
        if self.at_decode:
            c = ProcessCounters.now().minus(self.at_decode["counters"])
            d.disk_read_bytes, d.major_faults = c.read_bytes, c.major_faults
            d.cache = CacheTotals.of(report.get("cache")).minus(self.at_decode["cache"])
        return d


def run(spec: WorkerSpec) -> WorkerResult:
    rt: Dict[str, Any] = {"n_ctx": int(spec.n_ctx or max(256, spec.prompt_tokens + spec.gen_tokens + 16))}
    if spec.threads:
        rt["n_threads"] = int(spec.threads)
    progress("start")
    eng = Engine(spec.model, settings=spec.settings, routing_trace=spec.routing_trace,
                 record_trace=bool(spec.record_trace), **rt)
    try:
        progress("loaded", load_s=eng.load_s)
        if spec.prompt is not None:
            toks = eng.tokenize(spec.prompt)[:spec.prompt_tokens]
        else:
            toks = prompt_token_ids(eng, spec.prompt_tokens)
        with _DecodeProbe(eng) as probe:
            gen = eng.generate(toks, spec.gen_tokens, stop_at_eos=False)
        decode = probe.decode_figures(gen.report.to_dict())
        trace_tokens = eng.save_trace(spec.record_trace) if spec.record_trace else None
        return WorkerResult(True, tokens=gen.tokens, report=gen.report, decode=decode, info=eng.info,
                            mode_line=mode_line(eng), settings=_settings_dict(eng.settings),
                            wall_s=time.perf_counter() - _T0, trace_tokens=trace_tokens)
    finally:
        eng.close()


def mode_line(eng: Engine) -> str:
    """The engine's mode line, plus what it leaves out: lazy mode, the thread count."""
    line = eng.mode_line()
    rt = eng.settings.runtime
    extra = []
    if rt.lazy_mode and "lazy" not in line:
        extra.append(f"lazy mode {rt.lazy_mode}")
    if rt.n_threads:
        extra.append(f"{rt.n_threads} thread{'s' if rt.n_threads != 1 else ''}")
    return "; ".join([line] + extra)


def _settings_dict(s: EngineSettings) -> Dict[str, Any]:
    """The settings as run, the placements counted (the full map is long and in the plan)."""
    d = asdict(s)
    counts: Dict[str, int] = {}
    for p in (d.get("placements") or {}).values():
        counts[p] = counts.get(p, 0) + 1
    d["placements"] = {"tensors_by_placement": counts}
    return d


def read_spec(arg: str) -> Dict[str, Any]:
    """A worker's run spec: JSON on the command line, or @FILE holding it."""
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            return json.load(f)
    return json.loads(arg)


def main(argv: List[str]) -> None:
    try:
        res = run(WorkerSpec.from_dict(read_spec(argv[0])))
    except KeyboardInterrupt:
        raise
    except FlashMoEError as e:  # reported to the parent as a failed run, not a crash of it
        res = WorkerResult(False, error=str(e))
    except BaseException as e:  # noqa: BLE001 - likewise, with the exception's type
        res = WorkerResult(False, error=f"{type(e).__name__}: {e}")
    sys.stdout.write("\n" + RESULT_TAG + json.dumps(res.to_dict()) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
