"""The tuner's timing model without runs: the n_ubatch choice for the workload's prompt, and the reads
ahead that the engine drops (wrong predictions no reader has started when the layer's routing is known)."""
from __future__ import annotations

import numpy as np
import pytest

from flashmoe.bench.disk import DiskDepth, DiskMeasurement
from flashmoe.sizes import MiB

N_LAYER, N_EXPERT, K = 4, 32, 4
EB = 1 * MiB  # one expert of one layer
PER_SLOT = N_LAYER * EB


def _facts():
    """ModelFacts of a model (no file): N_LAYER layers of N_EXPERT experts, one expert tensor of EB each."""
    from flashmoe.tune import ModelFacts
    from gguf_tools.reader import GGUFModel, TensorInfo

    tensors = [TensorInfo(f"blk.{l}.ffn_down_exps.weight", 1, "F16", (1, 1, N_EXPERT), EB * N_EXPERT, 0, 0,
                          layer=l, is_expert=True, expert_kind="down", expert_stride=EB)
               for l in range(N_LAYER)]
    return ModelFacts.of(GGUFModel(path="m", files=["m"], arch="qwen3moe", metadata={}, alignment=[32],
                                   tensors=tensors, n_layer=N_LAYER, n_expert=N_EXPERT, n_expert_used=K))


def _disk(mb_s=(100, 300, 400)):
    """A slow disk (I/O dominates): direct reads at queue depths 1, 4, 8."""
    from flashmoe.tune import DiskModel

    return DiskModel(DiskMeasurement(True, "O_DIRECT", True, EB, EB,
                                     [DiskDepth(q, bytes_per_s=b * 1e6) for q, b in zip((1, 4, 8), mb_s)]), None)


def _compute():
    from flashmoe.tune import ComputeModel

    return ComputeModel(dense_decode_s=0.004, expert_decode_s=0.0001, dense_prefill_s=0.0005,
                        expert_prefill_s=0.00002, ok=True)


