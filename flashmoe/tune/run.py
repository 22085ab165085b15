"""``run_tune``: the tune's steps in order, within the time limit (the package docstring says what
each does), and ``write_outputs``: the policy, the report and its PNG, atomically at the very end."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from flashmoe import cgroup
from flashmoe.bench.facts import describe_machine, machine_facts
from flashmoe.bench.runner import run_worker
from flashmoe.errors import FlashMoEError, UsageError
from flashmoe.machine import mem_available
from flashmoe.policy import MachineInfo, Policy, load_policy, open_model_view
from flashmoe.settings import EngineSettings
from flashmoe.sizes import format_size
from flashmoe.trace import check_trace_fits, read_trace, trace_stats
from flashmoe.tune.candidates import Candidate, policy_text, resolve_text
from flashmoe.tune.document import Findings, document, header_lines
from flashmoe.tune.measure import (
    ENGINE,
    IO_CAL_MIN_S,
    IO_CAL_RESERVE,
    IO_CAL_SHARE,
    PAGECACHE,
    ComputeModel,
    DiskModel,
    IOCalibration,
    buffered_calibration_slots,
    calibrate_compute,
    calibrate_io,
    measure_disks,
)
from flashmoe.tune.model import MemoryPlan, ModelFacts, plan_memory, ubatch_plans
from flashmoe.tune.options import Clock, TuneOptions
from flashmoe.tune.report import format_report, plot_png
from flashmoe.tune.search import Search, Sizing, cache_sizes, measured_sizing, search
from flashmoe.tune.validate import Validation, choose_winner, fmt, pick_for_validation
from flashmoe.worker import WorkerSpec
from gguf_tools.atomic import atomic_write

DEFAULT_PROMPT = (
    "You are a helpful assistant. Answer the questions below clearly and concisely.\n"
    "1. Explain how a hash map handles collisions, and when a balanced tree is a better choice.\n"
    "2. Write a short Python function that returns the n-th Fibonacci number iteratively.\n"
    "3. Summarize the causes of the French Revolution in three sentences.\n"
    "4. Translate 'the weather is lovely today, let us walk to the harbour' into French and German.\n"
    "5. A train leaves at 14:05 and arrives at 17:50. How long is the journey, in minutes?\n"
)


@dataclass
class TuneResult:
    doc: Dict[str, Any]
    policy_text: str
    report_text: str
    png: Optional[bytes] = None


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check(opts: TuneOptions) -> None:
    if opts.ram <= 0:
        raise UsageError("--ram must be more than 0 bytes")
    for p in (opts.out, opts.report, opts.json_out):
        if p:
            d = os.path.dirname(os.path.abspath(p))
            if not os.path.isdir(d):
                raise FlashMoEError(f"output folder does not exist: {d}")
    if opts.trace and not os.path.isfile(opts.trace):
        raise FlashMoEError(f"no such routing trace: {opts.trace}")
    if opts.prompt_file and not os.path.isfile(opts.prompt_file):
        raise FlashMoEError(f"no such prompt file: {opts.prompt_file}")


@dataclass
class Tune:
    """The state the steps share."""

    opts: TuneOptions
    clock: Clock
    mf: ModelFacts
    view: Any
    base: Policy
    mp: MemoryPlan
    notes: List[str]

    @classmethod
    def start(cls, opts: TuneOptions, clock: Clock) -> "Tune":
        """The model, the base policy and the memory plan (errors before anything is measured)."""
        mf = ModelFacts.open(opts.model)
        view = open_model_view(mf.model)
        base = load_policy(opts.base)
        if opts.n_ctx:
            base.runtime.n_ctx = opts.n_ctx
        if opts.threads:
            base.runtime.threads = opts.threads
        t = cls(opts, clock, mf, view, base, plan_memory(base, view, mf, opts.ram), [])
        t.log_plan()
        return t

    def log_plan(self) -> None:
        mf, mp, K = self.mf, self.mp, self.mf.n_used
        self.clock.log(f"{mf.name}: {mf.arch}, {len(mf.moe_layers)} MoE layers, {mf.n_expert} experts ({K} per "
                       f"token), {format_size(mf.file_bytes)}; one expert in every layer: "
                       f"{format_size(mp.bytes_per_slot)}")
        self.clock.log(f"budget {format_size(self.opts.ram)}: resident weights {format_size(mp.weights)}, runtime "
                       f"{format_size(mp.runtime)} (n_ctx {mp.n_ctx}) -> {format_size(mp.cache_space)} for experts: "
                       f"up to {mp.max_slots} slots per layer")
        if mp.max_slots < K:
            self.notes.append(
                f"by the policy's memory estimate the budget leaves room for {mp.max_slots} expert cache slots "
                f"per layer, fewer than the {K} a token needs: only page-cache mode (and a cache sized from the "
                "measured memory, if it fits) can run")

    def machine(self) -> Tuple[MachineInfo, Dict[str, Any], Optional[int]]:
        """This machine's facts and the memory available now (notes when the budget exceeds it)."""
        machine = MachineInfo.detect()
        facts = machine_facts(self.mf.path)
        avail = mem_available()  # Linux MemAvailable; None where the system does not say (macOS)
        if avail is not None and self.opts.ram > avail:
            self.notes.append(f"--ram {format_size(self.opts.ram)} is more than the memory available now "
                              f"({format_size(avail)}): the runs may be slowed or killed by other programs")
        if self.opts.gpu_mem is not None:
            self.notes.append(f"--gpu-mem {format_size(self.opts.gpu_mem)}: " + (
                "this llama.cpp build has no GPU backend; ignored" if machine.gpu() is None else
                "the tuner does not place tensors on the GPU yet; ignored (CPU-side tuning only)"))
        self.clock.log(f"machine: {describe_machine(facts)}; available memory "
                       + (format_size(avail) if avail is not None else "unknown (no /proc/meminfo here)"))
        return machine, facts, avail

    def settings_for(self, cand: Candidate, budget: Optional[int] = None) -> EngineSettings:
        """Engine settings of a candidate (calibration, recording: without a budget by default)."""
        text = policy_text(self.base, cand, budget=budget, n_ctx=self.mp.n_ctx, threads=self.opts.threads)
        return resolve_text(text, self.view, None).engine_settings()

    def calibrate_io(self, disk: DiskModel, cm: ComputeModel, sizing: Sizing, trace: Any,
                     trace_path: str) -> IOCalibration:
        """The engine's own reads (``measure.calibrate_io``), confined to the budget like the validation runs,
        within IO_CAL_SHARE of the time limit: direct I/O with k slots per layer, buffered I/O with the largest
        buffered candidate's cache (``buffered_calibration_slots``), one page-cache-mode run; an empty calibration
        with the reason when it cannot run."""
        opts, mf, mp, K = self.opts, self.mf, self.mp, self.mf.n_used
        allowance = min(max(IO_CAL_MIN_S, IO_CAL_SHARE * opts.time_limit), self.clock.left * IO_CAL_RESERVE)
        if allowance < 5:
            return IOCalibration(note="no time left for it")
        fits_k = max(mp.max_slots, sizing.tight_slots) >= K
        pc_cap = sizing.pc_capacity if sizing.pc_capacity > 0 else None
        if not fits_k and pc_cap is None:
            return IOCalibration(note=f"the budget has no room for the {K} slots per layer it streams with")
        try:
            cgroup.detect()
            limit: Optional[int] = opts.ram
        except FlashMoEError:
            limit = None  # validation says so too
        modes: Tuple[bool, ...] = ((True, False) if disk.has(True) else (False,)) if fits_k else ()
        b_slots, b_why = (buffered_calibration_slots([s for s, _, _ in cache_sizes(mp, K, sizing)], trace, mf)
                          if fits_k else (K, ""))

        def settings(c: Candidate) -> EngineSettings:
            # a cache larger than the estimate allows fits by the measured memory: with its overhead, as `*-tight`
            tight = c.mode == "cache" and c.slots > mp.max_slots and sizing.tight_overhead is not None
            return self.settings_for(dataclasses.replace(c, overhead=sizing.tight_overhead) if tight else c,
                                     budget=opts.ram)

        return calibrate_io(settings, mf, opts.threads, mp.n_ctx, trace_path, opts.readers, modes, limit, disk, cm,
                            self.clock, allowance, trace, buffered_slots=b_slots, pc_capacity=pc_cap,
                            buffered_why=b_why)

    def disk_used(self, direct: Any, buffered: Any, io: IOCalibration, sizing: Sizing) -> DiskModel:
        """The disk model of the predictions: the engine's reads where they were measured, else the disk test;
        page-cache mode: its run's effective bandwidth, else buffered I/O's (and the page cache's room that gives
        the run's measured hit rate when the simulation's was far from it: ``sizing.pc_capacity``). Which one, said
        in the progress lines (and in the notes when the calibration fell back)."""
        disk = DiskModel(direct, buffered, io)
        rd = self.opts.readers
        modes = [(m, "direct" if m else "buffered") for m in (True, False) if disk.has(m)]
        fb = {m: name for m, name in modes if disk.source(m) != ENGINE}
        fallback = list(fb.values())
        if fallback:
            failed = "; ".join(f"{r.label}: {r.status}" + (f" ({r.detail})" if r.detail else "")
                               for r in io.runs if not r.bytes_per_s and not r.pagecache and r.direct in fb
                               ) or io.note or "not run"
            modes_text = " and ".join(fallback) + " I/O"
            if io.runs:
                self.clock.log(f"  the engine's reads gave nothing for {modes_text} ({failed}): falling back to the "
                               "disk test for " + modes_text)
            else:
                self.clock.log(f"disk (engine): not measured ({failed}): falling back to the disk test")
            self.notes.append(f"the engine's reads could not be measured for {modes_text} ({failed}): the predictions "
                              f"use the disk test's bandwidth for {modes_text}, which may be far from what the engine "
                              "gets")
        for m, name in modes:
            self.clock.log(f"  bandwidth in the predictions, {name} I/O: {disk.describe(m, rd)}")
        if disk.ok:
            pcr = io.pagecache_run
            if pcr is not None and not disk.has(PAGECACHE):
                why = (pcr.detail or "no figures") if pcr.status == "ok" else \
                    pcr.status + (f": {pcr.detail}" if pcr.detail else "")
                self.clock.log(f"  the page-cache run gave no bandwidth ({why}): page-cache candidates read at "
                               "buffered I/O's")
                self.notes.append(f"the page-cache calibration run gave no bandwidth ({why}): page-cache candidates "
                                  "are predicted with buffered I/O's bandwidth")
            self.clock.log(f"  bandwidth in the predictions, page-cache mode: {disk.describe(PAGECACHE, rd)}")
        if io.pc_effective_capacity:
            sizing.pc_capacity, sizing.pc_capacity_source = io.pc_effective_capacity, "calibrated"
            self.clock.log(f"  page-cache candidates simulated with {format_size(sizing.pc_capacity)} of page cache "
                           "(the room that gives the page-cache run's measured hit rate)")
        if io.runs:
            self.clock.log(f"  the I/O calibration took {io.s:.1f} s of its {io.allowance_s:.0f} s share (the larger of "
                           f"{100 * IO_CAL_SHARE:.0f}% of the time limit and {IO_CAL_MIN_S:.0f} s, at most half the "
                           "time left)")
        return disk

    def trace(self, tmp: str) -> Tuple[Any, str, int, int, Dict[str, Any]]:
        """(trace, its path, prompt tokens, generated tokens, where it came from): --trace, or the
        model's own routing recorded on a prompt."""
        opts = self.opts
        if opts.trace:
            tr = read_trace(opts.trace)
            check_trace_fits(tr, self.view)
            path = os.path.abspath(opts.trace)
            self.clock.log(f"trace: {opts.trace} ({tr.n_tokens} tokens); workload {opts.prompt_tokens}-token prompt, "
                           f"{opts.gen_tokens} generated")
            return tr, path, opts.prompt_tokens, opts.gen_tokens, {"source": "given", "path": path}
        return self.record_trace(os.path.join(tmp, "recorded.trace"))

    def record_trace(self, path: str) -> Tuple[Any, str, int, int, Dict[str, Any]]:
        opts, mf, mp, K = self.opts, self.mf, self.mp, self.mf.n_used
        prompt, max_p = DEFAULT_PROMPT, opts.prompt_tokens
        if opts.prompt_file:
            with open(opts.prompt_file, encoding="utf-8", errors="replace") as f:
                prompt = f.read()
            max_p = max(1, mp.n_ctx - opts.gen_tokens - 16)
            if not prompt.strip():
                raise FlashMoEError(f"prompt file {opts.prompt_file} is empty")
        cand = Candidate("record", "cache" if mp.max_slots >= K else "pagecache",
                         slots=min(mf.n_expert, max(K, mp.max_slots)), eviction="lru", readers=4, direct_io=True)
        spec = WorkerSpec(mf.path, self.settings_for(cand), prompt_tokens=max_p, gen_tokens=opts.gen_tokens,
                          threads=opts.threads, n_ctx=mp.n_ctx, prompt=prompt, record_trace=path)
        self.clock.log(f"trace: recording the model's routing on "
                       f"{'--prompt' if opts.prompt_file else 'the default prompt'} ({opts.gen_tokens} tokens "
                       "generated) ...")
        left = self.clock.left
        if left < 5:
            raise FlashMoEError("--time-limit is too short to record a routing trace: raise it, or give --trace")
        rec = run_worker(spec, None, max(3.0, min(left - 2, max(10.0, left * 0.4))), measure=False)
        if not rec.ok:
            raise FlashMoEError(f"recording the routing failed: {rec.detail}")
        tr = read_trace(path)
        rep = rec.ok_report
        P, G = rep.prompt_tokens, opts.gen_tokens
        src = {"source": "recorded", "prompt": "--prompt " + opts.prompt_file if opts.prompt_file
               else "default prompt", "prompt_tokens": P, "gen_tokens": G,
               "decode_tok_s": rep.decode_tok_s}
        self.clock.log(f"  recorded {tr.n_tokens} tokens ({P}-token prompt)")
        return tr, path, P, G, src

    def log_best(self, found: Search) -> None:
        for c in found.cands[:6]:
            p = c.prediction
            self.clock.log(f"  {c.name}: predicted {fmt(p.get('decode_tok_s'))} tok/s decode "
                           f"(hit {100 * (p.get('decode_hit_rate') or 0):.1f}%), {fmt(p.get('prefill_tok_s'))} prefill"
                           + (f", n_ubatch {c.n_ubatch}" if len(found.ubatch_sizes) > 1 else ""))


