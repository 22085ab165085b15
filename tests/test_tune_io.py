"""The tuner's I/O calibration: the engine's own reads (short streamed runs with the smallest cache) give the
bandwidth the predictions use, in place of the synthetic disk test; a calibration that fails falls back to the
disk test and says so."""
from __future__ import annotations

import json

import pytest

from flashmoe.bench.disk import DiskDepth, DiskMeasurement
from flashmoe.sizes import MiB
from tune_helpers import N_CTX, budget_for, write_realistic_trace

N_LAYER, N_EXPERT, K = 4, 32, 4
EB = 1 * MiB


def _facts(n_tensors=1):
    """ModelFacts of a model (no file): N_LAYER layers of N_EXPERT experts of EB bytes in n_tensors slices."""
    from flashmoe.tune import ModelFacts
    from gguf_tools.reader import GGUFModel, TensorInfo

    kinds = ("down", "gate", "up")[:n_tensors]
    tensors = [TensorInfo(f"blk.{l}.ffn_{kind}_exps.weight", 1, "F16", (1, 1, N_EXPERT), EB // n_tensors * N_EXPERT,
                          0, 0, layer=l, is_expert=True, expert_kind=kind, expert_stride=EB // n_tensors)
               for l in range(N_LAYER) for kind in kinds]
    return ModelFacts.of(GGUFModel(path="m", files=["m"], arch="qwen3moe", metadata={}, alignment=[32],
                                   tensors=tensors, n_layer=N_LAYER, n_expert=N_EXPERT, n_expert_used=K))


def _measured(mb_s, direct=True):
    return DiskMeasurement(True, "O_DIRECT" if direct else "buffered", direct, EB, EB,
                           [DiskDepth(q, bytes_per_s=b * 1e6) for q, b in zip((1, 4, 8), mb_s)])


SYN_DIRECT = (100, 300, 400)  # the disk test, MB/s at queue depths 1, 4, 8
SYN_BUFFERED = (80, 200, 250)


def _compute():
    from flashmoe.tune import ComputeModel

    return ComputeModel(dense_decode_s=0.004, expert_decode_s=0.0001, dense_prefill_s=0.0005,
                        expert_prefill_s=0.00002, ok=True)


def _engine(*points):
    """An I/O calibration with these (direct, readers, queue depth, MB/s) runs."""
    from flashmoe.tune import EngineRead, IOCalibration

    return IOCalibration([EngineRead(d, r, K, status="ok", qd=float(q), bytes_per_s=b * 1e6) for d, r, q, b in points])


def _sim(mf):
    from flashmoe.trace import gen_uniform
    from flashmoe.tune.simulate import engine_ubatches, simulate

    tr = gen_uniform(mf.moe_layers, N_EXPERT, K, 300, seed=3)
    return simulate(tr, engine_ubatches(16, 200), 8, "lru", last_layer=mf.last_layer, expert_bytes=mf.expert_bytes)


# ------------------------------------------------------------------------------------------- units


def test_calibrated_curve_keeps_the_engine_points_and_the_disk_tests_shape():
    from flashmoe.tune import calibrated_curve

    syn = [(1.0, 100e6), (4.0, 300e6), (8.0, 400e6)]
    # one run at 2 reads in flight: the disk test's shape scaled to it on both sides
    c = dict(calibrated_curve([(2.0, 500e6)], syn))
    s2 = 100e6 + (300e6 - 100e6) / 3  # the disk test at QD2
    assert c[2.0] == 500e6
    assert c[1.0] == pytest.approx(100e6 * 500e6 / s2) and c[8.0] == pytest.approx(400e6 * 500e6 / s2)
    # two runs: linear between them, scaled outside; two at one depth are averaged
    c = calibrated_curve([(4.0, 600e6), (8.0, 700e6), (8.0, 900e6)], syn)
    assert c == [(1.0, pytest.approx(200e6)), (4.0, 600e6), (8.0, 800e6)]
    # no disk test: the engine's points alone (np.interp holds the ends)
    assert calibrated_curve([(3.0, 1e9)], None) == [(3.0, 1e9)]
    assert calibrated_curve([], syn) == []


def test_io_plan_runs_the_main_mode_at_every_reader_count():
    from flashmoe.tune import io_plan
    from flashmoe.tune.measure import PAGECACHE

    assert io_plan([4, 8], [True, False]) == [(True, 8), (False, 8), (True, 4)]
    assert io_plan([8, 4, 8], [True]) == [(True, 8), (True, 4)]
    assert io_plan([4, 8], [False]) == [(False, 8), (False, 4)]  # no direct I/O here: buffered is the main mode
    assert io_plan([], [True]) == [] and io_plan([4], []) == []
    # one page-cache run, at the most readers, before the main mode's other reader counts
    assert io_plan([4, 8], [True, False], pagecache=True) == [(True, 8), (False, 8), (PAGECACHE, 8), (True, 4)]
    assert io_plan([4, 8], [], pagecache=True) == [(PAGECACHE, 8)]  # no k slots fit: the page-cache run alone


def test_reads_in_flight_follow_the_simulated_calibration_run():
    """Each token picks 4 experts none of the last token picked: with k slots every decode selection misses, so
    every layer's fetch reads 4 experts x 3 slices = 12 slices: min(readers, 12) in flight."""
    import numpy as np

    from flashmoe.trace import Trace, gen_uniform
    from flashmoe.tune.measure import reads_in_flight

    mf = _facts(n_tensors=3)
    n_tok = 64
    ids = np.array([[[(4 * t + j) % N_EXPERT for j in range(K)] for _ in mf.moe_layers] for t in range(n_tok)],
                   dtype=np.int32)
    tr = Trace(list(mf.moe_layers), N_EXPERT, ids, kind="test")
    assert reads_in_flight(tr, mf, 8) == 8.0 and reads_in_flight(tr, mf, 16) == 12.0
    assert reads_in_flight(tr, mf, 1) == 1.0 and reads_in_flight(None, mf, 8) is None
    # with reuse between tokens some fetches read fewer experts: fewer reads in flight, never under 3 (one expert)
    q = reads_in_flight(gen_uniform(mf.moe_layers, 8, K, n_tok, seed=1), mf, 16)
    assert q is not None and 3 <= q < 12


def test_engine_bandwidth_replaces_the_disk_test_in_the_predictions():
    """The engine read at twice the disk test's bandwidth at 4 and 8 reads in flight: a direct candidate's read
    time halves (exactly: every queue depth is scaled alike), its decode time is compute + that, and the source
    says so; buffered I/O, not calibrated, keeps the disk test's prediction."""
    from flashmoe.tune import Candidate, DiskModel, predict

    mf = _facts()
    syn = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False))
    eng = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False),
                    _engine((True, 8, 8, 800), (True, 4, 4, 600)))
    assert eng.source(True) == "engine" and eng.source(False) == "disk test"
    assert syn.source(True) == syn.source(False) == "disk test"
    for q in (1, 2, 4, 6, 8, 12):
        assert eng.bw(q, True) == pytest.approx(2 * syn.bw(q, True))
        assert eng.bw(q, False) == syn.bw(q, False)
    sim = _sim(mf)
    cm = _compute()
    c = Candidate("c", "cache", slots=8, readers=4, direct_io=True)
    p_syn, p_eng = predict(sim, c, mf, syn, cm), predict(sim, c, mf, eng, cm)
    d_syn, d_eng = p_syn["decode"], p_eng["decode"]
    assert d_syn["io_s_per_token"] > 0.01  # I/O matters here
    assert d_eng["io_s_per_token"] == pytest.approx(d_syn["io_s_per_token"] / 2)
    assert d_eng["compute_s_per_token"] == d_syn["compute_s_per_token"]
    assert 1 / p_eng["decode_tok_s"] == pytest.approx(d_eng["io_s_per_token"] + d_eng["compute_s_per_token"])
    assert p_eng["decode_tok_s"] > 1.3 * p_syn["decode_tok_s"]
    assert d_eng["read_mb_s"] == pytest.approx(2 * d_syn["read_mb_s"])
    assert p_eng["disk_source"] == "engine" and p_syn["disk_source"] == "disk test"
    b = Candidate("b", "cache", slots=8, readers=4, direct_io=False)
    pb_syn, pb_eng = predict(sim, b, mf, syn, cm), predict(sim, b, mf, eng, cm)
    assert pb_eng["decode_tok_s"] == pb_syn["decode_tok_s"] and pb_eng["disk_source"] == "disk test"
    pc = Candidate("p", "pagecache", readers=4, direct_io=False)  # page-cache mode reads buffered
    assert predict(sim, pc, mf, eng, cm)["disk_source"] == "disk test"
    # a buffered run calibrates buffered I/O (page-cache mode's too)
    eng_b = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), _engine((False, 8, 8, 1000)))
    assert eng_b.source(False) == "engine" and eng_b.source(True) == "disk test"
    assert eng_b.bw(8, False) == pytest.approx(1000e6) and eng_b.bw(4, False) == pytest.approx(200e6 * 1000 / 250)
    assert predict(sim, pc, mf, eng_b, cm)["disk_source"] == "engine"


