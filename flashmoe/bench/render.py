"""The bench's readable output, from its JSON document: the markdown report (setting lines, the
table, the modes and notes) and the sweep plot."""
from __future__ import annotations

import os
import shlex
from typing import Any, Dict, List, Optional

from flashmoe.bench.facts import describe_machine
from flashmoe.errors import FlashMoEError
from flashmoe.report import markdown_table
from flashmoe.sizes import GiB, MiB, format_size

TABLE_HEADERS = ["config", "budget", "status", "load s", "TTFT s", "prefill tok/s", "decode tok/s",
                 "decode min-max", "MiB read/tok", "expert MiB/tok", "maj faults/tok", "hit %", "stall ms/tok", "peak MiB",
                 "identical", "I/O bound tok/s", "% of bound"]


def _f(x: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _med(s: Dict[str, Any], k: str) -> Optional[float]:
    a = s["metrics"].get(k)
    return a["median"] if a else None


def _status_cell(s: Dict[str, Any]) -> str:
    st = s["status"]
    if st in ("n/a", "POLICY ERROR", "not run"):
        return st
    c, n = s["counts"], s["runs"]
    if len(c) == 1 and st == "ok" and n == 1:
        return st
    return f"{st} {c.get(st, 0)}/{n}" if len(c) == 1 else ", ".join(f"{k} {v}/{n}" for k, v in c.items())


def _identical_cell(s: Dict[str, Any]) -> str:
    if s["identical"] is True:
        return "yes"
    if s["identical"] is False:
        return f"NO (token {s['first_difference']})"
    if s["status"] in ("ok", "MIXED") and s["metrics"].get("decode_tok_s"):
        return "?"
    return "-"


def table_row(s: Dict[str, Any]) -> List[str]:
    """One summary row of the table (the JSON summary row it comes from has the same figures)."""
    dec = _med(s, "decode_tok_s")
    a = s["metrics"].get("decode_tok_s")
    decode = _f(dec)
    if dec is None and s.get("partial_decode_tok_s"):
        decode = f"~{s['partial_decode_tok_s']:.3g} (partial)"
    hit, frac, peak = _med(s, "hit_rate"), _med(s, "io_fraction"), _med(s, "peak_mib")
    if peak is None and s.get("peak_mib_failed"):
        peak = s["peak_mib_failed"]["max"]
    return [
        s["config"], s["budget_text"], _status_cell(s),
        _f(_med(s, "load_s")), _f(_med(s, "ttft_s"), "{:.3f}"), _f(_med(s, "prefill_tok_s")), decode,
        f"{a['min']:.2f}-{a['max']:.2f}" if a else "-",
        _f(_med(s, "disk_mib_per_token")), _f(_med(s, "expert_mib_per_token"), "{:.1f}"),
        _f(_med(s, "major_faults_per_token"), "{:.1f}"),
        _f(None if hit is None else 100 * hit, "{:.1f}"), _f(_med(s, "stall_ms_per_token"), "{:.1f}"),
        _f(peak, "{:.0f}"), _identical_cell(s), _f(_med(s, "io_bound_tok_s")),
        _f(None if frac is None else 100 * frac, "{:.0f}%"),
    ]


def _model_line(f: Dict[str, Any]) -> str:
    return (f"- model: {os.path.basename(f['path'])} ({f['arch']}, {f['n_layer']} layers, {f['n_expert']} experts "
            f"({f['n_expert_used']} used), {format_size(f['file_bytes'])}: dense {format_size(f['dense_bytes'])}, "
            f"experts {format_size(f['expert_bytes'])}; types {', '.join(f['expert_types'])} experts, "
            f"{', '.join(f['dense_types'])} dense; "
            f"{'experts grouped by layer' if f.get('experts_grouped_by_layer') else 'interleaved layout'})")


def _workload_lines(b: Dict[str, Any]) -> List[str]:
    """The workload, routing and memory lines."""
    out = [f"- workload: {b['prompt_tokens']}-token prompt, {b['gen_tokens']} generated (greedy), "
           f"{b['threads']} thread{'s' if b['threads'] != 1 else ''}, "
           f"{b['repeat']} run{'s' if b['repeat'] != 1 else ''} of each in alternation, each a fresh process"]
    tr = b.get("routing_trace")
    if tr:
        st = tr["stats"]
        lru = ", ".join(f"{k} {100 * v:.0f}%" for k, v in st["lru_hit_rate"].items())
        out.append(f"- routing: forced from {os.path.basename(tr['path'])} ({st['tokens']} tokens: "
                   f"next-token reuse {100 * st['next_token_reuse']:.1f}%, LRU hit at {lru} of a layer's experts)")
    else:
        out.append("- routing: the model's own (no trace)")
    dropped = b["drop_caches"] and b.get("page_cache_could_drop")
    if any(x is not None for x in b["budgets"]):
        out.append(f"- memory: each run confined to its budget (cgroup {b['cgroup']}: process memory and its page "
                   "cache); the model file evicted from the page cache before each confined run"
                   + ("; the page cache dropped before each run" if dropped else ""))
    else:
        out.append("- memory: unconfined" + ("; page cache dropped before each run" if dropped else
                                              " (the page cache is warm unless --drop-caches)"))
    return out


def _disk_and_reference_lines(doc: Dict[str, Any]) -> List[str]:
    out = []
    d = doc.get("disk")
    if d and d.get("ok"):
        out.append(f"- disk: random reads of {format_size(d['slice_bytes'])} (one expert slice) on the model file, "
                   f"{d['method']}: " + ", ".join(f"QD{x['qd']} {x['bytes_per_s'] / 1e9:.2f} GB/s" for x in d["depths"]))
    elif d:
        out.append(f"- disk: not measured ({d.get('reason')})")
    refs = list((doc.get("references") or {}).values()) or [doc.get("reference") or {}]
    for ref in refs:
        if ref.get("status") == "ok":
            out.append(f"- reference for 'identical': {ref['description']}: {len(ref['tokens'])} tokens"
                       + (" (cached)" if ref.get("cached") else ""))
        elif ref.get("status") != "skipped":
            out.append(f"- reference for 'identical': {ref.get('status')}: {ref.get('detail')}")
    return out


def _modes_and_notes(doc: Dict[str, Any]) -> List[str]:
    out = ["Modes:"]
    out += [f"- {s['config']} @ {s['budget_text']}: {s['mode_line']}" for s in doc["summary"] if s.get("mode_line")]
    details = [s for s in doc["summary"] if s.get("detail")]
    if details or doc.get("notes"):
        out += ["", "Notes:"]
        out += [f"- {s['config']} @ {s['budget_text']}: {s['detail']}" for s in details]
        out += [f"- {n}" for n in doc.get("notes", [])]
    return out


def format_markdown(doc: Dict[str, Any]) -> str:
    """The readable report of a bench's JSON document."""
    out = ["# flashmoe bench", "", f"- date: {doc['date']}"]
    if doc.get("command"):
        out.append(f"- command: `{' '.join(shlex.quote(a) for a in doc['command'])}`")
    out.append(f"- machine: {describe_machine(doc['machine'])}")
    out.append(_model_line(doc["model"]))
    out += _workload_lines(doc["bench"])
    out += _disk_and_reference_lines(doc)
    out += ["", markdown_table(TABLE_HEADERS, [table_row(s) for s in doc["summary"]]), ""]
    out.append("Medians over the completed runs; per-token figures are of the decode phase; peak is the cgroup's "
               "(process + page cache); I/O bound = decode tokens / the time the engine's reader pool was busy with "
               "their reads (the engine's own read pattern: a run cannot exceed it; % of bound is the share of the "
               "decode time spent reading), or, in page-cache mode, disk-test bandwidth at the run's reader count / "
               "expert bytes read per token.")
    out.append("")
    out += _modes_and_notes(doc)
    return "\n".join(out) + "\n"


def plot_sweep(doc: Dict[str, Any], path: str) -> None:
    """Decode tok/s against the budget, a line per configuration (x: runs that did not complete)."""
    try:  # matplotlib is optional (the `plot` extra)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlashMoEError("--plot needs matplotlib: pip install 'flashmoe[plot]' (or pip install matplotlib)")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(s["config"] for s in doc["summary"]))
    budgets = [s["budget"] for s in doc["summary"] if s["budget"] is not None]
    unit, unit_name = (GiB, "GiB") if budgets and max(budgets) >= 2 * GiB else (MiB, "MiB")
    any_fail = False
    for name in names:
        pts = sorted((s for s in doc["summary"] if s["config"] == name and s["budget"] is not None),
                     key=lambda s: s["budget"])
        meds = [(s["budget"] / unit, _med(s, "decode_tok_s")) for s in pts]
        done = [(x, y) for x, y in meds if y is not None]
        failed = [s["budget"] / unit for s in pts if _med(s, "decode_tok_s") is None and s["status"] != "n/a"]
        if not done and not failed:
            continue
        line, = ax.plot([x for x, _ in done], [y for _, y in done], marker="o", label=name)
        if failed:
            any_fail = True
            ax.plot(failed, [0] * len(failed), linestyle="none", marker="x", color=line.get_color())
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
