"""The tune's markdown report and its PNG (hit rate against cache size), from the tune's document."""
from __future__ import annotations

import io
from typing import Any, Dict, List, Optional

import numpy as np

from flashmoe.report import markdown_table
from flashmoe.sizes import format_size
from flashmoe.tune.validate import fmt

PER_LAYER_SLOTS = (
    "Per-layer slot counts run in the engine (`flashmoe_config_layer_slots`; in a policy, "
    "`cache_slots: {default: N, \"a-b\": M}`): the per-layer candidates above compete with the uniform "
    "ones, are validated like them, and a winner is written with its per-layer counts.")


def _table(headers: List[str], rows: List[List[Any]]) -> str:
    return markdown_table(headers, rows, pad=False)


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _pick_sizes(grid: List[int], max_slots: int, n: int = 8) -> List[int]:
    if len(grid) <= n:
        return list(grid)
    idx = np.unique(np.round(np.linspace(0, len(grid) - 1, n)).astype(int))
    pick = {grid[i] for i in idx}
    if max_slots in grid:
        pick.add(max_slots)
    return sorted(pick)


def _result(doc: Dict[str, Any]) -> List[str]:
    w = doc["winner"]
    p, me = w["prediction"], w.get("measured")
    L = ["## Result", "", f"**Winner: {w['name']}**: {w['description']}.", "", doc["why"], ""]
    L.append(f"- predicted: {fmt(p.get('decode_tok_s'))} decode tok/s, {fmt(p.get('prefill_tok_s'), '{:.1f}')} "
             f"prefill tok/s (first token after {fmt(p.get('ttft_s'), '{:.2f}')} s, n_ubatch "
             f"{doc['workload']['n_ubatch']}), decode hit rate {_pct(p.get('decode_hit_rate'))}, "
             f"{p.get('bound') or '-'} bound" + _read_text(p.get("decode", {}).get("read_mb_s"), p.get("disk_source")))
    if me:
        L.append(f"- measured: {me['decode_tok_s']:.2f} decode tok/s (median of {me['runs']}, "
                 f"{me['decode_min']:.2f}-{me['decode_max']:.2f}), {me['prefill_tok_s']:.1f} prefill tok/s, "
                 f"decode hit rate {_pct(me['decode_hit_rate'])}, peak {me['peak_mib']:.0f} MiB of "
                 f"{format_size(doc['budget'])}" + _read_text(me.get("read_mb_s"), None))
    else:
        L.append("- measured: not validated")
    L += _bandwidth_lines(doc)
    L.append("")
    if doc.get("notes"):
        L += ["Notes:"] + [f"- {n}" for n in doc["notes"]] + [""]
    return L


def _read_text(mb_s: Optional[float], source: Optional[str]) -> str:
    """', reads at 1612 MB/s (engine)' for a result line ('' without a figure)."""
    if not mb_s:
        return ""
    return f", reads at {mb_s:.0f} MB/s" + (f" ({source})" if source else "")


def _bandwidth_lines(doc: Dict[str, Any]) -> List[str]:
    """Which bandwidth the predictions used, per I/O mode, and where it came from."""
    d = doc["disk"]
    summary = d.get("summary") or {}
    if not summary:
        return ["- disk bandwidth in the predictions: none (the disk could not be measured)"]
    L = [f"- disk bandwidth in the predictions, {mode + ' I/O' if mode != 'page cache' else 'page-cache mode'}: {text}"
         for mode, text in summary.items()]
    if not (d.get("engine") or {}).get("ok"):
        L.append("- the engine's own reads were not measured (" + _engine_failure(d) + "): the predictions use "
                 "the disk test")
    return L


def _engine_failure(d: Dict[str, Any]) -> str:
    e = d.get("engine") or {}
    bad = [f"{_run_label(r)}: {r['status']}" + (f" ({r['detail']})" if r.get("detail") else "")
           for r in e.get("runs") or [] if not r.get("bytes_per_s")]
    return "; ".join(bad) or e.get("note") or "not run"


def _run_io(r: Dict[str, Any]) -> str:
    return "page cache" if r.get("pagecache") else "direct" if r["direct"] else "buffered"


def _run_label(r: Dict[str, Any]) -> str:
    return f"{_run_io(r)}, {r['readers']} readers"


