"""``flashmoe policy``: list, check and apply YAML placement policies (see docs/policies.md).

flashmoe.policy is imported inside the commands, as in every cmd_* module: the CLI imports all
command modules at start-up, and the policy package brings numpy, yaml and gguf (about 150 ms on
every ``flashmoe`` call, ``--help`` included, if imported here).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

import click

from flashmoe.errors import FlashMoEError
from flashmoe.sizes import SIZE


@click.group("policy")
def policy():
    """Placement policies: which tensors are pinned, streamed, mmap'd or on the GPU.

    POLICY is a YAML file or the name of a shipped config (stock, stream, pagecache, gpu-dense, gpu-ram,
    all-ram, ...). See docs/policies.md.
    """


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(as_json):
    """List the shipped configs."""
    from flashmoe.policy import list_configs, load_policy
    from flashmoe.policy.report import text_table

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
    click.echo(text_table(("name", "description"), [(n, d) for n, d, _p in rows]))


@policy.command("validate")
@click.argument("policies", nargs=-1, required=True, metavar="POLICY...")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate_cmd(policies, as_json):
    """Check policy files alone (no model): keys, types, patterns, sizes, placements."""
    from flashmoe.policy import load_policy, plural

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
            click.echo(f"ok  {pol.source}  ({pol.name}: {plural(len(pol.rules), 'rule')}, budget {budget}, {experts})")
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
@click.option("--gpu-memory", type=SIZE, default=None,
              help="Assume a GPU with this much memory (with --gpu-backend gpu: plan the VRAM of another machine).")
@click.option("-v", "--verbose", is_flag=True, help="List every tensor and where it goes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_cmd(policy_name, model, budget, gpu_backend, ram, gpu_memory, verbose, as_json):
    """Show where POLICY puts each tensor of MODEL and what memory it needs."""
    from flashmoe.policy import MachineInfo, load_policy
    from flashmoe.policy.report import render

    pol = load_policy(policy_name)
    machine = MachineInfo.detect()
    if ram is not None:
        if ram <= 0:
            raise FlashMoEError("--ram must be more than 0 bytes")
        machine.ram_bytes, machine.physical_ram, machine.cgroup_limit = ram, ram, None
    if gpu_backend != "auto":
        machine.gpu_backend = None if gpu_backend == "none" else gpu_backend
    if gpu_memory is not None:
        if gpu_memory <= 0:
            raise FlashMoEError("--gpu-memory must be more than 0 bytes")
        machine.gpu_memory, machine.detect_gpu_memory = gpu_memory, False
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
        click.echo(render(res, verbose))
    if res.errors:
        raise FlashMoEError(res.errors[0])
