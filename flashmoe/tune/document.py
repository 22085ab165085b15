"""The tune's document (everything it found, as plain data: what the report and the policy's
header are written from) and the policy's header lines."""
from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from flashmoe.bench.disk import DiskMeasurement
from flashmoe.bench.facts import describe_machine
from flashmoe.policy import MachineInfo
from flashmoe.sizes import format_size
from flashmoe.tune.candidates import Candidate
from flashmoe.tune.measure import PAGECACHE, ComputeModel, DiskModel, IOCalibration
from flashmoe.tune.model import MemoryPlan, ModelFacts
from flashmoe.tune.options import Clock, TuneOptions
from flashmoe.tune.search import EVICTIONS, UBATCH_DECODE_MARGIN, UBATCH_TTFT_GAIN, Search, Sizing
from flashmoe.tune.validate import fmt

TUNE_VERSION = 1


@dataclass
class Findings:
    """What the steps of a tune found, for the document."""

    mf: ModelFacts
    mp: MemoryPlan
    facts: Dict[str, Any]  # bench.machine_facts
    machine: MachineInfo
    avail: Optional[int]
    direct: DiskMeasurement
    buffered: DiskMeasurement
    cm: ComputeModel
    trace: Any
    tstats: Dict[str, Any]
    trace_src: Dict[str, Any]
    P: int
    G: int
    sizing: Sizing
    found: Search
    validated: List[Candidate]
    winner: Candidate
    why: str
    notes: List[str]
    disk: Optional[DiskModel] = None  # what the predictions used (None: the disk test's, as measured)
    io: IOCalibration = field(default_factory=IOCalibration)


def _curve_rows(f: Findings) -> List[Dict[str, Any]]:
    rows = []
    for s in f.found.grid:
        row: Dict[str, Any] = {"slots": s, "bytes": s * f.mp.bytes_per_slot, "fits": s <= f.mp.max_slots}
        for ev in EVICTIONS:
            r = f.found.curves[ev][s]
            row[ev] = {"all": r.hit_rate(), "decode": r.hit_rate("decode"), "prefill": r.hit_rate("prefill"),
                       "layers": {str(lc.layer): lc.phase_hit_rate("decode") for lc in r.layers}}
        rows.append(row)
    return rows


def _trace_section(f: Findings) -> Dict[str, Any]:
    n = f.trace.n_tokens
    label = (f"{os.path.basename(f.trace_src['path'])} ({n} tokens)" if f.trace_src["source"] == "given"
             else f"recorded on the {f.trace_src['prompt']} ({n} tokens)")
    return {**f.trace_src, "label": label, "stats": f.tstats}


def _disk_section(opts: TuneOptions, f: Findings) -> Dict[str, Any]:
    """The disk test (``direct``, ``buffered``), the engine's reads (``engine``: the I/O calibration's runs) and
    what the predictions used (``used``: per mode, page-cache mode too, the curve and its source; ``summary``: in
    words)."""
    disk = f.disk if f.disk is not None else DiskModel(f.direct, f.buffered)
    rd = list(opts.readers)
    summary = {("direct" if m else "buffered"): disk.describe(m, rd) for m in (True, False) if disk.has(m)}
    if disk.ok:
        summary["page cache"] = disk.describe(PAGECACHE, rd)
    return {"direct": f.direct.to_dict(), "buffered": f.buffered.to_dict(), "engine": f.io.to_dict(),
            "used": disk.to_dict(), "summary": summary}


def document(opts: TuneOptions, f: Findings, clock: Clock) -> Dict[str, Any]:
    mf, mp, pc = f.mf, f.mp, f.found.pc_sim
    return {
        "flashmoe_tune": TUNE_VERSION,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": opts.argv,
        "elapsed_s": clock.elapsed,
        "time_limit_s": opts.time_limit,
        "model": {"name": mf.name, "path": mf.path, "arch": mf.arch, "file_bytes": mf.file_bytes,
                  "n_layer": mf.n_layer, "moe_layers": len(mf.moe_layers), "n_expert": mf.n_expert,
                  "n_used": mf.n_used, "expert_bytes": mf.expert_bytes, "bytes_per_slot": mp.bytes_per_slot},
        "machine": {"description": describe_machine(f.facts), "facts": f.facts, "mem_available": f.avail,
                    "ram_bytes": f.machine.ram_bytes, "gpu": f.machine.gpu()},
        "budget": opts.ram,
        "gpu_mem": opts.gpu_mem,
        "base_policy": opts.base,
        "memory": {**asdict(mp), "measured_non_cache": f.cm.non_cache_rss, "tight_slots": f.sizing.tight_slots,
                   "tight_overhead": f.sizing.tight_overhead},
        "disk": _disk_section(opts, f),
        "compute": asdict(f.cm),
        "trace": _trace_section(f),
        "workload": {"prompt_tokens": f.P, "gen_tokens": f.G, "n_batch": f.winner.n_batch or mp.n_batch,
                     "n_ubatch": f.winner.n_ubatch or mp.n_ubatch, "n_ctx": mp.n_ctx, "threads": opts.threads},
        "ubatch": {"sizes": list(f.found.ubatch_sizes), "base": mp.n_ubatch, "base_n_batch": mp.n_batch,
                   "chosen": f.winner.n_ubatch or mp.n_ubatch, "decode_margin": UBATCH_DECODE_MARGIN,
                   "ttft_gain": UBATCH_TTFT_GAIN, "choices": f.winner.ubatch_choices},
        "curve": _curve_rows(f),
        "pagecache": {"capacity_bytes": f.sizing.pc_capacity, "all": pc.hit_rate(), "decode": pc.hit_rate("decode"),
                      "capacity_source": f.sizing.pc_capacity_source,
                      "modelled_capacity_bytes": f.io.pc_capacity},
        "working_set": {str(k): v for k, v in f.found.ws.items()},
        "candidates": [c.to_dict() for c in f.found.cands],
        "per_layer_candidates": [c.to_dict() for c in f.found.per_layer],
        "validated": [c.name for c in f.validated],
        "winner": f.winner.to_dict(),
        "why": f.why,
        "notes": f.notes,
    }


def header_lines(doc: Dict[str, Any]) -> List[str]:
    """The policy file's header comment: model, machine, budget, trace, predicted and measured."""
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
        f"predicted: {fmt(p.get('decode_tok_s'))} decode tok/s (decode hit rate "
        f"{100 * (p.get('decode_hit_rate') or 0):.1f}%), {fmt(p.get('prefill_tok_s'), '{:.1f}')} prefill tok/s, "
        f"first token after {fmt(p.get('ttft_s'), '{:.2f}')} s (n_ubatch {doc['workload']['n_ubatch']})",
    ]
    summary = (doc.get("disk") or {}).get("summary") or {}
    if summary:
        lines.append("disk bandwidth in the predictions: " + "; ".join(f"{k}: {v}" for k, v in summary.items()))
    if m:
        lines.append(f"measured: {m['decode_tok_s']:.2f} decode tok/s (median of {m['runs']}, "
                     f"{m['decode_min']:.2f}-{m['decode_max']:.2f}), {m['prefill_tok_s']:.1f} prefill tok/s, "
                     f"decode hit rate {100 * m['decode_hit_rate']:.1f}%, peak {m['peak_mib']:.0f} MiB")
    else:
        lines.append("measured: not validated (" + doc["why"] + ")")
    lines.append("")
    return lines
