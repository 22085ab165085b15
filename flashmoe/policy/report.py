"""The text of ``flashmoe policy show``: a resolved policy as tables (``--json`` is
``Resolution.to_dict``)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

from flashmoe.policy.cache import layer_runs
from flashmoe.policy.resolve import Resolution
from flashmoe.policy.schema import DEFAULT_GPU_BUDGET_TEXT, PLACEMENT_HELP, plural
from flashmoe.settings import PLACEMENTS
from flashmoe.sizes import format_size


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """A plain text table; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for r in cells:
        parts = []
        for i, c in enumerate(r):
            parts.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def _shape(shape) -> str:
    return "x".join(str(x) for x in shape)


def render(res: Resolution, verbose: bool = False) -> str:
    """The text of ``policy show``: the policy and model, placements, memory, cache and runtime,
    (with -v) every tensor and the notes, then warnings and errors."""
    out: List[str] = _header(res) + [""] + [_placement_table(res), ""]
    if res.tensor_devices:
        out += [_device_table(res), ""]
    out += [_memory_table(res), ""]
    if res.memory.on_device:
        out += [_vram_table(res), ""]
    out += _cache_and_runtime(res)
    if verbose:
        out += ["", _tensor_table(res)]
        if res.notes:
            out += ["", "notes"] + [f"  - {n}" for n in res.notes]
    if res.warnings:
        out += ["", "warnings"] + [f"  ! {w}" for w in res.warnings]
    if len(res.errors) > 1:
        out += ["", "errors (this policy cannot load this model as asked)"] + [f"  x {e}" for e in res.errors]
    return "\n".join(out)


def _header(res: Resolution) -> List[str]:
    pol, mv = res.policy, res.model
    out = [f"policy  {pol.name}  ({pol.source})"]
    if pol.description:
        out.append(f"        {pol.description}")
    used = f"{mv.n_expert_used} per token" if mv.n_expert_used else "?"
    out.append(
        f"model   {Path(mv.path).name}: {mv.arch}, {mv.n_layer} layers, {mv.n_expert} experts ({used}), "
        f"{len(mv.tensors)} tensors, {format_size(mv.total_bytes)}"
    )
    return out


def _placement_table(res: Resolution) -> str:
    rows = []
    for p in PLACEMENTS:
        n = res.count_by_placement[p]
        if n:
            where = PLACEMENT_HELP[p]
            if p == "stream" and res.cache.source == "ram" and res.cache.mode == "cache":
                where = "RAM (read at load) -> expert cache"
            rows.append((p, n, format_size(res.bytes_by_placement[p]), where))
    mem = res.memory
    if mem.not_loaded_tensors:
        layers = ", ".join(str(l) for l in mem.not_loaded_layers)
        rows.append(("not loaded", mem.not_loaded_tensors, format_size(mem.not_loaded),
                     f"of those: next-token-prediction {'layers' if len(mem.not_loaded_layers) > 1 else 'layer'} "
                     f"{layers}, which llama.cpp skips (never run, streamed or counted)"))
    rows.append(("total", len(res.model.tensors), format_size(res.model.total_bytes), ""))
    return text_table(("placement", "tensors", "bytes", "where"), rows, right=(1, 2))


def _device_table(res: Resolution) -> str:
    """The per-device plan: which host runs which layers and holds which bytes (remote devices: RPC workers)."""
    rows = []
    for name, d in res.devices_plan().items():
        layers = "-" if not d["layers"] else (str(d["layers"][0]) if d["layers"][0] == d["layers"][1]
                                              else f"{d['layers'][0]}-{d['layers'][1]}")
        if name == "local":
            where = "this host"
            if d["not_resident"]:
                where += f" ({format_size(d['not_resident'])} of it streamed or mmap'd from disk)"
        else:
            where = f"{d['url']} (RPC worker: weights, KV cache and compute of its layers)"
        cache = format_size(d["expert_cache"]) if d["expert_cache"] else "-"
        rows.append((name, layers, d["tensors"], format_size(d["bytes"]), cache, where))
    return text_table(("device", "layers", "tensors", "bytes", "expert cache", "where"), rows, right=(2, 3, 4))


def _memory_table(res: Resolution) -> str:
    pol, mem, c = res.policy, res.memory, res.cache
    rows = []
    if mem.pinned:
        rows.append(("pinned weights", format_size(mem.pinned), "locked in RAM"))
    if mem.ram:
        rows.append(("RAM weights", format_size(mem.ram), "resident, not locked"))
    if mem.gpu_host:
        rows.append(("GPU weights", format_size(mem.gpu_host), "unified memory (counts as RAM)"))
    if mem.tier:
        rows.append(("experts in RAM", format_size(mem.tier), "expert_cache source ram: every streamed expert, read at load"
                     + (", page-locked" if mem.on_device else "")))
    if mem.on_device:
        rows.append(("KV cache", "-", "in device memory (below)"))
    else:
        if c.mode == "cache":
            rows.append(_cache_row(c, mem.cache))
        rows += _state_rows(mem)
    rows.append(_compute_row(pol, mem))
    if mem.staging:
        rows.append(("staging", format_size(mem.staging), f"page-locked bounce buffers of the {c.readers} readers"))
    rows.append(("overhead", format_size(mem.overhead), "process, libraries (runtime.overhead)"))
    if mem.reserve:
        rows.append(("reserve", format_size(mem.reserve), "left free for page cache and file-backed pages (cache_size auto)"))
    rows.append(("total", format_size(mem.total), "not counting mmap'd tensors (page cache, evictable)"))
    if mem.budget is not None:
        src = "--budget" if mem.budget_source == "--budget" else f"budget: {pol.budget.text}"
        rows.append(("budget", format_size(mem.budget), src))
    else:
        rows.append(("budget", "none", ""))
    rows.append(("machine RAM", res.machine.describe_ram() if mem.machine_ram else "unknown", ""))
    if mem.gpu_device and not mem.on_device:
        rows.append(("device memory", format_size(mem.gpu_device), "gpu weights (not in RAM)"))
    return text_table(("memory", "bytes", ""), rows, right=(1,))


