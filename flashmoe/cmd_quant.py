"""`flashmoe quantize` (mixed-precision requantization in the streaming layout) and `flashmoe quality`
(KL divergence / top-1 agreement / perplexity of a variant against a reference). The work is in
gguf_tools.quantize and flashmoe.quality; docs/QUALITY.md explains both."""
from __future__ import annotations

import json
import os

import click

from flashmoe.sizes import SIZE, SIZE_HELP, format_size


@click.command("quantize")
@click.argument("input_path", metavar="IN.gguf", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, metavar="OUT.gguf", type=click.Path(dir_okay=False),
              help="The requantized model, in the streaming layout (split output: OUT-00001-of-0000N.gguf ...).")
@click.option("--experts", "experts", default="keep", show_default=True, metavar="TYPE",
              help="Type of the routed experts (ffn_{gate,up,down,gate_up}_exps), e.g. Q2_K, Q3_K, Q4_K; "
                   "keep = leave as is.")
@click.option("--dense", "dense", default="keep", show_default=True, metavar="TYPE",
              help="Type of the other weight matrices (attention, shared experts, embeddings, output), e.g. Q8_0 "
                   "or Q6_K. The router, norms and 1-D tensors always keep their precision.")
@click.option("--rule", "rules", multiple=True, metavar="PATTERN=TYPE",
              help="Type of the tensors whose name the regular expression PATTERN matches (searched, like "
                   "llama-quantize --tensor-type); the first matching rule wins over --experts/--dense. Repeatable.")
@click.option("--imatrix", "imatrix", default=None, metavar="FILE", type=click.Path(dir_okay=False),
              help="Importance matrix from llama-imatrix (.gguf, or the legacy .dat); needed by IQ1_S, IQ1_M, "
                   "IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, used by every type when given.")
@click.option("--align", "align", type=SIZE, default="16384", show_default=True,
              help="general.alignment of the output (as `flashmoe repack`).")
@click.option("--fuse-gate-up", is_flag=True, help="Merge each layer's gate and up experts (as `flashmoe repack`).")
@click.option("--split-max-size", type=SIZE, default=None, metavar="SIZE",
              help=f"Write shards of at most SIZE ({SIZE_HELP}).")
@click.option("--threads", "-t", type=click.IntRange(min=1), default=None, help="Quantization threads (default: all).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the written file before it takes the target name.")
@click.option("--force", is_flag=True, help="Replace an existing output file (never the input).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def quantize(input_path, output, experts, dense, rules, imatrix, align, fuse_gate_up, split_max_size, threads,
                 verify, force, progress, as_json):
    """Requantize a GGUF MoE model with llama.cpp's quantizer, one type for the routed experts and another for
    the resident (dense) weights, written in the streaming layout of `flashmoe repack` in the same pass.
    The input is only read; the output appears atomically. Valid types: Q2_K Q3_K Q4_K Q5_K Q6_K Q8_0
    Q4_0 Q4_1 Q5_0 Q5_1 IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S IQ4_NL IQ4_XS TQ1_0 TQ2_0 MXFP4
    F16 BF16 F32, keep."""
    from gguf_tools.quantize import file_type_name, quantize as run_quantize
    from gguf_tools.repack import format_layout

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    res = run_quantize(input_path, output, experts=experts, dense=dense, rules=list(rules), imatrix=imatrix,
                       align=align, fuse_gate_up=fuse_gate_up, split_max_size=split_max_size,
                       threads=threads, verify=verify, force=force, progress=progress, log=log)
    if as_json:
        click.echo(json.dumps({
            "paths": res.paths, "bytes": res.total_bytes, "input_bytes": res.input_bytes, "seconds": res.seconds,
            "verified": res.verified, "file_type": res.file_type, "file_type_name": file_type_name(res.file_type),
            "recipe": res.recipe, "type_bytes": res.type_bytes, "notes": res.notes,
            "changes": [c.__dict__ for c in res.changes],
        }, indent=2))
        return
    names = ", ".join(os.path.basename(p) for p in res.paths) if len(res.paths) <= 3 else \
        f"{os.path.basename(res.paths[0])} ... {os.path.basename(res.paths[-1])} ({len(res.paths)} shards)"
    click.echo(f"wrote {names}: {format_size(res.total_bytes)} (input {format_size(res.input_bytes)}) in "
               f"{res.seconds:.1f} s, " + ("verified" if res.verified else "NOT verified (--no-verify)"))
    click.echo(f"  recipe: {res.recipe}; file type {file_type_name(res.file_type)}")
    by = {}
    for c in res.changes:
        key = (c.src_type, c.dst_type)
        by[key] = by.get(key, 0) + 1
    for (a, b), n in sorted(by.items()):
        click.echo(f"  {n} tensors {a} -> {b}")
    tot = sum(res.type_bytes.values()) or 1
    click.echo("  weights by type: " + ", ".join(f"{k} {format_size(v)} ({100 * v / tot:.0f}%)"
                                                 for k, v in sorted(res.type_bytes.items(), key=lambda kv: -kv[1])))
    for line in format_layout(res.layout_after):
        click.echo("  " + line)


