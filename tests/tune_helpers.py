"""Shared by the tuner's tests: the context they tune for, a budget that leaves a given number of cache
slots, and the realistic trace of the tiny qwen3moe."""
from __future__ import annotations

N_CTX = 512


def budget_for(path, slots):
    """A budget that leaves `slots` expert cache slots per layer by the policy estimate."""
    from flashmoe.policy import load_policy

    pol = load_policy("stream")
    pol.runtime.n_ctx = N_CTX
    r = pol.resolve(path, budget="1GiB")
    return r.memory.weights + r.memory.runtime + slots * r.cache.bytes_per_slot_all_layers + 4096


def write_realistic_trace(model, folder):
    from flashmoe.trace import trace_for_model, write_trace

    p = str(folder / "realistic.trace")
    write_trace(p, trace_for_model(model, "realistic", 300, seed=4))
    return p