def _state_rows(mem) -> List[Tuple[str, str, str]]:
    """The KV cache and (hybrid models) the recurrent state: in RAM, or in device memory with a GPU."""
    rows = [("KV cache", format_size(mem.kv_cache), mem.kv_note or f"n_ctx {mem.n_ctx}, f16")]
    if mem.recurrent_state:
        rows.append(("recurrent state", format_size(mem.recurrent_state), "hybrid layers, f32"))
    return rows


def _compute_row(pol, mem) -> Tuple[str, str, str]:
    return ("compute buffer", format_size(mem.compute), f"estimate, n_ubatch {pol.runtime.n_ubatch}"
            + (" (auto)" if pol.runtime.n_ubatch_auto else ""))


def _cache_row(c, nbytes: int) -> Tuple[str, str, str]:
    per_layer = c.bytes_per_slot_all_layers // max(len(c.streamed_layers), 1)
    return ("expert cache", format_size(nbytes),
            f"{plural(c.slots, 'slot')}/layer{_differ(c)} of {c.n_expert} experts x {len(c.streamed_layers)} layers, "
            f"{format_size(per_layer)} per slot ({c.requested})")


def _vram_table(res: Resolution) -> str:
    """The device-memory (VRAM) plan of a discrete GPU: gpu weights, the expert cache's slots, KV cache and
    compute buffer, the backend's share, against gpu_budget and the GPU's memory."""
    pol, mem, c = res.policy, res.memory, res.cache
    rows = [("gpu weights", format_size(mem.gpu_device), "tensors placed gpu")]
    if c.mode == "cache":
        rows.append(_cache_row(c, mem.device_cache))
    rows += _state_rows(mem)
    rows.append(_compute_row(pol, mem))
    rows.append(("backend", format_size(mem.device_overhead), "context, kernels, library workspaces (estimate)"))
    rows.append(("total", format_size(mem.device_total), ""))
    if mem.gpu_budget is not None:
        src = f"gpu_budget: {pol.gpu_budget.text}" if mem.gpu_budget_source == "policy" else DEFAULT_GPU_BUDGET_TEXT + " (default)"
        rows.append(("gpu budget", format_size(mem.gpu_budget), src))
    else:
        rows.append(("gpu budget", "none", "the GPU's memory is unknown: set gpu_budget"))
    rows.append(("GPU memory", format_size(mem.gpu_memory) if mem.gpu_memory else "unknown", ""))
    return text_table(("device memory (VRAM)", "bytes", ""), rows, right=(1,))


def _cache_and_runtime(res: Resolution) -> List[str]:
    c, rt, mem = res.cache, res.policy.runtime, res.memory
    if c.mode == "cache":
        io = "direct I/O" if c.direct_io else "buffered I/O"
        share = f" ({round(c.slots * 100 / c.n_expert)}% of {c.n_expert})" if c.n_expert else ""
        cache = (
            f"expert cache  cache: {plural(c.slots, 'slot')} per layer{share}{_differ(c)}, eviction {c.eviction}, "
            f"{c.readers} readers, {io}, prefetch {c.prefetch}, misses from "
            + ("RAM (source ram)" if c.source == "ram" else "disk")
        )
    elif c.mode == "pagecache":
        cache = f"expert cache  pagecache: OS page cache, populated from the routing by {c.readers} readers"
    else:
        cache = "expert cache  off (nothing streamed)"
    threads = rt.threads if rt.threads is not None else "default"
    if res.experts_used_override is not None:
        ept = f"{res.experts_used} (override; model: {res.model.n_expert_used})"
    else:
        ept = f"{res.experts_used} (model)"
    runtime = (
        f"runtime       n_ctx {rt.n_ctx or str(mem.n_ctx) + ' (model)'}, n_batch {rt.n_batch}, n_ubatch {rt.n_ubatch}, "
        f"threads {threads}, experts per token {ept}, repack {'on' if rt.repack else 'off'}"
    )
    return [cache, runtime]


def _tensor_table(res: Resolution) -> str:
    rows = []
    for t in res.model.tensors:
        r = res.rule_of.get(t.name)
        rule = f"{r.index} (line {r.line})" if r else "- (gpu ignored)"
        place = res.tensor_devices.get(t.name) or res.placements[t.name]
        rows.append((t.name, t.type_name, _shape(t.shape), format_size(t.nbytes), place, rule))
    return text_table(("tensor", "type", "shape", "bytes", "placement", "rule"), rows, right=(3,))


def _differ(c) -> str:
    """The layers whose slot count differs from the default, as ``; layers 0-3: 32``."""
    if not c.layer_slots:
        return ""
    return "; " + ", ".join(f"layer{'s' if a != b else ''} {a}{'-' + str(b) if a != b else ''}: {n}"
                            for a, b, n in layer_runs(c.layer_slots))
