"""Reads ahead (prefetch), repacked cache slots, per-layer slots and the zero-slot skip, against the
real patched llama.cpp.

Prefetch only changes what is cached: a streamed run with reads ahead gives the in-RAM run's tokens
and bit-identical logits whether the predictions are right or wrong, with the real routers'
predictions (the small trained model) and with a trace's predicted sets drawn at a chosen accuracy
(synthetic models, whose routing is forced). Slots in llama.cpp's repacked CPU layout give a stock
run with repacking on, bit for bit.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from flashmoe.engine import Engine
from flashmoe.settings import StreamSettings
from flashmoe.trace import draw_predictions, prediction_accuracy, read_trace, trace_for_model, write_trace

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(HERE, "..", "flashmoe", "data", "real-moe-22m-q8_0.gguf")
PROMPT = "Once upon a time, a little girl named Lily found a shiny red ball in the park. She"
N = 48


def _run(path, repack=False, n=N, prompt=PROMPT, **kw):
    with Engine(path, use_extra_bufts=repack, n_ctx=512, **kw) as e:
        g = e.generate(prompt, n, return_logits=True, stop_at_eos=False)
        return g, e.stats(), e.info


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a.logits, b.logits))


@pytest.fixture(scope="module")
def real_q4k(tmp_path_factory, llama_cpp):
    """The small real model with Q4_K experts: a type llama.cpp repacks on x86 (AVX2) and ARM."""
    from gguf_tools.quantize import quantize

    out = str(tmp_path_factory.mktemp("q4k") / "real-q4k.gguf")
    quantize(REAL, out, experts="Q4_K", progress=False)
    return out


@pytest.mark.parametrize("slots,eviction", [(6, "lru"), (10, "lfru")])
def test_prefetch_with_the_real_routers_is_exact(llama_cpp, slots, eviction):
    ref, _, _ = _run(REAL)
    off, st_off, _ = _run(REAL, stream=StreamSettings(mode="cache", cache_slots=slots, eviction=eviction, prefetch="off"))
    on, st_on, _ = _run(REAL, stream=StreamSettings(mode="cache", cache_slots=slots, eviction=eviction,
                                                     prefetch="next-layer"))
    assert off.tokens == ref.tokens == on.tokens
    assert _max_diff(ref, off) == 0.0 and _max_diff(ref, on) == 0.0
    t_off, t_on = st_off["total"], st_on["total"]
    assert t_off["n_predicted"] == 0 and t_off["n_prefetched"] == 0
    # the next layer's router on this layer's input is right most of the time, wrong sometimes
    assert 0.5 < t_on["prediction_accuracy"] < 0.95, t_on
    assert 0 < t_on["n_prefetch_used"] < t_on["n_prefetched"] and t_on["prefetch_wasted_bytes"] > 0
    # reads moved off the critical path: fewer experts read while a layer waits
    assert t_on["misses"] < t_off["misses"]


def test_repacked_slots_equal_stock_with_repacking(llama_cpp, real_q4k):
    ref, _, ref_info = _run(real_q4k, repack=True)
    assert ref_info is None
    got, st, info = _run(real_q4k, repack=True, stream=StreamSettings(mode="cache", cache_slots=6, readers=2,
                                                                      prefetch="next-layer"))
    # the Q4_K expert tensors take the fast layout (the quantizer kept a fallback type for matrices whose
    # rows are not a multiple of 256: those stay in the file's layout, as in the stock run)
    assert 0 < info["n_repacked_tensors"] <= info["n_stream_tensors"]
    assert got.tokens == ref.tokens
    assert _max_diff(ref, got) == 0.0
    assert st["total"]["evictions"] > 0 and st["total"]["n_prefetched"] > 0
    # without repacking, the slots keep the file's layout (and match a stock run without repacking)
    plain, _, pinfo = _run(real_q4k, repack=False, stream=StreamSettings(mode="cache", cache_slots=6, readers=2))
    ref_plain, _, _ = _run(real_q4k, repack=False)
    assert pinfo["n_repacked_tensors"] == 0
    assert plain.tokens == ref_plain.tokens and _max_diff(ref_plain, plain) == 0.0


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen35moe"])
def test_trace_predictions_at_any_accuracy_are_exact(tiny_models, tmp_path, arch):
    """Forced uniform routing with predicted sets drawn at accuracy 1, 0.5 and 0: the output never
    changes; at 1 every layer after the first finds its experts read ahead, at 0 every read ahead is
    wasted."""
    path = tiny_models[arch]
    base = trace_for_model(path, "uniform", 512, seed=3)
    ref, _, _ = _run(path, routing_trace=_write(tmp_path, "plain", base))
    seen = {}
    for acc in (1.0, 0.5, 0.0):
        tr = draw_predictions(base, acc, seed=1)
        assert prediction_accuracy(tr) == pytest.approx(acc, abs=0.1)
        p = _write(tmp_path, f"acc{acc}", tr)
        assert read_trace(p).pred is not None
        got, st, _ = _run(path, routing_trace=p, stream=StreamSettings(mode="cache", cache_slots=4, readers=2,
                                                                        prefetch="next-layer"))
        assert got.tokens == ref.tokens, acc
        assert _max_diff(ref, got) == 0.0, acc
        seen[acc] = st
    first = min(l["layer"] for l in seen[1.0]["layers"])
    for l in seen[1.0]["layers"]:
        if l["layer"] != first:
            # decode: every expert was predicted right and read ahead, or was resident already
            assert l["n_predicted_right"] == l["n_predicted"] > 0
    assert seen[0.0]["total"]["n_prefetch_used"] == 0 and seen[0.0]["total"]["prefetch_wasted_bytes"] > 0
    assert seen[1.0]["total"]["misses"] < seen[0.5]["total"]["misses"] < seen[0.0]["total"]["misses"]


def test_wrong_reads_ahead_are_dropped_on_a_slow_disk(tiny_models, tmp_path, monkeypatch):
    """A disk that is behind (every read starts 3 ms late, one reader): once a layer's routing is known, the
    reads ahead of experts it does not use that have not started are dropped and those experts leave the
    cache. The output does not change; the bytes counted are the bytes read."""
    path = tiny_models["qwen3moe"]
    base = trace_for_model(path, "uniform", 512, seed=3)
    ref, _, _ = _run(path, routing_trace=_write(tmp_path, "plain", base), n=16)
    p = _write(tmp_path, "acc0.5", draw_predictions(base, 0.5, seed=1))
    monkeypatch.setenv("FLASHMOE_FAULT_INJECT", "slow:3000")
    runs = {}
    for cancel in ("1", "0"):
        monkeypatch.setenv("FLASHMOE_PREFETCH_CANCEL", cancel)
        got, st, _ = _run(path, routing_trace=p, n=16, stream=StreamSettings(mode="cache", cache_slots=4, readers=1,
                                                                              prefetch="next-layer"))
        assert got.tokens == ref.tokens and _max_diff(ref, got) == 0.0, cancel
        runs[cancel] = st
    on, off = runs["1"]["total"], runs["0"]["total"]
    assert off["n_prefetch_cancelled"] == 0
    assert 0 < on["n_prefetch_cancelled"] <= on["n_prefetched"] - on["n_prefetch_used"], on
    # a whole expert per read ahead or miss, less what was dropped (an expert may lose only some of its reads)
    per_expert, rest = divmod(off["bytes_read"], off["misses"] + off["n_prefetched"])  # every layer's experts: one size
    assert rest == 0
    full = (on["misses"] + on["n_prefetched"]) * per_expert
    assert full - on["n_prefetch_cancelled"] * per_expert <= on["bytes_read"] < full, (on, per_expert)


def test_the_reader_time_is_the_pools_busy_time(tiny_models, tmp_path, monkeypatch):
    """The reader pool is a queue: a layer's misses, its reads ahead and the next layer's reads ahead are in
    flight together. Each layer's `read_wall_s` is its share of the time the pool was reading, so the shares
    add up to the pool's busy time; summing each batch's own submit-to-done time would count the overlaps
    twice. With one reader the busy time is exactly the reader's time, and never more than the run's."""
    import time

    path = tiny_models["qwen3moe"]
    p = _write(tmp_path, "acc0.5", draw_predictions(trace_for_model(path, "uniform", 512, seed=3), 0.5, seed=1))
    monkeypatch.setenv("FLASHMOE_FAULT_INJECT", "slow:2000")
    monkeypatch.setenv("FLASHMOE_PREFETCH_CANCEL", "0")  # every read ahead is read: more overlap
    with Engine(path, use_extra_bufts=False, n_ctx=512, routing_trace=p,
                stream=StreamSettings(mode="cache", cache_slots=4, readers=1, prefetch="next-layer")) as e:
        e.reset_stats()
        t0 = time.monotonic()
        e.generate(PROMPT, 16, stop_at_eos=False)
        wall = time.monotonic() - t0
        tot = e.stats()["total"]
    assert tot["n_prefetched"] > 0 and tot["misses"] > 0
    assert tot["read_wall_s"] == pytest.approx(tot["read_s"], rel=0.05), tot  # the old per-batch sum: +21%
    assert tot["read_wall_s"] <= wall


def _write(tmp_path, name, tr):
    p = str(tmp_path / f"{name}.trace")
    write_trace(p, tr)
    return p


def test_per_layer_slots(tiny_models):
    path = tiny_models["qwen3moe"]
    ref, _, _ = _run(path)
    got, st, info = _run(path, stream=StreamSettings(mode="cache", cache_slots=2, layer_slots={0: 5, 2: 3}))
    slots = {l["layer"]: l["n_slots"] for l in st["layers"]}
    assert slots[0] == 5 and slots[2] == 3 and all(v == 2 for k, v in slots.items() if k not in (0, 2))
    assert info["n_slots"] == 5  # the largest
    assert got.tokens == ref.tokens and _max_diff(ref, got) == 0.0


def test_per_layer_slots_below_experts_per_token_is_an_error(tiny_models):
    from flashmoe.errors import FlashMoEError

    with pytest.raises(FlashMoEError, match="layer 1"):
        Engine(tiny_models["qwen3moe"], stream=StreamSettings(mode="cache", cache_slots=4, layer_slots={1: 1}))


def test_trace_v2_round_trip_and_refusals(tmp_path, tiny_models):
    tr = draw_predictions(trace_for_model(tiny_models["qwen3moe"], "realistic", 64, seed=2), 0.75, seed=5)
    p = str(tmp_path / "v2.trace")
    write_trace(p, tr)
    back = read_trace(p)
    assert np.array_equal(back.ids, tr.ids) and np.array_equal(back.pred, tr.pred)
    assert (back.pred[:, int(np.argmin(back.layers))] == -1).all()  # nothing predicts the first layer
    raw = bytearray(open(p, "rb").read())
    from flashmoe.errors import FlashMoEError

    for name, mutate in (("flags", lambda b: b.__setitem__(slice(20, 24), (3).to_bytes(4, "little"))),
                         ("cut", lambda b: b.__delitem__(slice(len(b) - 4, len(b)))),
                         ("pred range", lambda b: b.__setitem__(slice(len(b) - 4, len(b)), (10**6).to_bytes(4, "little")))):
        bad = bytearray(raw)
        mutate(bad)
        q = tmp_path / f"bad-{name.replace(' ', '_')}.trace"
        q.write_bytes(bytes(bad))
        with pytest.raises(FlashMoEError):
            read_trace(str(q))
        # the hook refuses it too (its own reader, before a load)
        with pytest.raises(FlashMoEError):
            Engine(tiny_models["qwen3moe"], routing_trace=str(q))


ALL_FAMILIES = ["qwen3moe", "qwen2moe", "qwen35moe", "deepseek2", "glm4moe", "gpt-oss", "llama", "llama4", "olmoe",
                "granitemoe"]


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from gguf_tools.synth import make_spec, synth_model

    d = tmp_path_factory.mktemp("families")
    out = {}
    for arch in ALL_FAMILIES:
        p = str(d / f"tiny-{arch}.gguf")
        synth_model(p, make_spec(arch, "tiny", seed=11), progress=False)
        out[arch] = p
    return out


@pytest.mark.parametrize("arch", ALL_FAMILIES)
def test_prefetch_is_exact_on_every_family(family_models, tmp_path, arch, llama_cpp):
    """Every MoE family: reads ahead with mispredictions (forced routing, predicted sets at accuracy 0.5)
    and with the model's own routers (random weights: their predictions are mostly wrong), prefill waves
    and evictions happening: the streamed run gives the in-RAM run's tokens and logits exactly."""
    path = family_models[arch]
    base = trace_for_model(path, "uniform", 512, seed=4)
    pred = _write(tmp_path, "pred", draw_predictions(base, 0.5, seed=2))
    from gguf_tools.reader import open_model

    with open_model(path) as m:
        k = m.n_expert_used
    stream = StreamSettings(mode="cache", cache_slots=max(2, k), readers=2, prefetch="next-layer")
    for trace in (pred, None):
        ref, _, _ = _run(path, n=24, routing_trace=trace)
        got, st, _ = _run(path, n=24, routing_trace=trace, stream=stream)
        assert got.tokens == ref.tokens, (arch, trace)
        assert _max_diff(ref, got) == 0.0, (arch, trace)
        t = st["total"]
        assert t["evictions"] > 0 and t["n_waves"] > len(st["layers"]) * 24, (arch, t)
        if len(st["layers"]) > 1:  # a layer before another: something was predicted and read ahead
            assert t["n_predicted"] > 0 and t["n_prefetched"] > 0, (arch, t)
        if trace is not None:
            assert 0 < t["n_prefetch_used"] < t["n_prefetched"], (arch, t)  # right and wrong ones


def test_report_says_how_often_a_prompt_read_the_experts(tiny_models):
    """A ubatch of a long prompt touches nearly every expert: smaller ubatches read the experts more
    often, and the report says how often."""
    path = tiny_models["qwen3moe"]
    prompt = "The quick brown fox jumps over the lazy dog. " * 20
    reads = {}
    for ub in (32, 512):
        with Engine(path, use_extra_bufts=False, n_ctx=1024, n_batch=512, n_ubatch=ub,
                    stream=StreamSettings(mode="cache", cache_slots=2, readers=2)) as e:
            rep = e.generate(prompt, 4, stop_at_eos=False).report
        assert rep.n_ubatch == ub
        reads[ub] = rep.prefill_expert_reads
        assert "the prompt read the streamed experts" in rep.format()
    assert reads[32] > 2 * reads[512] > 0, reads
    with Engine(path, use_extra_bufts=False, n_ctx=256) as e:  # nothing streamed: no such figure
        assert e.generate("hi", 2).report.prefill_expert_reads is None
