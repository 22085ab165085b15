"""`flashmoe bench`: compare placement policies with stock llama.cpp under a memory budget."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import click

from flashmoe.errors import FlashMoEError, UsageError
from flashmoe.sizes import parse_size
from gguf_tools.atomic import atomic_write

_VS_HELP = ("Stock llama.cpp baselines: 'stock' for all of them (stock, stock-mmap, stock-no-mmap, stock-lazy, "
            "and stock-n-cpu-moe, stock-ot-exps-cpu on GPU builds), or one name; repeatable.")


def _parse_sizes(text: str, what: str) -> List[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        v = parse_size(part, what)
        if v <= 0:
            raise UsageError(f"{what}: a memory budget must be more than 0 bytes")
        out.append(v)
    if not out:
        raise UsageError(f"{what}: no size given")
    return out


def _budgets(ram_limit: Optional[str], sweep_ram: Optional[str]) -> List[Optional[int]]:
    if ram_limit and sweep_ram:
        raise UsageError("give --ram-limit or --sweep-ram, not both")
    if sweep_ram:
        return list(_parse_sizes(sweep_ram, "--sweep-ram"))
    if ram_limit:
        budgets = _parse_sizes(ram_limit, "--ram-limit")
        if len(budgets) > 1:
            raise UsageError("--ram-limit takes one size (use --sweep-ram for several)")
        return list(budgets)
    return [None]


def _check_out(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise FlashMoEError(f"output folder does not exist: {d}")


def _argv() -> List[str]:
    return ["flashmoe", "bench"] + sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "bench" else []


@click.command("bench")
@click.option("-m", "--model", required=True, type=click.Path(dir_okay=False), help="GGUF model (first shard of a split model).")
@click.option("--policy", "policies", multiple=True, help="A policy to measure (shipped name or YAML file); repeatable.")
@click.option("--vs", "vs", multiple=True, help=_VS_HELP)
@click.option("--ram-limit", default=None, help="Confine each run (memory + page cache) to this budget, e.g. 2GiB.")
@click.option("--sweep-ram", default=None, help="Comma-separated budgets to sweep, e.g. 1GiB,2GiB,4GiB.")
@click.option("--drop-caches", is_flag=True, help="Empty the page cache before each run (needs root; says so if not).")
@click.option("-p", "--prompt-tokens", type=click.IntRange(1, 1_000_000), default=64, show_default=True)
@click.option("-n", "--gen-tokens", type=click.IntRange(2, 1_000_000), default=128, show_default=True,
              help="Generated tokens (greedy); at least 2 for a decode rate.")
@click.option("--repeat", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Runs of each configuration (in alternation).")
@click.option("--routing-trace", type=click.Path(dir_okay=False), default=None,
              help="Force the routing from a trace (the same expert work for every configuration).")
@click.option("--threads", "-t", type=click.IntRange(min=1), default=None, help="Threads (default: all cores).")
@click.option("--run-timeout", type=click.FloatRange(min=1), default=3600, show_default=True,
              help="Seconds before a run is killed and reported as TIMEOUT (with how far it got).")
@click.option("--json", "as_json", is_flag=True, help="Print every raw figure as JSON on stdout instead of the report.")
@click.option("--json-out", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write every raw figure as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG: decode tok/s against the budget, per configuration (with --sweep-ram; needs matplotlib).")
@click.option("--no-reference", is_flag=True, help="Skip the reference run (no identical-output check).")
@click.option("--fresh-reference", is_flag=True, help="Run the reference again even when a cached one matches.")
@click.option("--no-disk", is_flag=True, help="Skip the disk measurement (no I/O bound).")
def bench(model: str, policies: Tuple[str, ...], vs: Tuple[str, ...], ram_limit: Optional[str], sweep_ram: Optional[str],
          drop_caches: bool, prompt_tokens: int, gen_tokens: int, repeat: int, routing_trace: Optional[str],
          threads: Optional[int], run_timeout: float, as_json: bool, json_path: Optional[str], plot_path: Optional[str],
          no_reference: bool, fresh_reference: bool, no_disk: bool) -> None:
    """Measure policies against stock llama.cpp, each run a fresh process confined to a memory budget.

    Reports load time, time to first token, prefill and decode tok/s, disk MiB and major faults per
    token, expert cache hit rate, stall per token, the cgroup's peak memory, whether the output equals
    an unconfined reference run, and the I/O bound of each streaming run (docs/BENCHMARKS.md).
    Without --policy and --vs: the stream policy against every stock baseline.
    """
    # Imported here, not at the top: the CLI imports every command module at start, and the bench
    # package pulls in the engine, the policy module and numpy.
    from flashmoe import bench as B

    budgets = _budgets(ram_limit, sweep_ram)
    if plot_path:
        if budgets == [None]:
            raise UsageError("--plot draws decode tok/s against the memory budget: give --sweep-ram (or --ram-limit)")
        if importlib.util.find_spec("matplotlib") is None:
            raise FlashMoEError("--plot needs matplotlib: pip install 'flashmoe[plot]' (or pip install matplotlib)")
        _check_out(plot_path)
    if json_path:
        _check_out(json_path)
    if not policies and not vs:
        policies, vs = ("stream",), ("stock",)
    opts = B.BenchOptions(
        model=model, policies=list(policies), vs=B.expand_vs(vs), budgets=budgets, drop_caches=drop_caches,
        prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeat=repeat, routing_trace=routing_trace,
        threads=threads, run_timeout=run_timeout, reference=not no_reference, reference_cache=not fresh_reference,
        disk=not no_disk, argv=_argv(),
    )
    doc: Dict[str, Any] = B.run_bench(opts)
    click.echo(json.dumps(doc, indent=1) if as_json else B.format_markdown(doc))
    if json_path:
        with atomic_write(json_path) as f:
            f.write(json.dumps(doc, indent=1).encode())
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        B.plot_sweep(doc, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