def _mp(compute, cache_bytes, n_ubatch):
    """A memory plan whose compute buffer is `compute` and that leaves `cache_bytes` for experts."""
    from flashmoe.tune import MemoryPlan

    weights, kv, overhead = 10 * MiB, 2 * MiB, 8 * MiB
    return MemoryPlan(budget=weights + kv + overhead + compute + cache_bytes, weights=weights, pinned=weights,
                      runtime=kv + compute + overhead, kv_cache=kv, compute=compute, overhead=overhead,
                      cache_space=cache_bytes, bytes_per_slot=PER_SLOT, max_slots=min(N_EXPERT, cache_bytes // PER_SLOT),
                      n_ctx=4096, n_batch=max(512, n_ubatch), n_ubatch=n_ubatch)


def _plans(budget_for_512_slots, compute_by_ubatch, prompt, gen):
    """UbatchPlans at one budget: the base (512) leaves `budget_for_512_slots` slots; larger ubatches take
    their extra compute buffer from the cache."""
    from flashmoe.tune import UbatchPlan, ubatch_sizes
    from flashmoe.tune.simulate import engine_ubatches

    c0 = compute_by_ubatch[512]
    budget_left = budget_for_512_slots * PER_SLOT + c0 + 3 * MiB  # compute + cache (+ less than a slot)
    plans = []
    for u in ubatch_sizes(512, 4096, prompt, tuple(compute_by_ubatch)):
        mp = _mp(compute_by_ubatch[u], budget_left - compute_by_ubatch[u], u)
        plans.append(UbatchPlan(u, mp.n_batch, mp, engine_ubatches(prompt, gen, mp.n_batch, u)))
    return plans


def _search(plans, trace):
    from flashmoe.tune import Sizing, search

    mp = plans[0].mp
    return search(trace, plans[0].ubs, _facts(), mp, Sizing(pc_capacity=mp.cache_space), _disk(), _compute(), [4],
                  plans)


def _best_cache(found, slots):
    return next(c for c in found.cands if c.mode == "cache" and not c.per_layer and not c.prefetch
                and c.eviction == "lru" and c.direct_io and c.ubatch_choices[0]["slots"] == slots)


# ------------------------------------------------------------------------------------------- n_ubatch


def test_ubatch_sizes_follow_the_prompt_and_the_context():
    from flashmoe.tune import ubatch_sizes

    assert ubatch_sizes(512, 4096, 64) == [512]  # the default workload: nothing to weigh
    assert ubatch_sizes(512, 4096, 512) == [512]
    assert ubatch_sizes(512, 4096, 600) == [512, 1024]  # 1024 holds the whole prompt: no 2048
    assert ubatch_sizes(512, 4096, 3000) == [512, 1024, 2048, 4096]
    assert ubatch_sizes(512, 1024, 5000) == [512, 1024]  # not above the context
    assert ubatch_sizes(1024, 4096, 2000) == [1024, 2048]  # the base policy's first


def test_long_prompt_with_room_takes_a_larger_ubatch():
    """The compute buffer of a larger ubatch fits beside the same cache: the prompt reads the experts fewer
    times, TTFT drops, decode does not, so the largest useful n_ubatch wins and is written with n_batch >= it."""
    from flashmoe.policy import load_policy
    from flashmoe.trace import gen_uniform
    from flashmoe.tune import policy_text

    tr = gen_uniform(list(range(N_LAYER)), N_EXPERT, K, 2200, seed=5)
    compute = {512: 1 * MiB, 1024: 2 * MiB, 2048: 3 * MiB}  # less than one slot more: the cache keeps 20 slots
    plans = _plans(20, compute, prompt=2048, gen=100)
    assert [p.n_ubatch for p in plans] == [512, 1024, 2048] and all(p.mp.max_slots == 20 for p in plans)
    found = _search(plans, tr)
    assert found.ubatch_sizes == [512, 1024, 2048]
    c = _best_cache(found, 20)
    rows = c.ubatch_choices
    assert [r["n_ubatch"] for r in rows] == [512, 1024, 2048] and all(r["fits"] and r["slots"] == 20 for r in rows)
    reads = [r["prompt_reads"] for r in rows]
    assert reads[0] > reads[1] > reads[2] and reads[0] > 1.5 * reads[2]  # about once per ubatch
    assert rows[2]["ttft_s"] < rows[0]["ttft_s"]
    assert c.n_ubatch == 2048 and c.n_batch >= 2048 and rows[2]["chosen"] and not rows[0]["chosen"]
    assert c.name.endswith("-ub2048") and c.prediction["ttft_s"] == rows[2]["ttft_s"]
    assert c.prediction["decode_tok_s"] >= rows[0]["decode_tok_s"] * 0.98
    text = policy_text(load_policy("stream"), c, budget=plans[0].mp.budget, n_ctx=4096, threads=None)
    assert "  n_batch: 2048\n  n_ubatch: 2048\n" in text


def test_tight_budget_keeps_512():
    """A larger ubatch's compute buffer would take a third of the cache: decode would be much slower, so the
    base n_ubatch stays, however much faster the prompt would be."""
    from flashmoe.trace import gen_uniform

    tr = gen_uniform(list(range(N_LAYER)), N_EXPERT, K, 2200, seed=5)
    compute = {512: 1 * MiB, 1024: 1 * MiB + 8 * PER_SLOT, 2048: 1 * MiB + 16 * PER_SLOT}
    plans = _plans(20, compute, prompt=2048, gen=100)
    assert [p.mp.max_slots for p in plans] == [20, 12, 4]
    found = _search(plans, tr)
    c = _best_cache(found, 20)
    rows = c.ubatch_choices
    assert c.n_ubatch == 512 and c.slots == 20 and rows[0]["chosen"] and "-ub" not in c.name
    assert rows[1]["fits"] and rows[1]["slots"] == 12 and not rows[1]["decode_ok"]
    assert rows[1]["decode_tok_s"] < rows[0]["decode_tok_s"] * 0.98
    assert rows[1]["prompt_reads"] < rows[0]["prompt_reads"]  # the prompt would have read less: not enough
    assert rows[2]["slots"] == 4 or not rows[2]["fits"]
    assert all(x.n_ubatch == 512 for x in found.cands if x.mode == "cache" and not x.per_layer)


def test_short_prompt_weighs_only_the_base_ubatch():
    from flashmoe.trace import gen_uniform

    tr = gen_uniform(list(range(N_LAYER)), N_EXPERT, K, 300, seed=5)
    plans = _plans(20, {512: 1 * MiB, 1024: 2 * MiB, 2048: 3 * MiB}, prompt=64, gen=100)
    assert len(plans) == 1
    found = _search(plans, tr)
    assert found.ubatch_sizes == [512]
    for c in found.cands:
        assert c.n_ubatch == 512 and c.n_batch == 512 and len(c.ubatch_choices) == 1
        assert c.ubatch_choices[0]["chosen"] and c.prediction["ttft_s"] > 0
        assert "n_ubatch" not in c.describe()  # nothing was weighed: not worth saying


def test_pick_ubatch_rule():
    from flashmoe.tune import pick_ubatch

    def row(u, dec, ttft, fits=True):
        return {"n_ubatch": u, "fits": fits, "decode_tok_s": dec, "ttft_s": ttft}

    # 1024: 3% slower decode (out); 2048: 1% slower, 40% faster TTFT (in)
    rows = [row(512, 10.0, 10.0), row(1024, 9.7, 5.0), row(2048, 9.9, 6.0)]
    assert pick_ubatch(rows) == 2 and rows[2]["chosen"] and not rows[1]["decode_ok"]
    # a TTFT gain under 5% is not worth the memory: the smaller one stays
    rows = [row(512, 10.0, 10.0), row(1024, 10.0, 9.7)]
    assert pick_ubatch(rows) == 0
    # among eligible ones, a larger one must beat the current choice by 5% again
    rows = [row(512, 10.0, 10.0), row(1024, 10.0, 6.0), row(2048, 10.0, 5.9)]
    assert pick_ubatch(rows) == 1
    # one that does not fit is never chosen; nothing predicted (no disk, no compute): the base
    assert pick_ubatch([row(512, 10.0, 10.0), row(1024, None, None, fits=False)]) == 0
    assert pick_ubatch([row(512, None, None), row(1024, None, None)]) == 0


def test_ubatch_plans_of_a_real_policy(tiny_model):
    """The policy module's compute-buffer estimate: it grows with n_ubatch and comes out of the cache; n_batch
    follows; a tuned policy with a larger n_ubatch resolves within the budget."""
    from flashmoe.policy import load_policy, open_model_view
    from flashmoe.tune import Candidate, ModelFacts, plan_memory, policy_text, resolve_text, ubatch_plans

    mf = ModelFacts.open(tiny_model)
    view = open_model_view(mf.model)
    base = load_policy("stream")
    mp = plan_memory(base, view, mf, 1 << 30)
    assert (mp.n_ubatch, mp.n_batch, mp.n_ctx) == (512, 512, 4096)
    assert len(ubatch_plans(base, view, mf, mp, 64, 16)) == 1
    plans = ubatch_plans(base, view, mf, mp, 3000, 16)
    assert [(p.n_ubatch, p.n_batch) for p in plans] == [(512, 512), (1024, 1024), (2048, 2048), (4096, 4096)]
    computes = [p.mp.compute for p in plans]
    assert computes == sorted(computes) and computes[0] < computes[-1]
    assert [p.mp.cache_space for p in plans] == [mp.cache_space - (c - computes[0]) for c in computes]
    assert sum(u.n_tokens for u in plans[2].ubs if u.phase == "prefill") == 3000
    assert [u.n_tokens for u in plans[2].ubs if u.phase == "prefill"] == [2048, 952]
    p = plans[2]
    c = Candidate("x", "cache", slots=min(mf.n_expert, p.mp.max_slots), n_ubatch=p.n_ubatch, n_batch=p.n_batch)
    s = resolve_text(policy_text(base, c, budget=mp.budget, n_ctx=4096, threads=None), view, None).engine_settings()
    assert (s.runtime.n_ubatch, s.runtime.n_batch) == (2048, 2048)


# ------------------------------------------------------------------------------- dropped reads ahead


def test_charged_ahead_counts_started_and_right_reads():
    from flashmoe.tune import charged_ahead

    def bw(q):
        return q * 100e6  # every reader at 100 MB/s: one 1 MB slice in 10 ms

    used = np.array([False, False, False, True, True, False])
    # nothing overlaps: the first reader's slice only has started; the right ones are read anyway
    assert charged_ahead(used, 1, 1e6, 1, 0.0, bw) == 1 + 2
    # 25 ms of compute: slices started at 0, 10 and 20 ms, the rest of the wrong ones dropped
    assert charged_ahead(used, 1, 1e6, 1, 0.025, bw) == 3 + 2
    # a long window: every read ahead has started
    assert charged_ahead(used, 1, 1e6, 1, 10.0, bw) == len(used)
    # 2 readers, 3 slices per expert (1/3 MB each: 3.3 ms): at 0 and 3.3 ms, 4 slices have started:
    # expert 0 whole, 1 slice of expert 1
    assert charged_ahead(used, 3, 1e6, 2, 0.005, bw) == pytest.approx(2 + 1 + 1 / 3)
    # every prediction right: all of them, as without dropping
    assert charged_ahead(np.ones(5, dtype=bool), 3, 1e6, 4, 0.0, bw) == 5
    assert charged_ahead(np.zeros(0, dtype=bool), 3, 1e6, 4, 0.0, bw) == 0


def _prefetch_predictions(accuracy):
    from flashmoe.trace import draw_predictions, gen_uniform
    from flashmoe.tune import Candidate, predict
    from flashmoe.tune.simulate import engine_ubatches, simulate

    mf = _facts()
    tr = draw_predictions(gen_uniform(mf.moe_layers, N_EXPERT, K, 300, seed=7), accuracy, seed=1)
    ubs = engine_ubatches(16, 200)
    sim = simulate(tr, ubs, 12, "lru", last_layer=mf.last_layer, expert_bytes=mf.expert_bytes, prefetch=True)
    assert sim.ahead_used is not None and sim.ahead is not None and sim.ahead.sum() > 0
    c = Candidate("p", "cache", slots=12, readers=2, direct_io=True, prefetch=True)  # fewer readers than reads ahead
    disk = _disk((50, 120, 150))  # slower than the compute window: reads ahead are still queued at the fetch
    return (predict(sim, c, mf, disk, _compute(), drop_ahead=True),
            predict(sim, c, mf, disk, _compute(), drop_ahead=False))


def test_dropped_reads_ahead_cost_less_when_predictions_are_wrong():
    drop, keep = _prefetch_predictions(0.2)
    d, k = drop["decode"], keep["decode"]
    assert d["reads_ahead_dropped_per_token"] > 0 and k["reads_ahead_dropped_per_token"] == 0
    assert d["io_s_per_token"] < k["io_s_per_token"]
    assert drop["decode_tok_s"] > keep["decode_tok_s"]
    assert d["hit_rate"] == k["hit_rate"]  # the same simulation: only the timing differs


def test_right_predictions_cost_the_same_with_or_without_dropping():
    drop, keep = _prefetch_predictions(1.0)
    assert drop["decode"]["reads_ahead_dropped_per_token"] == 0
    assert drop["decode"]["io_s_per_token"] == keep["decode"]["io_s_per_token"]
    assert drop["decode_tok_s"] == keep["decode_tok_s"]


def test_report_says_each_ubatch_choice():
    """The report's n_ubatch section: per choice, the prompt's reads of the experts and the predicted TTFT."""
    from flashmoe.trace import gen_uniform
    from flashmoe.tune.report import _ubatch
    from flashmoe.tune.search import UBATCH_DECODE_MARGIN, UBATCH_TTFT_GAIN

    tr = gen_uniform(list(range(N_LAYER)), N_EXPERT, K, 2200, seed=5)
    plans = _plans(20, {512: 1 * MiB, 1024: 1 * MiB + 8 * PER_SLOT, 2048: 1 * MiB + 16 * PER_SLOT}, 2048, 100)
    c = _best_cache(_search(plans, tr), 20)
    doc = {"workload": {"prompt_tokens": 2048, "n_ubatch": c.n_ubatch},
           "ubatch": {"sizes": [512, 1024, 2048], "base": 512, "chosen": c.n_ubatch, "choices": c.ubatch_choices,
                      "decode_margin": UBATCH_DECODE_MARGIN, "ttft_gain": UBATCH_TTFT_GAIN}}
    text = "\n".join(_ubatch(doc))
    assert "## Prompt ubatch (n_ubatch)" in text and "at least 5% lower" in text
    rows = [l for l in text.splitlines() if l.startswith("| 512") or l.startswith("| 1024") or l.startswith("| 2048")]
    assert len(rows) == 3
    for line, r in zip(rows, c.ubatch_choices):
        cells = [x.strip() for x in line.strip("|").split("|")]
        assert cells[4] == f"{r['prompt_reads']:.2f}x" and cells[5] == f"{r['ttft_s']:.2f}"
    assert "**chosen**" in rows[0] and "decode more than 2% slower" in rows[1]
    doc["ubatch"]["choices"] = c.ubatch_choices[:1]
    assert "fits one ubatch of 512" in "\n".join(_ubatch(doc))


def test_validation_covers_reads_ahead_both_ways():
    from flashmoe.tune import Candidate, pick_for_validation

    def cand(name, d=True, pf=False, mode="cache"):
        c = Candidate(name, mode, slots=10, direct_io=d, prefetch=pf)
        c.prediction = {"decode_tok_s": 1.0}
        return c

    cands = [cand("a"), cand("b", d=False), cand("c"), cand("p", pf=True), cand("pc", d=False, mode="pagecache")]
    assert [c.name for c in pick_for_validation(cands, 4)] == ["a", "b", "p", "pc"]
