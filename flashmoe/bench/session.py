"""One bench from start to end: check what was asked, read the model and plan every configuration
at every budget, measure the disk, get the reference, run everything in alternation, and build the
JSON document (``run_bench``)."""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from flashmoe import cgroup
from flashmoe.bench.configs import BenchOptions, Config, Plan, budget_text, build_configs, plan, planned_mode_line
from flashmoe.bench.disk import DISK_DEPTHS, DiskMeasurement, disk_test, evict_file
from flashmoe.bench.facts import machine_facts
from flashmoe.bench.reference import Reference, RefKey, key_name, reference_key, run_reference, sha256_file
from flashmoe.bench.results import BenchRun, first_difference, run_metrics, summarize
from flashmoe.bench.runner import run_worker
from flashmoe.errors import FlashMoEError, UsageError
from flashmoe.machine import is_linux, needs_linux
from flashmoe.policy import open_model_view
from flashmoe.policy.machine_info import detect_gpu_backend
from flashmoe.trace import check_trace_fits, read_trace, trace_stats
from gguf_tools.inspect import model_facts
from gguf_tools.reader import open_model, require_moe

BENCH_VERSION = 1

Log = Callable[[str], None]


def _stderr(s: str) -> None:
    print(s, file=sys.stderr)


@dataclass
class Setup:
    """What the runs need from the model: its facts, files, the trace's, and every plan."""

    facts: Dict[str, Any]
    model_files: List[str]
    trace_info: Optional[Dict[str, Any]]
    configs: List[Config]
    plans: List[Plan]
    tensor_names: List[str] = field(default_factory=list)
    gpu_backend: Optional[str] = None  # of the installed llama.cpp build: GPU runs get a GPU reference

    def ref_key(self, s) -> RefKey:
        return reference_key(s, self.gpu_backend, self.facts.get("n_expert") or 0, self.n_expert_used)

    @property
    def n_expert_used(self) -> int:
        return self.facts.get("n_expert_used") or 0


def check_request(opts: BenchOptions) -> Optional[cgroup.Backend]:
    """One clear line before anything starts; the memory cgroup backend (None when unconfined and
    there is none: the peak is then each worker's RSS)."""
    # Linux-only features (macOS has no cgroups and no /proc)
    if opts.confined and not is_linux():
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
    try:
        return cgroup.detect()
    except FlashMoEError as e:
        if opts.confined:
            raise FlashMoEError(f"--ram-limit needs a memory cgroup, and {e}") from None
        return None


def read_setup(opts: BenchOptions) -> Setup:
    with open_model(opts.model) as m:
        require_moe(m)
        facts = model_facts(m)
        view = open_model_view(m)
        trace_info = None
        if opts.routing_trace:
            tr = read_trace(opts.routing_trace)
            check_trace_fits(tr, m, tr.n_used)  # layers and experts; a run with another count fails alone
            trace_info = {"path": os.path.abspath(opts.routing_trace), "sha256": sha256_file(opts.routing_trace),
                          "stats": trace_stats(tr)}
        configs = build_configs(opts, view)
        if not configs:
            raise UsageError("nothing to run: give --policy and/or --vs stock")
        plans = [plan(c, view, b, opts.n_ctx, opts.threads) for b in opts.budgets for c in configs]
        gpu = detect_gpu_backend() if any("gpu" in p.run_settings.placements.values() for p in plans if p.runnable) else None
        return Setup(facts, list(m.files), trace_info, configs, plans, [t.name for t in view.tensors], gpu)


@dataclass
class PageCache:
    """What is done to the page cache before each run: drop it all (--drop-caches, root), and evict
    the model's own pages before a confined run (pages cached by earlier runs were charged
    elsewhere: a confined run would use them for free; evicting needs no privilege)."""

    drop: bool
    model_files: List[str]
    log: Log
    drop_note: Optional[str] = None  # why the page cache could not be dropped (said once)

    def prepare(self, limit: Optional[int]) -> Dict[str, Any]:
        act: Dict[str, Any] = {"dropped": False, "model_evicted": False}
        if self.drop:
            why = cgroup.drop_caches()
            if why is None:
                act["dropped"] = True
                return act
            if self.drop_note is None:
                self.drop_note = why
                self.log(f"warning: {why}; evicting the model file from the page cache instead (posix_fadvise)")
        if self.drop or limit is not None:
            why = evict_file(self.model_files)
            act["model_evicted"] = why is None
            if why:
                act["evict_error"] = why
        return act


def measure_the_disk(opts: BenchOptions, log: Log) -> Optional[DiskMeasurement]:
    if not opts.disk:
        return None
    log("measuring the disk: random reads of one expert slice on the model file, QD " + "/".join(map(str, DISK_DEPTHS)))
    disk = disk_test(opts.model, drop=(cgroup.drop_caches if opts.drop_caches else None))
    if disk.ok:
        log("  " + ", ".join(f"QD{d.qd} {d.bytes_per_s / 1e9:.2f} GB/s" for d in disk.depths))
    else:
        log(f"  disk measurement failed: {disk.reason}")
    return disk


