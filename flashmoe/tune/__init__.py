"""`flashmoe tune`: measure this machine, simulate expert caches on a routing trace, validate the
best few under the memory budget, and write the winner as a policy (issue #7; docs/tune.md).

Steps (each shown as it runs; the whole stays inside ``time_limit``):

1. **Memory plan** (``model``). The base policy (``stream`` by default: experts streamed, the rest
   pinned) is resolved with the budget: pinned weights and runtime buffers (KV cache, compute
   buffer, process overhead) come off first; what is left is the expert cache (or, in page-cache
   mode, the OS page cache that holds experts). A budget below the pinned weights is an error.
2. **Machine** (``measure``). Random reads of one expert slice on the model's own file at several
   queue depths, direct and buffered (the bench's disk test, ``flashmoe.bench.disk``); memory
   available.
3. **Compute** (``measure``). Two short runs of the engine with streaming on and a warm cache: the
   routing is forced to a constant trace (the same k experts every token), so after the first
   token every access is a hit and the time is compute only (the hook's lookups included, no
   I/O). Run once with the model's k experts per token and once with 1 (the experts-per-token
   override): the difference is the cost of k-1 experts in every MoE layer, the rest is the dense
   part. Why this and not a stock run with all experts resident: it works for models larger than
   RAM (it only needs k slots per layer), and it times the same graph (fetch op, slot tensors) the
   candidates run.
4. **Trace** (``run``). ``--trace FILE``, or the engine's own routing recorded on a sample prompt.
4b. **Engine reads** (``measure.calibrate_io``). Short runs on the trace, confined to the budget, the
   model file evicted first: direct I/O with k slots per layer (nearly every selection a miss) at each
   ``--readers`` count; buffered I/O at the most readers with the largest buffered candidate's cache
   (``measure.buffered_calibration_slots``: the page cache its reads fill competes with that cache under the
   limit, as in the candidates' runs); one page-cache-mode run at the most readers. Of each decode phase, the
   hook's bytes read over the reader pool's busy time, at the reads in flight the simulation of the run
   gives; of the page-cache run, its effective bandwidth (bytes over the decode time less the modelled
   compute) and its hit rate against the simulation's (far apart: the page-cache candidates are simulated
   with the room that gives the measured one). The predictions' ``DiskModel`` takes these in place of the
   disk test's (kept for the report); a mode not measured (a run failed, timed out, had no time) keeps the
   disk test's (page-cache mode: buffered I/O's), and says so. All of it within IO_CAL_SHARE of the limit.
5. **Simulation** (``search`` with ``simulate``, exact for the explicit cache): hit rates for every
   cache size, LRU and LFRU, per layer and overall; per-layer slot counts proportional to each
   layer's working set, and a greedy per-layer split (candidates like the uniform ones); page-cache
   mode as a shared LRU of the leftover memory; reads ahead where the trace has predicted sets.
   Decode tok/s is predicted per token from the misses of each layer (read time at the queue depth
   the readers reach, at the engine's measured bandwidth, else the disk test's: the fetch op waits
   for them), the part of the
   reads ahead that the previous layer's compute does not cover (the wrong ones that no reader has
   started by the fetch are dropped by the engine: not charged), and the compute time; prefill
   likewise, each row's experts computed once (the zero-slot skip). For a prompt longer than the
   base policy's n_ubatch, each candidate is simulated again with larger ubatches (their compute
   buffer taken from the cache) and takes the one with the best time to first token among those
   that do not cost decode more than 2% (``search.choose_ubatches``).
6. **Validation** (``validate``). The best few candidates (``pick_for_validation``: the best, the other
   mode, the other I/O mode, reads ahead both ways and in every competitive I/O mode, ...) run in fresh
   processes confined to the
   budget (memory cgroup, the model file evicted from the page cache before each run; the bench's
   runner, ``flashmoe.bench.runner``), in alternation, as many rounds as time allows (at most
   ``repeat``); the winner is the best measured median decode tok/s (prefill tok/s breaks ties
   within 2%).
7. **Output** (``document``, ``report``, ``candidates``). A normal policy YAML (it validates with
   flashmoe.policy and loads in ``Engine(policy=path)``) with a header comment, and a markdown
   report. Written atomically at the very end (``run.write_outputs``): an interrupted tune writes
   nothing.

Public API::

    TuneOptions(...)
    run_tune(opts, log) -> TuneResult      # measures, simulates, validates; writes nothing
    write_outputs(result, opts)             # the policy, the report (and its PNG), atomically
    parse_duration("10m") -> seconds
"""
from flashmoe.tune.candidates import Candidate, policy_text, resolve_text, size_text
from flashmoe.tune.document import TUNE_VERSION, header_lines
from flashmoe.tune.measure import (
    ComputeModel,
    DiskModel,
    EngineRead,
    IOCalibration,
    calibrate_compute,
    calibrate_io,
    calibrated_curve,
    constant_trace,
    io_plan,
    measure_disks,
)
from flashmoe.tune.model import MemoryPlan, ModelFacts, UbatchPlan, plan_memory, ubatch_plans, ubatch_sizes
from flashmoe.tune.options import Clock, TuneOptions, parse_duration
from flashmoe.tune.report import format_report, plot_png
from flashmoe.tune.run import DEFAULT_PROMPT, TuneResult, run_tune, write_outputs
from flashmoe.tune.search import (
    Search,
    Sizing,
    charged_ahead,
    choose_ubatches,
    greedy_split,
    pick_ubatch,
    predict,
    proportional_split,
    search,
    size_grid,
    working_set,
)
from flashmoe.tune.validate import TIE_FRACTION, ValidationRun, choose_winner, pick_for_validation

__all__ = [
    "DEFAULT_PROMPT", "TIE_FRACTION", "TUNE_VERSION", "Candidate", "Clock", "ComputeModel", "DiskModel", "EngineRead",
    "IOCalibration", "MemoryPlan", "ModelFacts", "Search", "Sizing", "TuneOptions", "TuneResult", "UbatchPlan",
    "ValidationRun", "calibrate_compute", "calibrate_io", "calibrated_curve", "charged_ahead", "choose_ubatches", "choose_winner", "constant_trace", "format_report", "greedy_split",
    "header_lines", "io_plan", "measure_disks", "parse_duration", "pick_for_validation", "pick_ubatch", "plan_memory", "plot_png",
    "policy_text", "predict", "proportional_split", "resolve_text", "run_tune", "search", "size_grid", "size_text",
    "ubatch_plans", "ubatch_sizes", "working_set", "write_outputs",
]
