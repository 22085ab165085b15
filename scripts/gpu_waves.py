"""Prefill waves on a GPU: a tiny model with its experts streamed into a 2-slot cache in device memory,
prompt ubatches NOT lowered to fit the cache (the engine lowers them; here each ubatch runs in waves),
against every tensor on the GPU at the same ubatch. Run on the lent machine, plainly or under
compute-sanitizer (that is how CUDA's mul_mat_id writing out of bounds on repeated ids was found):
    python3 scripts/gpu_waves.py [--arch qwen3moe] [--source disk|ram] [--ubatch N] [--tokens N]
Prints one line per run (tokens and logits against the reference); exits non-zero when a run fails or
its tokens differ. On a CPU build the GPU placement is ignored and it checks the CPU's waves.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import tempfile

from gpu_check import gpu_all_policy, gpu_dense_policy, max_logit_diff  # scripts/ is sys.path[0]

_FH = os.fdopen(os.dup(2), "w")
faulthandler.enable(file=_FH)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="disk", choices=["disk", "ram"])
    ap.add_argument("--ubatch", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--arch", default="qwen3moe")
    a = ap.parse_args()
    import flashmoe.gpu as gpu
    from flashmoe.engine import Engine
    from gguf_tools.synth import make_spec, synth_model

    gpu.device_cache_ubatch = lambda n_batch, n_ubatch, *rest: (n_batch, n_ubatch, None)  # waves on the GPU
    d = tempfile.mkdtemp(prefix="gpuwaves-")
    path = os.path.join(d, f"tiny-{a.arch}.gguf")
    synth_model(path, make_spec(a.arch, "tiny", seed=0), progress=False)
    rt = f"  n_batch: 512\n  n_ubatch: {a.ubatch}\n"
    gall = os.path.join(d, "gpu-all.yaml")
    with open(gall, "w") as f:
        f.write(gpu_all_policy(rt))
    gdense = os.path.join(d, "gpu-dense-2.yaml")
    with open(gdense, "w") as f:
        f.write(gpu_dense_policy(f"  source: {a.source}\n", rt))
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    ref = ref_logits = None
    for name, pol in (("gpu-all", gall), ("gpu-dense-2", gdense)):
        try:
            with Engine(path, n_ctx=512, use_extra_bufts=False, policy=pol) as e:
                g = e.generate(prompt, a.tokens, stop_at_eos=False, return_logits=True)
                waves = e.stats()["total"].get("n_waves", 0) if name != "gpu-all" else 0
        except Exception as ex:  # noqa: BLE001 - report
            print(f"{name}: FAILED {type(ex).__name__}: {ex}", flush=True)
            return 1
        same = "" if ref is None else (" tokens == gpu-all" if g.tokens == ref else " TOKENS DIFFER from gpu-all")
        if ref_logits is not None:
            same += f", logits max|diff| {max_logit_diff(g.logits, ref_logits):.3g}"
        print(f"{a.arch} {name} source {a.source} ubatch {a.ubatch}: ok {len(g.tokens)} tokens, "
              f"{waves} waves{same}", flush=True)
        if ref is None:
            ref, ref_logits = g.tokens, g.logits
        elif g.tokens != ref:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