@dataclass
class Rounds:
    """The runs in alternation: every round runs each configuration at each budget once, in order."""

    opts: BenchOptions
    setup: Setup
    disk: Optional[DiskMeasurement]
    references: Dict[RefKey, Reference]  # by the compared run's weight repacking and GPU ubatch
    page_cache: PageCache
    measure: bool  # a cgroup measures the peak of unconfined runs
    log: Log
    runs: List[BenchRun] = field(default_factory=list)

    def run_all(self) -> List[BenchRun]:
        runnable = [p for p in self.setup.plans if p.runnable]
        total = len(runnable) * self.opts.repeat
        for rnd in range(1, self.opts.repeat + 1):
            for p in runnable:
                self.runs.append(self.run_one(p, rnd, len(self.runs) + 1, total))
        return self.runs

    def run_one(self, p: Plan, rnd: int, seq: int, total: int) -> BenchRun:
        s = p.run_settings
        act = self.page_cache.prepare(p.budget)
        self.log(f"[{seq}/{total}] {p.config.name} at {budget_text(p.budget)} (round {rnd}/{self.opts.repeat}) ...")
        rec = run_worker(self.opts.worker_spec(s), p.budget, self.opts.run_timeout, measure=self.measure)
        run = BenchRun(rec, seq, rnd, p.config.name, p.budget, act)
        if not rec.ok:
            run.mode_line = planned_mode_line(s, self.opts.routing_trace, self.setup.n_expert_used)
            self.log(f"    {rec.status}: {rec.detail or ''}")
            return run
        run.metrics = run_metrics(rec, s.stream.mode != "off", s.stream.readers, self.disk)
        run.mode_line = rec.ok_result.mode_line
        ref = self.references.get(self.setup.ref_key(s))
        if ref is not None and ref.tokens is not None:
            run.first_difference = first_difference(run.tokens, ref.tokens)
            run.identical = run.first_difference is None
        mm = run.metrics
        self.log(f"    ok: decode {mm.decode_tok_s:.2f} tok/s, prefill {mm.prefill_tok_s:.1f} tok/s, "
                 f"peak {mm.peak_mib or 0:.0f} MiB, {rec.wall_s:.1f} s"
                 + ("" if run.identical in (True, None) else "; OUTPUT DIFFERS from the reference"))
        return run


def run_bench(opts: BenchOptions, log: Log = _stderr) -> Dict[str, Any]:
    """Runs everything; returns the JSON document (``format_markdown`` renders it)."""
    backend = check_request(opts)
    setup = read_setup(opts)
    page_cache = PageCache(opts.drop_caches, setup.model_files, log)
    machine = machine_facts(opts.model)
    disk = measure_the_disk(opts, log)
    references: Dict[RefKey, Reference] = {}
    if opts.reference:  # unconfined, same routing, kernels as each run has them; once per model and trace
        trace_sha = setup.trace_info["sha256"] if setup.trace_info else None
        keys = sorted({setup.ref_key(p.run_settings) for p in setup.plans if p.runnable},
                      key=lambda k: (k[1] is not None, k[0], k[1] or 0))
        for key in keys:
            references[key] = run_reference(opts, setup.model_files, trace_sha, backend is not None, log, key,
                                            setup.tensor_names)
    reference = next(iter(references.values()), Reference("skipped"))
    runs = Rounds(opts, setup, disk, references, page_cache, backend is not None, log).run_all()
    summary = [summarize(p, [r for r in runs if r.config == p.config.name and r.budget == p.budget],
                         opts.routing_trace, setup.n_expert_used) for p in setup.plans]
    notes = []
    if page_cache.drop_note:
        notes.append(f"the page cache could not be dropped ({page_cache.drop_note}); the model file was evicted "
                     "from it before each run instead (posix_fadvise DONTNEED)")
    return {
        "flashmoe_bench": BENCH_VERSION,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": opts.argv,
        "machine": machine,
        "model": setup.facts,
        "bench": _settings_section(opts, setup, backend, page_cache),
        "disk": disk.to_dict() if disk is not None else None,
        "reference": reference.to_dict(),
        "references": {key_name(k): v.to_dict() for k, v in references.items()},
        "configs": [c.to_dict() for c in setup.configs],
        "plans": [p.to_dict() for p in setup.plans],
        "runs": [r.to_dict() for r in runs],
        "summary": summary,
        "notes": notes,
    }


def _settings_section(opts: BenchOptions, setup: Setup, backend: Optional[cgroup.Backend],
                      page_cache: PageCache) -> Dict[str, Any]:
    return {
        "prompt_tokens": opts.prompt_tokens,
        "gen_tokens": opts.gen_tokens,
        "greedy": True,
        "repeat": opts.repeat,
        "threads": opts.threads or os.cpu_count(),
        "n_ctx": opts.n_ctx,
        "budgets": opts.budgets,
        "cgroup": backend.kind if backend else None,
        "drop_caches": opts.drop_caches,
        "page_cache_could_drop": page_cache.drop_note is None if opts.drop_caches else None,
        "model_evicted_before_confined_runs": True,
        "run_timeout_s": opts.run_timeout,
        "routing_trace": setup.trace_info,
        "order": "alternation: every round runs each configuration at each budget once, in order",
    }
