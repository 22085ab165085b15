"""`flashmoe serve`: an OpenAI-compatible HTTP server on the streaming engine."""
from __future__ import annotations

import os
import sys

import click

from flashmoe.errors import FlashMoEError
from flashmoe.rpc.url import is_loopback_host


@click.command("serve")
@click.option("-m", "--model", "model_path", required=True, help="The GGUF model (first shard of a split model).")
@click.option("--policy", default=None, help="Placement policy: a shipped name (stream, stock, ...) or a YAML file. Default: auto (in RAM when the model fits, else stream).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the model to the network: use --api-key.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="0 = any free port.")
@click.option("--api-key", envvar="FLASHMOE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (also read from $FLASHMOE_API_KEY).")
@click.option("--ctx", "--n-ctx", "n_ctx", type=click.IntRange(min=64), default=None,
              help="Context size in tokens (default: the policy's). --n-ctx is the older spelling.")
@click.option("--experts-per-token", type=click.IntRange(min=1), default=None,
              help="Override the model's experts per token (CHANGES THE OUTPUT; shown in the mode line).")
@click.option("--no-weight-repack", is_flag=True,
              help="Turn off llama.cpp's CPU weight repacking (the same kernels in RAM and streamed: identical logits).")
@click.option("--threads", "-t", type=click.IntRange(min=1), default=None, help="Threads (default: all cores).")
@click.option("--alias", "model_name", default=None, help="Model id in /v1/models and responses (default: file name).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn log level (info: one line per request).")
@click.option("--verbose", is_flag=True, help="llama.cpp's own logging.")
def serve(model_path, policy, host, port, api_key, n_ctx, experts_per_token, no_weight_repack, threads, model_name,
          log_level, verbose):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    and /tokenize for lm-evaluation-harness).

    Tool calls with tool_choice "required" or a named function, and response_format JSON schemas,
    are generated under a grammar: the output always parses. One request runs at a time; others
    wait in line. See docs/server.md.
    """
    from flashmoe.server import _require_server_deps, bind_socket, create_app, make_server

    _require_server_deps()
    if not os.path.isfile(model_path):
        raise FlashMoEError(f"no such model file: {model_path}")
    if not is_loopback_host(host) and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this address can use "
                   f"the model", err=True)
    sock = bind_socket(host, port)  # before loading: a taken port fails fast
    from flashmoe.engine import Engine

    try:
        engine = Engine(model_path, policy=policy, n_ctx=n_ctx, verbose=verbose, n_expert_used=experts_per_token,
                        use_extra_bufts=False if no_weight_repack else None, n_threads=threads)
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(engine, api_key=api_key, model_name=model_name)
        h, p = sock.getsockname()[:2]
        shown = f"[{h}]" if ":" in h else h
        click.echo(f"model {os.path.basename(model_path)}: {engine.mode_line()}", err=True)
        if not app.state.model.template.from_model:
            click.echo("note: the model has no chat template; chat requests use ChatML", err=True)
        click.echo(f"context {engine.llama.n_ctx()} tokens; "
                   f"{'API key required' if api_key else 'no API key'}", err=True)
        click.echo(f"listening on http://{shown}:{p}  (OpenAI API base URL: http://{shown}:{p}/v1)", err=True)
        sys.stderr.flush()
        server = make_server(app, sock, log_level=log_level)
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