def _engine_reads(doc: Dict[str, Any]) -> List[str]:
    """The I/O calibration: the engine's own reads, run by run, and what the predictions took from them."""
    d = doc["disk"]
    e = d.get("engine") or {}
    used = d.get("used") or {}
    bslots = e.get("buffered_slots")
    L = ["Engine reads (the I/O calibration): short runs of the engine, routing forced from the trace, reads ahead "
         f"off, {e.get('prompt_tokens', '-')}-token prompt and {e.get('gen_tokens', '-')} tokens generated, each run "
         "in a fresh process confined to the budget with the model file evicted from the page cache first. Direct "
         "I/O streams with the smallest cache (k slots per layer, so nearly every expert a layer selects is read); "
         "buffered I/O with " + (f"{bslots} slots per layer" if bslots else "the slots per layer in the table")
         + ", so that the page cache its reads fill competes with the cache inside the budget as in the buffered "
         "candidates' runs" + (f" ({e['buffered_why']})" if bslots and e.get("buffered_why") else "")
         + "; page-cache mode once. Of each decode phase, bytes read over the time the reader pool was busy (the "
         "hook's `bytes_read` / `read_wall_s`).", ""]
    runs = e.get("runs") or []
    if runs:
        rows = []
        for r in runs:
            ok = bool(r.get("bytes_per_s"))
            rows.append([r["readers"], _run_io(r), "-" if r.get("pagecache") else r["slots"],
                         f"{r['bytes_per_s'] / 1e6:.0f}" if ok else "-", f"{r['qd']:.1f}" if ok else "-",
                         format_size(r["bytes_read"]) if ok else "-", f"{r['read_wall_s']:.2f}" if ok else "-",
                         _pct(r.get("hit_rate")), r["decode_tokens"] or "-",
                         f"{r['wall_s']:.1f}" if r.get("wall_s") else "-",
                         r["status"] + (f": {r['detail']}" if r.get("detail") else "")])
        L += [_table(["readers", "I/O", "slots/layer", "MB/s", "reads in flight", "read", "reader busy s",
                      "decode hit", "decode tokens", "run s", "status"], rows), ""]
    L.append(f"The calibration took {e.get('s', 0):.1f} s"
             + (f" of at most {e['allowance_s']:.0f} s" if e.get("allowance_s") else "")
             + (f" ({e['note']})" if e.get("note") else "") + ".")
    L.append("")
    src = {mode: (used.get(mode) or {}).get("source") for mode in ("direct", "buffered")}
    took = [mode for mode, x in src.items() if x == "engine"]
    if took:
        L.append(f"The predictions use these for {' and '.join(took)} I/O (the bandwidth at a queue depth between the "
                 "runs' is interpolated; outside them, the disk test's curve is scaled to the nearest run)"
                 + ("" if len(took) == 2 or not any(src.values()) else
                    f", the disk test for {'buffered' if took == ['direct'] else 'direct'} I/O") + ".")
    else:
        L.append(f"The engine's reads were not measured ({_engine_failure(d)}): the predictions use the disk test "
                 "above.")
    L.append("")
    return L + _pagecache_run(doc)


