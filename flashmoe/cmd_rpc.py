"""`flashmoe rpc-server`: a worker that runs a policy's remote layers (llama.cpp's rpc-server)."""
from __future__ import annotations

import os
import socket
import sys

import click

from flashmoe.rpc import DEFAULT_PORT, SECURITY_NOTE, is_loopback_host


@click.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback exposes the worker to that network: "
                   "the RPC protocol has no authentication.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True, help="TCP port.")
@click.option("--threads", "-t", type=click.IntRange(1, 1024), default=None,
              help="Threads of the CPU device (default: half the cores, llama.cpp's default).")
@click.option("--device", "devices", default=None,
              help="llama.cpp devices to expose, comma-separated (e.g. CUDA0,CUDA1; default: the accelerators, "
                   "else the CPU).")
@click.option("--cache", is_flag=True,
              help="llama.cpp's local file cache of large tensors (~/.cache/llama.cpp/rpc): reloads send hashes "
                   "instead of the weights.")
def rpc_server(host, port, threads, devices, cache):
    """Serve this host's CPU (or GPUs) to flashmoe on other hosts: llama.cpp's rpc-server, built by
    `flashmoe build` with the same patched library.

    A policy on the main host names it (`devices: {w1: rpc://HOST:PORT}`) and places layers on it
    (`{match: "blk.{12..23}.*", place: w1}`); see docs/rpc.md. It serves one client at a time.
    """
    from flashmoe import build as B
    from flashmoe.errors import FlashMoEError

    server = B.rpc_server_path()
    if server is None:
        raise FlashMoEError("the installed llama.cpp has no rpc-server (a build without RPC, or one made before "
                            "flashmoe shipped it): run `flashmoe build`")
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FlashMoEError(f"--host {host}: cannot resolve it ({e.strerror}); llama.cpp's RPC listens on IPv4 only")
    addr = str(infos[0][4][0])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a clear error before llama.cpp's silent exit 0
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as e:
            raise FlashMoEError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    if not is_loopback_host(addr):
        click.echo(f"warning: listening on {host}:{port}, not loopback: {SECURITY_NOTE}", err=True)
    args = [str(server), "-H", addr, "-p", str(port)]
    if threads:
        args += ["-t", str(threads)]
    if devices:
        args += ["-d", devices]
    if cache:
        args += ["-c"]
    click.echo(f"flashmoe rpc-server: rpc://{addr}:{port} ({server.name}, one client at a time; stop with Ctrl-C)",
               err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(server), args)
