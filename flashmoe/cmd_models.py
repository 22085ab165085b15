"""``flashmoe synth`` (write a synthetic random-weight MoE model) and ``flashmoe inspect`` (model facts)."""
from __future__ import annotations

import json
from typing import Any, Dict

import click

from flashmoe.errors import UsageError


@click.command("synth")
@click.option("-o", "--output", "output", required=False, metavar="OUT.gguf", help="Output file (split models: OUT-0000i-of-0000N.gguf).")
@click.option("--arch", default="qwen3moe", show_default=True, metavar="ARCH",
              help="qwen3moe, qwen2moe, qwen35moe, deepseek2, glm4moe, gpt-oss, llama (alias mixtral), llama4, olmoe or "
                   "granitemoe (llama.cpp's architecture names; gguf_tools/archs/).")
@click.option("--preset", default="tiny", show_default=True, metavar="NAME",
              help="tiny (tests, a few MB) or bench (the B1 model, ~8.5 GB; the qwen archs only).")
@click.option("--layers", type=int, help="Layers.")
@click.option("--experts", type=int, help="Routed experts per layer.")
@click.option("--experts-used", type=int, help="Experts used per token.")
@click.option("--embd", type=int, help="Embedding size.")
@click.option("--expert-ffn", type=int, help="Expert FFN size.")
@click.option("--shared-ffn", type=int, help="Shared expert FFN size (qwen2moe, qwen35moe, granitemoe).")
@click.option("--heads", type=int, help="Attention heads.")
@click.option("--kv-heads", type=int, help="KV heads.")
@click.option("--head-dim", type=int, help="Head size (qwen2moe, llama, olmoe, granitemoe: embd / heads; deepseek2: "
                                             "the q/k head, nope + rope).")
@click.option("--vocab", type=int, help="Vocabulary size (at least 512).")
@click.option("--ctx", type=int, help="Training context length.")
@click.option("--dense-type", metavar="TYPE", help="F32, F16, Q8_0 or Q4_K for dense matrices.")
@click.option("--expert-type", metavar="TYPE", help="F32, F16, Q8_0, Q4_K or MXFP4 for routed experts.")
@click.option("--seed", type=int, help="Random seed (same seed -> byte-identical file).")
@click.option("--alignment", type=int, help="GGUF tensor alignment in bytes (power of two, default 32).")
@click.option("--layout", metavar="LAYOUT", help="interleaved (converter order, default) or grouped (dense first, then experts by layer).")
@click.option("--shards", type=int, help="Write a split GGUF of N shards.")
@click.option("--name", "model_name", help="general.name of the model.")
@click.option("--expert-scales", is_flag=True, default=None,
              help="Add per-expert scale tensors (ffn_*_exps.scale), as some converted models have (qwen3moe, llama).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="One of the architecture's own hyper-parameters (repeatable), e.g. n_layer_dense_lead=2, "
                   "nextn_predict_layers=1, interleave_moe_layer_step=1, n_expert_groups=4; --param help lists them.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def synth(output, arch, preset, layers, experts, experts_used, embd, expert_ffn, shared_ffn, heads, kv_heads,
          head_dim, vocab, ctx, dense_type, expert_type, seed, alignment, layout, shards, model_name, expert_scales,
          params, force, quiet, as_json):
    """Write a synthetic random-weight MoE model that llama.cpp loads and runs."""
    from gguf_tools import archs
    from gguf_tools.synth import make_spec, synth_model
    from gguf_tools.units import human_bytes

    if any(p.strip() == "help" for p in params):
        click.echo(_params_help(archs.get(arch)))
        return
    if not output:
        raise UsageError("missing option -o / --output OUT.gguf")
    spec = make_spec(
        arch, preset,
        n_layer=layers, n_expert=experts, n_expert_used=experts_used, n_embd=embd, n_ff_exp=expert_ffn,
        n_ff_shexp=shared_ffn, n_head=heads, n_head_kv=kv_heads, head_dim=head_dim, n_vocab=vocab, n_ctx=ctx,
        dense_type=dense_type, expert_type=expert_type, seed=seed, alignment=alignment, layout=layout,
        shards=shards, name=model_name, expert_scales=expert_scales,
        **_parse_params(archs.get(arch), params),
    )
    res = synth_model(output, spec, progress=not quiet and not as_json, overwrite=force)
    if as_json:
        click.echo(json.dumps({"paths": res.paths, "bytes": res.total_bytes, "seconds": round(res.seconds, 3),
                               "spec": spec.to_dict()}, indent=2))
        return
    what = res.paths[0] if len(res.paths) == 1 else f"{len(res.paths)} shards: {', '.join(res.paths)}"
    moe = spec.moe_layers
    routed = "" if len(moe) == spec.n_layer else f" ({len(moe)} MoE: {', '.join(map(str, moe))})"
    click.echo(
        f"wrote {what}: {spec.arch} ({spec.preset}), {spec.n_layer} layers{routed}, {spec.n_expert} experts "
        f"({spec.n_expert_used} used), {human_bytes(res.total_bytes)} in {res.seconds:.1f}s"
    )


def _params_help(a) -> str:
    import dataclasses

    fs = dataclasses.fields(a.Params)
    if not fs:
        return f"{a.name} has no parameters of its own (the generic options apply)."
    tiny = a.presets.get("tiny", {})
    lines = [f"{a.name} ({a.family}): --param NAME=VALUE"]
    for f in fs:
        lines.append(f"  {f.name} = {tiny.get(f.name, f.default)!r}")
    return "\n".join(lines)


def _parse_params(a, params) -> dict:
    """--param NAME=VALUE pairs -> the arch's own hyper-parameters, typed like its Params defaults."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(a.Params)}
    out: Dict[str, Any] = {}
    for item in params:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name or not raw:
            raise UsageError(f"--param {item!r}: expected NAME=VALUE")
        if name not in fields:
            have = ", ".join(fields) or "none"
            raise UsageError(f"--param {name}: {a.name} has no such parameter (its parameters: {have})")
        default = fields[name].default
        value: Any
        try:
            if isinstance(default, bool):
                low = raw.lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(raw)
                value = low in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                value = int(raw, 0)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError:
            raise UsageError(f"--param {name}={raw}: expected {type(default).__name__}") from None
        out[name] = value
    return out


@click.command("inspect")
@click.argument("model", metavar="MODEL")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable facts.")
def inspect(model, as_json):
    """Show a GGUF model's layout: experts, dense vs expert bytes, types, alignment, shards."""
    from gguf_tools.inspect import format_facts, model_facts
    from gguf_tools.reader import open_model

    with open_model(model) as m:
        facts = model_facts(m)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
    else:
        click.echo(format_facts(facts))
    if facts.get("problems"):  # the report says what; the exit status says that the model will not load
        n = len(facts["problems"])
        where = 'in "problems"' if as_json else "listed above"
        raise click.ClickException(f"{model}: llama.cpp cannot load this model ({n} problem{'s' if n > 1 else ''}, "
                                   f"{where}): {facts['problems'][0]}")