def test_disk_model_round_trips_through_the_document():
    from flashmoe.tune import DiskModel

    cal = _engine((True, 8, 8, 800), (False, 8, 7.5, 1200))
    eng = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal)
    doc = json.loads(json.dumps({"direct": _measured(SYN_DIRECT).to_dict(), "engine": cal.to_dict(),
                                 "buffered": _measured(SYN_BUFFERED, False).to_dict(), "used": eng.to_dict()}))
    again = DiskModel(doc["direct"], doc["buffered"], doc["engine"])
    assert again.curves == eng.curves and again.sources == eng.sources
    assert doc["used"]["direct"]["source"] == "engine" and doc["used"]["buffered"]["source"] == "engine"
    assert doc["engine"]["ok"] and [r["status"] for r in doc["engine"]["runs"]] == ["ok", "ok"]
    text = eng.describe(True, [4, 8])
    assert text.startswith("engine: ") and "800 MB/s at 8 readers" in text and "disk test: " in text
    assert DiskModel(_measured(SYN_DIRECT), None).describe(True, [8]) == "disk test: 400 MB/s at 8 readers"


def _fake_run(bytes_read, read_wall_s, misses, tokens=23, status="ok", hits=10, decode_s=1.0):
    """A worker's record as run_worker returns it: a completed run whose decode phase (`decode_s` seconds) read
    `bytes_read` in `read_wall_s` seconds of reader time, or a failed one."""
    from flashmoe.bench.runner import RunRecord
    from flashmoe.engine import RunReport
    from flashmoe.worker import CacheTotals, DecodeFigures, WorkerResult

    if status != "ok":
        return RunRecord(status, timed_out=status == "TIMEOUT", wall_s=2.0, detail="killed after 2 s during load")
    dec = DecodeFigures(tokens=tokens, s=decode_s, cache=CacheTotals(hits=hits, misses=misses, bytes_read=bytes_read,
                                                                     read_wall_s=read_wall_s, stall_s=read_wall_s))
    return RunRecord("ok", wall_s=1.5, result=WorkerResult(True, report=RunReport("cache", "m"), decode=dec))


