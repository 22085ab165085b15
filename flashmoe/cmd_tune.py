"""`flashmoe tune`: pick the best streaming configuration for this machine and budget (issue #7).

See flashmoe/tune/ for how, docs/tune.md for the user's view.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import click

from flashmoe.errors import UsageError
from flashmoe.sizes import SIZE


def _readers(text: str) -> List[int]:
    try:
        rd = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--readers: expected comma-separated numbers, got {text!r}")
    if not rd or min(rd) < 1 or max(rd) > 64:
        raise UsageError("--readers: each count must be between 1 and 64")
    return rd


@click.command("tune")
@click.option("-m", "--model", required=True, type=click.Path(dir_okay=False), help="The GGUF model (first shard of a split model).")
@click.option("--ram", required=True, type=SIZE, help="Memory budget: process memory and its page cache (e.g. 2GiB).")
@click.option("--gpu-mem", type=SIZE, default=None, help="GPU memory budget (recorded; the tuner does not place tensors on the GPU yet).")
@click.option("--prompt", "prompt_file", type=click.Path(dir_okay=False), default=None,
              help="A text file: record the model's routing on this prompt instead of the default one.")
@click.option("--trace", type=click.Path(dir_okay=False), default=None,
              help="A routing trace (FMRT) to tune on instead of recording one; validation runs force it.")
@click.option("--time-limit", default="10m", show_default=True, help="Wall-clock limit for the whole tune (90s, 10m, 1h).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="The policy YAML to write.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="A markdown report to write (with a PNG of the hit-rate curve next to it when matplotlib is installed).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write everything the tune found (the report's data: candidates, predictions, n_ubatch "
                   "choices, validation runs) as JSON to this file.")
@click.option("--base", default="stream", show_default=True, help="The policy whose placement rules the tuned one keeps.")
@click.option("--prompt-tokens", type=click.IntRange(1, 100000), default=64, show_default=True,
              help="Prompt length of the workload (with --trace; with recording, the default prompt is cut to it).")
@click.option("--gen-tokens", type=click.IntRange(2, 100000), default=128, show_default=True, help="Tokens generated per run.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=None, help="Context size the policy is tuned for (default: the base policy's).")
@click.option("--n-ctx", "n_ctx_alias", type=click.IntRange(min=16), default=None, hidden=True)  # chat/serve's spelling
@click.option("--threads", "-t", type=click.IntRange(min=1), default=None)
@click.option("--validate", "n_validate", type=click.IntRange(0, 20), default=3, show_default=True,
              help="Candidates validated with real runs under the budget.")
@click.option("--repeat", type=click.IntRange(1, 20), default=3, show_default=True, help="At most this many runs per validated candidate.")
@click.option("--readers", default="4,8", show_default=True, help="Reader thread counts to consider (comma-separated).")
@click.option("--no-plot", is_flag=True, help="No PNG next to the report.")
def tune(model: str, ram: int, gpu_mem: Optional[int], prompt_file: Optional[str], trace: Optional[str], time_limit: str,
         out: str, report: Optional[str], json_out: Optional[str], base: str, prompt_tokens: int, gen_tokens: int,
         n_ctx: Optional[int], n_ctx_alias: Optional[int], threads: Optional[int], n_validate: int, repeat: int,
         readers: str, no_plot: bool) -> None:
    """Measure this machine, simulate expert caches on a routing trace, validate the best under the
    budget, and write the winner as a policy.

    \b
    flashmoe tune -m model.gguf --ram 2GiB -o tuned.yaml --report tune.md
    flashmoe tune -m b1.gguf --ram 2GiB --trace b1-realistic.trace --time-limit 15m -o tuned.yaml --report tune.md

    Nothing is written until the end: Ctrl-C leaves no partial file.
    """
    # Imported here, not at the top: the CLI imports every command module at start, and the tuner
    # pulls in the engine, the policy module and numpy.
    from flashmoe.tune import TuneOptions, parse_duration, run_tune, write_outputs

    if n_ctx is not None and n_ctx_alias is not None and n_ctx != n_ctx_alias:
        raise UsageError("give --ctx once (--n-ctx is the same option)")
    opts = TuneOptions(model=model, ram=ram, out=out, report=report, json_out=json_out, gpu_mem=gpu_mem, prompt_file=prompt_file,
                       trace=trace, time_limit=parse_duration(time_limit), base=base, prompt_tokens=prompt_tokens,
                       gen_tokens=gen_tokens, threads=threads, n_ctx=n_ctx if n_ctx is not None else n_ctx_alias,
                       validate=n_validate, repeat=repeat, readers=_readers(readers), plot=not no_plot,
                       argv=["flashmoe", "tune"] + sys.argv[2:])
    try:
        result = run_tune(opts)
        written = write_outputs(result, opts)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing written", err=True)
        sys.exit(130)
    for p in written:
        click.echo(f"wrote {p}")
