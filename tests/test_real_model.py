"""The small real MoE that ships with flashmoe (flashmoe/data/real-moe-22m-q8_0.gguf: trained on real
text, converted by llama.cpp's own converter, a BPE tokenizer written by someone else's code).

What random synthetic weights hide: natural routing (varied, with locality), a converter-made file.
Streamed == in RAM with its own routing and evictions under every shipped streaming policy; the
statistics of its recorded routing; the simulator predicting the engine's counters exactly on the
recorded (not synthetic) trace.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashmoe.demo import DEMO_MODEL
from flashmoe.engine import Engine
from flashmoe.policy import load_policy
from flashmoe.settings import StreamSettings
from flashmoe.trace import read_trace
from flashmoe.tune.simulate import ENGINE_FIELDS, engine_ubatches, last_layer_of, simulate
from gguf_tools.reader import open_model

pytestmark = pytest.mark.slow  # 64-token runs of the real model under every policy

MODEL = str(DEMO_MODEL)
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered the rightful property of some one or other of their daughters.")
N = 64


def _run(**kw):
    with Engine(MODEL, use_extra_bufts=False, n_ctx=512, **kw) as e:
        g = e.generate(TEXT, N, return_logits=True, stop_at_eos=False)
        return g, e.stats()


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a.logits, b.logits))


@pytest.fixture(scope="module")
def reference(llama_cpp):
    g, st = _run(policy="stock")
    assert st == {}  # nothing hooked
    return g


def test_the_shipped_model_is_a_converter_made_qwen3moe():
    with open_model(MODEL) as m:
        assert m.arch == "qwen3moe" and m.n_layer == 6 and m.n_expert == 32 and m.n_expert_used == 4
        assert m.metadata.get("tokenizer.ggml.model") == "gpt2"  # byte-level BPE, not our synthetic SPM vocab
        assert m.metadata.get("tokenizer.ggml.pre") == "qwen2"


def test_it_writes_text(reference):
    words = reference.text.split()
    assert len(words) > 20
    # real English: most words are letters only, and common words recur
    alpha = sum(1 for w in words if w.strip('.,;:!?"\'').isalpha()) / len(words)
    assert alpha > 0.8, reference.text
    assert {"the", "and", "of", "to"} & {w.lower().strip('.,;:!?"\'') for w in words}


@pytest.mark.parametrize("policy", ["stream", "pagecache", "gpu-dense"])
def test_streamed_equals_in_ram_with_natural_routing(reference, policy):
    with open_model(MODEL) as m:
        settings = load_policy(policy).resolve(m).engine_settings()
    if settings.stream.mode == "cache":
        settings.stream.cache_slots = 6  # of 32 experts: evictions on natural routing
    g, st = _run(settings=settings)
    assert g.tokens == reference.tokens, policy
    assert _max_diff(reference, g) == 0.0, policy
    tot = st["total"]
    assert tot["hits"] + tot["misses"] > 0  # (page-cache mode: the 26 MiB file is usually all cached)
    if settings.stream.mode == "cache":
        assert tot["misses"] > 0
        assert tot["evictions"] > 0 and tot["n_waves"] > N * len(st["layers"])  # prefill waves too


def test_recorded_routing_has_locality(tmp_path, llama_cpp, run_cli):
    rec = str(tmp_path / "real.trace")
    with Engine(MODEL, use_extra_bufts=False, n_ctx=512, record_trace=True) as e:
        e.generate(TEXT, N, stop_at_eos=False)
        e.save_trace(rec)
    r = run_cli("trace", "stats", rec)
    assert r.code == 0 and "next-token reuse" in r.stdout and "6" in r.stdout, r.stderr
    tr = read_trace(rec)
    ids = tr.ids[:, :-1]  # the last layer computes only output rows; its other rows are stand-ins
    n_tok, n_lay, k = ids.shape
    assert n_tok >= N
    reuse = np.mean([len(set(ids[t, l]) & set(ids[t + 1, l])) / k for t in range(n_tok - 1) for l in range(n_lay)])
    random_reuse = k / 32
    # natural routing reuses a token's experts at the next token more than chance (measured: ~0.2-0.3)
    assert reuse > 1.3 * random_reuse, reuse
    # and is varied: each layer uses many of its experts, not the same few (random weights' failure)
    assert min(len(np.unique(ids[:, l])) for l in range(n_lay)) >= 16


@pytest.mark.parametrize("slots,eviction,prefetch", [(6, "lru", "off"), (8, "lfru", "off"), (12, "lru", "off"),
                                                    (6, "lru", "next-layer"), (8, "lfru", "next-layer"),
                                                    (12, "lru", "next-layer")])
def test_simulator_predicts_the_engine_on_the_recorded_trace(tmp_path, llama_cpp, slots, eviction, prefetch,
                                                             monkeypatch):
    """The simulator replays the recorded routing (and, with prefetch, the recorded predictions of the
    real routers) and gets every counter of the engine exactly (reads ahead never dropped: that depends on
    timing)."""
    monkeypatch.setenv("FLASHMOE_PREFETCH_CANCEL", "0")
    rec = str(tmp_path / "real.trace")
    fields = ENGINE_FIELDS
    with Engine(MODEL, use_extra_bufts=False, n_ctx=512, record_trace=True,
                stream=StreamSettings(mode="cache", cache_slots=slots, eviction=eviction, readers=2,
                                      prefetch=prefetch)) as e:
        toks = e.tokenize(TEXT)
        e.generate(toks, N, stop_at_eos=False)
        e.save_trace(rec)
        eng = [{f: l[f] for f in fields} for l in e.stats()["layers"]]
    with open_model(MODEL) as m:
        eb = {}
        for t in m.tensors:
            if t.is_expert:
                eb[t.layer] = eb.get(t.layer, 0) + t.expert_stride
        last = last_layer_of(m.arch, m.n_layer)
    tr = read_trace(rec)
    assert tr.pred is not None  # the real routers' predictions were recorded
    sim = simulate(tr, engine_ubatches(len(toks), N), slots, eviction, last_layer=last,
                   expert_bytes=eb, prefetch=prefetch == "next-layer").engine_view()
    assert sim == eng
    if prefetch == "next-layer":
        tot = {k: sum(l[k] for l in eng) for k in fields[2:]}
        # the next layer's router on this layer's input predicts most experts (measured ~70%), and
        # mispredictions happen: both used and wasted reads ahead
        assert 0.5 < tot["n_predicted_right"] / tot["n_predicted"] < 0.95, tot
        assert 0 < tot["n_prefetch_used"] < tot["n_prefetched"] and tot["prefetch_wasted_bytes"] > 0, tot
    hits = sum(l["hits"] for l in eng)
    assert 0 < hits < sum(l["hits"] + l["misses"] for l in eng)