def _calibrate(monkeypatch, records, readers=(4, 8), modes=(True, False), cands=None, **kw):
    """calibrate_io on the fake model with these records for its runs (in io_plan's order); the specs it ran (and,
    in ``cands``, the candidates whose settings it asked for)."""
    from flashmoe.settings import EngineSettings
    from flashmoe.tune import Clock, DiskModel, calibrate_io
    from flashmoe.tune import measure

    specs, lines = [], []
    it = iter(records)

    def fake(spec, limit, timeout):
        specs.append((spec, limit, timeout))
        return next(it)

    def settings_for(c):
        if cands is not None:
            cands.append(c)
        return EngineSettings()

    monkeypatch.setattr(measure, "_io_worker", fake)
    monkeypatch.setattr(measure, "evict_file", lambda files: None)
    mf = _facts(n_tensors=3)
    syn = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False))
    cal = calibrate_io(settings_for, mf, 1, N_CTX, "t.trace", readers, modes, 1 << 30, syn,
                       _compute(), Clock(600, lines.append), allowance=60.0, **kw)
    return mf, syn, cal, specs, lines


def test_calibration_with_a_known_bandwidth_sets_the_prediction(monkeypatch):
    """calibrate_io turns each run's decode reads into a point (bytes / reader busy time, at the reads in flight
    its fetches kept), and the predictions follow it."""
    from flashmoe.tune import Candidate, DiskModel, predict
    from flashmoe.tune.measure import IO_CAL_GEN, IO_CAL_PROMPT

    # 23 decode tokens x 4 layers; misses 3 per layer-token x 3 slices = 9 slices per fetch: 8 in flight with 8
    # readers, 4 with 4
    misses = 23 * 4 * 3
    mf, syn, cal, specs, lines = _calibrate(monkeypatch, [_fake_run(1_600_000_000, 1.0, misses),
                                                          _fake_run(900_000_000, 1.0, misses),
                                                          _fake_run(1_000_000_000, 1.0, misses)])
    assert [(r.direct, r.readers) for r in cal.runs] == [(True, 8), (False, 8), (True, 4)]
    assert [r.status for r in cal.runs] == ["ok"] * 3 and cal.ok and cal.s >= 0
    assert [r.qd for r in cal.runs] == [8.0, 8.0, 4.0]
    assert [r.bytes_per_s for r in cal.runs] == [1.6e9, 0.9e9, 1.0e9]
    for spec, limit, timeout in specs:  # a short workload, the tune's trace, confined to the budget
        assert (spec.prompt_tokens, spec.gen_tokens, spec.routing_trace, limit) == (IO_CAL_PROMPT, IO_CAL_GEN,
                                                                                    "t.trace", 1 << 30)
        assert 0 < timeout <= 60
    assert any("disk (engine):" in l for l in lines) and any("1600 MB/s" in l for l in lines)
    disk = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal)
    assert disk.bw(8, True) == pytest.approx(1.6e9) and disk.bw(4, True) == pytest.approx(1.0e9)
    assert disk.bw(6, True) == pytest.approx(1.3e9) and disk.bw(8, False) == pytest.approx(0.9e9)
    sim = _sim(mf)
    c = Candidate("c", "cache", slots=8, readers=8, direct_io=True)
    p = predict(sim, c, mf, disk, _compute())
    ps = predict(sim, c, mf, syn, _compute())
    assert p["decode_tok_s"] > ps["decode_tok_s"] and p["disk_source"] == "engine"
    # the engine read 3.3x (4 or fewer in flight) to 4x (8) faster than the disk test
    assert 3.3 * ps["decode"]["read_mb_s"] <= p["decode"]["read_mb_s"] <= 1.6e3 + 1e-6


def test_failed_calibration_runs_fall_back_to_the_disk_test(monkeypatch):
    from flashmoe.tune import DiskModel

    mf, syn, cal, specs, lines = _calibrate(monkeypatch, [_fake_run(0, 0, 0, status="TIMEOUT"),
                                                          _fake_run(0, 0, 0, status="FAILED"),
                                                          _fake_run(0, 0, 0)])
    assert not cal.ok and [r.status for r in cal.runs] == ["TIMEOUT", "FAILED", "ok"]
    assert cal.runs[2].detail == "the run read nothing during its decode phase"
    disk = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal)
    assert disk.curves == syn.curves and disk.source(True) == disk.source(False) == "disk test"
    assert any("TIMEOUT" in l for l in lines)


def test_a_calibration_policy_that_does_not_resolve_fails_that_run(monkeypatch):
    from flashmoe.errors import FlashMoEError
    from flashmoe.tune import Clock, DiskModel, calibrate_io
    from flashmoe.tune import measure

    def settings_for(c):
        raise FlashMoEError("the cache does not fit the budget")

    monkeypatch.setattr(measure, "_io_worker", lambda spec, limit, timeout: pytest.fail("no run expected"))
    syn = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False))
    cal = calibrate_io(settings_for, _facts(), 1, N_CTX, "t.trace", [8], [True], None, syn, _compute(),
                       Clock(600, lambda m: None), allowance=60.0)
    assert [r.status for r in cal.runs] == ["FAILED"] and "does not fit the budget" in cal.runs[0].detail
    assert DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal).source(True) == "disk test"


