"""`flashmoe repack`: rewrite a GGUF MoE model in the streaming layout (dense first, experts grouped by
layer, page-aligned). The work is in gguf_tools.repack; docs/repack.md explains the layout."""
from __future__ import annotations

import os

import click

from flashmoe.sizes import SIZE, SIZE_HELP, format_size


@click.command("repack")
@click.argument("input_path", metavar="IN.gguf", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, metavar="OUT.gguf", type=click.Path(dir_okay=False),
              help="The repacked model (split output: OUT-00001-of-0000N.gguf ...).")
@click.option("--align", "align", type=SIZE, default="16384", show_default=True,
              help="general.alignment of the output: a power of two; 16384 puts expert slices on 16 KiB pages "
                   "(Apple Silicon) and so on 4 KiB pages (Linux) too.")
@click.option("--fuse-gate-up", is_flag=True,
              help="Merge each layer's gate and up experts into one ffn_gate_up_exps tensor, so that one expert's "
                   "gate+up is one read (architectures whose llama.cpp loader accepts it: qwen35moe, qwen3next, "
                   "deepseek2, ...).")
@click.option("--split-max-size", type=SIZE, default=None, metavar="SIZE",
              help=f"Write shards of at most SIZE ({SIZE_HELP}), named like llama.cpp's gguf-split.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the written files before they take the target name: tensor table, metadata, and a "
                   "sha256 of every tensor's bytes against the input.")
@click.option("--force", is_flag=True, help="Replace an existing output file (never the input).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def repack_cmd(input_path, output, align, fuse_gate_up, split_max_size, verify, force, progress):
    """Rewrite a GGUF MoE model for streaming: dense tensors first, then each layer's experts together,
    aligned so that expert slices start on page boundaries. Bytes are copied, never requantized; every
    metadata key is kept."""
    from gguf_tools.repack import format_layout, repack

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    res = repack(input_path, output, align=align, fuse_gate_up=fuse_gate_up, split_max_size=split_max_size,
                 verify=verify, force=force, progress=progress, log=log)
    rate = res.total_bytes / res.write_seconds if res.write_seconds > 0 else 0.0
    names = ", ".join(os.path.basename(p) for p in res.paths) if len(res.paths) <= 3 else \
        f"{os.path.basename(res.paths[0])} ... {os.path.basename(res.paths[-1])} ({len(res.paths)} shards)"
    click.echo(f"wrote {names} in {os.path.dirname(os.path.abspath(res.paths[0]))}: {format_size(res.total_bytes)} "
               f"in {res.write_seconds:.1f} s ({format_size(rate)}/s)"
               + (f", verified in {res.verify_seconds:.1f} s" if res.verified else ", NOT verified (--no-verify)"))
    for line in format_layout(res.layout_after, before=res.layout_before):
        click.echo("  " + line)
    for P, d in res.layout_after["pages"].items():
        if not d["aligned"]:
            click.echo(f"  note: at {P // 1024} KiB pages an expert read that is not page-aligned needs a bounce "
                       "copy with direct I/O (llama.cpp addresses expert e at offset + e*stride, so padding "
                       "between slices is impossible; see docs/repack.md)")
