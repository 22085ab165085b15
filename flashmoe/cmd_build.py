"""`flashmoe build`: the patched llama.cpp."""
from __future__ import annotations

import json

import click


@click.command("build")
@click.option("--backend", type=click.Choice(["auto", "cpu", "metal", "cuda"]), default="auto", show_default=True,
              help="auto = Metal on Apple Silicon, CUDA when nvcc and an NVIDIA GPU are found, else CPU.")
@click.option("--force", is_flag=True, help="Rebuild even if a cached wheel exists.")
@click.option("--rpc/--no-rpc", default=True, show_default=True,
              help="Build llama.cpp's RPC backend and its rpc-server (layers on other hosts: docs/rpc.md).")
@click.option("--info", "show_info", is_flag=True, help="Say what is installed and whether it carries the patch.")
@click.option("--json", "as_json", is_flag=True, help="With --info: JSON output.")
@click.option("--print-cmake-args", "print_args", is_flag=True,
              help="Print the backend and CMake arguments this machine would build with, and stop.")
def build_cmd(backend, force, rpc, show_info, as_json, print_args):
    """Build llama.cpp (llama-cpp-python 0.3.36) with flashmoe's patches and install it.

    FLASHMOE_CPU_AMX=0|1 overrides the CPU's AMX detection; FLASHMOE_CUDA_ARCHITECTURES (e.g. 90) and
    FLASHMOE_CUDA_FA=0 (no flash-attention kernels: a much shorter CUDA compile) tune a CUDA build.
    """
    from flashmoe import build as B
    from flashmoe.errors import FlashMoEError

    if print_args:
        plat = B.BuildPlatform.current()
        resolved = B.detect_backend(backend, plat)
        args = B.cmake_args(resolved, plat, rpc=rpc)
        if as_json:
            click.echo(json.dumps({"backend": resolved, "platform": plat.__dict__, "cmake_args": args,
                                   "key": B.build_key(resolved, args)}, indent=2))
        else:
            click.echo(f"backend {resolved}")
            click.echo(" ".join(args))
        return

    if show_info:
        info = B.info()
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        if not info.get("installed"):
            raise FlashMoEError(info.get("error", "llama-cpp-python is not installed; run `flashmoe build`"))
        b = info.get("build", {})
        rows = [
            ("llama-cpp-python", info.get("llama_cpp_python")),
            ("llama.cpp commit", b.get("llama_cpp_commit", "?")),
            ("library", info.get("library")),
            ("patch present", "yes (" + info["patch_version"] + ")" if info.get("patched") else "NO"),
            ("patch hash (library)", info.get("runtime_patch_hash", "-")),
            ("patch hash (patches/)", info.get("expected_patch_hash")),
            ("up to date", "yes" if info.get("up_to_date") else "no: run `flashmoe build`"),
            ("backend", info.get("backend") or b.get("backend", "?")),
            ("cmake args", " ".join(b.get("cmake_args", []))),
            ("rpc-server", info.get("rpc_server") or ("none: a build without RPC" if not b.get("rpc")
                                                      else "missing: run `flashmoe build --force`")),
        ]
        w = max(len(k) for k, _ in rows)
        for k, v in rows:
            click.echo(f"{k:<{w}}  {v}")
        if not info.get("patched"):
            raise FlashMoEError("the imported llama.cpp library does not carry the flashmoe patch")
        return
    res = B.build(backend=backend, force=force, rpc=rpc)
    click.echo(f"installed {res['wheel']} ({'cached' if res['cached'] else 'built'}, backend {res['backend']}, "
               f"{'with' if res['rpc'] else 'without'} RPC)")