def _pagecache_run(doc: Dict[str, Any]) -> List[str]:
    """What the page-cache run measured and what the page-cache candidates' predictions took from it."""
    d = doc["disk"]
    e = d.get("engine") or {}
    r = next((x for x in e.get("runs") or [] if x.get("pagecache")), None)
    if r is None:
        return []
    pu = (d.get("used") or {}).get("pagecache") or {}
    if r.get("status") != "ok":
        return [f"Page-cache run: {r['status']}" + (f" ({r['detail']})" if r.get("detail") else "")
                + f": the page-cache candidates are predicted with buffered I/O's bandwidth ({pu.get('source') or '-'})"
                " and the modelled page cache.", ""]
    cap, eff_cap = e.get("pc_capacity"), e.get("pc_effective_capacity")
    L = []
    if r.get("effective_bytes_per_s"):
        comp = (f", {r['compute_s']:.2f} s of it compute by the compute model" if r.get("compute_s") is not None
                else ", compute not calibrated: nothing taken off")
        L.append(f"Page-cache run ({r['readers']} readers): {format_size(r['bytes_read'])} read over "
                 f"{r['decode_tokens']} decode tokens in {r['decode_s']:.2f} s{comp}: an **effective bandwidth of "
                 f"{r['effective_bytes_per_s'] / 1e6:.0f} MB/s** (the reader pool's own: "
                 f"{fmt((r.get('bytes_per_s') or 0) / 1e6, '{:.0f}')} MB/s; the effective one also carries what "
                 "else a miss costs under the limit, such as the matmuls' page faults when the cgroup reclaims what "
                 "was just read). The page-cache candidates' reads are predicted at it (other reader counts: "
                 "buffered I/O's disk-test shape at its level).")
    else:
        L.append(f"Page-cache run ({r['readers']} readers): no bandwidth ({r.get('detail') or 'nothing read'}): the "
                 f"page-cache candidates are predicted with buffered I/O's bandwidth ({pu.get('source') or '-'}).")
    if r.get("hit_rate") is not None and r.get("sim_hit_rate") is not None:
        line = (f"Its decode hit rate (mincore): {_pct(r['hit_rate'])}; the simulation of its workload with "
                f"{format_size(cap)} of page cache: {_pct(r['sim_hit_rate'])}")
        if eff_cap:
            line += (f": too far apart, so the page-cache candidates are simulated with **{format_size(eff_cap)}** "
                     "(the room that gives the measured hit rate in that simulation) instead.")
        else:
            line += ": close enough, the modelled page cache is kept."
        L.append(line)
    return L + [""]


def _disk_table(doc: Dict[str, Any]) -> List[str]:
    dd, db = doc["disk"]["direct"] or {}, doc["disk"]["buffered"] or {}
    qds = sorted({x["qd"] for d in (dd, db) if d.get("ok") for x in d["depths"]})
    if not qds:
        return []

    def at(d: Dict[str, Any], q: int) -> Optional[Dict[str, Any]]:
        return next((x for x in d.get("depths", []) if x["qd"] == q), None) if d.get("ok") else None

    rows = []
    for q in qds:
        a, b = at(dd, q), at(db, q)
        rows.append([q, f"{a['bytes_per_s'] / 1e6:.0f}" if a else "-", f"{a['latency_ms']:.2f}" if a else "-",
                     f"{b['bytes_per_s'] / 1e6:.0f}" if b else "-", f"{b['latency_ms']:.2f}" if b else "-"])
    sb = dd.get("slice_bytes") or db.get("slice_bytes")
    return [f"Random reads of one expert slice ({format_size(sb)}) on the model file, the disk test "
            f"(direct: {dd.get('method', 'failed')}):", "",
            _table(["queue depth", "direct MB/s", "direct ms/read", "buffered MB/s", "buffered ms/read"], rows), ""]


def _compute(doc: Dict[str, Any]) -> List[str]:
    c, m = doc["compute"], doc["model"]
    if not c.get("ok"):
        return [f"Compute: not calibrated ({c.get('note') or 'no time'}); predictions count I/O only.", ""]
    per_token = m["n_used"] * m["moe_layers"]
    table = _table(["", "decode", "prefill"], [
        ["dense part, ms per token", f"{1000 * c['dense_decode_s']:.3f}", f"{1000 * c['dense_prefill_s']:.3f}"],
        ["one expert in one layer, ms per token", f"{1000 * c['expert_decode_s']:.4f}",
         f"{1000 * c['expert_prefill_s']:.4f}"],
        [f"a token ({m['n_used']} experts x {m['moe_layers']} layers), ms",
         f"{1000 * (c['dense_decode_s'] + per_token * c['expert_decode_s']):.3f}",
         f"{1000 * (c['dense_prefill_s'] + per_token * c['expert_prefill_s']):.3f}"],
    ])
    runs = "; ".join(f"k={r['k']}: {r['decode_ms_per_token']:.2f} ms/decode token, "
                     f"{r['prefill_ms_per_token']:.2f} ms/prefill token, load {r['load_s']:.1f} s" for r in c["runs"])
    return ["Compute (engine with streaming on and a warm cache: constant routing, every access a hit):", "",
            table, "", f"Runs: {runs}.", ""]


def _machine(doc: Dict[str, Any]) -> List[str]:
    return (["## Machine", "", f"{doc['machine']['description']}; memory available at the start: "
             f"{format_size(doc['machine'].get('mem_available'))}.", ""] + _disk_table(doc) + _engine_reads(doc)
            + _compute(doc))