def test_calibration_stops_when_its_time_is_spent(monkeypatch):
    from flashmoe.settings import EngineSettings
    from flashmoe.tune import Clock, DiskModel, calibrate_io
    from flashmoe.tune import measure

    ran = []
    monkeypatch.setattr(measure, "_io_worker", lambda spec, limit, timeout: ran.append(spec) or _fake_run(1, 1, 1))
    syn = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False))
    cal = calibrate_io(lambda c: EngineSettings(), _facts(), 1, N_CTX, "t.trace", [4, 8], [True, False], None, syn,
                       _compute(), Clock(600, lambda m: None), allowance=2.0)
    assert ran == [] and not cal.ok and [r.status for r in cal.runs] == ["not run"] * 3
    assert cal.note.startswith("no time for direct, 8 readers")


# ------------------------------------------------------------------- under the memory limit: buffered, page cache


def _cycling_trace(mf, n_tok=64):
    """Tokens alternate between two sets of K experts (0-3 and 4-7) in every layer: a cache of 8 slots or more holds
    both after the prompt (its decode reads nothing), k slots miss every selection."""
    import numpy as np

    from flashmoe.trace import Trace

    ids = np.array([[[(t % 2) * K + j for j in range(K)] for _ in mf.moe_layers] for t in range(n_tok)],
                   dtype=np.int32)
    return Trace(list(mf.moe_layers), N_EXPERT, ids, kind="test")


def test_buffered_calibration_slots_take_the_largest_buffered_cache_that_reads():
    from flashmoe.trace import gen_uniform
    from flashmoe.tune.measure import buffered_calibration_slots

    mf = _facts(n_tensors=3)
    uniform = gen_uniform(mf.moe_layers, N_EXPERT, K, 64, seed=2)
    assert buffered_calibration_slots([16, 13, 20], uniform, mf) == (20, "the largest buffered candidate's cache")
    assert buffered_calibration_slots([16, 20], None, mf)[0] == 20  # no trace: the largest, unchecked
    # 16 and 8 slots hold both sets: the run would read nothing in decode; 6 slots thrash
    cyc = _cycling_trace(mf)
    slots, why = buffered_calibration_slots([16, 8, 6], cyc, mf)
    assert slots == 6 and "with 16, 8 slots it would miss under 5%" in why
    slots, why = buffered_calibration_slots([16, 8], cyc, mf)
    assert slots == K and why.startswith("k: with the buffered candidates' caches (16, 8 slots)")
    assert buffered_calibration_slots([K], uniform, mf) == (K, "k: no buffered candidate has a larger cache")


def test_buffered_calibration_runs_with_the_buffered_candidates_slot_count(monkeypatch):
    """Direct I/O streams with k slots; buffered I/O with the buffered candidates' cache (here 16 slots): its
    settings, its run's slots and the reads in flight of its simulation are the 16-slot cache's."""
    from flashmoe.trace import gen_uniform
    from flashmoe.tune.measure import reads_in_flight

    misses = 23 * 4 * 3
    recs = [_fake_run(1_600_000_000, 1.0, misses), _fake_run(900_000_000, 1.0, misses),
            _fake_run(1_000_000_000, 1.0, misses)]
    cands = []
    tr = gen_uniform(list(range(N_LAYER)), N_EXPERT, K, 64, seed=5)
    mf, syn, cal, specs, lines = _calibrate(monkeypatch, recs, cands=cands, buffered_slots=16, trace=tr,
                                            buffered_why="the largest buffered candidate's cache")
    assert [(c.mode, c.direct_io, c.slots) for c in cands] == [("cache", True, K), ("cache", False, 16),
                                                                ("cache", True, K)]
    assert [(r.direct, r.slots) for r in cal.runs] == [(True, K), (False, 16), (True, K)]
    assert cal.buffered_slots == 16 and cal.to_dict()["buffered_slots"] == 16
    q16, qk = reads_in_flight(tr, mf, 8, slots=16), reads_in_flight(tr, mf, 8)
    assert cal.runs[1].qd == q16 and cal.runs[0].qd == qk and q16 < qk  # fewer misses per fetch
    assert any("buffered x8 (16 slots)" in l for l in lines)
    assert any("buffered I/O with 16 slots per layer (the largest buffered candidate's cache)" in l for l in lines)
    # without buffered_slots: k (as before)
    cands = []
    _calibrate(monkeypatch, recs, cands=cands)
    assert [c.slots for c in cands] == [K, K, K]


def _pc_calibration(monkeypatch, pc_rec, trace=None, pc_capacity=64 * MiB):
    """The calibration with its page-cache run: direct x8, buffered x8 (fixed records), page cache x8 (pc_rec),
    direct x4."""
    misses = 23 * 4 * 3
    recs = [_fake_run(1_600_000_000, 1.0, misses), _fake_run(900_000_000, 1.0, misses), pc_rec,
            _fake_run(1_000_000_000, 1.0, misses)]
    cands = []
    out = _calibrate(monkeypatch, recs, cands=cands, pc_capacity=pc_capacity, trace=trace)
    return out + (cands,)


