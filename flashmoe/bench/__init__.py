"""`flashmoe bench`: policies against stock llama.cpp under a memory budget, honestly.

Every run is a fresh process (``flashmoe.worker``), confined with a memory cgroup (its memory
and its page cache) when there is a budget; configurations run in alternation (A B A B ...),
``repeat`` times; medians and min/max are reported. The definitions are those of the reference
benchmark B1 (shared/BENCHMARK.md; docs/BENCHMARKS.md says how to read the output).

Modules:

- ``configs``: BenchOptions, the configurations (policies, STOCK_VARIANTS) and their plans per budget
- ``runner``: measured runs in fresh processes (a ``flashmoe.worker`` WorkerSpec -> RunRecord), shared
  with ``flashmoe.tune``
- ``disk``: the disk test (random reads of one expert slice), shared with ``flashmoe.tune``
- ``facts``: the machine; ``reference``: the reference run and its cache
- ``results``: per-run metrics, run records, summary rows; ``render``: the markdown report and the plot
- ``session``: ``run_bench``, everything in order

Public API::

    BenchOptions(...)                        # what the command line says
    run_bench(opts, log=print) -> dict       # runs everything, returns the JSON document
    format_markdown(doc) -> str              # the readable report (tables) of that document
    plot_sweep(doc, path)                    # decode tok/s against the budget (matplotlib)
    disk_test(model_path, direct=True) -> DiskMeasurement
    measure_disk(model_path, ...) -> dict    # the same, in its JSON form
    machine_facts(model_path) -> dict
    run_worker(WorkerSpec(...), limit, timeout, measure) -> RunRecord
    STOCK_VARIANTS                           # the stock llama.cpp baselines of --vs stock
"""
from flashmoe.bench.configs import (
    DEFAULT_RUN_TIMEOUT,
    GPU_VARIANT,
    STOCK_VARIANTS,
    BenchOptions,
    Config,
    Plan,
    budget_text,
    build_configs,
    expand_vs,
    plan,
    planned_mode_line,
)
from flashmoe.bench.disk import (
    DISK_DEPTHS,
    DISK_READS,
    DiskDepth,
    DiskMeasurement,
    ExpertSlices,
    disk_bw_for,
    disk_test,
    evict_file,
    measure_disk,
    timed_reads,
)
from flashmoe.bench.facts import describe_machine, disk_facts, machine_facts
from flashmoe.bench.reference import REFERENCE_DESC, Reference, cache_dir, reference_settings
from flashmoe.bench.render import TABLE_HEADERS, format_markdown, plot_sweep, table_row
from flashmoe.bench.results import METRICS, BenchRun, RunMetrics, first_difference, run_metrics, summarize
from flashmoe.bench.runner import MEASURE_ONLY_LIMIT, Progress, RunRecord, parse_worker_output, run_worker
from flashmoe.bench.session import BENCH_VERSION, run_bench
from flashmoe.sizes import GiB, MiB
from flashmoe.worker import WorkerResult, WorkerSpec, settings_from_dict

__all__ = [
    "BENCH_VERSION", "DEFAULT_RUN_TIMEOUT", "DISK_DEPTHS", "DISK_READS", "GPU_VARIANT", "GiB", "MEASURE_ONLY_LIMIT",
    "METRICS", "MiB", "REFERENCE_DESC", "STOCK_VARIANTS", "TABLE_HEADERS", "BenchOptions", "BenchRun", "Config",
    "DiskDepth", "DiskMeasurement", "ExpertSlices", "Plan", "Progress", "Reference", "RunMetrics", "RunRecord", "WorkerResult",
    "WorkerSpec", "budget_text", "build_configs", "cache_dir", "describe_machine", "disk_bw_for", "disk_facts",
    "disk_test", "evict_file", "expand_vs", "first_difference", "format_markdown", "machine_facts", "measure_disk",
    "parse_worker_output", "plan", "planned_mode_line", "plot_sweep", "reference_settings", "run_bench",
    "run_metrics", "run_worker", "settings_from_dict", "summarize", "table_row", "timed_reads",
]