def _steps(t: Tune, tmp: str) -> Findings:
    """Measure, trace, calibrate, simulate, validate, choose."""
    opts, mf, mp = t.opts, t.mf, t.mp
    machine, facts, avail = t.machine()
    direct, buffered = measure_disks(mf.path, sorted(set([1, 4, 8] + [int(r) for r in opts.readers])), t.clock)
    disk = DiskModel(direct, buffered)
    tr, trace_path, P, G, trace_src = t.trace(tmp)
    tstats = trace_stats(tr)
    plans = ubatch_plans(t.base, t.view, mf, mp, P, G, t.notes)
    ubs = plans[0].ubs
    if len(plans) > 1:
        t.clock.log(f"n_ubatch: weighing {', '.join(str(p.n_ubatch) for p in plans)} for the {P}-token prompt "
                    "(compute buffer " + ", ".join(format_size(p.mp.compute) for p in plans) + ")")
    cm = calibrate_compute(t.settings_for, mf, opts.threads, mp.n_ctx, tmp, t.clock,
                           timeout=max(30.0, opts.time_limit * 0.2))
    if not cm.ok:
        t.notes.append("compute could not be calibrated (" + (cm.note or "no time") + "): predictions count I/O only")
    sizing = measured_sizing(cm, mp, mf, opts.ram, t.clock)
    io = t.calibrate_io(disk, cm, sizing, tr, trace_path)
    disk = t.disk_used(direct, buffered, io, sizing)
    if not disk.ok:
        t.notes.append("the disk could not be measured: predictions count compute only")
    t.clock.log("simulating the expert cache on the trace ...")
    found = search(tr, ubs, mf, mp, sizing, disk, cm, opts.readers, plans)
    if not found.cands:
        raise FlashMoEError("no configuration fits the budget")
    t.log_best(found)
    validation = Validation(t.base, t.view, mf, opts, trace_path, P, G, mp.n_ctx, cm, t.clock)
    validated = validation.run(pick_for_validation(found.cands, opts.validate), found.cands)
    winner, why = choose_winner(validated, found.cands)
    return Findings(mf, mp, facts, machine, avail, direct, buffered, cm, tr, tstats, trace_src, P, G, sizing,
                    found, validated, winner, why, t.notes, disk, io)