def test_page_cache_calibration_sets_the_page_cache_prediction(monkeypatch):
    """The page-cache run's effective bandwidth (bytes over the decode time less the compute model's) is what the
    page-cache candidates' reads are predicted at; the explicit caches' predictions do not move."""
    from flashmoe.tune import Candidate, DiskModel, predict
    from flashmoe.tune.measure import ENGINE_PAGECACHE, PAGECACHE

    cm = _compute()
    comp = (cm.dense_decode_s + K * N_LAYER * cm.expert_decode_s) * 23  # the compute model's, without a trace
    pc_rec = _fake_run(230_000_000, 0.2, 23 * 4 * 3, decode_s=comp + 1.0)
    mf, syn, cal, specs, lines, cands = _pc_calibration(monkeypatch, pc_rec)
    assert [(c.mode, c.readers) for c in cands] == [("cache", 8), ("cache", 8), ("pagecache", 8), ("cache", 4)]
    pcr = cal.pagecache_run
    assert pcr is not None and pcr.pagecache and pcr.status == "ok" and pcr.label == "page cache, 8 readers"
    assert pcr.compute_s == pytest.approx(comp)
    assert pcr.effective_bytes_per_s == pytest.approx(230e6)  # not the reader pool's 1150 MB/s
    assert pcr.bytes_per_s == pytest.approx(230e6 / 0.2)
    assert cal.points(False) == [(8.0, 0.9e9)]  # the page-cache run is not a buffered point
    assert any("page cache, 8 readers: effective 230 MB/s" in l for l in lines)
    without = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False),
                        _engine((True, 8, 8, 1600), (False, 8, 8, 900), (True, 4, 4, 1000)))
    disk = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal)
    assert disk.source(PAGECACHE) == ENGINE_PAGECACHE and without.source(PAGECACHE) == "engine"
    assert disk.bw(pcr.qd, PAGECACHE) == pytest.approx(230e6)
    sim = _sim(mf)
    pc = Candidate("p", "pagecache", readers=8, direct_io=False)
    p_with, p_without = predict(sim, pc, mf, disk, cm), predict(sim, pc, mf, without, cm)
    assert p_with["disk_source"] == ENGINE_PAGECACHE and p_without["disk_source"] == "engine"
    # both curves have the disk test's buffered shape: the read time scales by the ratio of their levels
    ratio = (0.9e9 / disk.synthetic_bw(8, False)) / (230e6 / disk.synthetic_bw(pcr.qd, False))
    assert p_with["decode"]["io_s_per_token"] == pytest.approx(ratio * p_without["decode"]["io_s_per_token"])
    assert p_with["decode_tok_s"] < 0.5 * p_without["decode_tok_s"]
    for c in (Candidate("d", "cache", slots=8, readers=8, direct_io=True),
              Candidate("b", "cache", slots=8, readers=8, direct_io=False)):
        assert predict(sim, c, mf, disk, cm) == predict(sim, c, mf, without, cm)
    # the document and the report say what was measured and used
    from flashmoe.tune.report import _engine_reads

    doc = json.loads(json.dumps({"disk": {"engine": cal.to_dict(), "used": disk.to_dict(), "direct": {},
                                          "buffered": {}}}))
    assert doc["disk"]["used"]["pagecache"]["source"] == ENGINE_PAGECACHE
    text = "\n".join(_engine_reads(doc))
    assert "effective bandwidth of 230 MB/s" in text and "the reader pool's own: 1150 MB/s" in text
    assert "page-cache candidates' reads are predicted at it" in text
    again = DiskModel(doc["disk"].get("direct") or _measured(SYN_DIRECT), _measured(SYN_BUFFERED, False),
                      doc["disk"]["engine"])
    assert again.curves[PAGECACHE] == disk.curves[PAGECACHE]


def test_page_cache_hit_rate_far_from_the_simulation_gives_an_effective_capacity(monkeypatch):
    """The page cache hit far less than the simulation of the run's workload says (the cgroup holds less than the
    model's room): the page-cache candidates are simulated with the room that gives the measured hit rate; the
    tune's sizing takes it (Tune.disk_used) and the report says so. Close hit rates keep the modelled room."""
    from types import SimpleNamespace

    from flashmoe.tune import Clock, Sizing
    from flashmoe.tune.measure import IO_CAL_GEN, IO_CAL_PROMPT, calibration_sim
    from flashmoe.tune.report import _engine_reads
    from flashmoe.tune.run import Tune
    from flashmoe.tune.simulate import engine_ubatches, simulate_pagecache

    from flashmoe.trace import gen_realistic

    mf = _facts(n_tensors=3)
    tr = gen_realistic(mf.moe_layers, N_EXPERT, K, 64, seed=3)
    cap = 80 * MiB  # 20 of the 32 experts of every layer
    sim_hit = calibration_sim(tr, mf, pc_capacity=cap).hit_rate("decode")
    acc = 23 * N_LAYER * K
    hits = int(round((sim_hit - 0.25) * acc))  # 25 points below the simulation
    pc_rec = _fake_run(300_000_000, 0.5, acc - hits, hits=hits, decode_s=2.0)
    mf, syn, cal, specs, lines, cands = _pc_calibration(monkeypatch, pc_rec, trace=tr, pc_capacity=cap)
    pcr = cal.pagecache_run
    assert pcr.sim_hit_rate == pytest.approx(sim_hit) and pcr.hit_rate == pytest.approx(hits / acc)
    eff = cal.pc_effective_capacity
    assert eff is not None and eff < cap
    ubs = engine_ubatches(IO_CAL_PROMPT, IO_CAL_GEN)
    assert simulate_pagecache(tr, ubs, eff, mf.expert_bytes, last_layer=mf.last_layer).hit_rate("decode") \
        >= pcr.hit_rate > simulate_pagecache(tr, ubs, eff - EB, mf.expert_bytes,
                                             last_layer=mf.last_layer).hit_rate("decode")
    assert any("the page-cache candidates are simulated with" in l for l in lines)
    # the tune's sizing takes it, and the report says so
    log = []
    t = Tune(SimpleNamespace(readers=(4, 8)), Clock(600, log.append), mf, None, None, None, [])
    sizing = Sizing(pc_capacity=cap, pc_capacity_source="measured")
    disk = t.disk_used(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal, sizing)
    assert sizing.pc_capacity == eff and sizing.pc_capacity_source == "calibrated"
    assert any("page-cache candidates simulated with" in l for l in log)
    assert any("bandwidth in the predictions, page-cache mode: engine, page-cache run" in l for l in log)
    doc = {"disk": {"engine": cal.to_dict(), "used": disk.to_dict(), "direct": {}, "buffered": {}}}
    assert "too far apart, so the page-cache candidates are simulated with" in "\n".join(_engine_reads(doc))
    # a hit rate within PC_HIT_TOLERANCE of the simulation's: the modelled room stays
    near = int(round((sim_hit - 0.02) * acc))
    _, _, cal2, _, _, _ = _pc_calibration(monkeypatch, _fake_run(300_000_000, 0.5, acc - near, hits=near,
                                                                 decode_s=2.0), trace=tr, pc_capacity=cap)
    assert cal2.pc_effective_capacity is None and cal2.pc_capacity == cap
    sizing = Sizing(pc_capacity=cap, pc_capacity_source="measured")
    t.disk_used(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal2, sizing)
    assert sizing.pc_capacity == cap and sizing.pc_capacity_source == "measured"


