"""One benchmark run in a fresh process: load, prefill, decode, report as JSON on stdout.

    python -m flashmoe.bench_worker '{"model": "...", "config": {...}, "prompt_tokens": 64, "gen_tokens": 128}'

The bench (flashmoe.bench) starts one worker per run inside a memory cgroup.
Config keys: policy (name or path), stream (StreamSettings fields), use_extra_bufts, load_mode
("mmap" | "ram"), n_expert_used, routing_trace, threads, n_ctx.
"""
from __future__ import annotations

import json
import sys
import time


def prompt_token_ids(engine, n: int):
    """A deterministic prompt of exactly n tokens (text tokens, BOS first)."""
    text = ("In the beginning the universe was created. This has made a lot of people very angry "
            "and been widely regarded as a bad move. ") * (1 + n // 8)
    toks = engine.tokenize(text)
    while len(toks) < n:
        toks = toks + toks[1:]
    return toks[:n]


def run(spec: dict) -> dict:
    t_start = time.perf_counter()
    from flashmoe.engine import Engine
    from flashmoe.settings import EngineSettings, StreamSettings

    cfg = spec.get("config", {})
    settings = None
    if cfg.get("policy"):
        from flashmoe.policy import load_policy
        from gguf_tools.reader import open_model

        with open_model(spec["model"]) as m:
            settings = load_policy(cfg["policy"]).resolve(m).engine_settings()
    if settings is None:
        settings = EngineSettings()
    if cfg.get("stream"):
        s = StreamSettings(**cfg["stream"])
        if s.mode != settings.stream.mode:
            settings.placements = {}
        settings.stream = s
    if cfg.get("name"):
        settings.policy_name = cfg["name"]
    rt = {}
    for k in ("use_extra_bufts", "load_mode", "n_expert_used", "n_ctx", "n_batch", "n_ubatch"):
        if cfg.get(k) is not None:
            rt[k] = cfg[k]
    if spec.get("threads"):
        rt["n_threads"] = spec["threads"]
    n_prompt, n_gen = int(spec.get("prompt_tokens", 64)), int(spec.get("gen_tokens", 128))
    rt.setdefault("n_ctx", max(256, n_prompt + n_gen + 16))
    eng = Engine(spec["model"], settings=settings, routing_trace=spec.get("routing_trace"), **rt)
    try:
        toks = prompt_token_ids(eng, n_prompt)
        gen = eng.generate(toks, n_gen, stop_at_eos=False)
        out = {
            "ok": True,
            "tokens": gen.tokens,
            "report": gen.report.to_dict(),
            "info": eng.info,
            "mode_line": eng.mode_line(),
            "wall_s": time.perf_counter() - t_start,
        }
    finally:
        eng.close()
    return out


def main():
    spec = json.loads(sys.argv[1])
    try:
        res = run(spec)
    except Exception as e:  # reported to the bench as a failed run, not a crash of the bench
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n@@FLASHMOE_RESULT@@" + json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
