"""GPU (or sanitizer) check run by scripts/device_run.sh on the lent machine.

For each tiny synthetic arch: load with the stock and stream policies (and gpu-dense on a GPU build),
generate greedily, and compare the streamed tokens with the stock run of the same placement. Prints
one line per run and a summary; exits non-zero when a run fails or tokens differ.
    python3 scripts/gpu_check.py [--cpu-only] [--out DIR]
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import tempfile
import time

faulthandler.enable(file=sys.__stderr__)  # llama-cpp-python hides fd 2 during loads: keep Python stacks visible


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--tokens", type=int, default=32)
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
        runs = [("stock", dict(policy="stock")),
                ("stream", dict(stream=StreamSettings(mode="cache", cache_slots=2, readers=2)))]
        if not a.cpu_only:
            runs.append(("gpu-dense", dict(policy="gpu-dense")))
        ref = None
        for name, kw in runs:
            t0 = time.time()
            try:
                with Engine(path, n_ctx=512, use_extra_bufts=False, **kw) as e:
                    g = e.generate(prompt, a.tokens, stop_at_eos=False)
                    mode = e.mode_line()
            except Exception as ex:  # noqa: BLE001 - report and go on
                print(f"{arch:10s} {name:10s} FAILED {type(ex).__name__}: {ex}", flush=True)
                bad += 1
                continue
            same = "" if ref is None else (" tokens == stock" if g.tokens == ref else " TOKENS DIFFER from stock")
            if ref is not None and g.tokens != ref:
                bad += 1
            ref = ref if ref is not None else g.tokens
            print(f"{arch:10s} {name:10s} ok {len(g.tokens)} tokens {g.report.decode_tok_s:.1f} tok/s "
                  f"{time.time() - t0:.1f} s{same} | {mode}", flush=True)
    print("summary:", "all ok" if bad == 0 else f"{bad} failed", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