def test_a_failed_page_cache_run_falls_back_to_buffered_bandwidth(monkeypatch):
    """The page-cache run timed out: page-cache candidates read at buffered I/O's bandwidth (the engine's buffered
    run here) and the modelled room; the progress lines and the notes say so."""
    from types import SimpleNamespace

    from flashmoe.tune import Candidate, Clock, DiskModel, Sizing, predict
    from flashmoe.tune.measure import PAGECACHE
    from flashmoe.tune.run import Tune

    mf, syn, cal, specs, lines, cands = _pc_calibration(monkeypatch, _fake_run(0, 0, 0, status="TIMEOUT"),
                                                        trace=_cycling_trace(_facts(n_tensors=3)))
    assert cal.pagecache_run.status == "TIMEOUT" and cal.pc_effective_capacity is None
    assert cal.pagecache_point() is None and cal.ok  # the other runs measured
    disk = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal)
    assert not disk.has(PAGECACHE) and disk.source(PAGECACHE) == disk.source(False) == "engine"
    assert disk.bw(5.0, PAGECACHE) == disk.bw(5.0, False)
    sim = _sim(mf)
    pc, b = Candidate("p", "pagecache", readers=8, direct_io=False), Candidate("b", "pagecache", readers=8)
    assert predict(sim, pc, mf, disk, _compute()) == predict(sim, b, mf, disk, _compute())
    log, notes = [], []
    t = Tune(SimpleNamespace(readers=(4, 8)), Clock(600, log.append), mf, None, None, None, notes)
    sizing = Sizing(pc_capacity=64 * MiB, pc_capacity_source="measured")
    t.disk_used(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal, sizing)
    assert sizing.pc_capacity == 64 * MiB
    assert any("the page-cache run gave no bandwidth (TIMEOUT" in l for l in log)
    assert any("page-cache mode: buffered I/O's (engine)" in l for l in log)
    assert any("page-cache calibration run gave no bandwidth" in n for n in notes)


def test_calibration_time_stays_bounded_with_the_page_cache_run(monkeypatch):
    """Every run, the page-cache one too, fits the one allowance: each run's timeout is what is left of it, and a
    run that would not fit is not started."""
    from flashmoe.bench.runner import RunRecord
    from flashmoe.settings import EngineSettings
    from flashmoe.tune import Clock, DiskModel, calibrate_io
    from flashmoe.tune import measure

    clock = Clock(600, lambda m: None)
    timeouts = []

    def slow(spec, limit, timeout):  # each run would take 20 s; killed at its timeout
        timeouts.append(timeout)
        took = min(20.0, timeout)
        clock.t0 -= took
        if took < 20.0:
            return RunRecord("TIMEOUT", timed_out=True, wall_s=took, detail="killed")
        rec = _fake_run(1_000_000, 0.01, 12, decode_s=1.0)
        rec.wall_s = took
        return rec

    monkeypatch.setattr(measure, "_io_worker", slow)
    monkeypatch.setattr(measure, "evict_file", lambda files: None)
    syn = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False))
    cal = calibrate_io(lambda c: EngineSettings(), _facts(), 1, N_CTX, "t.trace", [4, 8], [True, False], None, syn,
                       _compute(), clock, allowance=50.0, buffered_slots=12, pc_capacity=64 * MiB)
    assert [r.label for r in cal.runs] == ["direct, 8 readers", "buffered, 8 readers", "page cache, 8 readers",
                                           "direct, 4 readers"]
    assert [r.status for r in cal.runs] == ["ok", "ok", "TIMEOUT", "not run"]
    assert timeouts[2] == pytest.approx(10.0, abs=0.5) and sum(min(20.0, t) for t in timeouts) <= 50.0 + 0.5
    assert cal.s <= 50.0 + 0.5 and cal.allowance_s == 50.0
    assert cal.note == "no time for direct, 4 readers"