def _memory_plan(doc: Dict[str, Any]) -> List[str]:
    mem, m = doc["memory"], doc["model"]
    rows = [
        ["budget", format_size(doc["budget"])],
        [f"resident weights (base policy `{doc['base_policy']}`)", format_size(mem["weights"])],
        [f"runtime buffers: KV cache (n_ctx {mem['n_ctx']}) + compute + overhead",
         f"{format_size(mem['runtime'])} = {format_size(mem['kv_cache'])} + {format_size(mem['compute'])} + "
         f"{format_size(mem['overhead'])}"],
        ["left for experts", format_size(mem["cache_space"])],
        ["one slot in every MoE layer", format_size(mem["bytes_per_slot"])],
        ["largest uniform expert cache", f"{mem['max_slots']} slots per layer "
                                         f"({100 * mem['max_slots'] / m['n_expert']:.1f}% of the experts)"],
    ]
    if mem.get("measured_non_cache"):
        rows.append(["measured: peak RSS of the calibration runs less their cache",
                     format_size(mem["measured_non_cache"])])
    if mem.get("tight_slots"):
        rows.append(["measured: slots per layer that fit (margin kept)",
                     f"{mem['tight_slots']} (candidates `*-tight`, policy overhead {format_size(mem['tight_overhead'])})"])
    return ["## Memory plan", "", _table(["", "bytes"], rows), ""]


def _trace(doc: Dict[str, Any]) -> List[str]:
    t, wl = doc["trace"], doc["workload"]
    st = t["stats"]
    return ["## Trace", "",
            f"{t['label']}: next-token reuse {_pct(st['next_token_reuse'])}, top 10% of experts take "
            f"{_pct(st['top10pct_share'])} of the selections. Workload: {wl['prompt_tokens']}-token "
            f"prompt (ubatches of {wl['n_ubatch']}), {wl['gen_tokens']} tokens generated; "
            "routing forced from this trace in every validation run.", ""]


def _per_layer_hits(doc: Dict[str, Any], ev: str, sizes: List[int]) -> List[str]:
    by = {r["slots"]: r for r in doc["curve"]}
    max_slots = doc["memory"]["max_slots"]
    rows = [[l, f"{doc['working_set'].get(l, 0):.1f}"] + [_pct(by[s][ev]["layers"][l]) for s in sizes]
            for l in by[sizes[0]][ev]["layers"]]
    return [f"Per layer, decode hit rate, {ev.upper()} (columns: slots per layer):", "",
            _table(["layer", "working set"] + [str(s) + ("*" if s == max_slots else "") for s in sizes], rows), ""]


def _hit_rates(doc: Dict[str, Any]) -> List[str]:
    L = ["## Hit rate against cache size", "",
         "Exact simulation of the hook's cache (flashmoe.tune.simulate) over the workload; `decode` counts the "
         "decode steps only (what decode tok/s depends on), `all` includes the prefill.", ""]
    rows = [[r["slots"], format_size(r["bytes"]), "yes" if r["fits"] else "no", _pct(r["lru"]["all"]),
             _pct(r["lru"]["decode"]), _pct(r["lfru"]["all"]), _pct(r["lfru"]["decode"])] for r in doc["curve"]]
    L += [_table(["slots/layer", "cache", "fits (estimate)", "LRU all", "LRU decode", "LFRU all", "LFRU decode"],
                 rows), ""]
    pc = doc["pagecache"]
    room = ("the room that gives the page-cache calibration run's measured hit rate"
            if pc.get("capacity_source") == "calibrated" else
            f"the budget less the {'measured' if pc.get('capacity_source') == 'measured' else 'estimated'} "
            "memory of the process")
    L += [f"Page-cache mode (modelled as one LRU of {format_size(pc['capacity_bytes'])} shared by all layers, "
          f"{room}): {_pct(pc['all'])} all, {_pct(pc['decode'])} decode.", ""]
    if doc.get("png"):
        L += [f"![hit rate against cache size]({doc['png']})", ""]
    sizes = _pick_sizes([r["slots"] for r in doc["curve"]], doc["memory"]["max_slots"])
    for ev in ("lru", "lfru"):
        L += _per_layer_hits(doc, ev, sizes)
    L += ["\\* the largest cache that fits the budget. Working set: mean distinct experts in 32 consecutive "
          "decode tokens.", ""]
    return L


