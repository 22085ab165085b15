"""`flashmoe bench`: policies against stock llama.cpp under a memory budget, honestly.

Every run is a fresh process (flashmoe.bench_worker), confined with a memory cgroup (its memory and
its page cache) when there is a budget; configurations run in alternation (A B A B ...), ``repeat``
times; medians and min/max are reported. The definitions are those of the reference benchmark B1
(shared/BENCHMARK.md; docs/BENCHMARKS.md says how to read the output).

Public API::

    BenchOptions(...)                        # what the command line says
    run_bench(opts, log=print) -> dict       # runs everything, returns the JSON document
    format_markdown(doc) -> str              # the readable report (tables) of that document
    plot_sweep(doc, path)                    # decode tok/s against the budget (matplotlib)
    measure_disk(model_path, ...) -> dict    # direct (O_DIRECT/F_NOCACHE) random reads of one expert slice at QD 1/4/8
    machine_facts(model_path) -> dict
    STOCK_VARIANTS                           # the stock llama.cpp baselines of --vs stock
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import json
import mmap
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from flashmoe.errors import FlashMoEError, UsageError
from flashmoe.settings import EngineSettings, RuntimeSettings, StreamSettings
from flashmoe.sizes import format_size

MiB = 1 << 20
GiB = 1 << 30
BENCH_VERSION = 1
MEASURE_ONLY_LIMIT = 1 << 50  # a cgroup that only measures (no real limit)
DEFAULT_RUN_TIMEOUT = 3600.0
DISK_DEPTHS = (1, 4, 8)
DISK_READS = 256  # reads per queue depth

# name -> (description, RuntimeSettings fields). The knobs a llama.cpp user would try; the hook is off
# (it only forces the routing when a trace is given).
STOCK_VARIANTS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "stock": ("llama.cpp defaults: mmap, CPU weight repacking on (repacked weights live in anonymous memory)",
              {"use_extra_bufts": True, "load_mode": "mmap"}),
    "stock-mmap": ("weight repacking off: weights stay on the mmap and the page cache streams them "
                   "(the baseline of the speed target)", {"use_extra_bufts": False, "load_mode": "mmap"}),
    "stock-no-mmap": ("--no-mmap (load mode none): the model read into anonymous memory",
                      {"use_extra_bufts": True, "load_mode": "ram"}),
    # with repacking on, lazy mode is killed like `stock` (the repacked copies are anonymous memory)
    "stock-lazy": ("--lazy-mode on with repacking off: tensors read lazily through the mmap (MADV_RANDOM, "
                   "no populate, no readahead)", {"use_extra_bufts": False, "load_mode": "mmap", "lazy_mode": "on"}),
}
GPU_VARIANT = "stock-n-cpu-moe"
GPU_VARIANT_DESC = ("--n-cpu-moe style: routed experts in host memory on the mmap, the rest on the GPU "
                    "(through flashmoe placements: llama-cpp-python has no -ot binding)")
REFERENCE_DESC = "stock llama.cpp, weight repacking off, unconfined, same routing"


# ------------------------------------------------------------------------------------------- options


@dataclass
class BenchOptions:
    model: str
    policies: List[str] = field(default_factory=list)
    vs: List[str] = field(default_factory=list)  # stock variant names
    budgets: List[Optional[int]] = field(default_factory=lambda: [None])  # None: unconfined
    drop_caches: bool = False
    prompt_tokens: int = 64
    gen_tokens: int = 128
    repeat: int = 3
    routing_trace: Optional[str] = None
    threads: Optional[int] = None
    run_timeout: float = DEFAULT_RUN_TIMEOUT
    reference: bool = True
    reference_cache: bool = True
    disk: bool = True
    argv: List[str] = field(default_factory=list)


@dataclass
class Config:
    name: str
    kind: str  # "policy" | "stock"
    description: str
    policy: Any = None  # flashmoe.policy.Policy
    stock: Dict[str, Any] = field(default_factory=dict)  # RuntimeSettings fields of a stock variant
    placements: Optional[Dict[str, str]] = None  # stock variants that place tensors (GPU)
    applicable: bool = True
    reason: str = ""


@dataclass
class Plan:
    """A configuration at one budget: what the runs run with (or why it cannot run)."""

    config: Config
    budget: Optional[int]
    settings: Optional[EngineSettings] = None
    error: Optional[str] = None
    resolution: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.config.name}@{budget_text(self.budget)}"


def budget_text(b: Optional[int]) -> str:
    return "none" if b is None else format_size(b)


# ------------------------------------------------------------------------------------- configurations


def build_configs(opts: BenchOptions, model_view) -> List[Config]:
    from flashmoe.policy import load_policy

    out: List[Config] = []
    names = set()

    def unique(n: str) -> str:
        base, i = n, 2
        while n in names:
            n = f"{base}#{i}"
            i += 1
        names.add(n)
        return n

    for p in opts.policies:
        pol = load_policy(p)
        out.append(Config(unique(pol.name), "policy", pol.description or f"policy {p}", policy=pol))
    if opts.vs:
        from flashmoe.policy import detect_gpu_backend

        gpu = detect_gpu_backend()
        for v in opts.vs:
            if v == GPU_VARIANT:
                c = Config(unique(v), "stock", GPU_VARIANT_DESC, stock={"use_extra_bufts": False, "load_mode": "mmap"})
                if gpu is None:
                    c.applicable, c.reason = False, "not applicable on CPU builds (no GPU backend in this llama.cpp build)"
                else:
                    c.placements = {t.name: ("mmap" if t.is_expert else "gpu") for t in model_view.tensors}
                out.append(c)
                continue
            desc, knobs = STOCK_VARIANTS[v]
            out.append(Config(unique(v), "stock", desc, stock=dict(knobs)))
    return out


def expand_vs(values: Sequence[str]) -> List[str]:
    """--vs values -> stock variant names, in order ("stock" alone means all of them)."""
    out: List[str] = []
    for v in values:
        if v == "none":
            continue
        if v == "stock":
            names = list(STOCK_VARIANTS) + [GPU_VARIANT]
        elif v in STOCK_VARIANTS or v == GPU_VARIANT:
            names = [v]
        else:
            choices = ", ".join(["stock"] + list(STOCK_VARIANTS) + [GPU_VARIANT, "none"])
            raise UsageError(f"unknown --vs {v!r}; expected one of {choices}")
        out += [n for n in names if n not in out]
    return out


def plan(config: Config, model, budget: Optional[int], n_ctx: int, threads: Optional[int]) -> Plan:
    """Resolve a configuration at a budget. A policy's own budget is replaced by the bench's."""
    p = Plan(config, budget)
    if not config.applicable:
        return p
    if config.kind == "policy":
        pol = copy.deepcopy(config.policy)
        pol.runtime.n_ctx = n_ctx  # the context the runs use: the memory plan (cache: auto) must see it
        if threads:
            pol.runtime.threads = threads
        try:
            res = pol.resolve(model, budget=budget)
            p.resolution = {
                "budget": res.memory.budget,
                "budget_source": res.memory.budget_source,
                "cache_mode": res.cache.mode,
                "cache_slots": res.cache.slots,
                "cache_bytes": res.cache.bytes,
                "memory_estimate": {k: getattr(res.memory, k) for k in (
                    "pinned", "ram", "cache", "kv_cache", "recurrent_state", "compute", "overhead")},
                "memory_total": res.memory.total,
                "warnings": list(res.warnings),
                "errors": list(res.errors),
            }
            p.settings = res.engine_settings()
        except FlashMoEError as e:
            p.error = str(e)
            return p
    else:
        rt = RuntimeSettings(n_ctx=n_ctx, n_threads=threads, **config.stock)
        p.settings = EngineSettings(policy_name=config.name, stream=StreamSettings(mode="off"), runtime=rt,
                                    placements=dict(config.placements or {}))
    p.settings.runtime.n_ctx = n_ctx
    p.settings.runtime.n_threads = threads
    if config.kind == "stock":
        p.settings.policy_name = "stock"  # not a policy: the engine's mode line then says "stock llama.cpp (...)"
    return p


def reference_settings(n_ctx: int, threads: Optional[int]) -> EngineSettings:
    rt = RuntimeSettings(n_ctx=n_ctx, n_threads=threads, use_extra_bufts=False, load_mode="mmap")
    return EngineSettings(policy_name="reference", stream=StreamSettings(mode="off"), runtime=rt)


def planned_mode_line(settings: EngineSettings, routing_trace: Optional[str], n_expert_used_model: int) -> str:
    """What a run was set to run with (the engine's own mode line is used when the run got that far)."""
    from flashmoe.engine import format_mode_line

    return format_mode_line(settings, routing_trace, n_expert_used_model, n_threads=True)


# ------------------------------------------------------------------------------------------ machine


def _cpu_model() -> Optional[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            r = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            return r.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    if sys.platform == "darwin":
        return "macOS " + platform.mac_ver()[0]
    return platform.system()


def _read(p: Path) -> Optional[str]:
    try:
        return p.read_text().strip() or None
    except OSError:
        return None


def disk_facts(path: str) -> Dict[str, Any]:
    """The block device holding path (Linux /sys/block), as far as known."""
    out: Dict[str, Any] = {}
    try:
        st = os.stat(path)
    except OSError:
        return out
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not dev.exists():
        return out
    d = dev.resolve()
    if (d / "partition").exists():
        d = d.parent
    out["device"] = d.name
    model = _read(d / "device" / "model")
    vendor = _read(d / "device" / "vendor")
    drv = d / "device" / "driver"
    driver = drv.resolve().name if drv.exists() else None
    out["model"] = " ".join(x for x in (vendor, model) if x) if model else None  # virtio: vendor id only
    out["driver"] = driver
    rot = _read(d / "queue" / "rotational")
    out["rotational"] = None if rot is None else rot == "1"
    size = _read(d / "size")
    out["bytes"] = int(size) * 512 if size and size.isdigit() else None
    return out


def machine_facts(model_path: str) -> Dict[str, Any]:
    from flashmoe import machine

    try:
        from importlib.metadata import version

        llama_version = version("llama_cpp_python")
    except Exception:
        llama_version = None
    try:
        from importlib.metadata import version

        fm_version = version("flashmoe")
    except Exception:
        fm_version = None
    return {
        "cpu": _cpu_model(),
        "cores": machine.cpu_count(),
        "cores_usable": machine.usable_cpus(),
        "ram_bytes": machine.physical_ram(),
        "os": _os_name(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_version,
        "flashmoe": fm_version,
        "disk": disk_facts(model_path),
        "hostname": platform.node(),
    }


def describe_machine(m: Dict[str, Any]) -> str:
    d = m.get("disk") or {}
    disk = "disk unknown"
    if d.get("device"):
        what = d.get("model") or (f"{d['driver']} device" if d.get("driver") else "model unknown")
        rot = "" if d.get("rotational") is None else (", rotational" if d["rotational"] else ", non-rotational")
        disk = f"disk {d['device']} ({what}{rot})"
    ram = format_size(m["ram_bytes"]) if m.get("ram_bytes") else "RAM unknown"
    return (f"{m.get('cpu') or 'CPU unknown'}, {m.get('cores')} cores, {ram} RAM, {m.get('os')}, "
            f"kernel {m.get('kernel')}, {disk}")


# -------------------------------------------------------------------------------------- page cache


def evict_file(paths: Sequence[str]) -> Optional[str]:
    """Drops the clean page-cache pages of these files (posix_fadvise DONTNEED; needs no privilege).
    None on success, else why not."""
    if not hasattr(os, "posix_fadvise"):
        return "posix_fadvise is not available here"
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as e:
            return f"cannot open {p}: {e.strerror}"
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            return f"posix_fadvise failed on {p}: {e.strerror}"
        finally:
            os.close(fd)
    return None


# -------------------------------------------------------------------------------------------- disk


def _alloc_aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # anonymous mappings are page-aligned: fine for O_DIRECT


def timed_reads(fds: List[int], offs: List[Tuple[int, int]], qd: int, read_len: int) -> Tuple[int, float, List[str]]:
    """`qd` threads doing back-to-back preadv of `read_len` bytes (page-aligned buffers) at the
    (file index, offset) pairs: (bytes read, seconds, errors)."""
    from flashmoe.machine import pread_into

    it = iter(offs)
    lock = threading.Lock()
    done = [0]
    errors: List[str] = []

    def worker():
        b = _alloc_aligned(read_len)
        try:
            while True:
                with lock:
                    nxt = next(it, None)
                if nxt is None:
                    return
                fi, off = nxt
                try:
                    got = pread_into(fds[fi], b, off)
                except OSError as e:
                    errors.append(e.strerror or str(e))
                    return
                with lock:
                    done[0] += got
        finally:
            b.close()

    threads = [threading.Thread(target=worker) for _ in range(qd)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return done[0], time.perf_counter() - t0, errors


def measure_disk(model_path: str, depths: Sequence[int] = DISK_DEPTHS, reads: int = DISK_READS,
                 seed: int = 0, drop: Optional[Callable[[], Optional[str]]] = None) -> Dict[str, Any]:
    """Random reads of one expert slice's size on the model's own file, around the page cache where the
    system and file system allow it (O_DIRECT on Linux, F_NOCACHE on macOS; else buffered reads after
    evicting the file from the page cache, said so, or saying that it could not be evicted), at each
    queue depth: that many threads doing back-to-back preadv into page-aligned buffers."""
    from flashmoe.machine import open_uncached, pread_into
    from gguf_tools.reader import open_model

    with open_model(model_path) as m:
        files = list(m.files)
        sizes = list(m.file_sizes)
        experts = [t for t in m.tensors if t.is_expert and t.expert_stride > 0]
    if not experts:
        return {"ok": False, "reason": "the model has no routed experts"}
    strides: Dict[int, int] = {}
    for t in experts:
        strides[t.expert_stride] = strides.get(t.expert_stride, 0) + 1
    slice_bytes = max(strides, key=lambda s: (strides[s], s))
    page = mmap.PAGESIZE
    rlen = -(-slice_bytes // page) * page
    note = None
    if drop is not None:
        why = drop()
        if why:
            note = why
    direct = True
    fds: List[int] = []
    method = "O_DIRECT"
    evict_why: Optional[str] = None
    try:
        try:
            for f in files:
                fd, method = open_uncached(f)
                fds.append(fd)
            buf = _alloc_aligned(rlen)
            try:
                pread_into(fds[0], buf, 0)  # some file systems accept the flag but fail the read
            finally:
                buf.close()
        except OSError as e:
            for fd in fds:
                os.close(fd)
            fds = [os.open(f, os.O_RDONLY) for f in files]
            why_not = e.strerror or str(e)
            direct = False
            evict_why = evict_file(files)
            method = (f"buffered (direct I/O not available: {why_not}; file evicted from the page cache first)"
                      if evict_why is None else
                      f"buffered (direct I/O not available: {why_not}; the file could not be evicted from the "
                      f"page cache either: {evict_why}, so reads may be served from memory)")
        rng = random.Random(seed)
        results = []
        for qd in depths:
            n = max(reads, 16 * qd)
            offs = []
            for _ in range(n):
                t = rng.choice(experts)
                e = rng.randrange(max(1, t.nbytes // t.expert_stride))
                off = (t.data_offset + e * t.expert_stride) // page * page
                off = min(off, max(0, (sizes[t.file_index] - rlen) // page * page))
                offs.append((t.file_index, off))
            if not direct:
                evict_file(files)
            got, dt, errors = timed_reads(fds, offs, qd, rlen)
            if errors:
                return {"ok": False, "reason": f"reads failed: {errors[0]}", "method": method}
            results.append({"qd": qd, "reads": n, "bytes": got, "s": dt,
                            "bytes_per_s": got / dt if dt > 0 else 0.0,
                            "latency_ms": 1000 * dt * qd / n})
    finally:
        for fd in fds:
            os.close(fd)
    return {"ok": True, "method": method, "direct": direct, "slice_bytes": slice_bytes, "read_bytes": rlen,
            "depths": results, "note": note}


def disk_bw_for(disk: Dict[str, Any], readers: int) -> Tuple[Optional[float], Optional[int]]:
    """Measured bandwidth at the deepest measured queue depth not above `readers`."""
    if not disk or not disk.get("ok"):
        return None, None
    ds = sorted(disk["depths"], key=lambda d: d["qd"])
    pick = [d for d in ds if d["qd"] <= max(1, readers)] or ds[:1]
    d = pick[-1]
    return d["bytes_per_s"], d["qd"]


# --------------------------------------------------------------------------------------- reference


def _lib_identity() -> Dict[str, Any]:
    import importlib.util

    out: Dict[str, Any] = {}
    libdir = os.environ.get("LLAMA_CPP_LIB_PATH")
    if not libdir:
        spec = importlib.util.find_spec("llama_cpp")
        if spec and spec.origin:
            libdir = os.path.join(os.path.dirname(spec.origin), "lib")
    if libdir and os.path.isdir(libdir):
        for f in sorted(os.listdir(libdir)):
            p = os.path.join(libdir, f)
            if os.path.isfile(p):
                st = os.stat(p)
                out[f] = [st.st_size, st.st_mtime_ns]
    return out


def _file_identity(path: str) -> List[Any]:
    st = os.stat(path)
    return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashmoe" / "bench"


# --------------------------------------------------------------------------------------------- runs


def _worker_env() -> Dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def parse_worker_output(stdout: str) -> Tuple[Optional[dict], List[dict]]:
    from flashmoe.bench_worker import PROGRESS_TAG, RESULT_TAG

    result, prog = None, []
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            try:
                result = json.loads(line[len(RESULT_TAG):])
            except ValueError:
                pass
        elif line.startswith(PROGRESS_TAG):
            try:
                prog.append(json.loads(line[len(PROGRESS_TAG):]))
            except ValueError:
                pass
    return result, prog


def progress_summary(prog: List[dict], n_prompt: int, n_gen: int) -> Dict[str, Any]:
    """How far a run got (from its progress lines): stage, load time, prefill, decode steps done."""
    out: Dict[str, Any] = {"stage": "starting", "load_s": None, "prefill_s": None, "decode_steps": 0,
                           "generated": 0, "partial_decode_tok_s": None, "last_t": None}
    t_loaded = t_prefill = t_last = None
    for p in prog:
        t_last = p.get("t")
        if p["stage"] == "start":
            out["stage"] = "loading"
        elif p["stage"] == "loaded":
            out["stage"] = "prefill"
            out["load_s"] = p.get("load_s")
            t_loaded = p["t"]
        elif p["stage"] == "eval":
            if p.get("i") == 1:
                out["stage"] = "decode"
                t_prefill = p["t"]
                out["prefill_s"] = (t_prefill - t_loaded) if t_loaded is not None else None
                out["generated"] = 1
            else:
                out["decode_steps"] = p["i"] - 1
                out["generated"] = p["i"]
    out["last_t"] = t_last
    if out["decode_steps"] and t_prefill is not None and t_last is not None and t_last > t_prefill:
        out["partial_decode_tok_s"] = out["decode_steps"] / (t_last - t_prefill)
    return out


def describe_progress(ps: Dict[str, Any], n_prompt: int, n_gen: int) -> str:
    if ps["stage"] == "starting":
        return "before the model load began (starting Python and the libraries)"
    if ps["stage"] == "loading":
        return "during load"
    bits = [f"loaded in {ps['load_s']:.1f} s" if ps.get("load_s") is not None else "loaded"]
    if ps["stage"] == "prefill":
        bits.append(f"during the prefill of {n_prompt} tokens")
        return ", ".join(bits)
    if ps.get("prefill_s") is not None:
        bits.append(f"prefill of {n_prompt} tokens in {ps['prefill_s']:.1f} s")
    bits.append(f"{ps['generated']}/{n_gen} tokens generated")
    if ps.get("partial_decode_tok_s"):
        bits.append(f"decoding at {ps['partial_decode_tok_s']:.3g} tok/s")
    return ", ".join(bits)


def run_worker(spec: Dict[str, Any], limit: Optional[int], timeout: float, measure: bool) -> Dict[str, Any]:
    """One worker process; limit None: unconfined (in a measuring cgroup when `measure`)."""
    from flashmoe.cgroup import run_limited

    fd, spec_path = tempfile.mkstemp(prefix="flashmoe-bench-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        cmd = [sys.executable, "-m", "flashmoe.bench_worker", "@" + spec_path]
        cg_limit = limit if limit is not None else (MEASURE_ONLY_LIMIT if measure else None)
        r = run_limited(cmd, cg_limit, timeout=timeout, env=_worker_env())
    finally:
        try:
            os.unlink(spec_path)
        except OSError:
            pass
    result, prog = parse_worker_output(r.stdout or "")
    n_prompt, n_gen = spec["prompt_tokens"], spec["gen_tokens"]
    ps = progress_summary(prog, n_prompt, n_gen)
    rec: Dict[str, Any] = {
        "returncode": r.returncode,
        "wall_s": r.wall_s,
        "peak_bytes": r.peak_bytes,
        "peak_source": "cgroup" if r.peak_bytes is not None else None,
        "oom_killed": bool(r.oom) if limit is not None else False,
        "timed_out": r.timed_out,
        "progress": ps,
    }
    if result is not None and result.get("ok"):
        rec["status"] = "ok"
        rec["result"] = result
        if rec["peak_bytes"] is None:
            rec["peak_bytes"] = result["report"].get("peak_rss_bytes")
            rec["peak_source"] = "rss"
    elif r.timed_out:
        rec["status"] = "TIMEOUT"
        rec["detail"] = f"killed after {timeout:g} s " + describe_progress(ps, n_prompt, n_gen)
    elif limit is not None and r.oom:
        rec["status"] = "OOM"
        rec["detail"] = f"killed by the {format_size(limit)} memory limit " + describe_progress(ps, n_prompt, n_gen)
    elif result is not None:
        rec["status"] = "FAILED"
        rec["detail"] = result.get("error", "failed")
    else:
        rec["status"] = "FAILED"
        how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
        tail = (r.stderr or "").strip().splitlines()[-3:]
        rec["detail"] = f"the worker died ({how}) " + describe_progress(ps, n_prompt, n_gen) + (
            ": " + " | ".join(tail) if tail else "")
    if rec["status"] != "ok":
        rec["stderr_tail"] = (r.stderr or "")[-2000:]
    return rec


def run_metrics(rec: Dict[str, Any], streaming: bool, readers: int, disk: Optional[dict]) -> Dict[str, Any]:
    """The reported figures of one completed run (per token figures are of the decode phase)."""
    res = rec["result"]
    rep, dec = res["report"], res["decode"]
    n = max(1, dec["tokens"])
    c = dec["cache"]
    acc = c["hits"] + c["misses"]
    has_cache = bool((rep.get("cache") or {}).get("total")) and acc > 0
    m: Dict[str, Any] = {
        "load_s": rep["load_s"],
        "ttft_s": rep["ttft_s"],
        "prefill_tok_s": rep["prefill_tok_s"],
        "decode_tok_s": rep["decode_tok_s"],
        "generated_tokens": rep["generated_tokens"],
        "decode_tokens": dec["tokens"],
        "disk_mib_per_token": dec["disk_read_bytes"] / n / MiB,
        "major_faults_per_token": dec["major_faults"] / n,
        "hit_rate": (c["hits"] / acc) if has_cache else None,
        "stall_ms_per_token": (1000 * c["stall_s"] / n) if has_cache else None,
        "expert_mib_per_token": (c["bytes_read"] / n / MiB) if has_cache else None,
        "peak_mib": rec["peak_bytes"] / MiB if rec.get("peak_bytes") else None,
        "io_bound_tok_s": None,
        "io_fraction": None,
        "io_bound_qd": None,
    }
    if streaming:
        per_tok = c["bytes_read"] / n if has_cache and c["bytes_read"] else dec["disk_read_bytes"] / n
        bw, qd = disk_bw_for(disk or {}, readers)
        m["io_bound_qd"] = qd
        if bw and per_tok > 0:
            m["io_bound_tok_s"] = bw / per_tok
            m["io_fraction"] = rep["decode_tok_s"] / m["io_bound_tok_s"]
    return m


METRICS = ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "disk_mib_per_token", "major_faults_per_token",
           "hit_rate", "stall_ms_per_token", "expert_mib_per_token", "peak_mib", "io_bound_tok_s", "io_fraction")


def _agg(values: List[Optional[float]]) -> Optional[Dict[str, float]]:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def first_difference(a: List[int], b: List[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# -------------------------------------------------------------------------------------------- bench


def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Dict[str, Any]:
    from flashmoe import cgroup
    from flashmoe.machine import is_linux, needs_linux
    from flashmoe.policy import open_model_view
    from gguf_tools.inspect import model_facts
    from gguf_tools.reader import open_model, require_moe

    # Linux-only features: one clear line before anything starts (macOS has no cgroups and no /proc)
    if any(b is not None for b in opts.budgets) and not is_linux():
        flag = "--sweep-ram" if len(opts.budgets) > 1 else "--ram-limit"
        raise FlashMoEError(needs_linux(
            flag, "each run is confined with a Linux memory cgroup",
            f"run without {flag} (peak memory is then each run's peak RSS), or in a Linux VM"))
    if opts.drop_caches and not is_linux():
        raise FlashMoEError(needs_linux(
            "--drop-caches", "it writes /proc/sys/vm/drop_caches", "run without --drop-caches, or in a Linux VM"))
    if not os.path.isfile(opts.model):
        raise FlashMoEError(f"no such model: {opts.model}")
    if opts.routing_trace and not os.path.isfile(opts.routing_trace):
        raise FlashMoEError(f"no such routing trace: {opts.routing_trace}")
    confined = any(b is not None for b in opts.budgets)
    backend = None
    if confined:
        try:
            backend = cgroup.detect()
        except FlashMoEError as e:
            raise FlashMoEError(f"--ram-limit needs a memory cgroup, and {e}") from None
    else:
        try:
            backend = cgroup.detect()
        except FlashMoEError:
            backend = None  # unconfined runs: the peak is the worker's RSS then

    with open_model(opts.model) as m:
        require_moe(m)
        facts = model_facts(m)
        view = open_model_view(m)
        model_files = list(m.files)
        trace_info = None
        if opts.routing_trace:
            from flashmoe.trace import check_trace_fits, read_trace, trace_stats

            tr = read_trace(opts.routing_trace)
            check_trace_fits(tr, m, tr.n_used)  # layers and experts; a run with another count fails alone
            trace_info = {"path": os.path.abspath(opts.routing_trace), "sha256": _sha256(opts.routing_trace),
                          "stats": trace_stats(tr)}
        n_ctx = max(256, opts.prompt_tokens + opts.gen_tokens + 16)
        configs = build_configs(opts, view)
        if not configs:
            raise UsageError("nothing to run: give --policy and/or --vs stock")
        plans: List[Plan] = [plan(c, view, b, n_ctx, opts.threads) for b in opts.budgets for c in configs]
    n_expert_used = facts.get("n_expert_used") or 0

    # page cache handling
    notes: List[str] = []
    drop_note: Optional[str] = None

    def prepare_page_cache(limit: Optional[int]) -> Dict[str, Any]:
        nonlocal drop_note
        act: Dict[str, Any] = {"dropped": False, "model_evicted": False}
        if opts.drop_caches:
            why = cgroup.drop_caches()
            if why is None:
                act["dropped"] = True
                return act
            if drop_note is None:
                drop_note = why
                log(f"warning: {why}; evicting the model file from the page cache instead (posix_fadvise)")
        if opts.drop_caches or limit is not None:
            # pages of the model cached by earlier runs were charged elsewhere: a confined run would
            # use them for free. Evicting the model's own pages needs no privilege.
            why = evict_file(model_files)
            act["model_evicted"] = why is None
            if why:
                act["evict_error"] = why
        return act

    machine = machine_facts(opts.model)
    disk = None
    if opts.disk:
        log("measuring the disk: random reads of one expert slice on the model file, QD " +
            "/".join(map(str, DISK_DEPTHS)))
        disk = measure_disk(opts.model, drop=(cgroup.drop_caches if opts.drop_caches else None))
        if disk.get("ok"):
            log("  " + ", ".join(f"QD{d['qd']} {d['bytes_per_s'] / 1e9:.2f} GB/s" for d in disk["depths"]))
        else:
            log(f"  disk measurement failed: {disk.get('reason')}")

    base_spec = {
        "model": os.path.abspath(opts.model),
        "prompt_tokens": opts.prompt_tokens,
        "gen_tokens": opts.gen_tokens,
        "threads": opts.threads,
        "n_ctx": n_ctx,
        "routing_trace": os.path.abspath(opts.routing_trace) if opts.routing_trace else None,
    }

    # the reference: unconfined, repacking off, same routing; once per model and trace
    reference: Dict[str, Any] = {"description": REFERENCE_DESC, "status": "skipped"}
    if opts.reference:
        reference = _reference(opts, base_spec, n_ctx, model_files, trace_info, backend is not None, log)

    # the runs, in alternation
    runnable = [p for p in plans if p.settings is not None and p.error is None]
    runs: List[Dict[str, Any]] = []
    total = len(runnable) * opts.repeat
    seq = 0
    for rnd in range(opts.repeat):
        for p in runnable:
            seq += 1
            act = prepare_page_cache(p.budget)
            spec = dict(base_spec, settings=asdict(p.settings))
            log(f"[{seq}/{total}] {p.config.name} at {budget_text(p.budget)} (round {rnd + 1}/{opts.repeat}) ...")
            rec = run_worker(spec, p.budget, opts.run_timeout, measure=backend is not None)
            rec.update({"seq": seq, "round": rnd + 1, "config": p.config.name, "budget": p.budget,
                        "page_cache": act})
            streaming = p.settings.stream.mode != "off"
            if rec["status"] == "ok":
                rec["metrics"] = run_metrics(rec, streaming, p.settings.stream.readers, disk)
                rec["tokens"] = rec["result"]["tokens"]
                rec["mode_line"] = rec["result"]["mode_line"]
                if reference.get("tokens") is not None:
                    d = first_difference(rec["tokens"], reference["tokens"])
                    rec["identical"] = d is None
                    rec["first_difference"] = d
                else:
                    rec["identical"] = None
                mm = rec["metrics"]
                log(f"    ok: decode {mm['decode_tok_s']:.2f} tok/s, prefill {mm['prefill_tok_s']:.1f} tok/s, "
                    f"peak {mm['peak_mib'] or 0:.0f} MiB, {rec['wall_s']:.1f} s"
                    + ("" if rec["identical"] in (True, None) else "; OUTPUT DIFFERS from the reference"))
            else:
                rec["mode_line"] = planned_mode_line(p.settings, opts.routing_trace, n_expert_used)
                log(f"    {rec['status']}: {rec.get('detail', '')}")
            runs.append(rec)

    summary = [_summarize(p, [r for r in runs if r["config"] == p.config.name and r["budget"] == p.budget],
                          opts, n_expert_used) for p in plans]
    if drop_note:
        notes.append(f"the page cache could not be dropped ({drop_note}); the model file was evicted from it "
                     "before each run instead (posix_fadvise DONTNEED)")
    doc = {
        "flashmoe_bench": BENCH_VERSION,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": opts.argv,
        "machine": machine,
        "model": facts,
        "bench": {
            "prompt_tokens": opts.prompt_tokens,
            "gen_tokens": opts.gen_tokens,
            "greedy": True,
            "repeat": opts.repeat,
            "threads": opts.threads or os.cpu_count(),
            "n_ctx": n_ctx,
            "budgets": opts.budgets,
            "cgroup": backend.kind if backend else None,
            "drop_caches": opts.drop_caches,
            "page_cache_could_drop": drop_note is None if opts.drop_caches else None,
            "model_evicted_before_confined_runs": True,
            "run_timeout_s": opts.run_timeout,
            "routing_trace": trace_info,
            "order": "alternation: every round runs each configuration at each budget once, in order",
        },
        "disk": disk,
        "reference": {k: v for k, v in reference.items()},
        "configs": [{"name": c.name, "kind": c.kind, "description": c.description, "applicable": c.applicable,
                     "reason": c.reason, "policy_source": (c.policy.source if c.policy is not None else None),
                     "stock_knobs": c.stock or None} for c in configs],
        "plans": [{"config": p.config.name, "budget": p.budget, "error": p.error, "resolution": p.resolution,
                   "settings": asdict(p.settings) if p.settings is not None else None} for p in plans],
        "runs": runs,
        "summary": summary,
        "notes": notes,
    }
    return doc


def _reference(opts, base_spec, n_ctx, model_files, trace_info, measure, log) -> Dict[str, Any]:
    settings = reference_settings(n_ctx, opts.threads)
    key = {
        "model": [_file_identity(f) for f in model_files],
        "trace": trace_info["sha256"] if trace_info else None,
        "prompt_tokens": opts.prompt_tokens,
        "gen_tokens": opts.gen_tokens,
        "threads": opts.threads,
        "n_ctx": n_ctx,
        "lib": _lib_identity(),
        "settings": asdict(settings),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / f"reference-{digest}.json"
    if opts.reference_cache and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == json.loads(json.dumps(key)):
                log(f"reference ({REFERENCE_DESC}): cached in {path}")
                return {"description": REFERENCE_DESC, "status": "ok", "cached": True, "file": str(path),
                        "tokens": data["tokens"], "mode_line": data.get("mode_line"),
                        "created": data.get("created"), "decode_tok_s": data.get("decode_tok_s")}
        except (OSError, ValueError, KeyError):
            pass
    log(f"reference ({REFERENCE_DESC}) ...")
    spec = dict(base_spec, settings=asdict(settings))
    rec = run_worker(spec, None, opts.run_timeout, measure=measure)
    if rec["status"] != "ok":
        log(f"    reference run {rec['status']}: {rec.get('detail', '')}")
        return {"description": REFERENCE_DESC, "status": rec["status"], "detail": rec.get("detail"),
                "cached": False}
    res = rec["result"]
    out = {"description": REFERENCE_DESC, "status": "ok", "cached": False, "file": str(path),
           "tokens": res["tokens"], "mode_line": res["mode_line"],
           "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "decode_tok_s": res["report"]["decode_tok_s"]}
    log(f"    ok: {len(res['tokens'])} tokens, decode {res['report']['decode_tok_s']:.2f} tok/s")
    if opts.reference_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, **{k: out[k] for k in ("tokens", "mode_line", "created",
                                                                          "decode_tok_s")}}))
            os.replace(tmp, path)
        except OSError as e:
            log(f"    (could not cache the reference: {e.strerror})")
    return out


def _summarize(p: Plan, runs: List[Dict[str, Any]], opts: BenchOptions, n_expert_used: int) -> Dict[str, Any]:
    s: Dict[str, Any] = {"config": p.config.name, "budget": p.budget, "budget_text": budget_text(p.budget),
                         "kind": p.config.kind, "runs": len(runs), "counts": {}, "metrics": {},
                         "identical": None, "first_difference": None, "detail": None,
                         "mode_line": None}
    if not p.config.applicable:
        s["status"] = "n/a"
        s["detail"] = p.config.reason
        return s
    if p.error:
        s["status"] = "POLICY ERROR"
        s["detail"] = p.error
        s["mode_line"] = None
        return s
    for r in runs:
        s["counts"][r["status"]] = s["counts"].get(r["status"], 0) + 1
    ok = [r for r in runs if r["status"] == "ok"]
    if ok:
        s["mode_line"] = ok[0]["mode_line"]
    elif p.settings is not None:
        s["mode_line"] = planned_mode_line(p.settings, opts.routing_trace, n_expert_used)
    if len(s["counts"]) == 1:
        s["status"] = next(iter(s["counts"]))
    elif s["counts"]:
        s["status"] = "MIXED"
    else:
        s["status"] = "not run"
    for k in METRICS:
        s["metrics"][k] = _agg([r["metrics"][k] for r in ok])
    if ok:
        idents = [r.get("identical") for r in ok]
        if any(i is False for i in idents):
            s["identical"] = False
            s["first_difference"] = min(r["first_difference"] for r in ok if r.get("identical") is False)
        elif all(i is True for i in idents):
            s["identical"] = True
    bad = [r for r in runs if r["status"] != "ok"]
    if bad:
        s["detail"] = "; ".join(f"run #{r['seq']}: {r['status']}: {r.get('detail', '')}" for r in bad[:3]) + (
            f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        to = [r for r in bad if r["status"] == "TIMEOUT" and r["progress"].get("partial_decode_tok_s")]
        if to:
            s["partial_decode_tok_s"] = statistics.median(r["progress"]["partial_decode_tok_s"] for r in to)
        s["peak_mib_failed"] = _agg([r["peak_bytes"] / MiB if r.get("peak_bytes") else None for r in bad])
    return s


# ------------------------------------------------------------------------------------------- output


def _f(x: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _med(s: Dict[str, Any], k: str) -> Optional[float]:
    a = s["metrics"].get(k)
    return a["median"] if a else None


TABLE_HEADERS = ["config", "budget", "status", "load s", "TTFT s", "prefill tok/s", "decode tok/s",
                 "decode min-max", "MiB read/tok", "maj faults/tok", "hit %", "stall ms/tok", "peak MiB",
                 "identical", "I/O bound tok/s", "% of bound"]


def table_row(s: Dict[str, Any]) -> List[str]:
    """One summary row of the table (the JSON summary row it comes from has the same figures)."""
    st = s["status"]
    status = st
    if st not in ("n/a", "POLICY ERROR", "not run"):
        c = s["counts"]
        n = s["runs"]
        status = st if len(c) == 1 and st == "ok" and n == 1 else (
            f"{st} {c.get(st, 0)}/{n}" if len(c) == 1 else ", ".join(f"{k} {v}/{n}" for k, v in c.items()))
    dec = _med(s, "decode_tok_s")
    a = s["metrics"].get("decode_tok_s")
    decode = _f(dec)
    span = f"{a['min']:.2f}-{a['max']:.2f}" if a else "-"
    if dec is None and s.get("partial_decode_tok_s"):
        decode = f"~{s['partial_decode_tok_s']:.3g} (partial)"
    ident = "-"
    if s["identical"] is True:
        ident = "yes"
    elif s["identical"] is False:
        ident = f"NO (token {s['first_difference']})"
    elif s["status"] in ("ok", "MIXED") and s["metrics"].get("decode_tok_s"):
        ident = "?"
    hit = _med(s, "hit_rate")
    frac = _med(s, "io_fraction")
    peak = _med(s, "peak_mib")
    if peak is None and s.get("peak_mib_failed"):
        peak = s["peak_mib_failed"]["max"]
    return [
        s["config"], s["budget_text"], status,
        _f(_med(s, "load_s")), _f(_med(s, "ttft_s"), "{:.3f}"), _f(_med(s, "prefill_tok_s")), decode, span,
        _f(_med(s, "disk_mib_per_token")), _f(_med(s, "major_faults_per_token"), "{:.1f}"),
        _f(None if hit is None else 100 * hit, "{:.1f}"), _f(_med(s, "stall_ms_per_token"), "{:.1f}"),
        _f(peak, "{:.0f}"), ident, _f(_med(s, "io_bound_tok_s")), _f(None if frac is None else 100 * frac, "{:.0f}%"),
    ]


def markdown_table(headers: List[str], rows: List[List[str]]) -> str:
    w = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])


def format_markdown(doc: Dict[str, Any]) -> str:
    b, m, f = doc["bench"], doc["machine"], doc["model"]
    out = ["# flashmoe bench", ""]
    out.append(f"- date: {doc['date']}")
    if doc.get("command"):
        out.append(f"- command: `{' '.join(shlex.quote(a) for a in doc['command'])}`")
    out.append(f"- machine: {describe_machine(m)}")
    out.append(f"- model: {os.path.basename(f['path'])} ({f['arch']}, {f['n_layer']} layers, {f['n_expert']} experts "
               f"({f['n_expert_used']} used), {format_size(f['file_bytes'])}: dense {format_size(f['dense_bytes'])}, "
               f"experts {format_size(f['expert_bytes'])}; types {', '.join(f['expert_types'])} experts, "
               f"{', '.join(f['dense_types'])} dense; "
               f"{'experts grouped by layer' if f.get('experts_grouped_by_layer') else 'interleaved layout'})")
    wl = (f"{b['prompt_tokens']}-token prompt, {b['gen_tokens']} generated (greedy), "
          f"{b['threads']} thread{'s' if b['threads'] != 1 else ''}, "
          f"{b['repeat']} run{'s' if b['repeat'] != 1 else ''} of each in alternation, each a fresh process")
    out.append(f"- workload: {wl}")
    tr = b.get("routing_trace")
    if tr:
        st = tr["stats"]
        lru = ", ".join(f"{k} {100 * v:.0f}%" for k, v in st["lru_hit_rate"].items())
        out.append(f"- routing: forced from {os.path.basename(tr['path'])} ({st['tokens']} tokens: "
                   f"next-token reuse {100 * st['next_token_reuse']:.1f}%, LRU hit at {lru} of a layer's experts)")
    else:
        out.append("- routing: the model's own (no trace)")
    if any(x is not None for x in b["budgets"]):
        out.append(f"- memory: each run confined to its budget (cgroup {b['cgroup']}: process memory and its page "
                   "cache); the model file evicted from the page cache before each confined run"
                   + ("; the page cache dropped before each run" if b["drop_caches"] and b.get("page_cache_could_drop")
                      else ""))
    else:
        out.append("- memory: unconfined" + ("; page cache dropped before each run"
                                              if b["drop_caches"] and b.get("page_cache_could_drop") else
                                              " (the page cache is warm unless --drop-caches)"))
    d = doc.get("disk")
    if d and d.get("ok"):
        out.append(f"- disk: random reads of {format_size(d['slice_bytes'])} (one expert slice) on the model file, "
                   f"{d['method']}: " + ", ".join(f"QD{x['qd']} {x['bytes_per_s'] / 1e9:.2f} GB/s" for x in d["depths"]))
    elif d:
        out.append(f"- disk: not measured ({d.get('reason')})")
    ref = doc.get("reference") or {}
    if ref.get("status") == "ok":
        out.append(f"- reference for 'identical': {ref['description']}: {len(ref['tokens'])} tokens"
                   + (" (cached)" if ref.get("cached") else ""))
    elif ref.get("status") != "skipped":
        out.append(f"- reference for 'identical': {ref.get('status')}: {ref.get('detail')}")
    out.append("")
    rows = [table_row(s) for s in doc["summary"]]
    out.append(markdown_table(TABLE_HEADERS, rows))
    out.append("")
    out.append("Medians over the completed runs; per-token figures are of the decode phase; peak is the cgroup's "
               "(process + page cache); I/O bound = disk bandwidth at the run's reader count / expert bytes read "
               "per token.")
    out.append("")
    out.append("Modes:")
    for s in doc["summary"]:
        if s.get("mode_line"):
            out.append(f"- {s['config']} @ {s['budget_text']}: {s['mode_line']}")
    details = [s for s in doc["summary"] if s.get("detail")]
    if details or doc.get("notes"):
        out.append("")
        out.append("Notes:")
        for s in details:
            out.append(f"- {s['config']} @ {s['budget_text']}: {s['detail']}")
        for n in doc.get("notes", []):
            out.append(f"- {n}")
    return "\n".join(out) + "\n"


def plot_sweep(doc: Dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlashMoEError("--plot needs matplotlib: pip install 'flashmoe[plot]' (or pip install matplotlib)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = []
    for s in doc["summary"]:
        if s["config"] not in names:
            names.append(s["config"])
    any_fail = False
    budgets = [s["budget"] for s in doc["summary"] if s["budget"] is not None]
    unit, unit_name = (GiB, "GiB") if budgets and max(budgets) >= 2 * GiB else (MiB, "MiB")
    for name in names:
        pts = [s for s in doc["summary"] if s["config"] == name and s["budget"] is not None]
        if not pts:
            continue
        xs, ys, fx = [], [], []
        for s in sorted(pts, key=lambda s: s["budget"]):
            v = _med(s, "decode_tok_s")
            if v is not None:
                xs.append(s["budget"] / unit)
                ys.append(v)
            elif s["status"] not in ("n/a",):
                fx.append(s["budget"] / unit)
        if not xs and not fx:
            continue
        line, = ax.plot(xs, ys, marker="o", label=name)
        if fx:
            any_fail = True
            ax.plot(fx, [0] * len(fx), linestyle="none", marker="x", color=line.get_color())
    ax.set_xlabel(f"memory budget ({unit_name}, cgroup: process + page cache)")
    ax.set_ylabel("decode tok/s (median)")
    title = os.path.basename(doc["model"]["path"])
    tr = doc["bench"].get("routing_trace")
    if tr:
        title += f", routing from {os.path.basename(tr['path'])}"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if any_fail:
        ax.text(0.01, 0.01, "x: OOM / timeout / failed", transform=ax.transAxes, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
