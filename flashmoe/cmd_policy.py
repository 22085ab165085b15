"""``flashmoe policy``: list, check and apply YAML placement policies (see docs/policies.md)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Sequence

import click

from flashmoe.errors import FlashMoEError
from flashmoe.settings import PLACEMENTS
from flashmoe.sizes import SIZE, format_size


def _table(headers: Sequence[str], rows: List[Sequence[object]], right: Sequence[int] = ()) -> str:
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


@click.group("policy")
def policy():
    """Placement policies: which tensors are pinned, streamed, mmap'd or on the GPU.

    POLICY is a YAML file or the name of a shipped config (stock, stream, pagecache, gpu-dense,
    all-ram, ...). See docs/policies.md.
    """


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(as_json):
    """List the shipped configs."""
    from flashmoe.policy import list_configs, load_policy

    rows = []
    for name, path in list_configs().items():
        try:
            desc = load_policy(path).description
        except FlashMoEError as e:
            desc = f"(invalid: {e})"
        rows.append((name, desc, str(path)))
    if as_json:
        click.echo(json.dumps([{"name": n, "description": d, "path": p} for n, d, p in rows], indent=2))
        return
    if not rows:
        raise FlashMoEError("no shipped configs found (looked in the checkout's configs/ and the package data)")
    click.echo(_table(("name", "description"), [(n, d) for n, d, _p in rows]))


@policy.command("validate")
@click.argument("policies", nargs=-1, required=True, metavar="POLICY...")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate_cmd(policies, as_json):
    """Check policy files alone (no model): keys, types, patterns, sizes, placements."""
    from flashmoe.policy import load_policy

    results = []
    for name in policies:
        try:
            pol = load_policy(name)
        except FlashMoEError as e:
            results.append({"policy": name, "ok": False, "error": str(e), "warnings": []})
            continue
        results.append({"policy": name, "ok": True, "error": None, "warnings": pol.warnings, "parsed": pol.to_dict()})
        if not as_json:
            c = pol.expert_cache
            streams = "stream" in pol.places
            budget = pol.budget.text or "none"
            if streams:
                experts = f"experts: {c.mode}" + (f" {c.describe_size()}" if c.mode == "cache" else "")
            else:
                experts = "nothing streamed"
            click.echo(f"ok  {pol.source}  ({pol.name}: {len(pol.rules)} rule{'s' if len(pol.rules) != 1 else ''}, budget {budget}, {experts})")
            for w in pol.warnings:
                click.echo(f"  warning: {w}")
    failed = [r for r in results if not r["ok"]]
    if as_json:
        click.echo(json.dumps(results, indent=2))
        for r in failed:
            click.echo(f"error: {r['error']}", err=True)
    elif len(results) == 1 and failed:
        raise FlashMoEError(failed[0]["error"])
    else:
        for r in failed:
            click.echo(f"error: {r['error']}", err=True)
    if failed:
        sys.exit(1)


@policy.command("show")
@click.argument("policy_name", metavar="POLICY")
@click.option("-m", "--model", "model", required=True, type=click.Path(dir_okay=False), help="The GGUF model (first shard of a split model).")
@click.option("--budget", type=SIZE, default=None, help="Override the policy's memory budget (e.g. 28GiB).")
@click.option(
    "--gpu-backend",
    type=click.Choice(["auto", "none", "gpu", "metal"]),
    default="auto",
    show_default=True,
    help="Assume this GPU backend instead of asking the installed llama.cpp build.",
)
@click.option("--ram", type=SIZE, default=None, help="Assume a machine with this much RAM (plan for another machine).")
@click.option("-v", "--verbose", is_flag=True, help="List every tensor and where it goes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_cmd(policy_name, model, budget, gpu_backend, ram, verbose, as_json):
    """Show where POLICY puts each tensor of MODEL and what memory it needs."""
    from flashmoe.policy import MachineInfo, load_policy

    pol = load_policy(policy_name)
    machine = MachineInfo.detect()
    if ram is not None:
        if ram <= 0:
            raise FlashMoEError("--ram must be more than 0 bytes")
        machine.ram_bytes, machine.physical_ram, machine.cgroup_limit = ram, ram, None
    if gpu_backend != "auto":
        machine.gpu_backend = None if gpu_backend == "none" else gpu_backend
    res = pol.resolve(model, budget=budget, machine=machine)

    if as_json:
        d = res.to_dict(tensors=True)
        d["engine_settings"] = asdict(res.engine_settings()) if not res.errors else None
        d["expected_report"] = res.expected_report()
        if d["engine_settings"] is not None:
            d["engine_settings"].pop("placements", None)  # already in "tensors"
        d["expected_report"].pop("placements", None)
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo(_render(res, verbose))
    if res.errors:
        raise FlashMoEError(res.errors[0])


def _render(res, verbose: bool) -> str:
    from flashmoe.policy import PLACEMENT_HELP, plural

    pol, mv, mem, c = res.policy, res.model, res.memory, res.cache
    out: List[str] = []
    out.append(f"policy  {pol.name}  ({pol.source})")
    if pol.description:
        out.append(f"        {pol.description}")
    used = f"{mv.n_expert_used} per token" if mv.n_expert_used else "?"
    out.append(
        f"model   {Path(mv.path).name}: {mv.arch}, {mv.n_layer} layers, {mv.n_expert} experts ({used}), "
        f"{len(mv.tensors)} tensors, {format_size(mv.total_bytes)}"
    )
    out.append("")

    rows = []
    for p in PLACEMENTS:
        n = res.count_by_placement[p]
        if n:
            rows.append((p, n, format_size(res.bytes_by_placement[p]), PLACEMENT_HELP[p]))
    rows.append(("total", len(mv.tensors), format_size(mv.total_bytes), ""))
    out.append(_table(("placement", "tensors", "bytes", "where"), rows, right=(1, 2)))
    out.append("")

    mrows = []
    if mem.pinned:
        mrows.append(("pinned weights", format_size(mem.pinned), "locked in RAM"))
    if mem.ram:
        mrows.append(("RAM weights", format_size(mem.ram), "resident, not locked"))
    if mem.gpu_host:
        mrows.append(("GPU weights", format_size(mem.gpu_host), "unified memory (counts as RAM)"))
    if c.mode == "cache":
        per_layer = c.bytes_per_slot_all_layers // max(len(c.streamed_layers), 1)
        mrows.append(
            (
                "expert cache",
                format_size(mem.cache),
                f"{plural(c.slots, 'slot')}/layer of {c.n_expert} experts x {len(c.streamed_layers)} layers, "
                f"{format_size(per_layer)} per slot ({c.requested})",
            )
        )
    kv_note = f"n_ctx {mem.n_ctx}, f16"
    mrows.append(("KV cache", format_size(mem.kv_cache), kv_note))
    if mem.recurrent_state:
        mrows.append(("recurrent state", format_size(mem.recurrent_state), "hybrid layers, f32"))
    mrows.append(("compute buffer", format_size(mem.compute), f"estimate, n_ubatch {pol.runtime.n_ubatch}"))
    mrows.append(("overhead", format_size(mem.overhead), "process, libraries (runtime.overhead)"))
    mrows.append(("total", format_size(mem.total), "not counting mmap'd tensors (page cache, evictable)"))
    if mem.budget is not None:
        src = "--budget" if mem.budget_source == "--budget" else f"budget: {pol.budget.text}"
        mrows.append(("budget", format_size(mem.budget), src))
    else:
        mrows.append(("budget", "none", ""))
    mrows.append(("machine RAM", res.machine.describe_ram() if mem.machine_ram else "unknown", ""))
    if mem.gpu_device:
        mrows.append(("device memory", format_size(mem.gpu_device), "gpu weights (not in RAM)"))
    out.append(_table(("memory", "bytes", ""), mrows, right=(1,)))
    out.append("")

    if c.mode == "cache":
        io = "direct I/O" if c.direct_io else "buffered I/O"
        share = f" ({round(c.slots * 100 / c.n_expert)}% of {c.n_expert})" if c.n_expert else ""
        out.append(
            f"expert cache  cache: {plural(c.slots, 'slot')} per layer{share}, eviction {c.eviction}, {c.readers} readers, {io}"
        )
    elif c.mode == "pagecache":
        out.append(f"expert cache  pagecache: OS page cache, populated from the routing by {c.readers} readers")
    else:
        out.append("expert cache  off (nothing streamed)")
    rt = pol.runtime
    threads = rt.threads if rt.threads is not None else "default"
    if res.experts_used_override is not None:
        ept = f"{res.experts_used} (override; model: {mv.n_expert_used})"
    else:
        ept = f"{res.experts_used} (model)"
    out.append(
        f"runtime       n_ctx {rt.n_ctx or str(mem.n_ctx) + ' (model)'}, n_batch {rt.n_batch}, n_ubatch {rt.n_ubatch}, "
        f"threads {threads}, experts per token {ept}, repack {'on' if rt.repack else 'off'}"
    )

    if verbose:
        out.append("")
        trows = []
        for t in mv.tensors:
            r = res.rule_of.get(t.name)
            rule = f"{r.index} (line {r.line})" if r else "- (gpu ignored)"
            trows.append((t.name, t.type_name, _shape(t.shape), format_size(t.nbytes), res.placements[t.name], rule))
        out.append(_table(("tensor", "type", "shape", "bytes", "placement", "rule"), trows, right=(3,)))
        if res.notes:
            out.append("")
            out.append("notes")
            out.extend(f"  - {n}" for n in res.notes)

    if res.warnings:
        out.append("")
        out.append("warnings")
        out.extend(f"  ! {w}" for w in res.warnings)
    if len(res.errors) > 1:
        out.append("")
        out.append("errors (this policy cannot load this model as asked)")
        out.extend(f"  x {e}" for e in res.errors)
    return "\n".join(out)