def _candidates(doc: Dict[str, Any]) -> List[str]:
    val = set(doc["validated"])
    rows = []
    seen = set()
    for cd in doc["candidates"] + doc["per_layer_candidates"]:  # (the per-layer ones are among the candidates)
        if cd["name"] in seen:
            continue
        seen.add(cd["name"])
        p = cd["prediction"]
        d = p.get("decode", {})
        rows.append([cd["name"], cd["description"] + ("" if cd["supported"] else " (not yet supported by the engine)"),
                     _pct(p.get("decode_hit_rate")), f"{d.get('mib_per_token', 0):.1f}",
                     fmt(d.get("read_mb_s"), "{:.0f}"),
                     f"{1000 * d.get('io_s_per_token', 0):.2f}", f"{1000 * d.get('compute_s_per_token', 0):.2f}",
                     fmt(p.get("decode_tok_s")), fmt(p.get("prefill_tok_s"), "{:.1f}"),
                     fmt(p.get("ttft_s"), "{:.2f}"), cd.get("n_ubatch") or "-", "yes" if cd["name"] in val else ""])
    return ["## Candidates (predicted)", "",
            "Decode time per token = compute (dense + experts) + the reads each layer's fetch waits for: its misses, "
            "read min(readers, reads) at a time at the bandwidth of that queue depth (the engine's own reads where "
            "the I/O calibration measured them, else the disk test; page-cache candidates: the effective bandwidth of "
            "the calibration's page-cache run, else buffered I/O's: see Machine; *read MB/s* is what the readers get "
            "in the prediction), and the part of its "
            "reads ahead (candidates with reads ahead) that the layer before's compute does not cover; wrong reads "
            "ahead that no reader has started by the fetch are dropped by the engine and cost nothing here "
            "(docs/tune.md). TTFT: the predicted prefill of the workload's prompt.", "",
            _table(["name", "configuration", "decode hit", "MiB/token", "read MB/s", "I/O ms/token", "compute ms/token",
                    "decode tok/s", "prefill tok/s", "TTFT s", "n_ubatch", "validated"], rows), ""]


def _ubatch(doc: Dict[str, Any]) -> List[str]:
    """The n_ubatch choices of the winner: the prompt's reads of the streamed experts and the predicted TTFT."""
    ub, wl = doc.get("ubatch") or {}, doc["workload"]
    rows_in = ub.get("choices") or []
    if not rows_in:
        return []
    L = ["## Prompt ubatch (n_ubatch)", ""]
    if len(rows_in) == 1:
        L += [f"The {wl['prompt_tokens']}-token prompt fits one ubatch of {ub['base']} (the base policy's): a larger "
              "n_ubatch would read the experts no fewer times, and its compute buffer would come out of the expert "
              "cache. Kept.", ""]
    else:
        L += [f"A ubatch of a long prompt touches nearly every expert of a layer: the {wl['prompt_tokens']}-token prompt "
              "reads the streamed experts about once per ubatch. A larger n_ubatch reads them fewer times, but its "
              "compute buffer comes out of the expert cache. Rule: a choice predicted to decode more than "
              f"{100 * ub['decode_margin']:.0f}% slower than with n_ubatch {ub['base']} is out; of the others, a larger "
              f"n_ubatch is taken when its predicted time to first token is at least {100 * ub['ttft_gain']:.0f}% "
              f"lower. The winner's choices:", ""]
    rows = []
    for r in rows_in:
        if not r["fits"]:
            verdict = f"does not fit: {r['why_not']}"
        elif r["chosen"]:
            verdict = "**chosen**"
        elif not r["decode_ok"]:
            verdict = f"decode more than {100 * ub['decode_margin']:.0f}% slower"
        else:
            verdict = ""
        rows.append([r["n_ubatch"], r["n_batch"], format_size(r["compute_bytes"]),
                     format_size(r["cache_bytes"]) + (f" ({r['slots']} slots/layer)" if r.get("slots") else ""),
                     "-" if r["prompt_reads"] is None else f"{r['prompt_reads']:.2f}x",
                     fmt(r["ttft_s"], "{:.2f}"), fmt(r["prefill_tok_s"], "{:.1f}"), fmt(r["decode_tok_s"]), verdict])
    L += [_table(["n_ubatch", "n_batch", "compute buffer", "expert cache", "prompt reads of the experts",
                  "pred. TTFT s", "pred. prefill tok/s", "pred. decode tok/s", ""], rows), "",
          "Prompt reads: the bytes the prompt's ubatches read (misses and reads ahead) over the bytes of every streamed "
          "expert of the model.", ""]
    return L