@click.command("quality")
@click.option("-m", "--model", "reference", required=True, metavar="REFERENCE.gguf", type=click.Path(dir_okay=False),
              help="The reference model.")
@click.option("--vs", "candidate", default=None, metavar="CANDIDATE.gguf", type=click.Path(dir_okay=False),
              help="The model compared with it (default: the reference file itself, e.g. under --vs-policy).")
@click.option("--policy", default=None, help="Policy of the reference run (a YAML file or shipped config name; default: auto).")
@click.option("--vs-policy", default=None,
              help="Policy of the candidate run (e.g. one with runtime: experts_per_token).")
@click.option("--experts-per-token", type=click.IntRange(min=1), default=None,
              help="Override the reference's experts per token.")
@click.option("--vs-experts-per-token", type=click.IntRange(min=1), default=None,
              help="Override the candidate's experts per token (e.g. 4 of the model's 8).")
@click.option("--text", "text_path", default=None, type=click.Path(dir_okay=False),
              help="Plain-text file to evaluate on (default: the packaged flashmoe/data/quality.txt).")
@click.option("--tokens", "n_tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens of the text to use, in whole chunks of --ctx (0 = all of it).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=8), default=512, show_default=True,
              help="Chunk size (context) in tokens; the second half of each chunk is scored, as llama-perplexity.")
@click.option("--threads", "-t", type=click.IntRange(min=1), default=None)
@click.option("--no-weight-repack", is_flag=True, help="Turn off llama.cpp's CPU weight repacking in both runs.")
@click.option("--tmp-dir", default=None, type=click.Path(file_okay=False),
              help="Folder for the reference's log-probabilities (tokens/2 x vocabulary x 4 bytes; default: the "
                   "system's temporary folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress on stderr.")
def quality(reference, candidate, policy, vs_policy, experts_per_token, vs_experts_per_token, text_path, n_tokens,
                n_ctx, threads, no_weight_repack, tmp_dir, as_json, progress):
    """Compare a model variant with a reference over the same text, as llama-perplexity --kl-divergence does:
    KL divergence of the candidate's next-token distribution from the reference's (mean, median, 99th
    percentile), top-1 agreement, and the perplexity of each. The candidate is another file (e.g. from
    `flashmoe quantize`) or the same file under another policy or experts-per-token."""
    from flashmoe.quality import measure_quality

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    rep = measure_quality(reference, candidate, policy=policy, vs_policy=vs_policy,
                          experts_per_token=experts_per_token, vs_experts_per_token=vs_experts_per_token,
                          text_path=text_path, n_tokens=n_tokens, n_ctx=n_ctx, threads=threads,
                          use_extra_bufts=False if no_weight_repack else None, tmp_dir=tmp_dir,
                          progress=progress, log=log)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
    else:
        click.echo(rep.format())
