"""One benchmark run in a fresh process: load, prefill, decode, report as JSON on stdout.

    python -m flashmoe.bench_worker '{"model": "...", "settings": {...}, "prompt_tokens": 64, "gen_tokens": 128}'
    python -m flashmoe.bench_worker @spec.json

The bench (flashmoe.bench) starts one worker per run, inside a memory cgroup when there is a budget.

Spec keys: model, prompt_tokens, gen_tokens, threads, n_ctx, routing_trace, and either
``settings`` (an EngineSettings as a dict: what the bench resolved, run exactly) or ``config``
(older form: policy (name or path), budget, stream (StreamSettings fields), use_extra_bufts,
load_mode ("mmap" | "ram"), lazy_mode, n_expert_used, n_ctx, n_batch, n_ubatch, name).

Output on stdout:
- ``@@FLASHMOE_PROGRESS@@{json}`` lines while it runs (stage "start", "loaded", then "eval" after each
  llama.cpp evaluation: i=1 is the prefill, i>=2 decode steps), flushed, so a run killed by the
  memory limit or the timeout still says how far it got;
- one ``@@FLASHMOE_RESULT@@{json}`` line at the end: ok, tokens, report (RunReport), decode (figures
  of the decode phase alone: from the first generated token to the last), info, mode_line, or ok
  false and error.
"""
from __future__ import annotations

import json
import sys
import time

RESULT_TAG = "@@FLASHMOE_RESULT@@"
PROGRESS_TAG = "@@FLASHMOE_PROGRESS@@"

_T0 = time.perf_counter()


def progress(stage: str, **kw) -> None:
    sys.stdout.write(PROGRESS_TAG + json.dumps({"stage": stage, "t": time.perf_counter() - _T0, **kw}) + "\n")
    sys.stdout.flush()