def _validation_row(cd: Dict[str, Any]) -> List[Any]:
    p, me = cd["prediction"], cd.get("measured")
    runs = cd.get("runs") or []
    status = ", ".join(sorted({r["status"] for r in runs})) or "not run (time)"
    if not me:
        detail = next((r.get("detail", "") for r in runs if r["status"] != "ok"), "")
        return [cd["name"], fmt(p.get("decode_tok_s")), "-", "-", _pct(p.get("decode_hit_rate")), "-", "-", "-",
                fmt(p.get("prefill_tok_s"), "{:.1f}"), "-", "-", status + (f": {detail}" if detail else "")]
    ratio = (me["decode_tok_s"] / p["decode_tok_s"]) if p.get("decode_tok_s") else None
    return [cd["name"], fmt(p.get("decode_tok_s")),
            f"{me['decode_tok_s']:.2f} ({me['decode_min']:.2f}-{me['decode_max']:.2f}, n={me['runs']})",
            fmt(ratio), _pct(p.get("decode_hit_rate")), _pct(me["decode_hit_rate"]),
            f"{1000 * p.get('decode', {}).get('io_s_per_token', 0):.2f}", f"{me['stall_ms_per_token']:.2f}",
            fmt(p.get("prefill_tok_s"), "{:.1f}"), f"{me['prefill_tok_s']:.1f}", f"{me['peak_mib']:.0f}", status]


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def _pair(a: Optional[float], b: Optional[float], f: Optional[str] = None) -> str:
    if f is None:
        return f"{_ms(a)} / {_ms(b)}"
    return f"{fmt(a, f)} / {fmt(b, f)}"


def error_source(cd: Dict[str, Any]) -> Optional[str]:
    """Where most of a validated candidate's decode error lies: 'I/O -120.3 ms: read bandwidth x1.72', 'I/O ...:
    bytes read x1.10', 'compute +3.2 ms' (None: not measured). The measured time per token is split into the time
    the compute waited for reads (the hook's stall) and the rest, set against the predicted I/O wait and compute;
    an I/O error is put down to the bandwidth or to the bytes read, whichever measured/predicted ratio is further
    from 1."""
    p, me = cd["prediction"], cd.get("measured")
    d = p.get("decode") or {}
    if not me or not p.get("decode_tok_s") or not me.get("decode_tok_s"):
        return None
    d_io = me["stall_ms_per_token"] - 1000 * d.get("io_s_per_token", 0)
    d_comp = (1000 / me["decode_tok_s"] - me["stall_ms_per_token"]) - 1000 * d.get("compute_s_per_token", 0)
    if abs(d_comp) > abs(d_io):
        return f"compute {d_comp:+.3g} ms"
    bw_p, bw_m = d.get("read_mb_s"), me.get("read_mb_s")
    mib_p, mib_m = d.get("mib_per_token"), me.get("expert_mib_per_token")
    r_bw = bw_m / bw_p if bw_p and bw_m else None
    r_mib = mib_m / mib_p if mib_p and mib_m else None
    if r_bw is not None and (r_mib is None or abs(np.log(r_bw)) >= abs(np.log(r_mib))):
        return f"I/O {d_io:+.3g} ms: read bandwidth x{r_bw:.2f}"
    if r_mib is not None:
        return f"I/O {d_io:+.3g} ms: bytes read x{r_mib:.2f}"
    return f"I/O {d_io:+.3g} ms"