def run_tune(opts: TuneOptions, log: Callable[[str], None] = _default_log) -> TuneResult:
    """Measures, simulates, validates; writes nothing (``write_outputs`` does)."""
    clock = Clock(opts.time_limit, log)
    _check(opts)
    t = Tune.start(opts, clock)
    with tempfile.TemporaryDirectory(prefix="flashmoe-tune-") as tmp:
        found = _steps(t, tmp)
        doc = document(opts, found, clock)
    winner = found.winner
    text = policy_text(t.base, winner, budget=opts.ram, n_ctx=t.mp.n_ctx, threads=opts.threads,
                       header=header_lines(doc), name="tuned",
                       description=f"flashmoe tune for {t.mf.name} at {format_size(opts.ram)}: {winner.describe()}")
    resolve_text(text, t.view, None, source=opts.out).engine_settings()  # raises when the policy would not load
    png = None
    if opts.report and opts.plot:
        png = plot_png(doc)
        if png is not None:
            doc["png"] = os.path.splitext(os.path.basename(opts.report))[0] + ".png"
    report = format_report(doc)
    clock.log(f"winner: {winner.name} ({winner.describe()})")
    return TuneResult(doc=doc, policy_text=text, report_text=report, png=png)


def _plain(x: Any) -> Any:
    """numpy scalars and arrays of the document as plain JSON values."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def document_json(doc: Dict[str, Any]) -> str:
    """The tune's document as JSON (``--json``)."""
    return json.dumps(doc, indent=1, default=_plain) + "\n"


def write_outputs(result: TuneResult, opts: TuneOptions) -> List[str]:
    """The policy, the report and its PNG, the JSON document, each written atomically; returns the paths
    written."""
    written = []
    text = document_json(result.doc) if opts.json_out else None  # before anything is written: it may raise
    with atomic_write(opts.out, "w") as f:
        f.write(result.policy_text)
    written.append(opts.out)
    if opts.json_out and text is not None:
        with atomic_write(opts.json_out, "w") as f:
            f.write(text)
        written.append(opts.json_out)
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
