"""GPU (or sanitizer) check run by scripts/device_run.sh on the lent machine.

For each tiny synthetic arch: load with the stock and stream policies (and gpu-dense on a GPU build),
generate greedily, and compare the streamed tokens with the stock run of the same placement. Prints
one line per run and a summary; exits non-zero when a run fails or tokens differ.
    python3 scripts/gpu_check.py [--cpu-only] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import os
import sys
import tempfile
import time

import numpy as np

# llama-cpp-python points fd 2 at /dev/null during loads: keep Python stacks on a copy of the real stderr
_FH = os.fdopen(os.dup(2), "w")
faulthandler.enable(file=_FH)


def gpu_all_policy(runtime: str = "") -> str:
    """The GPU reference: every tensor on the GPU (the token embeddings in RAM, as llama.cpp keeps them),
    nothing streamed; ``runtime``: more lines of its runtime section."""
    return ("version: 1\nname: gpu-all\nrules:\n  - match: \"token_embd.weight\"\n    place: ram\n"
            "  - match: \"*\"\n    place: gpu\nruntime:\n  repack: false\n" + runtime)


def gpu_dense_policy(cache: str = "", runtime: str = "") -> str:
    """Dense weights on the GPU, the routed experts streamed into a 2-slot cache in device memory; ``cache``
    and ``runtime``: more lines of those sections."""
    return ("version: 1\nname: gpu-dense-2\nrules:\n"
            "  - match: \"blk.*.ffn_{gate,up,down,gate_up}_exps.weight\"\n    place: stream\n"
            "  - match: \"token_embd.weight\"\n    place: ram\n  - match: \"*\"\n    place: gpu\n"
            "expert_cache:\n  mode: cache\n  cache_slots: 2\n  readers: 2\n" + cache +
            "runtime:\n  repack: false\n" + runtime)


def max_logit_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


@contextlib.contextmanager
def _no_op_offload(on: bool):
    """The stock reference of a streamed run on a GPU build: no op offload (streamed runs have none),
    so both run every matmul where its weights are: matched kernels."""
    import llama_cpp.llama_cpp as lc

    orig = lc.llama_context_default_params
    if on:
        def patched():
            p = orig()
            p.op_offload = False
            return p
        lc.llama_context_default_params = patched
    try:
        yield
    finally:
        lc.llama_context_default_params = orig


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--verbose", action="store_true", help="llama.cpp's log on stderr")
    a = ap.parse_args()
    from flashmoe.engine import Engine
    from flashmoe.settings import StreamSettings
    from gguf_tools.synth import make_spec, synth_model

    d = tempfile.mkdtemp(prefix="gpucheck-")
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    bad = 0
    for arch in ("qwen3moe", "qwen2moe", "qwen35moe"):
        path = os.path.join(d, f"tiny-{arch}.gguf")
        synth_model(path, make_spec(arch, "tiny", seed=0), progress=False)
        runs = [("stock", dict(policy="stock", op_offload=False)),
                ("stream", dict(stream=StreamSettings(mode="cache", cache_slots=2, readers=2)))]
        gruns = []
        if not a.cpu_only:
            # the GPU reference: every tensor on the GPU, nothing streamed; then dense on the GPU with the
            # experts streamed into a 2-slot cache in device memory (the same kernels on the same device)
            # reads ahead into device slots (from disk, and copies from RAM with source ram), wrong often:
            # the routers of random weights predict little.
            # the 2-slot runs prefill in ubatches lowered to fit the device cache (CUDA's kernels batch rows
            # by ubatch): their reference is gpu-all at that ubatch
            from flashmoe.gpu import device_cache_ubatch
            from gguf_tools.reader import open_model

            with open_model(path) as m:
                _, ub, _ = device_cache_ubatch(512, 512, 2, m.n_expert, m.n_expert_used)
            ahead = "  prefetch: next-layer\n"
            texts = {"gpu-all": gpu_all_policy(), "gpu-dense-2": gpu_dense_policy(),
                     "gpu-dense-2-pf": gpu_dense_policy(ahead), "gpu-dense-2-ram": gpu_dense_policy(ahead + "  source: ram\n"),
                     "gpu-all-ub": gpu_all_policy(f"  n_batch: 512\n  n_ubatch: {ub}\n")}
            files = {}
            for name, text in texts.items():
                files[name] = os.path.join(d, name + ".yaml")
                with open(files[name], "w") as f:
                    f.write(text)
            gall, gdense, gdense_pf, gram, gall_ub = (files[k] for k in texts)
            gruns = [("gpu-all", dict(policy=gall)), ("gpu-dense", dict(policy="gpu-dense")),
                     ("gpu-ram", dict(policy="gpu-ram")), (f"gpu-all-ub{ub}", dict(policy=gall_ub)),
                     ("gpu-dense-2", dict(policy=gdense)), ("gpu-2-ahead", dict(policy=gdense_pf)),
                     ("gpu-2-ram", dict(policy=gram))]
        for group in (runs, gruns):
          ref, ref_name, ref_logits = None, "", None
          for name, kw in group:
              if name.startswith("gpu-all-ub"):
                  ref = None  # the runs after it compare with it
              t0 = time.time()
              try:
                  ofl = kw.pop("op_offload", None)
                  with _no_op_offload(ofl is False), \
                          Engine(path, n_ctx=512, use_extra_bufts=False, verbose=a.verbose, **kw) as e:
                      g = e.generate(prompt, a.tokens, stop_at_eos=False, return_logits=True)
                      mode = e.mode_line()
              except Exception as ex:  # noqa: BLE001 - report and go on
                  print(f"{arch:10s} {name:10s} FAILED {type(ex).__name__}: {ex}", flush=True)
                  bad += 1
                  continue
              same = "" if ref is None else (f" tokens == {ref_name}" if g.tokens == ref else f" TOKENS DIFFER from {ref_name}")
              if ref is not None and ref_logits is not None and g.logits is not None:
                  dmax = max_logit_diff(g.logits, ref_logits)
                  same += f", logits max|diff| {dmax:.3g}"
              if ref is not None and g.tokens != ref:
                  bad += 1
              if ref is None:
                  ref, ref_name, ref_logits = g.tokens, name, g.logits
              print(f"{arch:10s} {name:10s} ok {len(g.tokens)} tokens {g.report.decode_tok_s:.1f} tok/s "
                    f"{time.time() - t0:.1f} s{same} | {mode}", flush=True)
    print("summary:", "all ok" if bad == 0 else f"{bad} failed", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