def _time_row(cd: Dict[str, Any]) -> List[Any]:
    p, me = cd["prediction"], cd.get("measured") or {}
    d = p.get("decode") or {}
    pred_ms = 1000 / p["decode_tok_s"] if p.get("decode_tok_s") else None
    meas_ms = 1000 / me["decode_tok_s"] if me.get("decode_tok_s") else None
    stall = me.get("stall_ms_per_token")
    rest = meas_ms - stall if meas_ms is not None and stall is not None else None
    return [cd["name"], _pair(pred_ms, meas_ms), _pair(d.get("read_mb_s"), me.get("read_mb_s"), "{:.0f}"),
            p.get("disk_source") or "-", _pair(d.get("mib_per_token"), me.get("expert_mib_per_token")),
            _pair(1000 * d["io_s_per_token"] if "io_s_per_token" in d else None, stall),
            _ms(me.get("read_ms_per_token")),
            _pair(1000 * d["compute_s_per_token"] if "compute_s_per_token" in d else None, rest),
            error_source(cd) or "-"]


def _validation(doc: Dict[str, Any]) -> List[str]:
    val = set(doc["validated"])
    cds = [cd for cd in doc["candidates"] if cd["name"] in val]
    rows = [_validation_row(cd) for cd in cds]
    L = ["## Validation (measured under the budget)", ""]
    if rows:
        L.append(_table(["name", "pred. decode tok/s", "measured decode tok/s", "measured/pred.", "pred. decode hit",
                         "meas. decode hit", "pred. read ms/token", "meas. stall ms/token", "pred. prefill tok/s",
                         "meas. prefill tok/s", "peak MiB", "status"], rows))
    else:
        L.append("No validation run fitted in the time limit.")
    L += ["", "The measured decode hit rate of an explicit cache equals the simulated one when the simulator "
          "and the engine agree (they are tested to); the page-cache figure is a model.", ""]
    measured = [cd for cd in cds if cd.get("measured")]
    if measured:
        L += ["Decode per token, predicted / measured: the time; the bandwidth of the reads (bytes over the time "
              "the reader pool was busy; the prediction's from the source named: the engine's own reads in the I/O "
              "calibration, or the disk test); the expert bytes read; the time the compute waited for reads "
              "(measured: the hook's stall); and the rest (predicted: compute; measured: the time less the stall). "
              "*Reader busy* is the measured pool's busy time per token (reads ahead included). The last column says "
              "whether the error is mostly I/O (and then whether the bandwidth or the bytes read were off, as a "
              "measured/predicted ratio) or compute.", "",
              _table(["name", "ms/token", "read MB/s", "bandwidth from", "MiB read/token", "I/O wait ms/token",
                      "reader busy ms/token", "compute (rest) ms/token", "most of the error"],
                     [_time_row(cd) for cd in measured]), ""]
    return L


def format_report(doc: Dict[str, Any]) -> str:
    """The markdown report of a tune document."""
    m = doc["model"]
    L = [f"# flashmoe tune: {m['name']} at {format_size(doc['budget'])}", "",
         f"{doc['date']}; {doc['elapsed_s']:.0f} s of a {doc['time_limit_s']:.0f} s limit. "
         f"Command: `{' '.join(doc['command']) or 'flashmoe tune'}`", ""]
    for section in (_result, _machine, _memory_plan, _trace, _hit_rates, _candidates, _ubatch, _validation):
        L += section(doc)
    L += ["## Per-layer slot counts", "", PER_LAYER_SLOTS, ""]
    return "\n".join(L)


def plot_png(doc: Dict[str, Any]) -> Optional[bytes]:
    """Hit rate against cache size (overall and per layer) as a PNG, or None without matplotlib."""
    try:  # matplotlib is optional (the `plot` extra)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    xs = [r["slots"] for r in doc["curve"]]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for ev, color in (("lru", "tab:blue"), ("lfru", "tab:orange")):
        for l in doc["curve"][0][ev]["layers"]:
            ax.plot(xs, [100 * r[ev]["layers"][l] for r in doc["curve"]], color=color, alpha=0.15, lw=0.8)
        ax.plot(xs, [100 * r[ev]["decode"] for r in doc["curve"]], color=color, lw=2.2,
                label=f"{ev.upper()} decode (overall; thin: per layer)")
    ms = doc["memory"]["max_slots"]
    if ms:
        ax.axvline(ms, color="k", ls="--", lw=1)
        ax.text(ms, 2, f" budget: {ms} slots", fontsize=8)
    ax.axhline(100 * doc["pagecache"]["decode"], color="tab:green", ls=":", lw=1.5, label="page cache (model)")
    ax.set_xlabel("cache slots per layer")
    ax.set_ylabel("decode hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{doc['model']['name']}: hit rate against cache size", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