def test_validation_takes_reads_ahead_in_every_competitive_io_mode():
    """Reads ahead are validated in each I/O mode predicted competitive, picked by the prediction; a mode predicted
    far behind gets none of its own."""
    from flashmoe.tune import Candidate, pick_for_validation
    from flashmoe.tune.validate import competitive_io_modes

    def cand(name, pred, d=True, pf=False, mode="cache", ev="lru"):
        c = Candidate(name, mode, slots=16, direct_io=d, prefetch=pf, eviction=ev)
        c.prediction = {"decode_tok_s": pred}
        return c

    # today's B1 order (buffered over-predicted): one reads-ahead candidate (the best predicted: buffered) at 4;
    # with a 5th, the direct reads ahead too
    b1 = [cand("pc", 7.57, d=False, mode="pagecache"), cand("b", 6.22, d=False), cand("bp", 6.18, d=False, pf=True),
          cand("d", 6.14), cand("dp", 6.10, pf=True)]
    assert [c.name for c in pick_for_validation(b1, 4)] == ["pc", "b", "bp", "d"]
    assert [c.name for c in pick_for_validation(b1, 5)] == ["pc", "b", "bp", "d", "dp"]
    # corrected predictions: the reads-ahead candidate is the direct one; buffered still competitive: its own at 5
    fixed = [cand("d", 6.14), cand("dp", 6.10, pf=True), cand("e", 6.0, ev="lfru"), cand("b", 4.70, d=False),
             cand("bp", 4.60, d=False, pf=True), cand("pc", 2.70, d=False, mode="pagecache")]
    assert competitive_io_modes(fixed) == [True, False]
    assert [c.name for c in pick_for_validation(fixed, 4)] == ["d", "dp", "b", "pc"]
    assert [c.name for c in pick_for_validation(fixed, 5)] == ["d", "dp", "b", "bp", "pc"]
    # buffered far behind (under 75% of the best): no reads ahead of its own; the next rule (eviction) instead
    for c in fixed:
        if not c.direct_io and c.mode == "cache":
            c.prediction["decode_tok_s"] -= 1.0
    assert competitive_io_modes(fixed) == [True]
    assert [c.name for c in pick_for_validation(fixed, 5)] == ["d", "dp", "e", "b", "pc"]


# ------------------------------------------------------------------------------------- with the engine


@pytest.fixture(scope="module")
def trace_path(tiny_models, tmp_path_factory):
    return write_realistic_trace(tiny_models["qwen3moe"], tmp_path_factory.mktemp("tune-io"))


def _real_calibration(model, trace, readers=(4,), modes=(True,), tr=None):
    from flashmoe.policy import load_policy, open_model_view
    from flashmoe.tune import Clock, ComputeModel, DiskModel, ModelFacts, calibrate_io, policy_text, resolve_text

    mf = ModelFacts.open(model)
    view = open_model_view(mf.model)
    base = load_policy("stream")

    def settings_for(c):
        return resolve_text(policy_text(base, c, budget=None, n_ctx=N_CTX, threads=1), view, None).engine_settings()

    syn = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False))
    lines = []
    cal = calibrate_io(settings_for, mf, 1, N_CTX, trace, readers, modes, None, syn, ComputeModel(),
                       Clock(120, lines.append), allowance=60.0, trace=tr)
    return mf, syn, cal, lines


@pytest.mark.slow
def test_calibration_measures_the_engines_reads(tiny_model, trace_path, llama_cpp):
    from flashmoe.tune import DiskModel
    from flashmoe.tune.measure import IO_CAL_GEN

    from flashmoe.trace import read_trace
    from flashmoe.tune.measure import IO_CAL_PROMPT, reads_in_flight
    from flashmoe.tune.simulate import engine_ubatches, simulate

    tr = read_trace(trace_path)
    mf, syn, cal, lines = _real_calibration(tiny_model, trace_path, readers=(4,), modes=(True, False), tr=tr)
    assert [(r.direct, r.readers, r.status) for r in cal.runs] == [(True, 4, "ok"), (False, 4, "ok")], lines
    # the simulation the reads in flight come from is the run's: the same decode misses
    sim = simulate(tr, engine_ubatches(IO_CAL_PROMPT, IO_CAL_GEN), mf.n_used, "lru", last_layer=mf.last_layer)
    for r in cal.runs:
        assert r.decode_tokens == IO_CAL_GEN - 1 and r.slots == mf.n_used and r.model_evicted
        assert r.misses == sim.total("decode")["misses"] > 0 and r.bytes_read > 0 and r.read_wall_s > 0
        assert r.bytes_per_s == r.bytes_read / r.read_wall_s and r.qd == reads_in_flight(tr, mf, 4)
        assert 3 <= r.qd <= 4  # 3 slices per expert
    disk = DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal)
    assert disk.source(True) == disk.source(False) == "engine"
    for r in cal.runs:
        assert disk.bw(r.qd, r.direct) == pytest.approx(r.bytes_per_s)


@pytest.mark.slow
def test_a_calibration_run_that_fails_is_said(tiny_model, tmp_path, llama_cpp):
    """A real failed run (its routing trace is missing): the record says why and the disk test stays."""
    from flashmoe.tune import DiskModel

    mf, syn, cal, lines = _real_calibration(tiny_model, str(tmp_path / "missing.trace"))
    assert [r.status for r in cal.runs] == ["FAILED"] and not cal.ok
    assert "missing.trace" in (cal.runs[0].detail or "")
    assert DiskModel(_measured(SYN_DIRECT), _measured(SYN_BUFFERED, False), cal).curves == syn.curves
    assert any("FAILED" in l for l in lines)


