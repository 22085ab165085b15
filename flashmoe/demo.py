"""`flashmoe demo`: the small real MoE shipped with flashmoe, run in RAM and with its experts streamed
from disk through a small expert cache, side by side: the same tokens, and what streaming cost.

The model (``flashmoe/data/real-moe-22m-q8_0.gguf``, 26 MiB) is a 22M-parameter qwen3moe (6 layers,
32 experts, 4 per token) trained on public-domain books and converted by llama.cpp's own converter;
``scripts/real_model/`` remakes it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

import click

from flashmoe.engine import Engine
from flashmoe.settings import StreamSettings

DEMO_MODEL = Path(__file__).resolve().parent / "data" / "real-moe-22m-q8_0.gguf"
DEMO_PROMPT = "Elizabeth looked at Mr. Darcy and"


def run_demo(model: Optional[str] = None, prompt: str = DEMO_PROMPT, n_tokens: int = 48, cache_slots: int = 8,
             threads: Optional[int] = None) -> bool:
    """Prints both runs and the comparison; True when the tokens are identical."""
    path = str(model or DEMO_MODEL)
    common: Dict[str, Any] = dict(use_extra_bufts=False, n_ctx=512, n_threads=threads)  # matched kernels: docs/patch.md
    with Engine(path, policy="stock", **common) as e:
        ram = e.generate(prompt, n_tokens, stop_at_eos=False)
    with Engine(path, stream=StreamSettings(mode="cache", cache_slots=cache_slots, readers=2, direct_io=True),
                **common) as e:
        streamed = e.generate(prompt, n_tokens, stop_at_eos=False)
    same = ram.tokens == streamed.tokens
    click.echo(f"model   {os.path.basename(path)}")
    click.echo(f"prompt  {prompt}\n")
    click.echo(f"[in RAM]   {prompt}{ram.text}\n")
    click.echo(f"[streamed] {prompt}{streamed.text}\n")
    n_same = sum(1 for a, b in zip(ram.tokens, streamed.tokens) if a == b)
    click.echo(f"identical tokens: {'yes' if same else 'NO'} ({n_same} of {len(ram.tokens)})")
    click.echo(f"in RAM:   {ram.report.decode_tok_s:.1f} tok/s decode; {ram.report.mode}")
    click.echo(f"streamed: {streamed.report.decode_tok_s:.1f} tok/s decode; {streamed.report.mode}\n")
    click.echo(streamed.report.format())
    return same


@click.command("demo")
@click.option("-m", "--model", default=None, help="A GGUF MoE (default: the small real model shipped with flashmoe).")
@click.option("-p", "--prompt", default=DEMO_PROMPT, show_default=True)
@click.option("-n", "n_tokens", type=click.IntRange(1, 2048), default=48, show_default=True)
@click.option("--cache-slots", type=click.IntRange(min=1), default=8, show_default=True,
              help="Expert cache slots per layer of the streamed run.")
@click.option("--threads", "-t", type=click.IntRange(min=1), default=None)
def demo(model, prompt, n_tokens, cache_slots, threads):
    """Run a model in RAM and with streamed experts, side by side (identical tokens, the cache report)."""
    from flashmoe.errors import FlashMoEError

    if not run_demo(model, prompt, n_tokens, cache_slots, threads):
        raise FlashMoEError("the streamed run's tokens differ from the in-RAM run's")
