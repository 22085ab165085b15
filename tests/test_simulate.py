"""The offline cache simulator (flashmoe.tune.simulate) against the engine's own counters.

The same trace replayed (or recorded) by the patched llama.cpp and simulated offline must give
the same per-layer hits, misses, evictions, bytes read, tokens and waves: prefill ubatches (waves,
resident experts first), the model's last layer that computes only the output rows, llama.cpp's
split of a prompt into batches and ubatches (ubatches without an output row), LRU and LFRU with
ageing.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashmoe.tune.simulate import (
    ENGINE_FIELDS,
    Ubatch,
    combine,
    engine_ubatches,
    last_layer_of,
    layer_curves,
    simulate,
    simulate_pagecache,
)
from flashmoe.trace import Trace, read_trace, trace_for_model, write_trace

PROMPT = list(range(1, 40))  # 39 tokens: a prefill touching every expert of the tiny models (8 experts, 2 used)
FIELDS = ENGINE_FIELDS  # every counter, the prefetch ones included


def _facts(path):
    from gguf_tools.reader import open_model

    with open_model(path) as m:
        eb = {}
        for t in m.tensors:
            if t.is_expert:
                eb[t.layer] = eb.get(t.layer, 0) + t.expert_stride
        return last_layer_of(m.arch, m.n_layer), eb


def _engine_counters(path, slots, eviction, prompt, n_gen, trace=None, record=None, **rt):
    from flashmoe.engine import Engine
    from flashmoe.settings import StreamSettings

    e = Engine(path, stream=StreamSettings(mode="cache", cache_slots=slots, eviction=eviction, prefetch="next-layer"),
               routing_trace=trace, record_trace=record is not None, n_threads=1, **rt)
    try:
        e.generate(prompt, n_gen, stop_at_eos=False)
        if record is not None:
            e.save_trace(record)
        return [{k: l[k] for k in FIELDS} for l in e.stats()["layers"]]
    finally:
        e.close()


def _sim(path, trace_path, slots, eviction, prompt_len, n_gen, n_batch=512, n_ubatch=512):
    last, eb = _facts(path)
    tr = read_trace(trace_path)
    # the engine reads ahead by default: from its routers' predictions (recorded in the trace), or from a
    # replayed trace's predicted sets; a trace without them reads nothing ahead
    r = simulate(tr, engine_ubatches(prompt_len, n_gen, n_batch, n_ubatch), slots, eviction, last_layer=last,
                 expert_bytes=eb, prefetch=tr.pred is not None)
    return r, r.engine_view()


@pytest.fixture(autouse=True)
def _reads_ahead_never_dropped(monkeypatch):
    """The engine drops unstarted reads ahead of experts a layer did not use, which depends on timing; the
    simulator assumes every read ahead completes. These comparisons run the engine without dropping."""
    monkeypatch.setenv("FLASHMOE_PREFETCH_CANCEL", "0")


@pytest.fixture(scope="module")
def uniform_trace(tiny_models, tmp_path_factory):
    p = str(tmp_path_factory.mktemp("sim") / "uniform.trace")
    write_trace(p, trace_for_model(tiny_models["qwen3moe"], "uniform", 300, seed=3))
    return p


# ------------------------------------------------------------------------------ against the engine


@pytest.mark.parametrize("eviction", ["lru", "lfru"])
@pytest.mark.parametrize("slots", [2, 3, 5])
def test_uniform_trace_matches_engine(tiny_models, uniform_trace, llama_cpp, slots, eviction):
    path = tiny_models["qwen3moe"]
    n_gen = 70  # > 16 * slots accesses per layer: LFRU's ageing runs several times
    eng = _engine_counters(path, slots, eviction, PROMPT, n_gen, trace=uniform_trace)
    r, sim = _sim(path, uniform_trace, slots, eviction, len(PROMPT), n_gen)
    assert sim == eng
    # the prefill ran in waves, and the last layer computed only the output row
    assert all(l["n_waves"] > n_gen for l in eng[:-1])
    assert eng[-1]["n_tokens"] == n_gen


@pytest.mark.parametrize("n_batch,n_ubatch", [(16, 16), (16, 8)])
def test_batches_and_ubatches_match_engine(tiny_models, uniform_trace, llama_cpp, n_batch, n_ubatch):
    """A prompt split in batches (last token of each an output) and ubatches (some with no output
    row: the last layer's empty ops are skipped and its trace cursor stays)."""
    path = tiny_models["qwen3moe"]
    prompt = list(range(1, 41))
    for eviction in ("lru", "lfru"):
        eng = _engine_counters(path, 3, eviction, prompt, 12, trace=uniform_trace, n_batch=n_batch, n_ubatch=n_ubatch)
        _, sim = _sim(path, uniform_trace, 3, eviction, len(prompt), 12, n_batch, n_ubatch)
        assert sim == eng, eviction


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen35moe"])
def test_recorded_trace_matches_engine(tiny_models, llama_cpp, tmp_path, arch):
    """The model's own routing, recorded: the recording run itself and replays with other cache
    settings agree with the simulation of the recorded trace."""
    path = tiny_models[arch]
    rec = str(tmp_path / "rec.trace")
    n_gen = 40
    eng = _engine_counters(path, 4, "lru", PROMPT, n_gen, record=rec)
    assert read_trace(rec).n_tokens == len(PROMPT) + n_gen - 1
    _, sim = _sim(path, rec, 4, "lru", len(PROMPT), n_gen)
    assert sim == eng
    # qwen2moe's last layer computes the output row only; qwen35moe's every row
    assert eng[-1]["n_tokens"] == (n_gen if arch == "qwen2moe" else len(PROMPT) + n_gen - 1)
    for slots, ev in ((2, "lfru"), (6, "lru")):
        eng = _engine_counters(path, slots, ev, PROMPT, n_gen, trace=rec)
        _, sim = _sim(path, rec, slots, ev, len(PROMPT), n_gen)
        assert sim == eng, (slots, ev)


def test_trace_wraps_like_the_engine(tiny_models, llama_cpp, tmp_path):
    """A trace shorter than the run: every layer's cursor wraps around."""
    path = tiny_models["qwen3moe"]
    short = str(tmp_path / "short.trace")
    write_trace(short, trace_for_model(path, "uniform", 23, seed=5))
    eng = _engine_counters(path, 3, "lfru", PROMPT[:10], 40, trace=short)
    _, sim = _sim(path, short, 3, "lfru", 10, 40)
    assert sim == eng


# ----------------------------------------------------------------------------------------- offline


def _trace(rows, n_expert=8, layers=(0,)):
    ids = np.array(rows, dtype=np.int32)
    if ids.ndim == 2:
        ids = ids[:, None, :]
    return Trace(list(layers), n_expert, ids)


def test_engine_ubatches():
    u = engine_ubatches(40, 5, n_batch=16, n_ubatch=8)
    assert [(x.n_tokens, x.n_outputs) for x in u if x.phase == "prefill"] == [(8, 0), (8, 1), (8, 0), (8, 1), (8, 1)]
    assert [(x.n_tokens, x.n_outputs, x.phase) for x in u[5:]] == [(1, 1, "decode")] * 4
    assert [(x.n_tokens, x.n_outputs) for x in engine_ubatches(39, 1)] == [(39, 1)]


def test_waves_resident_first_then_misses_by_id():
    """3 slots; a ubatch touching experts {0..5} with 4 and 5 resident: wave 1 = [4, 5, 0] (resident
    first, then misses by ascending id), wave 2 = [1, 2, 3]; victims are never of the current wave."""
    tr = _trace([[4, 5], [0, 1], [2, 3], [4, 5], [4, 6]], layers=(0,))
    ubs = [Ubatch(1, 1, "decode"), Ubatch(3, 3, "prefill"), Ubatch(1, 1, "decode")]
    r = simulate(tr, ubs, 3, "lru", last_layer=5)
    l = r.layers[0]
    # token 0: 4, 5 miss. ubatch 2 (rows 1-3 = {0,1,2,3,4,5}): wave [4,5,0]: 2 hits, 1 miss (free slot);
    # wave [1,2,3]: 3 misses, each evicting one of 4, 5, 0 (least recent first).
    # last row [4, 6]: 4 was evicted -> both miss.
    assert (l.hits, l.misses, l.evictions, l.n_waves) == (2, 2 + 1 + 3 + 2, 3 + 2, 1 + 2 + 1)
    assert r.waves[1, 0] == 2 and r.distinct[1, 0] == 6


def test_lfru_keeps_frequent_experts():
    rows = [[0, 1]] * 6 + [[2, 3], [4, 5], [0, 1]]
    tr = _trace(rows)
    ubs = [Ubatch(1, 1, "decode")] * len(rows)
    lru = simulate(tr, ubs, 4, "lru", last_layer=9).layers[0]
    lfru = simulate(tr, ubs, 4, "lfru", last_layer=9).layers[0]
    assert lru.hits == 10 and lfru.hits == 12  # LRU evicted 0 and 1 for 4 and 5; LFRU evicted 2 and 3


def test_last_layer_uses_the_output_rows():
    tr = _trace([[0, 1], [2, 3], [4, 5], [6, 7]], layers=(0, 1))
    tr.ids = np.stack([tr.ids[:, 0, :], tr.ids[:, 0, :]], axis=1)
    r = simulate(tr, [Ubatch(3, 1, "prefill"), Ubatch(1, 1, "decode")], 8, "lru", last_layer=1)
    assert (r.layers[0].misses, r.layers[1].misses) == (8, 4)  # layer 1: rows 2 and 3 only
    assert r.layers[1].n_tokens == 2


def test_curves_combine_and_pagecache():
    tr = trace_for_model_like(n_layers=3, n_expert=16, n_used=4, n_tokens=120)
    ubs = engine_ubatches(20, 100)
    eb = {0: 100, 1: 100, 2: 100}
    curves = layer_curves(tr, ubs, [4, 8, 16], "lru", last_layer=9, expert_bytes=eb)
    rates = [curves[s].hit_rate("decode") for s in (4, 8, 16)]
    assert rates[0] < rates[1] < rates[2]
    mixed = combine(curves, {0: 4, 1: 8, 2: 16})
    direct = simulate(tr, ubs, {0: 4, 1: 8, 2: 16}, "lru", last_layer=9, expert_bytes=eb)
    assert mixed.engine_view() == direct.engine_view()
    assert (mixed.misses == direct.misses).all()
    # page cache: everything fits -> only cold misses; nothing fits -> every access misses
    big = simulate_pagecache(tr, ubs, 10**9, eb, last_layer=9)
    assert sum(l.misses for l in big.layers) == 3 * 16 - sum(
        16 - len(np.unique(tr.ids[:119, li])) for li in range(3))
    none = simulate_pagecache(tr, ubs, 0, eb, last_layer=9)
    assert none.hit_rate() == 0.0


def trace_for_model_like(n_layers, n_expert, n_used, n_tokens):
    from flashmoe.trace import gen_realistic

    return gen_realistic(list(range(n_layers)), n_expert, n_used, n_tokens, seed=1)


def test_too_few_slots_is_an_error():
    from flashmoe.errors import FlashMoEError

    tr = _trace([[0, 1]])
    with pytest.raises(FlashMoEError, match="needs 2"):
        simulate(tr, [Ubatch(1, 1)], 1, "lru", last_layer=0)


def test_reads_ahead_keep_their_issue_order_and_use():
    """``ahead_used``: per ubatch and layer, the reads ahead in the order the prediction issued them and whether
    the layer used each; they add up to the engine's counters (n_prefetched, n_prefetch_used)."""
    from flashmoe.trace import draw_predictions, gen_uniform

    tr = draw_predictions(gen_uniform([0, 1, 2], 16, 2, 120, seed=2), 0.5, seed=3)
    r = simulate(tr, engine_ubatches(8, 100), 6, "lru", last_layer=2, prefetch=True)
    assert r.ahead_used is not None and r.ahead is not None
    for j, lc in enumerate(r.layers):
        mine = {u: a for (u, jj), a in r.ahead_used.items() if jj == j}
        assert sum(len(a) for a in mine.values()) == lc.n_prefetched == int(r.ahead[:, j].sum())
        assert sum(int(a.sum()) for a in mine.values()) == lc.n_prefetch_used
        assert all(len(a) == r.ahead[u, j] for u, a in mine.items())
    assert 0 < sum(int(a.sum()) for a in r.ahead_used.values()) < sum(len(a) for a in r.ahead_used.values())
    assert not any(j == 0 for _, j in r.ahead_used)  # the first layer: nothing runs before it to predict
    # the order is the prediction's, resident predictions skipped. Layer 1, 4 slots: token 0 predicts 0, 1 (both
    # used); token 1 predicts 5, 2 and uses 2, 3 (5 demoted, then evicted for 3); token 2 predicts 3 (resident)
    # and 6 (used)
    ids = np.array([[[0, 1], [0, 1]], [[0, 1], [2, 3]], [[0, 1], [6, 7]]], dtype=np.int32)
    pred = np.array([[[-1, -1], [0, 1]], [[-1, -1], [5, 2]], [[-1, -1], [3, 6]]], dtype=np.int32)
    small = Trace([0, 1], 8, ids, pred=pred)
    r = simulate(small, [Ubatch(1, 1, "decode")] * 3, 4, "lru", last_layer=None, prefetch=True)
    assert {k: v.tolist() for k, v in r.ahead_used.items()} == {(0, 1): [True, True], (1, 1): [False, True],
                                                                (2, 1): [True]}
    assert (r.layers[1].n_prefetched, r.layers[1].n_prefetch_used, r.layers[1].misses) == (5, 4, 2)
