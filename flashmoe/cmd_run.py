"""`flashmoe generate` and `flashmoe trace`."""
from __future__ import annotations

import json
import sys

import click

from flashmoe.errors import UsageError


def stream_options(f):
    """Streaming options shared by the commands that run a model (a policy file says the same in YAML)."""
    opts = [
        click.option("--policy", default=None, help="A placement policy: a YAML file or a shipped config name (stream, pagecache, stock, ...). Default: auto (in RAM when the model fits 90%% of RAM or the cgroup limit, else stream)."),
        click.option("--stream", "stream_mode", type=click.Choice(["off", "cache", "pagecache"]), default=None,
                     help="Stream routed experts: explicit cache, OS page cache, or off (stock). Overrides the policy."),
        click.option("--cache-slots", type=click.IntRange(min=1), default=None, help="Expert cache slots per layer."),
        click.option("--cache-size", default=None, help="Expert cache size in bytes for all layers (e.g. 1.5GiB)."),
        click.option("--eviction", type=click.Choice(["lru", "lfru"]), default=None),
        click.option("--readers", type=click.IntRange(1, 64), default=None, help="Reader threads."),
        click.option("--direct-io/--no-direct-io", default=None, help="O_DIRECT (Linux) / F_NOCACHE (macOS) expert reads."),
        click.option("--routing-trace", type=click.Path(dir_okay=False), default=None,
                     help="Force the routing from a trace file (benchmarks: same expert work for every configuration)."),
        click.option("--experts-per-token", type=click.IntRange(min=1), default=None,
                     help="Override the model's experts per token (CHANGES THE OUTPUT; reported)."),
        click.option("--no-weight-repack", is_flag=True, help="Turn off llama.cpp's CPU weight repacking (matched kernels)."),
        click.option("--threads", "-t", type=click.IntRange(min=1), default=None),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=None, help="Context size."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def engine_from_options(model, policy, stream_mode, cache_slots, cache_size, eviction, readers, direct_io,
                        routing_trace, experts_per_token, no_weight_repack, threads, n_ctx, record_trace=False,
                        seed=0, **extra):
    from flashmoe.engine import Engine
    from flashmoe.settings import EngineSettings
    from flashmoe.sizes import parse_size

    settings = None
    if policy and policy != "auto":
        from flashmoe.policy import load_policy
        from gguf_tools.reader import open_model

        with open_model(model) as m:
            settings = load_policy(policy).resolve(m).engine_settings()
    elif stream_mode is None:
        # no policy (or `auto`): in RAM when the model fits the memory budget, else stream its experts
        from flashmoe.autopolicy import auto_settings

        settings = auto_settings(model)
    if settings is None:
        settings = EngineSettings()
    st = settings.stream
    if stream_mode is not None:
        if stream_mode != st.mode:
            settings.placements = {}  # let the engine place experts/dense for the chosen mode
        st.mode = stream_mode
        if stream_mode != "off" and settings.policy_name == "stock":
            settings.policy_name = f"stream-{stream_mode}"
    if cache_slots is not None:
        st.cache_slots = cache_slots
    if cache_size is not None:
        st.cache_bytes = parse_size(cache_size, "--cache-size")
        st.cache_slots = 0
    if eviction is not None:
        st.eviction = eviction
    if readers is not None:
        st.readers = readers
    if direct_io is not None:
        st.direct_io = direct_io
    return Engine(
        model,
        settings=settings,
        routing_trace=routing_trace,
        record_trace=record_trace,
        seed=seed,
        n_expert_used=experts_per_token,
        use_extra_bufts=False if no_weight_repack else None,
        n_threads=threads,
        n_ctx=n_ctx,
        **extra,
    )


@click.command("generate")
@click.option("-m", "--model", required=True, type=click.Path(dir_okay=False), help="GGUF model (first shard of a split model).")
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("-n", "--n-tokens", type=click.IntRange(1, 1_000_000), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--record-trace", type=click.Path(dir_okay=False), default=None, help="Write the routing of this run to a trace file.")
@click.option("--json", "as_json", is_flag=True, help="Print the text and the report as JSON.")
@stream_options
def generate(model, prompt, n_tokens, seed, temp, record_trace, as_json, **opts):
    """Generate text, streaming tokens to stdout, then a run report."""
    if opts.get("n_ctx") is None:
        opts["n_ctx"] = 4096
    if record_trace:
        from flashmoe.trace import ensure_writable_target

        ensure_writable_target(record_trace, "--record-trace")  # before the model loads and generates
    eng = engine_from_options(model, record_trace=bool(record_trace), seed=seed, **opts)
    try:
        def emit(piece):
            sys.stdout.write(piece)
            sys.stdout.flush()

        gen = eng.generate(prompt, n_tokens, temp=temp, seed=seed, on_token=None if as_json else emit)
        if record_trace:
            eng.save_trace(record_trace)
        if as_json:
            click.echo(json.dumps({"text": gen.text, "tokens": gen.tokens, "report": gen.report.to_dict()}, indent=2))
        else:
            click.echo("\n")
            click.echo(gen.report.format())
    finally:
        eng.close()


@click.group("trace")
def trace():
    """Routing traces: generate, measure."""


@trace.command("gen")
@click.option("-m", "--model", required=True, type=click.Path(dir_okay=False))
@click.option("--kind", type=click.Choice(["uniform", "realistic"]), default="uniform", show_default=True)
@click.option("--tokens", type=click.IntRange(1, 10_000_000), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--experts-per-token", type=click.IntRange(min=1), default=None)
@click.option("--reuse", type=click.FloatRange(0, 1), default=None, help="realistic: next-token reuse probability.")
@click.option("--zipf", type=click.FloatRange(min=0), default=None, help="realistic: popularity skew exponent.")
@click.option("--drift", type=click.FloatRange(min=0), default=None, help="realistic: popularity drift per token.")
@click.option("--predict-accuracy", type=click.FloatRange(0, 1), default=None,
              help="Add predicted sets (trace v2) for prefetch: each used expert predicted with this probability.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
def trace_gen(model, kind, tokens, seed, experts_per_token, reuse, zipf, drift, predict_accuracy, output):
    """Write a synthetic routing trace for MODEL."""
    from flashmoe import trace as T

    params = T.RealisticParams()
    for k, v in (("reuse", reuse), ("zipf", zipf), ("drift", drift)):
        if v is not None:
            if kind != "realistic":
                raise UsageError(f"--{k} applies to --kind realistic only")
            setattr(params, k, v)
    T.ensure_parent(output)
    tr = T.trace_for_model(model, kind, tokens, seed, experts_per_token, params)
    if predict_accuracy is not None:
        tr = T.draw_predictions(tr, predict_accuracy, seed)
    T.write_trace(output, tr)
    pred = "" if predict_accuracy is None else f", predicted sets at accuracy {predict_accuracy:g}"
    click.echo(f"wrote {output}: {kind}, {tr.n_tokens} tokens x {len(tr.layers)} layers x {tr.n_used} of {tr.n_expert} experts{pred}")


@trace.command("stats")
@click.argument("trace_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def trace_stats_cmd(trace_file, as_json):
    """Measure a trace: next-token reuse, popularity skew, LRU hit rates."""
    from flashmoe import trace as T

    s = T.trace_stats(T.read_trace(trace_file))
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    rows = [
        ("tokens x layers", f"{s['tokens']} x {s['layers']}"),
        ("experts", f"{s['experts_used']} of {s['experts']} per token"),
        ("next-token reuse", f"{100 * s['next_token_reuse']:.1f}% of selections"),
        ("top 10% experts' share", f"{100 * s['top10pct_share']:.1f}% of selections"),
    ] + [(f"LRU hit rate at {k}", f"{100 * v:.1f}%") for k, v in s["lru_hit_rate"].items()]
    if s["prediction_accuracy"] is not None:
        rows.append(("prediction accuracy", f"{100 * s['prediction_accuracy']:.1f}% of predicted experts used"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{w}}  {v}")
