"""The expert-offload hook, against the real patched llama.cpp on synthetic models.

Exactness: a streamed run (cache far smaller than the experts, evictions happening) gives the same
greedy tokens and bit-identical logits as the in-RAM run of the same file, with the model's own
routing and with routing forced from a uniform trace, prefill waves included.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import write_uniform_traces

from flashmoe.engine import Engine
from flashmoe.errors import FlashMoEError
from flashmoe.metrics import ProcessCounters
from flashmoe.settings import StreamSettings
from flashmoe.trace import gen_uniform, model_moe_layers, read_trace, write_trace
from gguf_tools.reader import open_model

ARCHES = ["qwen3moe", "qwen2moe", "qwen35moe"]
# long enough that prefill touches every expert: several waves through a 2-slot cache
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 8
N_GEN = 64


def _run(path, n=N_GEN, prompt=LONG_PROMPT, **kw):
    with Engine(path, use_extra_bufts=False, n_ctx=1024, **kw) as e:
        g = e.generate(prompt, n, return_logits=True, stop_at_eos=False)
        return g, e.stats(), e.info


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a.logits, b.logits))


@pytest.fixture(scope="module")
def uniform_traces(tiny_models, tmp_path_factory):
    return write_uniform_traces(tiny_models, tmp_path_factory.mktemp("traces"))


def test_patch_is_in_the_imported_library():
    from flashmoe import build as B

    info = B.info()
    assert info["patched"], info
    assert info["patch_version"].startswith("flashmoe-patch/")
    # the library that is imported was built from the patches in this checkout
    assert info["up_to_date"] or os.environ.get("LLAMA_CPP_LIB_PATH"), info


@pytest.mark.parametrize("arch", ARCHES)
def test_streamed_equals_in_ram_own_routing(tiny_models, arch):
    path = tiny_models[arch]
    ref, _, ref_info = _run(path)
    assert ref_info is None  # hook off: nothing attached, stock graph
    got, st, info = _run(path, stream=StreamSettings(mode="cache", cache_slots=2, readers=2))
    assert info["n_slots"] == 2 and info["mode"] == "cache"
    assert len(got.tokens) == N_GEN
    assert got.tokens == ref.tokens
    assert _max_diff(ref, got) == 0.0
    tot = st["total"]
    assert tot["evictions"] > 0 and tot["misses"] > 0
    # the prompt touches more experts than the 2 slots: prefill ran in waves
    n_calls_prefill = len(st["layers"])
    assert tot["n_waves"] > N_GEN * n_calls_prefill


@pytest.mark.parametrize("arch", ARCHES)
def test_prefill_waves_with_distinct_rows_are_exact(tiny_models, monkeypatch, arch):
    """Device slots (CUDA's mul_mat_id counts a token once per expert id) give a token's rows outside the
    wave distinct slots, most of them holding other experts, instead of all the zero slot; the wave mask
    must zero those rows all the same. FLASHMOE_WAVE_ROWS=distinct does the same with host slots, so the
    CPU checks it: bit-identical logits with many waves."""
    path = tiny_models[arch]
    ref, _, _ = _run(path)
    monkeypatch.setenv("FLASHMOE_WAVE_ROWS", "distinct")
    for slots in (2, 3):
        got, st, _ = _run(path, stream=StreamSettings(mode="cache", cache_slots=slots, readers=2, source="ram"))
        assert st["total"]["n_waves"] > N_GEN * len(st["layers"])
        assert got.tokens == ref.tokens, slots
        assert _max_diff(ref, got) == 0.0, slots


@pytest.mark.parametrize("arch", ARCHES)
def test_streamed_equals_in_ram_forced_uniform_routing(tiny_models, uniform_traces, arch):
    path, tr = tiny_models[arch], uniform_traces[arch]
    ref, _, ref_info = _run(path, routing_trace=tr)
    assert ref_info["routing_forced"] == 1 and ref_info["mode"] == "off"
    for stream in (StreamSettings(mode="cache", cache_slots=2, readers=3),
                   StreamSettings(mode="cache", cache_slots=3, readers=2, eviction="lfru", direct_io=True),
                   StreamSettings(mode="pagecache", readers=2)):
        got, st, info = _run(path, routing_trace=tr, stream=stream)
        assert got.tokens == ref.tokens, stream
        assert _max_diff(ref, got) == 0.0, stream
        if stream.mode == "cache":
            # uniform routing over a small cache: evictions on (nearly) every token of every layer
            per_layer = [l["evictions"] for l in st["layers"]]
            assert min(per_layer) >= N_GEN // 2, per_layer


def test_forced_routing_changes_the_work_not_the_protocol(tiny_models, uniform_traces):
    path = tiny_models["qwen3moe"]
    own, _, _ = _run(path)
    forced, _, _ = _run(path, routing_trace=uniform_traces["qwen3moe"])
    # forcing another routing must change the computation (else the override is a no-op)
    assert _max_diff(own, forced) > 0


def test_recorded_trace_replays_exactly(tiny_models, tmp_path):
    path = tiny_models["qwen2moe"]
    rec_path = str(tmp_path / "rec.trace")
    with Engine(path, use_extra_bufts=False, n_ctx=1024, record_trace=True) as e:
        g0 = e.generate(LONG_PROMPT, 32, return_logits=True, stop_at_eos=False)
        n_prompt = g0.report.prompt_tokens
        n = e.save_trace(rec_path)
    tr = read_trace(rec_path)
    assert tr.n_tokens == n == n_prompt + 31  # every evaluated token, prompt included
    with open_model(path) as m:
        assert tr.layers == model_moe_layers(m) and tr.n_used == m.n_expert_used
    g1, _, info = _run(path, n=32, routing_trace=rec_path, stream=StreamSettings(mode="cache", cache_slots=2))
    assert info["routing_forced"] == 1
    assert g1.tokens == g0.tokens
    assert _max_diff(g0, g1) == 0.0


def test_reads_only_what_routing_asks(tiny_models, uniform_traces):
    """Direct I/O, a cache that holds every expert (no evictions), an empty start: the bytes read are
    exactly the bytes of the distinct experts the trace selects."""
    path, tr_path = tiny_models["qwen3moe"], uniform_traces["qwen3moe"]
    tr = read_trace(tr_path)
    with open_model(path) as m:
        per_expert = {}
        for t in m.tensors:
            if t.is_expert:
                per_expert[t.layer] = per_expert.get(t.layer, 0) + t.expert_stride
        n_expert = m.n_expert
        n_layer = m.n_layer
    prompt_tokens = 5
    n_new = 6
    with Engine(path, use_extra_bufts=False, n_ctx=256, routing_trace=tr_path,
                stream=StreamSettings(mode="cache", cache_slots=n_expert, direct_io=True, readers=2)) as e:
        toks = e.tokenize("hello")[:prompt_tokens]
        rows = len(toks) + n_new - 1  # the last sampled token is not evaluated
        expected = 0
        for li, layer in enumerate(tr.layers):
            # llama.cpp computes only the output row (the prompt's last token) in the model's last layer
            first = len(toks) - 1 if layer == n_layer - 1 else 0
            distinct = set(int(x) for x in tr.ids[first:rows, li].ravel())
            expected += len(distinct) * per_expert[layer]
        c0 = ProcessCounters.now()
        g = e.generate(toks, n_new, stop_at_eos=False)
        delta = ProcessCounters.now().minus(c0)
        st = e.stats()
    assert len(g.tokens) == n_new
    assert st["total"]["evictions"] == 0
    assert st["total"]["bytes_read"] == expected
    if delta.exact_bytes and st["info"]["direct_io"]:
        # what the kernel actually read from the disk: the selected experts, rounded to direct-I/O blocks
        n_reads = st["total"]["misses"] * 3
        assert expected <= delta.read_bytes <= expected + n_reads * 2 * 4096, (delta.read_bytes, expected)


def test_trace_for_another_model_is_a_clear_error(tiny_models, tmp_path):
    path = tiny_models["qwen3moe"]
    with open_model(path) as m:
        tr = gen_uniform(model_moe_layers(m), m.n_expert * 2, m.n_expert_used, 16)
    p = str(tmp_path / "other.trace")
    write_trace(p, tr)
    with pytest.raises(FlashMoEError, match="does not fit"):
        Engine(path, routing_trace=p)
    bad = tmp_path / "bad.trace"
    bad.write_bytes(b"FMRT" + b"\x00" * 10)
    with pytest.raises(FlashMoEError, match="routing trace"):
        Engine(path, routing_trace=str(bad))


def test_cache_smaller_than_experts_per_token_is_an_error(tiny_models):
    with pytest.raises(FlashMoEError, match="at least"):
        Engine(tiny_models["qwen3moe"], stream=StreamSettings(mode="cache", cache_slots=1))


def test_hook_state_is_per_model(tiny_models):
    """Two engines at once: a streamed one and a stock one do not see each other's configuration."""
    path = tiny_models["qwen3moe"]
    with Engine(path, stream=StreamSettings(mode="cache", cache_slots=2), use_extra_bufts=False) as a:
        with Engine(path, use_extra_bufts=False) as b:
            assert a.info["mode"] == "cache"
            assert b.info is None
            ga = a.generate("hi there", 8)
            gb = b.generate("hi there", 8)
            assert ga.tokens == gb.tokens
            assert b.stats() == {}