@pytest.mark.slow
def test_tune_falls_back_to_the_disk_test_when_the_calibration_fails(tiny_model, trace_path, tmp_path, monkeypatch,
                                                                    llama_cpp):
    """The whole tune with every I/O calibration run timing out: it goes on with the disk test's bandwidth, and
    the progress lines, the notes, the report and the JSON say so."""
    from flashmoe.tune import TuneOptions, measure, run_tune, write_outputs

    monkeypatch.setattr(measure, "_io_worker", lambda spec, limit, timeout: _fake_run(0, 0, 0, status="TIMEOUT"))
    opts = TuneOptions(model=tiny_model, ram=budget_for(tiny_model, 5), out=str(tmp_path / "t.yaml"),
                       report=str(tmp_path / "t.md"), json_out=str(tmp_path / "t.json"), trace=trace_path,
                       time_limit=60, gen_tokens=12, n_ctx=N_CTX, threads=1, validate=1, repeat=1, plot=False)
    lines = []
    res = run_tune(opts, lines.append)
    write_outputs(res, opts)
    log = "\n".join(lines)
    assert "disk (engine):" in log and "TIMEOUT" in log
    assert "falling back to the disk test for direct and buffered I/O" in log
    assert "bandwidth in the predictions, direct I/O: disk test: " in log
    doc = json.loads((tmp_path / "t.json").read_text())
    d = doc["disk"]
    assert not d["engine"]["ok"] and {r["status"] for r in d["engine"]["runs"]} == {"TIMEOUT"}
    assert d["used"]["direct"]["source"] == d["used"]["buffered"]["source"] == "disk test"
    assert d["direct"]["ok"] and d["direct"]["depths"]  # the disk test is kept
    assert all(c["prediction"]["disk_source"] == "disk test" for c in doc["candidates"])
    assert any("could not be measured" in n for n in doc["notes"])
    md = (tmp_path / "t.md").read_text()
    assert "The engine's reads were not measured (direct, 8 readers: TIMEOUT" in md
    assert "- disk bandwidth in the predictions, direct I/O: disk test: " in md
    assert "# disk bandwidth in the predictions: direct: disk test: " in (tmp_path / "t.yaml").read_text()
    # the page-cache run timed out too: page-cache candidates read at buffered I/O's (the disk test's here)
    pcr = [r for r in d["engine"]["runs"] if r["pagecache"]]
    assert len(pcr) == 1 and pcr[0]["status"] == "TIMEOUT" and d["engine"]["pc_effective_capacity"] is None
    assert d["used"]["pagecache"]["source"] == "disk test" and not d["used"]["pagecache"]["own_curve"]
    assert "the page-cache run gave no bandwidth (TIMEOUT" in log
    assert any("page-cache calibration run gave no bandwidth (TIMEOUT" in n for n in doc["notes"])
    assert "- disk bandwidth in the predictions, page-cache mode: buffered I/O's (disk test): " in md
    assert "Page-cache run: TIMEOUT" in md


def test_validation_table_says_where_the_error_lies():
    """The report's second validation table: per validated candidate, predicted / measured time, bandwidth, bytes,
    I/O wait and compute, and whether the error was mostly the bandwidth, the bytes read or the compute."""
    from flashmoe.tune.report import _validation, error_source

    def cd(name, pred_tok_s, io_ms, comp_ms, bw, mib, meas_tok_s, stall_ms, meas_bw, meas_mib):
        return {"name": name, "prediction": {"decode_tok_s": pred_tok_s, "disk_source": "engine", "decode": {
            "io_s_per_token": io_ms / 1000, "compute_s_per_token": comp_ms / 1000, "read_mb_s": bw,
            "mib_per_token": mib}},
            "measured": {"runs": 2, "decode_tok_s": meas_tok_s, "decode_min": meas_tok_s, "decode_max": meas_tok_s,
                         "prefill_tok_s": 10.0, "decode_hit_rate": 0.5, "stall_ms_per_token": stall_ms,
                         "peak_mib": 100, "read_mb_s": meas_bw, "expert_mib_per_token": meas_mib,
                         "read_ms_per_token": stall_ms}, "runs": [{"status": "ok"}]}

    # the disk was faster than predicted: 230 ms of I/O predicted, 130 measured, the same bytes
    a = cd("a", 1000 / 268, 230, 38, 930, 214, 1000 / 168, 130, 1650, 214)
    # the bandwidth was right, the compute slower
    b = cd("b", 1000 / 268, 230, 38, 930, 214, 1000 / 290, 230, 930, 214)
    # more bytes read than predicted
    c = cd("c", 1000 / 268, 230, 38, 930, 214, 1000 / 368, 330, 930, 307)
    assert error_source(a) == "I/O -100 ms: read bandwidth x1.77"
    assert error_source(b) == "compute +22 ms"
    assert error_source(c) == "I/O +100 ms: bytes read x1.43"
    text = "\n".join(_validation({"validated": ["a", "b", "c"], "candidates": [a, b, c]}))
    row = next(l for l in text.splitlines() if l.startswith("| a |") and "engine" in l)
    cells = [x.strip() for x in row.strip("|").split("|")]
    assert cells[1] == "268.0 / 168.0" and cells[2] == "930 / 1650" and cells[3] == "engine"
    assert cells[-1] == "I/O -100 ms: read bandwidth x1.77"


def test_the_tuned_report_without_engine_figures_reads():
    """A document from before the I/O calibration (no engine section) still makes a report."""
    from flashmoe.tune.report import _bandwidth_lines, _engine_reads

    doc = {"disk": {"direct": {}, "buffered": {}}}
    assert _bandwidth_lines(doc) == ["- disk bandwidth in the predictions: none (the disk could not be measured)"]
    assert any("were not measured" in l for l in _engine_reads(doc))
