"""`flashmoe tune`: measure this machine, simulate expert caches on a routing trace, validate the
best few under the memory budget, and write the winner as a policy (issue #7).

Steps (each shown as it runs; the whole stays inside ``time_limit``):

1. **Memory plan.** The base policy (``stream`` by default: experts streamed, the rest pinned) is
   resolved with the budget: pinned weights and runtime buffers (KV cache, compute buffer, process
   overhead) come off first; what is left is the expert cache (or, in page-cache mode, the OS page
   cache that holds experts). A budget below the pinned weights is an error.
2. **Machine.** Random reads of one expert slice on the model's own file at several queue depths,
   direct (``flashmoe.bench.measure_disk``) and buffered (the file evicted from the page cache
   first); memory available.
3. **Compute.** Two short runs of the engine with streaming on and a warm cache: the routing is
   forced to a constant trace (the same k experts every token), so after the first token every
   access is a hit and the time is compute only (the hook's lookups included, no I/O). Run once
   with the model's k experts per token and once with 1 (the experts-per-token override): the
   difference is the cost of k-1 experts in every MoE layer, the rest is the dense part. Why this
   and not a stock run with all experts resident: it works for models larger than RAM (it only
   needs k slots per layer), and it times the same graph (fetch op, slot tensors) the candidates run.
4. **Trace.** ``--trace FILE``, or the engine's own routing recorded on a sample prompt.
5. **Simulation** (:mod:`flashmoe.simulate`, exact for the explicit cache): hit rates for every
   cache size, LRU and LFRU, per layer and overall; per-layer slot counts proportional to each
   layer's working set, and a greedy per-layer split (not supported by the engine yet: reported
   only); page-cache mode as a shared LRU of the leftover memory. Decode tok/s is predicted per
   token from the misses of each layer (read time at the queue depth the readers reach, from the
   disk measurement; the hook does not overlap reads with compute: the fetch op waits) plus the
   compute time; prefill likewise, with each wave recomputing the layer's expert rows.
6. **Validation.** The best few candidates run in fresh processes confined to the budget (memory
   cgroup, the model file evicted from the page cache before each run), in alternation, as many
   rounds as time allows (at most ``repeat``); the winner is the best measured median decode tok/s
   (prefill tok/s breaks ties within 2%).
7. **Output.** A normal policy YAML (it validates with flashmoe.policy and loads in
   ``Engine(policy=path)``) with a header comment, and a markdown report. Written atomically at the
   very end: an interrupted tune writes nothing.

Public API::

    TuneOptions(...)
    run_tune(opts, log) -> TuneResult      # measures, simulates, validates; writes nothing
    write_outputs(result, opts)             # the policy, the report (and its PNG), atomically
    parse_duration("10m") -> seconds
"""
from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from flashmoe.errors import FlashMoEError, UsageError
from flashmoe.sizes import GiB, KiB, MiB, format_size

TUNE_VERSION = 1
DEFAULT_PROMPT = (
    "You are a helpful assistant. Answer the questions below clearly and concisely.\n"
    "1. Explain how a hash map handles collisions, and when a balanced tree is a better choice.\n"
    "2. Write a short Python function that returns the n-th Fibonacci number iteratively.\n"
    "3. Summarize the causes of the French Revolution in three sentences.\n"
    "4. Translate 'the weather is lovely today, let us walk to the harbour' into French and German.\n"
    "5. A train leaves at 14:05 and arrives at 17:50. How long is the journey, in minutes?\n"
)
TIE_FRACTION = 0.02  # measured decode tok/s within 2%: prefill decides
CAL_PROMPT = 32  # tokens of the compute calibration runs
CAL_GEN = 24
RESULT_TAG = "@@FLASHMOE_TUNE_RESULT@@"


# ------------------------------------------------------------------------------------------ options


def parse_duration(text: str) -> float:
    """'10m', '90s', '1h', '1h30m' -> seconds; a plain number is seconds."""
    s = str(text).strip().lower()
    if not s:
        raise UsageError("--time-limit: empty duration")
    if s[0].isdigit() or s[0] == ".":
        try:
            v = float(s)
        except ValueError:
            v = None
        if v is not None:
            if not math.isfinite(v) or v <= 0:
                raise UsageError(f"--time-limit must be more than 0, got {text!r}")
            return v
    total, num = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    for ch in s:
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in units and num:
            total += float(num) * units[ch]
            num = ""
        elif ch == " ":
            continue
        else:
            raise UsageError(f"--time-limit: cannot parse {text!r} (examples: 90s, 10m, 1h30m)")
    if num:
        raise UsageError(f"--time-limit: {text!r} ends without a unit (s, m or h)")
    if total <= 0:
        raise UsageError(f"--time-limit must be more than 0, got {text!r}")
    return total


@dataclass
class TuneOptions:
    model: str
    ram: int  # the memory budget in bytes (process memory and its page cache)
    out: str  # the policy YAML to write
    report: Optional[str] = None  # the markdown report (and a PNG next to it when matplotlib is there)
    gpu_mem: Optional[int] = None
    prompt_file: Optional[str] = None
    trace: Optional[str] = None
    time_limit: float = 600.0
    base: str = "stream"  # the policy whose rules (placements) and runtime the tuned one keeps
    prompt_tokens: int = 64  # the validation workload (with --prompt: the prompt's own length)
    gen_tokens: int = 128
    threads: Optional[int] = None
    n_ctx: Optional[int] = None  # None: the base policy's
    validate: int = 3  # candidates validated
    repeat: int = 3  # at most this many runs per validated candidate
    readers: Sequence[int] = (4, 8)
    plot: bool = True
    argv: List[str] = field(default_factory=list)


@dataclass
class TuneResult:
    doc: Dict[str, Any]
    policy_text: str
    report_text: str
    png: Optional[bytes] = None


class _Clock:
    def __init__(self, limit: float, log: Callable[[str], None]):
        self.t0 = time.monotonic()
        self.limit = limit
        self._log = log

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def left(self) -> float:
        return self.limit - self.elapsed

    def log(self, msg: str) -> None:
        self._log(f"[tune {_mmss(self.elapsed)}/{_mmss(self.limit)}] {msg}")


def _mmss(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60}:{s % 60:02d}"


# -------------------------------------------------------------------------------------------- model


@dataclass
class ModelFacts:
    path: str
    name: str
    arch: str
    n_layer: int
    n_expert: int
    n_used: int
    file_bytes: int
    moe_layers: List[int]
    expert_bytes: Dict[int, int]  # layer -> bytes of one expert (all its slices)
    n_tensors: Dict[int, int]  # layer -> expert tensors (reads per expert)

    @property
    def last_layer(self) -> Optional[int]:
        from flashmoe.simulate import last_layer_of

        return last_layer_of(self.arch, self.n_layer)

    @property
    def bytes_per_slot(self) -> int:
        return sum(self.expert_bytes.values())


def model_facts(path: str) -> ModelFacts:
    from gguf_tools.reader import open_model, require_moe

    if not os.path.isfile(path):
        raise FlashMoEError(f"no such model: {path}")
    with open_model(path) as m:
        require_moe(m)
        eb: Dict[int, int] = {}
        nt: Dict[int, int] = {}
        for t in m.tensors:
            if t.is_expert:
                eb[t.layer] = eb.get(t.layer, 0) + t.expert_stride
                nt[t.layer] = nt.get(t.layer, 0) + 1
        size = sum(os.path.getsize(f) for f in m.files)
        return ModelFacts(path=os.path.abspath(path), name=os.path.basename(path), arch=m.arch,
                          n_layer=int(m.n_layer), n_expert=int(m.n_expert), n_used=int(m.n_expert_used),
                          file_bytes=size, moe_layers=sorted(eb), expert_bytes=dict(sorted(eb.items())),
                          n_tensors=dict(sorted(nt.items())))


# ------------------------------------------------------------------------------------------ policies


def _size_text(n: int) -> str:
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(int(n))