def prompt_token_ids(engine, n: int):
    """A deterministic prompt of exactly n tokens (text tokens, BOS first)."""
    text = ("In the beginning the universe was created. This has made a lot of people very angry "
            "and been widely regarded as a bad move. ") * (1 + n // 8)
    toks = engine.tokenize(text)
    while len(toks) < n:
        toks = toks + toks[1:]
    return toks[:n]


def settings_from_dict(d: dict):
    """An EngineSettings from its asdict() form (what the bench sends)."""
    from flashmoe.settings import EngineSettings, RuntimeSettings, StreamSettings

    d = dict(d)
    stream = StreamSettings(**d.pop("stream", {}) or {})
    runtime = RuntimeSettings(**d.pop("runtime", {}) or {})
    return EngineSettings(stream=stream, runtime=runtime, **d)


def _settings_from_config(model: str, cfg: dict):
    from flashmoe.settings import EngineSettings, StreamSettings

    settings = None
    if cfg.get("policy"):
        from flashmoe.policy import load_policy
        from gguf_tools.reader import open_model

        with open_model(model) as m:
            settings = load_policy(cfg["policy"]).resolve(m, budget=cfg.get("budget")).engine_settings()
    if settings is None:
        settings = EngineSettings()
    if cfg.get("stream"):
        s = StreamSettings(**cfg["stream"])
        if s.mode != settings.stream.mode:
            settings.placements = {}
        settings.stream = s
    if cfg.get("name"):
        settings.policy_name = cfg["name"]
    for k in ("use_extra_bufts", "load_mode", "lazy_mode", "n_expert_used", "n_ctx", "n_batch", "n_ubatch"):
        if cfg.get(k) is not None:
            setattr(settings.runtime, k, cfg[k])
    return settings


def _totals(stats: dict) -> dict:
    t = (stats or {}).get("total") or {}
    return {k: t.get(k, 0) for k in ("hits", "misses", "evictions", "bytes_read", "read_s", "stall_s")}


def run(spec: dict) -> dict:
    from flashmoe.engine import Engine
    from flashmoe.metrics import ProcessCounters

    model = spec["model"]
    if spec.get("settings") is not None:
        settings = settings_from_dict(spec["settings"])
    else:
        settings = _settings_from_config(model, spec.get("config", {}))
    rt = {}
    if spec.get("threads"):
        rt["n_threads"] = int(spec["threads"])
    n_prompt, n_gen = int(spec.get("prompt_tokens", 64)), int(spec.get("gen_tokens", 128))
    rt["n_ctx"] = int(spec.get("n_ctx") or max(256, n_prompt + n_gen + 16))
    progress("start")
    eng = Engine(model, settings=settings, routing_trace=spec.get("routing_trace"), **rt)
    try:
        progress("loaded", load_s=eng.load_s)
        toks = prompt_token_ids(eng, n_prompt)
        L = eng.llama
        orig_eval = L.eval
        n_eval = [0]
        snap = {}

        def eval_wrapped(tokens):
            n_eval[0] += 1
            if n_eval[0] == 2:  # the first decode step: the prefill and the first token are done
                snap["counters"] = ProcessCounters.now()
                snap["cache"] = _totals(eng.stats())
                snap["t"] = time.perf_counter()
            r = orig_eval(tokens)
            progress("eval", i=n_eval[0], n=len(tokens))
            return r

        L.eval = eval_wrapped
        try:
            gen = eng.generate(toks, n_gen, stop_at_eos=False)
        finally:
            try:
                del L.eval
            except AttributeError:
                pass
        c_end = ProcessCounters.now()
        rep = gen.report.to_dict()
        decode = {"tokens": max(0, n_eval[0] - 1), "s": rep["decode_s"], "disk_read_bytes": 0, "major_faults": 0,
                  "cache": {k: 0 for k in ("hits", "misses", "evictions", "bytes_read", "read_s", "stall_s")}}
        if "counters" in snap:
            d = c_end.minus(snap["counters"])
            decode["disk_read_bytes"] = d.read_bytes
            decode["major_faults"] = d.major_faults
            end = _totals(rep.get("cache"))
            decode["cache"] = {k: end[k] - snap["cache"][k] for k in end}
        out = {
            "ok": True,
            "tokens": gen.tokens,
            "report": rep,
            "decode": decode,
            "info": eng.info,
            "mode_line": mode_line(eng),
            "settings": _settings_dict(eng.settings),
            "wall_s": time.perf_counter() - _T0,
        }
    finally:
        eng.close()
    return out


def mode_line(eng) -> str:
    """The engine's mode line, plus what it leaves out: lazy mode, a placement that mentions a stock
    knob, the thread count."""
    line = eng.mode_line()
    rt = eng.settings.runtime
    extra = []
    if rt.lazy_mode and "lazy" not in line:
        extra.append(f"lazy mode {rt.lazy_mode}")
    if rt.n_threads:
        extra.append(f"{rt.n_threads} thread{'s' if rt.n_threads != 1 else ''}")
    return "; ".join([line] + extra)


def _settings_dict(s) -> dict:
    from dataclasses import asdict

    d = asdict(s)
    d["placements"] = _count(d.get("placements") or {})
    return d


def _count(placements: dict) -> dict:
    out: dict = {}
    for p in placements.values():
        out[p] = out.get(p, 0) + 1
    return {"tensors_by_placement": out}


def read_spec(arg: str) -> dict:
    """A worker's run spec: JSON on the command line, or @FILE holding it."""
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            return json.load(f)
    return json.loads(arg)


def main():
    spec = read_spec(sys.argv[1])
    try:
        res = run(spec)
    except BaseException as e:  # reported to the bench as a failed run, not a crash of the bench
        if isinstance(e, KeyboardInterrupt):
            raise
        res = {"ok": False, "error": f"{type(e).__name__}: {e}" if not _is_user_error(e) else str(e)}
    sys.stdout.write("\n" + RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()


def _is_user_error(e: BaseException) -> bool:
    from flashmoe.errors import FlashMoEError

    return isinstance(e, FlashMoEError)


if __name__ == "__main__":
    main()
