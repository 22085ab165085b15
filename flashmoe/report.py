"""Readable run reports (one screen) for generate/chat/serve, and the markdown table of bench and tune."""
from __future__ import annotations

from typing import Any, Sequence


def fmt_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_run_report(r) -> str:
    gen = max(1, r.generated_tokens)
    rows = [
        ("mode", r.mode),
        ("model", r.model),
        ("load", f"{r.load_s:.2f} s"),
        ("prompt", f"{r.prompt_tokens} tokens, prefill {r.prefill_tok_s:.2f} tok/s ({r.prefill_s:.2f} s)"),
        ("time to first token", f"{r.ttft_s:.3f} s"),
        ("generated", f"{r.generated_tokens} tokens, decode {r.decode_tok_s:.2f} tok/s"),
        ("peak RSS", fmt_bytes(r.peak_rss_bytes)),
        ("read from disk", f"{fmt_bytes(r.disk_read_bytes)} during generation ({fmt_bytes(r.disk_read_bytes / gen)}/token), "
                           f"{fmt_bytes(r.load_disk_read_bytes)} at load"),
        ("major page faults", f"{r.major_faults} ({r.major_faults / gen:.1f}/token)"),
    ]
    c = (r.cache or {}).get("total")
    if c:
        acc = c["hits"] + c["misses"]
        rows += [
            ("expert cache", f"hit rate {100 * c['hit_rate']:.1f}% ({c['hits']} hits, {c['misses']} misses of {acc}), "
                             f"{c['evictions']} evictions"),
            ("expert reads", f"{fmt_bytes(c['bytes_read'])} ({fmt_bytes(c['bytes_read'] / gen)}/token), "
                             f"read time {c['read_s']:.3f} s, stall {c['stall_s']:.3f} s ({1000 * c['stall_s'] / gen:.1f} ms/token)"),
        ]
        if c.get("n_predicted"):
            rows.append(("prefetch", f"prediction right {100 * c['prediction_accuracy']:.1f}% of {c['n_predicted']}; "
                                     f"{c['n_prefetched']} read ahead, {c['n_prefetch_used']} used, "
                                     f"{c.get('n_prefetch_cancelled', 0)} dropped unstarted, "
                                     f"{fmt_bytes(c['prefetch_wasted_bytes'])} wasted, waited {c['prefetch_wait_s']:.3f} s"))
    if r.prefill_expert_reads is not None:
        rows.append(("prompt reads", f"the prompt read the streamed experts {r.prefill_expert_reads:.2f} times "
                                     f"({r.prompt_tokens} tokens in ubatches of {r.n_ubatch}: each ubatch of a long "
                                     "prompt touches nearly every expert)"))
    for n in r.notes:
        rows.append(("note", n))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def markdown_table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], pad: bool = True) -> str:
    """A markdown table. ``pad`` lines the columns up, for reading in a terminal (the bench's table);
    without it each cell stands as written (the tuner's long report, read rendered)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    if not pad:
        out = ["| " + " | ".join(r) + " |" for r in cells]
        out.insert(1, "|" + "|".join("---" for _ in headers) + "|")
        return "\n".join(out)
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |" for r in cells]
    out.insert(1, "|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(out)