def _q(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


@dataclass
class Candidate:
    """One configuration the tuner considers."""

    name: str
    mode: str  # "cache" | "pagecache"
    slots: int = 0  # per layer (cache mode, uniform)
    eviction: str = "lru"
    readers: int = 4
    direct_io: bool = True
    per_layer: Optional[Dict[int, int]] = None  # simulated only (the engine takes one slot count)
    overhead: Optional[int] = None  # runtime.overhead written in the policy (None: the base policy's)
    supported: bool = True
    note: str = ""
    prediction: Dict[str, Any] = field(default_factory=dict)
    runs: List[Dict[str, Any]] = field(default_factory=list)
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
            return f"page cache, {self.readers} readers"
        sl = (f"per-layer slots {min(self.per_layer.values())}-{max(self.per_layer.values())}" if self.per_layer
              else f"{self.slots} slots/layer")
        return f"expert cache {sl}, {self.eviction.upper()}, {self.readers} readers, " \
               f"{'direct I/O' if self.direct_io else 'buffered I/O'}"


def policy_text(base, cand: Candidate, *, budget: Optional[int], n_ctx: int, threads: Optional[int],
                header: Sequence[str] = (), name: str = "tuned", description: str = "") -> str:
    """A policy YAML: the base policy's rules and runtime, the candidate's expert cache."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines += ["version: 1", f"name: {_q(name)}"]
    if description:
        lines.append(f"description: {_q(description)}")
    if budget is not None:
        lines.append(f"budget: {_size_text(budget)}")
    lines += ["", "rules:"]
    for r in base.rules:
        pats = [p.text for p in r.patterns]
        m = _q(pats[0]) if len(pats) == 1 else "[" + ", ".join(_q(p) for p in pats) + "]"
        lines += [f"  - match: {m}", f"    place: {r.place}"]
    lines += ["", "expert_cache:", f"  mode: {cand.mode}"]
    if cand.mode == "cache":
        lines += [f"  cache_slots: {cand.slots}", f"  eviction: {cand.eviction}"]
    lines.append(f"  readers: {cand.readers}")
    if cand.mode == "cache":
        lines.append(f"  direct_io: {'true' if cand.direct_io else 'false'}")
    rt = base.runtime
    lines += ["", "runtime:"]
    if threads:
        lines.append(f"  threads: {threads}")
    lines += [f"  n_ctx: {n_ctx}", f"  n_batch: {rt.n_batch}", f"  n_ubatch: {rt.n_ubatch}"]
    if rt.experts_per_token is not None:
        lines.append(f"  experts_per_token: {rt.experts_per_token}")
    if not rt.repack:
        lines.append("  repack: false")
    from flashmoe.policy import DEFAULT_OVERHEAD

    overhead = cand.overhead if cand.overhead is not None else rt.overhead
    if overhead != DEFAULT_OVERHEAD or cand.overhead is not None:
        lines.append(f"  overhead: {_size_text(overhead)}")
    return "\n".join(lines) + "\n"


def resolve_text(text: str, model, budget: Optional[int], source: str = "<tuned policy>"):
    from flashmoe.policy import parse_policy

    return parse_policy(text, source=source).resolve(model, budget=budget)


@dataclass
class MemoryPlan:
    budget: int
    weights: int
    pinned: int
    runtime: int
    kv_cache: int
    compute: int
    overhead: int
    cache_space: int  # budget - weights - runtime
    bytes_per_slot: int  # one slot in every streamed layer
    max_slots: int  # uniform slots per layer that fit (capped at n_expert)
    n_ctx: int
    n_batch: int
    n_ubatch: int


def plan_memory(base, view, mf: ModelFacts, budget: int) -> MemoryPlan:
    """The base policy's memory estimate at this budget; FlashMoEError when nothing can run."""
    from flashmoe.policy import PolicyError

    try:
        res = base.resolve(view, budget=budget)
    except PolicyError as e:
        raise FlashMoEError(f"the base policy does not apply to {mf.name}: {e}") from None
    mem = res.memory
    if mem.budget is not None and mem.budget < mem.pinned:
        raise FlashMoEError(
            f"--ram {format_size(budget)} is below the pinned weights of {mf.name} ({format_size(mem.pinned)}): "
            "nothing can run; raise --ram (or tune a base policy that pins less)")
    if res.cache.mode == "off":
        raise FlashMoEError(f"the base policy {base.name!r} streams no tensor of {mf.name}: nothing to tune")
    per_slot = res.cache.bytes_per_slot_all_layers
    space = budget - mem.weights - mem.runtime
    if space <= 0:
        raise FlashMoEError(
            f"--ram {format_size(budget)} leaves nothing for experts: resident weights {format_size(mem.weights)} "
            f"+ runtime buffers {format_size(mem.runtime)} (KV cache {format_size(mem.kv_cache)} at n_ctx "
            f"{mem.n_ctx}, compute {format_size(mem.compute)}, overhead {format_size(mem.overhead)}) = "
            f"{format_size(mem.weights + mem.runtime)}; raise --ram or lower --ctx")
    max_slots = min(mf.n_expert, space // per_slot) if per_slot else 0
    rt = base.runtime
    return MemoryPlan(budget=budget, weights=mem.weights, pinned=mem.pinned, runtime=mem.runtime,
                      kv_cache=mem.kv_cache, compute=mem.compute, overhead=mem.overhead, cache_space=space,
                      bytes_per_slot=per_slot, max_slots=int(max_slots), n_ctx=mem.n_ctx,
                      n_batch=rt.n_batch, n_ubatch=min(rt.n_ubatch, rt.n_batch))


# -------------------------------------------------------------------------------------------- disk


def measure_buffered(model_path: str, depths: Sequence[int], reads: int = 256, seed: int = 1) -> Dict[str, Any]:
    """Buffered random reads (POSIX_FADV_RANDOM: no readahead, as the hook's buffered descriptors)
    of one expert slice, the model file evicted from the page cache before each queue depth."""
    import mmap as _mmap
    import random

    from flashmoe import bench
    from flashmoe.bench import evict_file
    from gguf_tools.reader import open_model

    with open_model(model_path) as m:
        files = list(m.files)
        experts = [t for t in m.tensors if t.is_expert and t.expert_stride > 0]
    strides: Dict[int, int] = {}
    for t in experts:
        strides[t.expert_stride] = strides.get(t.expert_stride, 0) + 1
    slice_bytes = max(strides, key=lambda s: (strides[s], s))
    rng = random.Random(seed)
    fds = [os.open(f, os.O_RDONLY) for f in files]
    results = []
    evict_why: Optional[str] = None
    try:
        for fd in fds:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            except (OSError, AttributeError):
                pass
        for qd in depths:
            n = max(reads, 16 * qd)
            offs = []
            for _ in range(n):
                t = rng.choice(experts)
                e = rng.randrange(max(1, t.nbytes // t.expert_stride))
                offs.append((t.file_index, t.data_offset + e * t.expert_stride))
            why = evict_file(files)
            evict_why = evict_why or why
            got, dt, errors = bench.timed_reads(fds, offs, qd, slice_bytes)
            if errors:
                return {"ok": False, "reason": f"reads failed: {errors[0]}"}
            results.append({"qd": qd, "reads": n, "bytes": got, "s": dt,
                            "bytes_per_s": got / dt if dt > 0 else 0.0, "latency_ms": 1000 * dt * qd / n,
                            "evicted": why is None})
    finally:
        for fd in fds:
            os.close(fd)
        try:
            evict_file(files)
        except Exception:
            pass
    method = ("buffered (POSIX_FADV_RANDOM, file evicted first)" if evict_why is None else
              f"buffered (the file could not be evicted from the page cache first: {evict_why}; reads may hit it)")
    return {"ok": True, "method": method, "slice_bytes": slice_bytes, "depths": results}


class DiskModel:
    """Read bandwidth against queue depth (piecewise linear between the measured depths)."""

    def __init__(self, direct: Optional[dict], buffered: Optional[dict]):
        self.curves: Dict[bool, List[Tuple[int, float]]] = {}
        for is_direct, d in ((True, direct), (False, buffered)):
            if d and d.get("ok") and d.get("depths"):
                pts = sorted((int(x["qd"]), float(x["bytes_per_s"])) for x in d["depths"] if x["bytes_per_s"] > 0)
                if pts:
                    self.curves[is_direct] = pts
        if direct and direct.get("ok") and not direct.get("direct", "O_DIRECT" in str(direct.get("method", ""))):
            # the bench fell back to buffered reads: there is no direct curve on this file system
            self.curves.pop(True, None)
            self.curves.setdefault(False, sorted((int(x["qd"]), float(x["bytes_per_s"])) for x in direct["depths"]))

    @property
    def ok(self) -> bool:
        return bool(self.curves)

    def has(self, direct: bool) -> bool:
        return direct in self.curves

    def bw(self, qd, direct: bool):
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


# ------------------------------------------------------------------------------------------ workers


def _worker_env() -> Dict[str, str]:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run_json_worker(module: str, spec: Dict[str, Any], timeout: float, tag: str) -> Dict[str, Any]:
    """A worker of ours (``python -m module @spec``), unconfined; its result line as a dict."""
    from flashmoe.cgroup import run_limited

    fd, spec_path = tempfile.mkstemp(prefix="flashmoe-tune-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        r = run_limited([sys.executable, "-m", module, "@" + spec_path], None, timeout=timeout, env=_worker_env())
    finally:
        try:
            os.unlink(spec_path)
        except OSError:
            pass
    for line in (r.stdout or "").splitlines():
        if line.startswith(tag):
            try:
                return json.loads(line[len(tag):])
            except ValueError:
                break
    if r.timed_out:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    tail = " | ".join((r.stderr or "").strip().splitlines()[-3:])
    how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
    return {"ok": False, "error": f"the worker died ({how}){': ' + tail if tail else ''}"}


def _record_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: run the model on the prompt with routing recorded; save the trace."""
    from flashmoe.bench_worker import settings_from_dict
    from flashmoe.engine import Engine

    settings = settings_from_dict(spec["settings"])
    rt = {"n_ctx": int(spec["n_ctx"])}
    if spec.get("threads"):
        rt["n_threads"] = int(spec["threads"])
    eng = Engine(spec["model"], settings=settings, record_trace=True, **rt)
    try:
        toks = eng.tokenize(spec["prompt"])
        if spec.get("max_prompt_tokens") and len(toks) > spec["max_prompt_tokens"]:
            toks = toks[: spec["max_prompt_tokens"]]
        g = eng.generate(toks, int(spec["gen_tokens"]), stop_at_eos=False)
        n = eng.save_trace(spec["trace_path"])
        return {"ok": True, "prompt_tokens": len(toks), "generated": len(g.tokens), "trace_tokens": n,
                "decode_tok_s": g.report.decode_tok_s, "prefill_tok_s": g.report.prefill_tok_s,
                "text": g.text[:200]}
    finally:
        eng.close()


def _worker_main(argv: Sequence[str]) -> None:
    from flashmoe.bench_worker import read_spec

    spec = read_spec(argv[0])
    try:
        res = _record_worker(spec)
    except Exception as e:  # reported to the tuner, not a crash of it
        res = {"ok": False, "error": str(e) if isinstance(e, FlashMoEError) else f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------ compute


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
        return n_tokens * self.dense_prefill_s + (waves * rows).sum(axis=1) * k * self.expert_prefill_s


def _constant_trace(path: str, mf: ModelFacts, k: int, n_tokens: int) -> None:
    from flashmoe.trace import Trace, write_trace

    ids = np.tile(np.arange(k, dtype=np.int32), (n_tokens, len(mf.moe_layers), 1))
    write_trace(path, Trace(list(mf.moe_layers), mf.n_expert, ids, kind="constant"))


def calibrate_compute(base, view, mf: ModelFacts, opts: TuneOptions, n_ctx: int, tmp: str, clock: _Clock,
                      timeout: float) -> ComputeModel:
    """Warm-cache runs (constant routing: every access after the first token hits) with k and 1
    experts per token: per-token compute of the dense part and of one expert. Their peak RSS less
    their cache slots is what the process needs besides the experts on this machine."""
    from flashmoe.bench import run_worker

    cm = ComputeModel()
    ks = [mf.n_used] + ([1] if mf.n_used > 1 else [])
    got: Dict[int, Dict[str, float]] = {}
    for k in ks:
        if clock.left < 8:
            cm.note = "no time left for the compute calibration"
            break
        tpath = os.path.join(tmp, f"constant-k{k}.trace")
        _constant_trace(tpath, mf, k, CAL_PROMPT + CAL_GEN)
        cand = Candidate("calibration", "cache", slots=max(mf.n_used, k), eviction="lru", readers=4, direct_io=False)
        res = resolve_text(policy_text(base, cand, budget=None, n_ctx=n_ctx, threads=opts.threads), view, None)
        s = res.engine_settings()
        if k != mf.n_used:
            s.runtime.n_expert_used = k
        spec = {"model": mf.path, "settings": asdict(s), "prompt_tokens": CAL_PROMPT, "gen_tokens": CAL_GEN,
                "threads": opts.threads, "n_ctx": n_ctx, "routing_trace": tpath}
        clock.log(f"compute: warm-cache run with {k} expert{'s' if k > 1 else ''} per token ...")
        rec = run_worker(spec, None, max(3.0, min(timeout, clock.left - 5)), measure=False)
        if rec["status"] != "ok":
            cm.note = f"calibration run with k={k} {rec['status']}: {rec.get('detail', '')}"
            clock.log("  " + cm.note)
            break
        res_ = rec["result"]
        rep, dec = res_["report"], res_["decode"]
        tot = (rep.get("cache") or {}).get("total") or {}
        dstall = dec["cache"].get("stall_s", 0.0)
        pstall = max(0.0, tot.get("stall_s", 0.0) - dstall)
        n_dec = max(1, dec["tokens"])
        t_dec = max(1e-9, (dec["s"] - dstall) / n_dec)
        t_pf = max(1e-9, (rep["prefill_s"] - pstall) / max(1, rep["prompt_tokens"]))
        got[k] = {"decode_s": t_dec, "prefill_s": t_pf}
        startup = rec["wall_s"] - rep["prefill_s"] - rep["decode_s"]
        cm.runs.append({"k": k, "decode_ms_per_token": 1000 * t_dec, "prefill_ms_per_token": 1000 * t_pf,
                        "decode_stall_s": dstall, "prefill_stall_s": pstall, "load_s": rep["load_s"],
                        "wall_s": rec["wall_s"], "peak_bytes": rec.get("peak_bytes")})
        cm.startup_s = max(cm.startup_s, startup)
        rss = rep.get("peak_rss_bytes") or 0
        if rss:
            nc = rss - cand.slots * sum(mf.expert_bytes.values())
            cm.non_cache_rss = max(cm.non_cache_rss or 0, nc)
        clock.log(f"  {1000 * t_dec:.2f} ms per decode token, {1000 * t_pf:.2f} ms per prefill token "
                  f"(load {rep['load_s']:.1f} s)")
    n_moe = max(1, len(mf.moe_layers))
    K = mf.n_used
    if K in got:
        cm.ok = True
        if 1 in got and K > 1:
            cm.expert_decode_s = max(0.0, (got[K]["decode_s"] - got[1]["decode_s"]) / ((K - 1) * n_moe))
            cm.expert_prefill_s = max(0.0, (got[K]["prefill_s"] - got[1]["prefill_s"]) / ((K - 1) * n_moe))
        else:
            cm.note = cm.note or "one calibration point: the expert share of compute is unknown (counted as dense)"
        cm.dense_decode_s = max(0.0, got[K]["decode_s"] - K * n_moe * cm.expert_decode_s)
        cm.dense_prefill_s = max(0.0, got[K]["prefill_s"] - K * n_moe * cm.expert_prefill_s)
    return cm


# ----------------------------------------------------------------------------------------- predict


def predict(sim, cand: Candidate, mf: ModelFacts, disk: DiskModel, cm: ComputeModel) -> Dict[str, Any]:
    """Decode and prefill tok/s of a simulated candidate (see the module docstring)."""
    from flashmoe.simulate import PHASES

    layers = [lc.layer for lc in sim.layers]
    eb = np.array([mf.expert_bytes[l] for l in layers], dtype=float)
    nt = np.array([mf.n_tensors[l] for l in layers], dtype=float)
    direct = cand.direct_io and cand.mode == "cache"
    io = disk.read_time(sim.misses.astype(float), eb, nt, cand.readers, direct) if disk.ok else \
        np.zeros(sim.misses.shape)
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
        mb = float((sim.misses[sel] * eb).sum())
        out[ph] = {
            "hit_rate": t["hit_rate"],
            "hits": t["hits"],
            "misses": t["misses"],
            "tok_s": (n / total) if total > 0 else None,
            "io_s_per_token": io_s / n,
            "compute_s_per_token": comp / n,
            "mib_per_token": mb / n / MiB,
            "tokens": int(n),
        }
    d = out.get("decode", {})
    out["decode_tok_s"] = d.get("tok_s")
    out["prefill_tok_s"] = out.get("prefill", {}).get("tok_s")
    out["decode_hit_rate"] = d.get("hit_rate")
    out["bound"] = ("I/O" if d.get("io_s_per_token", 0) > d.get("compute_s_per_token", 0) else "compute") if d else None
    return out


# ------------------------------------------------------------------------------------ the simulation


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


def working_set(trace, ubatches, mf: ModelFacts, window: int = 32) -> Dict[int, float]:
    """Per layer: the mean number of distinct experts in a window of `window` consecutive decode
    tokens (Denning's working set), from the rows the decode phase computes."""
    from flashmoe.simulate import _rows_per_layer

    cols = _rows_per_layer(trace, ubatches, mf.last_layer)
    out = {}
    for li, il in enumerate(trace.layers):
        rows = [cols[li][u] for u, ub in enumerate(ubatches) if ub.phase == "decode" and cols[li][u] is not None]
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

    def used():
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


def greedy_split(curves: Dict[int, Any], mf: ModelFacts, cache_bytes: int, phase: str = "decode") -> Dict[int, int]:
    """Slots per layer by marginal misses saved per byte, from the per-layer curves (layers are
    independent). Sizes are those of the curve grid."""
    sizes = sorted(curves)
    idx = {lc.layer: j for j, lc in enumerate(curves[sizes[0]].layers)}

    def misses(l, s):
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


# -------------------------------------------------------------------------------------------- main


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mem_available() -> Optional[int]:
    from flashmoe.machine import mem_available

    return mem_available()  # Linux MemAvailable; None where the system does not say (macOS)


def run_tune(opts: TuneOptions, log: Callable[[str], None] = _default_log) -> TuneResult:
    from flashmoe import bench
    from flashmoe.policy import MachineInfo, load_policy, open_model_view
    from flashmoe.simulate import engine_ubatches, simulate, simulate_pagecache
    from flashmoe.trace import check_trace_fits, read_trace, trace_stats

    clock = _Clock(opts.time_limit, log)
    if opts.ram <= 0:
        raise UsageError("--ram must be more than 0 bytes")
    for p in (opts.out, opts.report):
        if p:
            d = os.path.dirname(os.path.abspath(p))
            if not os.path.isdir(d):
                raise FlashMoEError(f"output folder does not exist: {d}")
    if opts.trace and not os.path.isfile(opts.trace):
        raise FlashMoEError(f"no such routing trace: {opts.trace}")
    if opts.prompt_file and not os.path.isfile(opts.prompt_file):
        raise FlashMoEError(f"no such prompt file: {opts.prompt_file}")

    mf = model_facts(opts.model)
    view = open_model_view(mf.path)
    base = load_policy(opts.base)
    if opts.n_ctx:
        base.runtime.n_ctx = opts.n_ctx
    if opts.threads:
        base.runtime.threads = opts.threads
    mp = plan_memory(base, view, mf, opts.ram)
    n_ctx = mp.n_ctx
    K = mf.n_used
    notes: List[str] = []
    clock.log(f"{mf.name}: {mf.arch}, {len(mf.moe_layers)} MoE layers, {mf.n_expert} experts ({K} per token), "
              f"{format_size(mf.file_bytes)}; one expert in every layer: {format_size(mp.bytes_per_slot)}")
    clock.log(f"budget {format_size(opts.ram)}: resident weights {format_size(mp.weights)}, runtime "
              f"{format_size(mp.runtime)} (n_ctx {n_ctx}) -> {format_size(mp.cache_space)} for experts: "
              f"up to {mp.max_slots} slots per layer")
    if mp.max_slots < K:
        notes.append(f"by the policy's memory estimate the budget leaves room for {mp.max_slots} expert cache slots "
                     f"per layer, fewer than the {K} a token needs: only page-cache mode (and a cache sized from the "
                     "measured memory, if it fits) can run")

    # -- machine
    machine = MachineInfo.detect()
    facts = bench.machine_facts(mf.path)
    avail = _mem_available()
    if avail is not None and opts.ram > avail:
        notes.append(f"--ram {format_size(opts.ram)} is more than the memory available now "
                     f"({format_size(avail)}): the runs may be slowed or killed by other programs")
    if opts.gpu_mem is not None:
        notes.append(f"--gpu-mem {format_size(opts.gpu_mem)}: " + (
            "this llama.cpp build has no GPU backend; ignored" if machine.gpu() is None else
            "the tuner does not place tensors on the GPU yet; ignored (CPU-side tuning only)"))
    clock.log(f"machine: {bench.describe_machine(facts)}; available memory "
              + (format_size(avail) if avail is not None else "unknown (no /proc/meminfo here)"))

    depths = sorted(set([1, 4, 8] + [int(r) for r in opts.readers]))
    clock.log("disk: random reads of one expert slice on the model file, QD " + "/".join(map(str, depths)))
    direct = bench.measure_disk(mf.path, depths=depths)
    try:
        buffered = measure_buffered(mf.path, depths)
    except OSError as e:
        buffered = {"ok": False, "reason": e.strerror or str(e)}
    disk = DiskModel(direct, buffered)
    for label, d in (("direct", direct), ("buffered", buffered)):
        if d.get("ok"):
            clock.log(f"  {label}: " + ", ".join(f"QD{x['qd']} {x['bytes_per_s'] / 1e6:.0f} MB/s"
                                                for x in d["depths"]))
        else:
            clock.log(f"  {label}: failed ({d.get('reason')})")
    if not disk.ok:
        notes.append("the disk could not be measured: predictions count compute only")

    # -- the trace and the workload
    tmp_ctx = tempfile.TemporaryDirectory(prefix="flashmoe-tune-")
    tmp = tmp_ctx.name
    try:
        if opts.trace:
            tr = read_trace(opts.trace)
            check_trace_fits(tr, view)
            trace_path = os.path.abspath(opts.trace)
            P, G = opts.prompt_tokens, opts.gen_tokens
            trace_src = {"source": "given", "path": trace_path}
            clock.log(f"trace: {opts.trace} ({tr.n_tokens} tokens); workload {P}-token prompt, {G} generated")
        else:
            prompt = DEFAULT_PROMPT
            max_p = opts.prompt_tokens
            if opts.prompt_file:
                with open(opts.prompt_file, encoding="utf-8", errors="replace") as f:
                    prompt = f.read()
                max_p = max(1, n_ctx - opts.gen_tokens - 16)
                if not prompt.strip():
                    raise FlashMoEError(f"prompt file {opts.prompt_file} is empty")
            trace_path = os.path.join(tmp, "recorded.trace")
            slots = min(mf.n_expert, max(K, mp.max_slots))
            rec_cand = Candidate("record", "cache" if mp.max_slots >= K else "pagecache", slots=slots,
                                 eviction="lru", readers=4, direct_io=True)
            rres = resolve_text(policy_text(base, rec_cand, budget=None, n_ctx=n_ctx, threads=opts.threads),
                                view, None)
            spec = {"model": mf.path, "settings": asdict(rres.engine_settings()), "prompt": prompt,
                    "max_prompt_tokens": max_p, "gen_tokens": opts.gen_tokens, "threads": opts.threads,
                    "n_ctx": n_ctx, "trace_path": trace_path}
            clock.log(f"trace: recording the model's routing on {'--prompt' if opts.prompt_file else 'the default prompt'}"
                      f" ({opts.gen_tokens} tokens generated) ...")
            if clock.left < 5:
                raise FlashMoEError("--time-limit is too short to record a routing trace: raise it, or give --trace")
            r = _run_json_worker("flashmoe.tune", spec, max(3.0, min(clock.left - 2, max(10.0, clock.left * 0.4))),
                                 RESULT_TAG)
            if not r.get("ok"):
                raise FlashMoEError(f"recording the routing failed: {r.get('error')}")
            tr = read_trace(trace_path)
            P, G = int(r["prompt_tokens"]), opts.gen_tokens
            trace_src = {"source": "recorded", "prompt": "--prompt " + opts.prompt_file if opts.prompt_file
                         else "default prompt", "prompt_tokens": P, "gen_tokens": G,
                         "decode_tok_s": r.get("decode_tok_s")}
            clock.log(f"  recorded {tr.n_tokens} tokens ({P}-token prompt)")
        tstats = trace_stats(tr)
        ubs = engine_ubatches(P, G, mp.n_batch, mp.n_ubatch)

        # -- compute
        cm = calibrate_compute(base, view, mf, opts, n_ctx, tmp, clock, timeout=max(30.0, opts.time_limit * 0.2))
        if not cm.ok:
            notes.append("compute could not be calibrated (" + (cm.note or "no time") + "): predictions count I/O only")

        # -- what the process really needs besides experts (RSS of the calibration runs)
        tight_slots, tight_overhead, pc_capacity = 0, None, mp.cache_space
        if cm.non_cache_rss:
            margin = max(32 * MiB, cm.non_cache_rss // 10)
            real_left = opts.ram - cm.non_cache_rss
            if real_left > 0:
                pc_capacity = real_left
            ts = min(mf.n_expert, max(0, real_left - margin) // mp.bytes_per_slot) if mp.bytes_per_slot else 0
            ov = (opts.ram - mp.weights - mp.kv_cache - mp.compute - ts * mp.bytes_per_slot) // MiB * MiB
            if ts > mp.max_slots and ts >= K and ov > 0:
                tight_slots, tight_overhead = int(ts), int(ov)
            clock.log(f"memory: the calibration runs needed {format_size(cm.non_cache_rss)} besides their cache "
                      f"(estimate: {format_size(mp.weights + mp.runtime)})" +
                      (f": {tight_slots} slots per layer fit with a {format_size(margin)} margin" if tight_slots else ""))

        # -- simulation
        clock.log("simulating the expert cache on the trace ...")
        extra = [mp.max_slots, int(mp.max_slots * 0.85), tight_slots]
        grid = size_grid(K, mf.n_expert, extra)
        curves: Dict[str, Dict[int, Any]] = {}
        for ev in ("lru", "lfru"):
            curves[ev] = {s: simulate(tr, ubs, s, ev, last_layer=mf.last_layer, expert_bytes=mf.expert_bytes)
                          for s in grid}
        readers = sorted(set(int(r) for r in opts.readers))
        io_modes = (True, False) if disk.has(True) else (False,)
        sizes: List[Tuple[int, Optional[int], str]] = []  # (slots, policy overhead, note)
        if mp.max_slots >= K:
            sizes.append((mp.max_slots, None, ""))
            safe = int(mp.max_slots * 0.85)
            if K <= safe < mp.max_slots:
                sizes.append((safe, None, "85% of the largest cache: a margin on the estimate"))
        if tight_slots:
            sizes.append((tight_slots, tight_overhead,
                          f"sized from the memory measured on this machine (runtime.overhead "
                          f"{format_size(tight_overhead)} instead of {format_size(mp.overhead)})"))
        cands: List[Candidate] = []
        for slots, ov, note in sizes:
            for ev in ("lru", "lfru"):
                for d in io_modes:
                    for r in readers:
                        name = f"{ev}-{slots}-r{r}{'' if d else '-buffered'}{'-tight' if ov else ''}"
                        c = Candidate(name, "cache", slots=slots, eviction=ev, readers=r, direct_io=d, overhead=ov,
                                      note=note)
                        c.prediction = predict(curves[ev][slots], c, mf, disk, cm)
                        cands.append(c)
        pc_sim = simulate_pagecache(tr, ubs, pc_capacity, mf.expert_bytes, last_layer=mf.last_layer)
        for r in readers:
            c = Candidate(f"pagecache-r{r}", "pagecache", readers=r, direct_io=False,
                          note="modelled: one LRU of the leftover memory shared by all layers")
            c.prediction = predict(pc_sim, c, mf, disk, cm)
            cands.append(c)
        # per-layer splits: simulated only
        ws = working_set(tr, ubs, mf)
        per_layer: List[Candidate] = []
        if mp.max_slots >= K:
            cache_bytes = mp.max_slots * mp.bytes_per_slot
            from flashmoe.simulate import simulate as _sim

            for label, alloc in (("proportional", proportional_split(ws, mf, cache_bytes)),):
                for ev in ("lru", "lfru"):
                    c = Candidate(f"{ev}-{label}", "cache", eviction=ev, readers=readers[-1],
                                  direct_io=disk.has(True), per_layer=alloc, supported=False,
                                  note=f"slots per layer {label} to the working set: not yet supported by the engine")
                    c.prediction = predict(_sim(tr, ubs, alloc, ev, last_layer=mf.last_layer,
                                                expert_bytes=mf.expert_bytes), c, mf, disk, cm)
                    per_layer.append(c)
            for ev in ("lru", "lfru"):
                alloc = greedy_split(curves[ev], mf, cache_bytes)
                c = Candidate(f"{ev}-greedy", "cache", eviction=ev, readers=readers[-1], direct_io=disk.has(True),
                              per_layer=alloc, supported=False,
                              note="slots per layer by misses saved per byte: not yet supported by the engine")
                c.prediction = predict(_sim(tr, ubs, alloc, ev, last_layer=mf.last_layer,
                                            expert_bytes=mf.expert_bytes), c, mf, disk, cm)
                per_layer.append(c)

        def pkey(c: Candidate):
            # ties (within about 1%): the exact explicit cache before the page-cache model, fewer readers
            p = c.prediction
            dec = p.get("decode_tok_s") or 0.0
            return (round(math.log(dec), 2) if dec > 0 else -1e9, c.mode == "cache", p.get("prefill_tok_s") or 0.0,
                    c.direct_io, -c.readers)

        cands.sort(key=pkey, reverse=True)
        if not cands:
            raise FlashMoEError("no configuration fits the budget")
        for c in cands[:6]:
            p = c.prediction
            clock.log(f"  {c.name}: predicted {_fmt(p.get('decode_tok_s'))} tok/s decode "
                      f"(hit {100 * (p.get('decode_hit_rate') or 0):.1f}%), {_fmt(p.get('prefill_tok_s'))} prefill")

        # -- validation
        chosen = _pick_for_validation(cands, opts.validate)
        validated = _validate(chosen, base, view, mf, mp, opts, trace_path, P, G, n_ctx, cm, clock, cands)
        winner, why = _choose(validated, cands)
        doc = _document(opts, mf, mp, facts, machine, avail, direct, buffered, cm, tr, tstats, trace_src, P, G,
                        grid, curves, pc_sim, ws, cands, per_layer, validated, winner, why, notes, clock)
        doc["memory"].update({"measured_non_cache": cm.non_cache_rss, "tight_slots": tight_slots,
                              "tight_overhead": tight_overhead})
        doc["pagecache"]["capacity_bytes"] = pc_capacity
        doc["pagecache"]["capacity_source"] = "measured" if pc_capacity != mp.cache_space else "estimate"
    finally:
        tmp_ctx.cleanup()

    header = _header(doc)
    text = policy_text(base, winner, budget=opts.ram, n_ctx=n_ctx, threads=opts.threads, header=header,
                       name="tuned", description=f"flashmoe tune for {mf.name} at {format_size(opts.ram)}: "
                       f"{winner.describe()}")
    res = resolve_text(text, view, None, source=opts.out)
    res.engine_settings()  # raises when the policy would not load
    png = None
    if opts.report and opts.plot:
        png = plot_png(doc)
        if png is not None:
            doc["png"] = os.path.splitext(os.path.basename(opts.report))[0] + ".png"
    report = format_report(doc)
    clock.log(f"winner: {winner.name} ({winner.describe()})")
    return TuneResult(doc=doc, policy_text=text, report_text=report, png=png)


def _fmt(x: Optional[float], f: str = "{:.2f}") -> str:
    return "-" if x is None else f.format(x)


def _pick_for_validation(cands: List[Candidate], n: int) -> List[Candidate]:
    """The best prediction, then the best that differs from it in what matters most: the other
    mode (explicit cache or page cache), then, among explicit caches, the other I/O mode (direct or
    buffered), the other eviction, another size; then the next best. At most n, best first."""
    if n <= 0 or not cands:
        return []
    out: List[Candidate] = [cands[0]]

    def add(pred):
        c = next((x for x in cands if x not in out and pred(x)), None)
        if c is not None and len(out) < n:
            out.append(c)

    best = cands[0]
    add(lambda x: x.mode != best.mode)
    bc = next((x for x in cands if x.mode == "cache"), None)
    if bc is not None:
        add(lambda x: x.mode == "cache" and x.direct_io != bc.direct_io)
        add(lambda x: x.mode == "cache" and x.eviction != bc.eviction)
        add(lambda x: x.mode == "cache" and x.slots != bc.slots)
    for c in cands:
        if len(out) >= n:
            break
        if c not in out:
            out.append(c)
    return sorted(out, key=lambda c: cands.index(c))


def _validate(chosen: List[Candidate], base, view, mf: ModelFacts, mp: MemoryPlan, opts: TuneOptions,
              trace_path: str, P: int, G: int, n_ctx: int, cm: ComputeModel, clock: _Clock,
              all_cands: Sequence[Candidate] = ()) -> List[Candidate]:
    """Runs the chosen candidates under the budget, in alternation, as many rounds as time allows.
    A candidate killed by the memory limit brings in the best untried one with a smaller cache."""
    from flashmoe import cgroup
    from flashmoe.bench import evict_file, run_metrics, run_worker
    from gguf_tools.reader import open_model

    chosen = list(chosen)
    if not chosen:
        return []
    try:
        cgroup.detect()
        confined = True
    except FlashMoEError as e:
        clock.log(f"validation: no memory cgroup here ({e}); runs are not confined to the budget")
        confined = False
    with open_model(mf.path) as m:
        files = list(m.files)

    def settings_of(c: Candidate):
        text = policy_text(base, c, budget=opts.ram, n_ctx=n_ctx, threads=opts.threads)
        return resolve_text(text, view, None, source=f"<candidate {c.name}>").engine_settings()

    def estimate(c: Candidate) -> float:
        """Seconds a run of c needs: its own completed runs, else the prediction (capped by twice the
        longest completed run of any candidate: predictions are least sure on a busy machine)."""
        done = [r["wall_s"] for r in c.runs if r.get("wall_s") and r["status"] == "ok"]
        if done:
            return max(done) * 1.2 + 1.0
        p = c.prediction
        t = cm.startup_s or 5.0
        d, pf = p.get("decode_tok_s"), p.get("prefill_tok_s")
        t += (G - 1) / d if d else 60.0
        t += P / pf if pf else 10.0
        t = t * 1.3 + 3.0
        other = [r["wall_s"] for x in chosen for r in x.runs if r.get("wall_s") and r["status"] == "ok"]
        return min(t, 2.0 * max(other)) if other else t

    reserve = 3.0  # to write the outputs
    for rnd in range(max(1, opts.repeat)):
        ran = False
        i = 0
        while i < len(chosen):
            c = chosen[i]
            i += 1
            if rnd > 0 and (not c.runs or c.runs[-1]["status"] != "ok"):
                continue  # a candidate that failed (or never ran) is not retried
            need = estimate(c)
            left = clock.left - reserve
            first_ever = not any(x.runs for x in chosen)
            if left < 5 or (left < need and not (first_ever and left > 10)):
                if rnd == 0:
                    clock.log(f"validation: skipping {c.name}: about {need:.0f} s needed, {max(0, left):.0f} s left")
                continue
            why = evict_file(files)
            spec = {"model": mf.path, "settings": asdict(settings_of(c)), "prompt_tokens": P, "gen_tokens": G,
                    "threads": opts.threads, "n_ctx": n_ctx, "routing_trace": trace_path}
            clock.log(f"validation round {rnd + 1}: {c.name} ({c.describe()}) under {format_size(opts.ram)} ...")
            rec = run_worker(spec, opts.ram if confined else None, min(left, max(10.0, need * 3)), measure=confined)
            rec["round"] = rnd + 1
            rec["confined"] = confined
            rec["model_evicted"] = why is None
            if rec["status"] == "ok":
                rec["metrics"] = run_metrics(rec, True, c.readers, None)
                dc = rec["result"]["decode"]["cache"]
                acc = dc["hits"] + dc["misses"]
                rec["decode_hits"], rec["decode_misses"] = dc["hits"], dc["misses"]
                rec["decode_hit_rate"] = dc["hits"] / acc if acc else None
                mm = rec["metrics"]
                clock.log(f"  decode {mm['decode_tok_s']:.2f} tok/s (predicted {_fmt(c.prediction.get('decode_tok_s'))}),"
                          f" prefill {mm['prefill_tok_s']:.1f} tok/s, decode hit "
                          f"{100 * (rec['decode_hit_rate'] or 0):.1f}%, peak {mm['peak_mib'] or 0:.0f} MiB")
            else:
                clock.log(f"  {rec['status']}: {rec.get('detail', '')}")
                if rec["status"] == "OOM" and c.mode == "cache":
                    smaller = next((x for x in all_cands if x.mode == "cache" and x.slots < c.slots
                                    and x not in chosen and x.supported), None)
                    if smaller is not None:
                        clock.log(f"  trying {smaller.name} ({smaller.slots} slots) instead")
                        chosen.append(smaller)
            rec.pop("result", None)
            c.runs.append(rec)
            ran = True
        if not ran:
            break
    for c in chosen:
        ok = [r for r in c.runs if r["status"] == "ok"]
        if ok:
            dec = [r["metrics"]["decode_tok_s"] for r in ok]
            pf = [r["metrics"]["prefill_tok_s"] for r in ok]
            c.measured = {
                "runs": len(ok),
                "decode_tok_s": statistics.median(dec),
                "decode_min": min(dec), "decode_max": max(dec),
                "prefill_tok_s": statistics.median(pf),
                "decode_hit_rate": statistics.median([r["decode_hit_rate"] or 0 for r in ok]),
                "stall_ms_per_token": statistics.median([r["metrics"]["stall_ms_per_token"] or 0 for r in ok]),
                "peak_mib": max((r["metrics"]["peak_mib"] or 0) for r in ok),
                "load_s": statistics.median([r["metrics"]["load_s"] for r in ok]),
            }
        else:
            c.measured = None
    return chosen


def _choose(validated: List[Candidate], cands: List[Candidate]) -> Tuple[Candidate, str]:
    ok = [c for c in validated if c.measured]
    if not ok:
        failed = [c for c in validated if c.failed]
        hard = [c for c in failed if any(r["status"] in ("OOM", "FAILED") for r in c.runs)]
        fails = "; ".join(f"{c.name}: {c.runs[0]['status']} ({c.runs[0].get('detail', '')})" for c in failed)
        left = [c for c in cands if c not in hard]
        if not left:
            raise FlashMoEError(f"every validated configuration failed under the budget: {fails}")
        w = left[0]
        why = ("no validation run completed" + (f" ({fails})" if fails else " within the time limit") +
               f": the winner is the best prediction{' not killed by the limit' if hard else ''} "
               f"({_fmt(w.prediction.get('decode_tok_s'))} decode tok/s predicted), not measured; "
               "raise --time-limit to measure it")
        return w, why
    ok.sort(key=lambda c: c.measured["decode_tok_s"], reverse=True)
    best = ok[0]
    tied = [c for c in ok if c.measured["decode_tok_s"] >= best.measured["decode_tok_s"] * (1 - TIE_FRACTION)]
    w = max(tied, key=lambda c: c.measured["prefill_tok_s"])
    parts = [f"{w.name} had the best measured decode speed: {w.measured['decode_tok_s']:.2f} tok/s "
             f"(median of {w.measured['runs']})"]
    if w is not best:
        parts[0] = (f"{w.name} and {best.name} decoded within {100 * TIE_FRACTION:.0f}% of each other "
                    f"({w.measured['decode_tok_s']:.2f} and {best.measured['decode_tok_s']:.2f} tok/s); {w.name} "
                    f"prefilled faster ({w.measured['prefill_tok_s']:.1f} vs {best.measured['prefill_tok_s']:.1f} tok/s)")
    for o in ok:
        if o is w:
            continue
        d = w.measured["decode_tok_s"] / o.measured["decode_tok_s"] - 1 if o.measured["decode_tok_s"] else 0
        hw, ho = w.measured["decode_hit_rate"], o.measured["decode_hit_rate"]
        reason = []
        if w.mode == "cache" and o.mode == "cache" and w.eviction != o.eviction:
            reason.append(f"{w.eviction.upper()} hit {100 * hw:.1f}% of decode expert accesses, "
                          f"{o.eviction.upper()} {100 * ho:.1f}%")
        elif o.mode == "pagecache":
            reason.append(f"the page cache hit {100 * ho:.1f}% of decode accesses with buffered reads, "
                          f"against {100 * hw:.1f}% here")
        elif w.slots != o.slots:
            reason.append(f"{w.slots} slots against {o.slots}: hit {100 * hw:.1f}% vs {100 * ho:.1f}%")
        elif w.readers != o.readers:
            reason.append(f"{w.readers} readers against {o.readers}")
        elif w.direct_io != o.direct_io:
            reason.append("direct I/O against buffered" if w.direct_io else "buffered I/O against direct")
        spread = max(w.measured["decode_max"] - w.measured["decode_min"], o.measured["decode_max"] - o.measured["decode_min"])
        if w.measured["decode_tok_s"] - o.measured["decode_tok_s"] < spread:
            reason.append("within the run-to-run spread")
        parts.append(f"{'+' if d >= 0 else ''}{100 * d:.0f}% over {o.name}" + (f" ({'; '.join(reason)})" if reason else ""))
    for c in [c for c in validated if c.failed]:
        parts.append(f"{c.name} did not complete ({c.runs[0]['status']}: {c.runs[0].get('detail', '')})")
    return w, "; ".join(parts) + "."


def _header(doc: Dict[str, Any]) -> List[str]:
    w = doc["winner"]
    m = w.get("measured")
    p = w["prediction"]
    lines = [
        f"flashmoe tune, {doc['date']}",
        f"model: {doc['model']['name']} ({format_size(doc['model']['file_bytes'])}, {doc['model']['arch']}, "
        f"{doc['model']['n_expert']} experts, {doc['model']['n_used']} per token)",
        f"machine: {doc['machine']['description']}",
        f"budget: {format_size(doc['budget'])} (cgroup-confined validation runs)",
        f"trace: {doc['trace']['label']}; workload {doc['workload']['prompt_tokens']}-token prompt, "
        f"{doc['workload']['gen_tokens']} generated",
        f"winner: {w['name']}: {w['description']}",
        f"predicted: {_fmt(p.get('decode_tok_s'))} decode tok/s (decode hit rate "
        f"{100 * (p.get('decode_hit_rate') or 0):.1f}%), {_fmt(p.get('prefill_tok_s'), '{:.1f}')} prefill tok/s",
    ]
    if m:
        lines.append(f"measured: {m['decode_tok_s']:.2f} decode tok/s (median of {m['runs']}, "
                     f"{m['decode_min']:.2f}-{m['decode_max']:.2f}), {m['prefill_tok_s']:.1f} prefill tok/s, "
                     f"decode hit rate {100 * m['decode_hit_rate']:.1f}%, peak {m['peak_mib']:.0f} MiB")
    else:
        lines.append("measured: not validated (" + doc["why"] + ")")
    lines.append("")
    return lines


def _cand_dict(c: Candidate) -> Dict[str, Any]:
    d = {"name": c.name, "family": c.family, "description": c.describe(), "mode": c.mode, "slots": c.slots,
         "eviction": c.eviction, "readers": c.readers, "direct_io": c.direct_io, "supported": c.supported,
         "note": c.note, "prediction": c.prediction}
    if c.per_layer:
        d["per_layer"] = {str(k): v for k, v in c.per_layer.items()}
    if c.runs:
        d["runs"] = c.runs
    if c.measured is not None or c.runs:
        d["measured"] = c.measured
    return d


def _document(opts, mf, mp, facts, machine, avail, direct, buffered, cm, tr, tstats, trace_src, P, G, grid, curves,
              pc_sim, ws, cands, per_layer, validated, winner, why, notes, clock) -> Dict[str, Any]:
    from flashmoe import bench

    label = (f"{os.path.basename(trace_src['path'])} ({tr.n_tokens} tokens)"
             if trace_src["source"] == "given" else f"recorded on the {trace_src['prompt']} ({tr.n_tokens} tokens)")
    curve_rows = []
    for s in grid:
        row = {"slots": s, "bytes": s * mp.bytes_per_slot, "fits": s <= mp.max_slots}
        for ev in ("lru", "lfru"):
            r = curves[ev][s]
            row[ev] = {"all": r.hit_rate(), "decode": r.hit_rate("decode"), "prefill": r.hit_rate("prefill"),
                       "layers": {str(lc.layer): lc.phase_hit_rate("decode") for lc in r.layers}}
        curve_rows.append(row)
    return {
        "flashmoe_tune": TUNE_VERSION,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": opts.argv,
        "elapsed_s": clock.elapsed,
        "time_limit_s": opts.time_limit,
        "model": {"name": mf.name, "path": mf.path, "arch": mf.arch, "file_bytes": mf.file_bytes,
                  "n_layer": mf.n_layer, "moe_layers": len(mf.moe_layers), "n_expert": mf.n_expert,
                  "n_used": mf.n_used, "expert_bytes": mf.expert_bytes, "bytes_per_slot": mp.bytes_per_slot},
        "machine": {"description": bench.describe_machine(facts), "facts": facts, "mem_available": avail,
                    "ram_bytes": machine.ram_bytes, "gpu": machine.gpu()},
        "budget": opts.ram,
        "gpu_mem": opts.gpu_mem,
        "base_policy": opts.base,
        "memory": asdict(mp),
        "disk": {"direct": direct, "buffered": buffered},
        "compute": asdict(cm),
        "trace": {**trace_src, "label": label, "stats": tstats},
        "workload": {"prompt_tokens": P, "gen_tokens": G, "n_batch": mp.n_batch, "n_ubatch": mp.n_ubatch,
                     "n_ctx": mp.n_ctx, "threads": opts.threads},
        "curve": curve_rows,
        "pagecache": {"capacity_bytes": mp.cache_space, "all": pc_sim.hit_rate(), "decode": pc_sim.hit_rate("decode")},
        "working_set": {str(k): v for k, v in ws.items()},
        "candidates": [_cand_dict(c) for c in cands],
        "per_layer_candidates": [_cand_dict(c) for c in per_layer],
        "validated": [c.name for c in validated],
        "winner": _cand_dict(winner),
        "why": why,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------- report


def _md_table(headers: Sequence[str], rows: List[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pick_sizes(grid: List[int], max_slots: int, n: int = 8) -> List[int]:
    if len(grid) <= n:
        return list(grid)
    idx = np.unique(np.round(np.linspace(0, len(grid) - 1, n)).astype(int))
    pick = {grid[i] for i in idx}
    if max_slots in grid:
        pick.add(max_slots)
    return sorted(pick)


def format_report(doc: Dict[str, Any]) -> str:
    """The markdown report of a tune document."""
    m, mem, w = doc["model"], doc["memory"], doc["winner"]
    L: List[str] = []
    L.append(f"# flashmoe tune: {m['name']} at {format_size(doc['budget'])}")
    L.append("")
    L.append(f"{doc['date']}; {doc['elapsed_s']:.0f} s of a {doc['time_limit_s']:.0f} s limit. "
             f"Command: `{' '.join(doc['command']) or 'flashmoe tune'}`")
    L.append("")
    L.append("## Result")
    L.append("")
    L.append(f"**Winner: {w['name']}**: {w['description']}.")
    L.append("")
    L.append(doc["why"])
    L.append("")
    p, me = w["prediction"], w.get("measured")
    L.append(f"- predicted: {_fmt(p.get('decode_tok_s'))} decode tok/s, {_fmt(p.get('prefill_tok_s'), '{:.1f}')} "
             f"prefill tok/s, decode hit rate {_pct(p.get('decode_hit_rate'))}, {p.get('bound') or '-'} bound")
    if me:
        L.append(f"- measured: {me['decode_tok_s']:.2f} decode tok/s (median of {me['runs']}, "
                 f"{me['decode_min']:.2f}-{me['decode_max']:.2f}), {me['prefill_tok_s']:.1f} prefill tok/s, "
                 f"decode hit rate {_pct(me['decode_hit_rate'])}, peak {me['peak_mib']:.0f} MiB of "
                 f"{format_size(doc['budget'])}")
    else:
        L.append("- measured: not validated")
    L.append("")
    if doc.get("notes"):
        L.append("Notes:")
        L += [f"- {n}" for n in doc["notes"]]
        L.append("")

    L.append("## Machine")
    L.append("")
    L.append(f"{doc['machine']['description']}; memory available at the start: "
             f"{format_size(doc['machine'].get('mem_available'))}.")
    L.append("")
    dd, db = doc["disk"]["direct"] or {}, doc["disk"]["buffered"] or {}
    qds = sorted({x["qd"] for d in (dd, db) if d.get("ok") for x in d["depths"]})
    if qds:
        sb = dd.get("slice_bytes") or db.get("slice_bytes")
        L.append(f"Random reads of one expert slice ({format_size(sb)}) on the model file "
                 f"(direct: {dd.get('method', 'failed')}):")
        L.append("")
        rows = []
        for q in qds:
            a = next((x for x in dd.get("depths", []) if x["qd"] == q), None) if dd.get("ok") else None
            b = next((x for x in db.get("depths", []) if x["qd"] == q), None) if db.get("ok") else None
            rows.append([q, f"{a['bytes_per_s'] / 1e6:.0f}" if a else "-", f"{a['latency_ms']:.2f}" if a else "-",
                         f"{b['bytes_per_s'] / 1e6:.0f}" if b else "-", f"{b['latency_ms']:.2f}" if b else "-"])
        L.append(_md_table(["queue depth", "direct MB/s", "direct ms/read", "buffered MB/s", "buffered ms/read"], rows))
        L.append("")
    c = doc["compute"]
    if c.get("ok"):
        L.append("Compute (engine with streaming on and a warm cache: constant routing, every access a hit):")
        L.append("")
        L.append(_md_table(["", "decode", "prefill"], [
            ["dense part, ms per token", f"{1000 * c['dense_decode_s']:.3f}", f"{1000 * c['dense_prefill_s']:.3f}"],
            ["one expert in one layer, ms per token", f"{1000 * c['expert_decode_s']:.4f}",
             f"{1000 * c['expert_prefill_s']:.4f}"],
            [f"a token ({m['n_used']} experts x {m['moe_layers']} layers), ms",
             f"{1000 * (c['dense_decode_s'] + m['n_used'] * m['moe_layers'] * c['expert_decode_s']):.3f}",
             f"{1000 * (c['dense_prefill_s'] + m['n_used'] * m['moe_layers'] * c['expert_prefill_s']):.3f}"],
        ]))
        L.append("")
        L.append("Runs: " + "; ".join(f"k={r['k']}: {r['decode_ms_per_token']:.2f} ms/decode token, "
                                      f"{r['prefill_ms_per_token']:.2f} ms/prefill token, load {r['load_s']:.1f} s"
                                      for r in c["runs"]) + ".")
        L.append("")
    else:
        L.append(f"Compute: not calibrated ({c.get('note') or 'no time'}); predictions count I/O only.")
        L.append("")

    L.append("## Memory plan")
    L.append("")
    L.append(_md_table(["", "bytes"], [
        ["budget", format_size(doc["budget"])],
        [f"resident weights (base policy `{doc['base_policy']}`)", format_size(mem["weights"])],
        [f"runtime buffers: KV cache (n_ctx {mem['n_ctx']}) + compute + overhead",
         f"{format_size(mem['runtime'])} = {format_size(mem['kv_cache'])} + {format_size(mem['compute'])} + "
         f"{format_size(mem['overhead'])}"],
        ["left for experts", format_size(mem["cache_space"])],
        ["one slot in every MoE layer", format_size(mem["bytes_per_slot"])],
        ["largest uniform expert cache", f"{mem['max_slots']} slots per layer "
                                         f"({100 * mem['max_slots'] / m['n_expert']:.1f}% of the experts)"],
    ] + ([["measured: peak RSS of the calibration runs less their cache",
           format_size(mem["measured_non_cache"])]] if mem.get("measured_non_cache") else []) + (
        [["measured: slots per layer that fit (margin kept)",
          f"{mem['tight_slots']} (candidates `*-tight`, policy overhead {format_size(mem['tight_overhead'])})"]]
        if mem.get("tight_slots") else [])))
    L.append("")

    t = doc["trace"]
    st = t["stats"]
    L.append("## Trace")
    L.append("")
    L.append(f"{t['label']}: next-token reuse {_pct(st['next_token_reuse'])}, top 10% of experts take "
             f"{_pct(st['top10pct_share'])} of the selections. Workload: {doc['workload']['prompt_tokens']}-token "
             f"prompt (ubatches of {doc['workload']['n_ubatch']}), {doc['workload']['gen_tokens']} tokens generated; "
             "routing forced from this trace in every validation run.")
    L.append("")

    L.append("## Hit rate against cache size")
    L.append("")
    L.append("Exact simulation of the hook's cache (flashmoe.simulate) over the workload; `decode` counts the "
             "decode steps only (what decode tok/s depends on), `all` includes the prefill.")
    L.append("")
    rows = []
    for r in doc["curve"]:
        rows.append([r["slots"], format_size(r["bytes"]), "yes" if r["fits"] else "no",
                     _pct(r["lru"]["all"]), _pct(r["lru"]["decode"]), _pct(r["lfru"]["all"]), _pct(r["lfru"]["decode"])])
    L.append(_md_table(["slots/layer", "cache", "fits (estimate)", "LRU all", "LRU decode", "LFRU all", "LFRU decode"],
                       rows))
    L.append("")
    pc = doc["pagecache"]
    L.append(f"Page-cache mode (modelled as one LRU of {format_size(pc['capacity_bytes'])} shared by all layers, "
             f"the budget less the {'measured' if pc.get('capacity_source') == 'measured' else 'estimated'} "
             f"memory of the process): {_pct(pc['all'])} all, {_pct(pc['decode'])} decode.")
    L.append("")
    if doc.get("png"):
        L.append(f"![hit rate against cache size]({doc['png']})")
        L.append("")
    sizes = _pick_sizes([r["slots"] for r in doc["curve"]], mem["max_slots"])
    by = {r["slots"]: r for r in doc["curve"]}
    for ev in ("lru", "lfru"):
        L.append(f"Per layer, decode hit rate, {ev.upper()} (columns: slots per layer):")
        L.append("")
        layers = list(by[sizes[0]][ev]["layers"])
        rows = []
        for l in layers:
            rows.append([l, f"{doc['working_set'].get(l, 0):.1f}"] + [_pct(by[s][ev]["layers"][l]) for s in sizes])
        L.append(_md_table(["layer", "working set"] + [str(s) + ("*" if s == mem["max_slots"] else "") for s in sizes],
                           rows))
        L.append("")
    L.append(f"\\* the largest cache that fits the budget. Working set: mean distinct experts in 32 consecutive "
             "decode tokens.")
    L.append("")

    L.append("## Candidates (predicted)")
    L.append("")
    L.append("Decode time per token = compute (dense + experts) + reads of the misses (the hook waits for them: "
             "no overlap), each layer's misses read min(readers, reads) at a time at the measured bandwidth of that "
             "queue depth.")
    L.append("")
    rows = []
    val = set(doc["validated"])
    for cd in doc["candidates"] + doc["per_layer_candidates"]:
        p = cd["prediction"]
        d = p.get("decode", {})
        rows.append([cd["name"], cd["description"] + ("" if cd["supported"] else " (not yet supported by the engine)"),
                     _pct(p.get("decode_hit_rate")), f"{d.get('mib_per_token', 0):.1f}",
                     f"{1000 * d.get('io_s_per_token', 0):.2f}", f"{1000 * d.get('compute_s_per_token', 0):.2f}",
                     _fmt(p.get("decode_tok_s")), _fmt(p.get("prefill_tok_s"), "{:.1f}"),
                     "yes" if cd["name"] in val else ""])
    L.append(_md_table(["name", "configuration", "decode hit", "MiB/token", "I/O ms/token", "compute ms/token",
                        "decode tok/s", "prefill tok/s", "validated"], rows))
    L.append("")

    L.append("## Validation (measured under the budget)")
    L.append("")
    vrows = []
    for cd in doc["candidates"]:
        if cd["name"] not in val:
            continue
        p, me = cd["prediction"], cd.get("measured")
        runs = cd.get("runs") or []
        status = ", ".join(sorted({r["status"] for r in runs})) or "not run (time)"
        if me:
            ratio = (me["decode_tok_s"] / p["decode_tok_s"]) if p.get("decode_tok_s") else None
            vrows.append([cd["name"], _fmt(p.get("decode_tok_s")),
                          f"{me['decode_tok_s']:.2f} ({me['decode_min']:.2f}-{me['decode_max']:.2f}, n={me['runs']})",
                          _fmt(ratio), _pct(p.get("decode_hit_rate")), _pct(me["decode_hit_rate"]),
                          f"{1000 * p.get('decode', {}).get('io_s_per_token', 0):.2f}",
                          f"{me['stall_ms_per_token']:.2f}", _fmt(p.get("prefill_tok_s"), "{:.1f}"),
                          f"{me['prefill_tok_s']:.1f}", f"{me['peak_mib']:.0f}", status])
        else:
            detail = next((r.get("detail", "") for r in runs if r["status"] != "ok"), "")
            vrows.append([cd["name"], _fmt(p.get("decode_tok_s")), "-", "-", _pct(p.get("decode_hit_rate")), "-",
                          "-", "-", _fmt(p.get("prefill_tok_s"), "{:.1f}"), "-", "-",
                          status + (f": {detail}" if detail else "")])
    if vrows:
        L.append(_md_table(["name", "pred. decode tok/s", "measured decode tok/s", "measured/pred.", "pred. decode hit",
                            "meas. decode hit", "pred. read ms/token", "meas. stall ms/token", "pred. prefill tok/s",
                            "meas. prefill tok/s", "peak MiB", "status"], vrows))
    else:
        L.append("No validation run fitted in the time limit.")
    L.append("")
    L.append("The measured decode hit rate of an explicit cache equals the simulated one when the simulator and "
             "the engine agree (they are tested to); the page-cache figure is a model.")
    L.append("")

    L.append("## Per-layer slot counts")
    L.append("")
    L.append("The hook takes one slot count for all layers today (`flashmoe_params.cache_slots`). The per-layer "
             "candidates above are simulated only. Supporting them needs one call before the model load, "
             "`int32_t flashmoe_config_layer_slots(int32_t il, int32_t n_slots)` (0 = use cache_slots), read "
             "by `attach` when it sizes each layer's slot tensors; everything after that (`n_waves`, "
             "`pick_victim`, the ageing period, the per-layer stats' n_slots) already works per layer; "
             "`flashmoe_model_info.n_slots` would report the largest. A policy key `cache_slots_per_layer: "
             "{N: slots}` would carry it.")
    L.append("")
    return "\n".join(L)


def plot_png(doc: Dict[str, Any]) -> Optional[bytes]:
    """Hit rate against cache size (overall and per layer) as a PNG, or None without matplotlib."""
    try:
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    xs = [r["slots"] for r in doc["curve"]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for ev, color in (("lru", "tab:blue"), ("lfru", "tab:orange")):
        layers = list(doc["curve"][0][ev]["layers"])
        for l in layers:
            ax.plot(xs, [100 * r[ev]["layers"][l] for r in doc["curve"]], color=color, alpha=0.15, lw=0.8)
        ax.plot(xs, [100 * r[ev]["decode"] for r in doc["curve"]], color=color, lw=2.2,
                label=f"{ev.upper()} decode (overall; thin: per layer)")
    ms = doc["memory"]["max_slots"]
    if ms:
        ax.axvline(ms, color="k", ls="--", lw=1)
        ax.text(ms, 2, f" budget: {ms} slots", fontsize=8)
    ax.axhline(100 * doc["pagecache"]["decode"], color="tab:green", ls=":", lw=1.5, label="page cache (model)")
    ax.set_xlabel("cache slots per layer")
    ax.set_ylabel("decode hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{doc['model']['name']}: hit rate against cache size", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(result: TuneResult, opts: TuneOptions) -> List[str]:
    """The policy, the report and its PNG, each written atomically; returns the paths written."""
    from gguf_tools.atomic import atomic_write

    written = []
    with atomic_write(opts.out, "w") as f:
        f.write(result.policy_text)
    written.append(opts.out)
    if opts.report:
        if result.png is not None:
            png_path = os.path.join(os.path.dirname(os.path.abspath(opts.report)), result.doc["png"])
            with atomic_write(png_path, "wb") as f:
                f.write(result.png)
            written.append(png_path)
        with atomic_write(opts.report, "w") as f:
            f.write(result.report_text)
        written.append(opts.report)
    return written


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
