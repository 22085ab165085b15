"""`flashmoe tune` on the tiny models: the whole command (real llama.cpp runs under a memory
cgroup), the policy it writes, the errors, the time limit and Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO_ROOT
from tune_helpers import N_CTX, budget_for, write_realistic_trace

pytestmark = pytest.mark.slow  # measures, simulates and validates with real runs


@pytest.fixture(scope="module")
def realistic_trace(tiny_models, tmp_path_factory):
    return write_realistic_trace(tiny_models["qwen3moe"], tmp_path_factory.mktemp("tune"))


@pytest.fixture(scope="module")
def tuned(tiny_models, realistic_trace, tmp_path_factory, llama_cpp):
    out = tmp_path_factory.mktemp("tuned")
    path = tiny_models["qwen3moe"]
    budget = budget_for(path, 5)
    args = ["tune", "-m", path, "--ram", str(budget), "--trace", realistic_trace, "--time-limit", "90s",
            "-o", str(out / "tuned.yaml"), "--report", str(out / "tune.md"), "--json", str(out / "tune.json"),
            "--gen-tokens", "16", "--ctx", str(N_CTX),
            "--threads", "1", "--validate", "3", "--repeat", "2"]
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "flashmoe", *args], capture_output=True, text=True, timeout=200,
                       cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    return {"proc": p, "wall": time.monotonic() - t0, "dir": out, "model": path, "budget": budget}


def test_tune_writes_a_policy_that_loads(tuned):
    from flashmoe.engine import Engine
    from flashmoe.policy import load_policy

    p = tuned["proc"]
    assert p.returncode == 0, p.stderr[-3000:]
    assert tuned["wall"] < 90 + 15
    yml = tuned["dir"] / "tuned.yaml"
    text = yml.read_text()
    head = [l for l in text.splitlines() if l.startswith("#")]
    assert any(l.startswith("# model: ") for l in head) and any(l.startswith("# machine: ") for l in head)
    assert any(l.startswith("# budget: ") for l in head) and any(l.startswith("# predicted: ") for l in head)
    assert any(l.startswith("# measured: ") for l in head)
    pol = load_policy(str(yml))
    res = pol.resolve(tuned["model"])
    assert not res.errors
    assert res.memory.budget == tuned["budget"]
    s = res.engine_settings()
    assert s.stream.mode in ("cache", "pagecache")
    with Engine(tuned["model"], policy=str(yml), n_threads=1) as e:
        g = e.generate("Hello", 4, stop_at_eos=False)
        assert len(g.tokens) == 4
        if s.stream.mode == "cache":
            assert e.info["n_slots"] == s.stream.cache_slots
    # progress was shown
    assert "[tune " in p.stderr and "validation round 1" in p.stderr


def test_tune_report(tuned):
    md = (tuned["dir"] / "tune.md").read_text()
    for section in ("## Result", "## Machine", "## Memory plan", "## Hit rate against cache size",
                    "## Candidates (predicted)", "## Validation (measured under the budget)", "## Per-layer slot counts"):
        assert section in md
    assert "| slots/layer | cache | fits (estimate) | LRU all | LRU decode | LFRU all | LFRU decode |" in md
    assert "Per layer, decode hit rate, LRU" in md and "Per layer, decode hit rate, LFRU" in md
    assert "Per-layer slot counts run in the engine" in md
    assert "**Winner: " in md
    # a validated explicit cache: the measured decode hit rate is the simulated one (exact simulator)
    rows = [l for l in md.splitlines() if l.startswith("| lru-") or l.startswith("| lfru-")]
    checked = 0
    for l in rows:
        cells = [c.strip() for c in l.strip("|").split("|")]
        if len(cells) == 12 and cells[-1] == "ok":
            assert cells[4] == cells[5], l  # predicted decode hit == measured decode hit
            checked += 1
    assert checked >= 1
    assert (tuned["dir"] / "tune.png").exists() == ("![hit rate" in md)
    # the default 64-token workload: one n_ubatch weighed (the base policy's), said in the report and the JSON
    assert "## Prompt ubatch (n_ubatch)" in md and "fits one ubatch of 512" in md
    import json

    doc = json.loads((tuned["dir"] / "tune.json").read_text())
    assert doc["ubatch"]["sizes"] == [512] and doc["workload"]["n_ubatch"] == 512
    assert doc["winner"]["n_ubatch"] == 512 and len(doc["winner"]["ubatch_choices"]) == 1
    assert doc["winner"]["prediction"]["ttft_s"] > 0 and doc["winner"]["name"] in md
    assert "n_ubatch: 512" in (tuned["dir"] / "tuned.yaml").read_text()


def test_tune_measures_the_engines_reads(tuned):
    """The I/O calibration ran (direct I/O with k slots per layer, buffered I/O with the largest buffered cache that
    reads, one page-cache run), its bandwidth is the one the predictions use, the disk test is kept beside it, and
    the validation runs' own read bandwidth is in the report."""
    import json

    p = tuned["proc"]
    assert p.returncode == 0, p.stderr[-3000:]
    assert "disk (engine): short runs, 8-token prompt, 24 generated" in p.stderr
    assert "direct I/O with 2 slots per layer" in p.stderr
    # the budget leaves 5 slots by the estimate, 8 by the measured memory: 8 (every expert) would read nothing
    # in the calibration's decode, so the buffered runs take 5
    assert "buffered I/O with 5 slots per layer (the largest buffered candidate's cache whose run reads enough: " \
           "with 8 slots it would miss under 5%" in p.stderr
    assert "bandwidth in the predictions, direct I/O: engine: " in p.stderr
    assert "bandwidth in the predictions, page-cache mode: " in p.stderr
    assert "the I/O calibration took " in p.stderr and " of its 20 s share (the larger of 8% of the time" in p.stderr
    doc = json.loads((tuned["dir"] / "tune.json").read_text())
    d = doc["disk"]
    assert d["direct"]["ok"] and d["direct"]["depths"]  # the disk test, for comparison
    e = d["engine"]
    assert e["ok"] and [(r["pagecache"], r["direct"], r["readers"]) for r in e["runs"]] == [
        (False, True, 8), (False, False, 8), (True, False, 8), (False, True, 4)]
    assert e["buffered_slots"] == doc["memory"]["max_slots"] == 5 and doc["memory"]["tight_slots"] == 8
    assert [r["slots"] for r in e["runs"]] == [2, 5, 0, 2]
    pc = e["runs"][2]
    assert pc["status"] == "ok" and pc["hit_rate"] is not None and pc["sim_hit_rate"] is not None
    assert e["pc_capacity"] == doc["pagecache"]["modelled_capacity_bytes"]
    # the tiny model fits the page cache: the run reads (nearly) nothing in its decode; without a bandwidth of its
    # own, page-cache candidates read at buffered I/O's (said)
    pcu = d["used"]["pagecache"]
    if pc["effective_bytes_per_s"]:
        assert pcu["source"] == "engine, page-cache run" and pcu["own_curve"]
    else:
        assert pcu["source"] == "engine" and not pcu["own_curve"]
        assert "Page-cache run (8 readers): no bandwidth" in (tuned["dir"] / "tune.md").read_text()
    # its hit rate close to the simulation's: the measured room; far: the room that gives it
    if e["pc_effective_capacity"]:
        assert doc["pagecache"]["capacity_source"] == "calibrated"
        assert doc["pagecache"]["capacity_bytes"] == e["pc_effective_capacity"]
    else:
        assert abs(pc["hit_rate"] - pc["sim_hit_rate"]) <= 0.05
        assert doc["pagecache"]["capacity_source"] == "measured" and doc["pagecache"]["capacity_bytes"] == e["pc_capacity"]
    assert all(c["prediction"]["disk_source"] == pcu["source"] for c in doc["candidates"] if c["mode"] == "pagecache")
    confined = {r["confined"] for c in doc["candidates"] for r in c.get("runs") or []}
    for r in e["runs"]:  # confined to the budget like the validation runs (where this machine has cgroups)
        assert r["status"] == "ok" and {r["confined"]} == confined
        assert r["model_evicted"] and r["decode_tokens"] == e["gen_tokens"] - 1
        if not r["pagecache"]:
            assert r["bytes_per_s"] == pytest.approx(r["bytes_read"] / r["read_wall_s"])
    assert d["used"]["direct"]["source"] == d["used"]["buffered"]["source"] == "engine"
    from flashmoe.tune import DiskModel

    disk = DiskModel(d["direct"], d["buffered"], e)
    cache_runs = [r for r in e["runs"] if not r["pagecache"]]
    for r in cache_runs:  # the curve the predictions read goes through the runs' points (runs at one depth: their mean)
        same = [x["bytes_per_s"] for x in cache_runs if x["direct"] == r["direct"] and x["qd"] == r["qd"]]
        assert disk.bw(r["qd"], r["direct"]) == pytest.approx(sum(same) / len(same))
    cache = [c for c in doc["candidates"] if c["mode"] == "cache"]
    assert cache and all(c["prediction"]["disk_source"] == "engine" for c in cache)
    md = (tuned["dir"] / "tune.md").read_text()
    assert "Engine reads (the I/O calibration)" in md and "the disk test (direct:" in md
    assert "- disk bandwidth in the predictions, direct I/O: engine: " in md
    assert "# disk bandwidth in the predictions: direct: engine: " in (tuned["dir"] / "tuned.yaml").read_text()
    # per validated candidate: predicted / measured read bandwidth, the measured one the runs' median
    val = [c for c in doc["candidates"] if c["name"] in doc["validated"] and c.get("measured")]
    checked = 0
    for c in val:
        me = c["measured"]
        bws = sorted(r["metrics"]["read_mb_s"] for r in c["runs"] if r.get("metrics") and r["metrics"]["read_mb_s"])
        row = next(l for l in md.splitlines() if l.startswith(f"| {c['name']} |") and "| engine |" in l)
        cells = [x.strip() for x in row.strip("|").split("|")]
        assert cells[3] == "engine" and cells[-1] != "-"
        if bws:
            import statistics

            assert me["read_mb_s"] == pytest.approx(statistics.median(bws))
            assert cells[2] == f"{c['prediction']['decode']['read_mb_s']:.0f} / {me['read_mb_s']:.0f}"
            checked += 1
    assert checked >= 1


def test_tune_records_the_routing_without_trace(tiny_models, tmp_path, run_cli, llama_cpp):
    path = tiny_models["qwen35moe"]
    out = tmp_path / "t.yaml"
    r = run_cli("tune", "-m", path, "--ram", str(budget_for(path, 4)), "--time-limit", "60s", "-o", out,
                "--report", tmp_path / "t.md", "--gen-tokens", "12", "--ctx", N_CTX, "--threads", "1",
                "--validate", "1", "--repeat", "1", "--no-plot", "--readers", "4")
    assert r.code == 0, r.stderr[-3000:]
    assert "recording the model's routing" in r.stderr
    md = (tmp_path / "t.md").read_text()
    assert "recorded on the default prompt" in md
    assert not (tmp_path / "t.png").exists()
    from flashmoe.policy import load_policy

    assert not load_policy(str(out)).resolve(path).errors


def test_budget_below_pinned_weights_is_a_clear_error(tiny_model, tmp_path, run_cli):
    r = run_cli("tune", "-m", tiny_model, "--ram", "1MiB", "-o", tmp_path / "x.yaml")
    assert r.code == 1
    assert "below the pinned weights" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists()
    for ctx in ("--ctx", "--n-ctx"):  # --n-ctx: the hidden spelling of chat and serve
        r = run_cli("tune", "-m", tiny_model, "--ram", "100MiB", ctx, N_CTX, "-o", tmp_path / "x.yaml")
        assert r.code == 1 and "leaves nothing for experts" in r.stderr and "Traceback" not in r.stderr
        assert f"at n_ctx {N_CTX}," in r.stderr
    r = run_cli("tune", "-m", tiny_model, "--ram", "lots", "-o", tmp_path / "x.yaml")
    assert r.code == 2 and "Traceback" not in r.stderr
    r = run_cli("tune", "-m", tiny_model, "--ram", "1GiB", "--time-limit", "5 parsecs", "-o", tmp_path / "x.yaml")
    assert r.code == 2 and "--time-limit" in r.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_short_time_limit_is_kept(tiny_model, realistic_trace, tmp_path, llama_cpp):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "flashmoe", "tune", "-m", tiny_model, "--ram", str(budget_for(tiny_model, 5)),
                        "--trace", realistic_trace, "--time-limit", "8s", "-o", str(tmp_path / "x.yaml"),
                        "--gen-tokens", "16", "--ctx", str(N_CTX), "--threads", "1"],
                       capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                       env={**os.environ, "PYTHONPATH": REPO_ROOT})
    wall = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert wall < 8 + 6  # the limit, plus the interpreter start and the writing
    assert "# measured: " in (tmp_path / "x.yaml").read_text()


def test_ctrl_c_writes_nothing(tiny_model, realistic_trace, tmp_path, llama_cpp):
    out, rep = tmp_path / "x.yaml", tmp_path / "x.md"
    p = subprocess.Popen([sys.executable, "-m", "flashmoe", "tune", "-m", tiny_model, "--ram",
                          str(budget_for(tiny_model, 5)), "--trace", realistic_trace, "--time-limit", "60s", "-o", str(out),
                          "--report", str(rep), "--gen-tokens", "64", "--ctx", str(N_CTX), "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": REPO_ROOT, "FLASHMOE_TUNE_TEST_PAUSE": "20"},
                         start_new_session=True,
                         # Ctrl-C must reach Python's handler even if this test process ignores SIGINT
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []

    def read():
        for line in p.stderr:
            seen.append(line)

    th = threading.Thread(target=read, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not any("compute:" in l for l in seen) and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the tuner's pause (FLASHMOE_TUNE_TEST_PAUSE)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    p.wait(timeout=60)
    th.join(timeout=5)
    assert p.returncode == 130, "".join(seen)[-2000:]
    assert "interrupted: nothing written" in "".join(seen)
    assert not out.exists() and not rep.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary file left


# ------------------------------------------------------------------------------------------- units


def test_parse_duration():
    from flashmoe.errors import UsageError
    from flashmoe.tune import parse_duration

    assert parse_duration("10m") == 600 and parse_duration("90s") == 90 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45  # plain numbers are seconds
    for bad in ("", "m", "-5m", "3 weeks", "10x", "0s", "0", "-5", "nan", "inf"):
        with pytest.raises(UsageError):
            parse_duration(bad)


def test_policy_text_round_trips(tiny_model):
    from flashmoe.policy import load_policy
    from flashmoe.sizes import MiB
    from flashmoe.tune import Candidate, policy_text, resolve_text

    base = load_policy("stream")
    for c in (Candidate("a", "cache", slots=3, eviction="lfru", readers=8, direct_io=True),
              Candidate("b", "pagecache", readers=2),
              Candidate("c", "cache", slots=4, eviction="lru", readers=4, direct_io=False, overhead=64 * MiB)):
        text = policy_text(base, c, budget=1 << 30, n_ctx=N_CTX, threads=2, header=["hello", ""])
        assert text.startswith("# hello\n#\nversion: 1")
        s = resolve_text(text, tiny_model, None).engine_settings()
        assert s.stream.mode == c.mode and s.stream.readers == c.readers and s.runtime.n_ctx == N_CTX
        assert s.memory_budget == 1 << 30 and s.runtime.n_threads == 2
        if c.mode == "cache":
            assert (s.stream.cache_slots, s.stream.eviction, s.stream.direct_io) == (c.slots, c.eviction, c.direct_io)
    assert "overhead: 64MiB" in policy_text(base, c, budget=None, n_ctx=N_CTX, threads=None)


def _facts(n_layer, n_expert, n_used, expert_bytes):
    """ModelFacts of a model (no file) whose layers each hold one expert tensor of expert_bytes per expert."""
    from flashmoe.tune import ModelFacts
    from gguf_tools.reader import GGUFModel, TensorInfo

    tensors = [TensorInfo(f"blk.{l}.ffn_down_exps.weight", 1, "F16", (1, 1, n_expert), expert_bytes * n_expert, 0, 0,
                          layer=l, is_expert=True, expert_kind="down", expert_stride=expert_bytes)
               for l in range(n_layer)]
    return ModelFacts.of(GGUFModel(path="m", files=["m"], arch="qwen3moe", metadata={}, alignment=[32],
                                   tensors=tensors, n_layer=n_layer, n_expert=n_expert, n_expert_used=n_used))


def test_per_layer_splits_stay_within_the_bytes():
    from flashmoe.trace import gen_realistic
    from flashmoe.tune import greedy_split, proportional_split, size_grid, working_set
    from flashmoe.tune.simulate import engine_ubatches, simulate

    tr = gen_realistic([0, 1, 2, 3], 32, 4, 200, seed=2)
    mf = _facts(4, 32, 4, 1000)
    assert mf.moe_layers == [0, 1, 2, 3] and mf.bytes_per_slot == 4000 and mf.last_layer == 3
    ubs = engine_ubatches(16, 150)
    ws = working_set(tr, ubs, mf)
    assert all(4 <= v <= 32 for v in ws.values())
    cache_bytes = 4 * 10 * 1000  # 10 slots per layer
    alloc = proportional_split(ws, mf, cache_bytes)
    assert sum(alloc.values()) * 1000 <= cache_bytes and min(alloc.values()) >= 4
    grid = size_grid(4, 32, [10])
    curves = {s: simulate(tr, ubs, s, "lru", last_layer=3) for s in grid}
    g = greedy_split(curves, mf, cache_bytes)
    assert sum(g.values()) * 1000 <= cache_bytes
    uniform = curves[10].total("decode")["misses"]
    assert simulate(tr, ubs, g, "lru", last_layer=3).total("decode")["misses"] <= uniform


def _cand(name, mode="cache", ev="lru", d=True, slots=10, pred=1.0, meas=None, prefill=1.0, status="ok"):
    from flashmoe.bench import RunRecord
    from flashmoe.tune import Candidate, ValidationRun

    c = Candidate(name, mode, slots=slots, eviction=ev, direct_io=d)
    c.prediction = {"decode_tok_s": pred, "prefill_tok_s": 1.0}
    if meas is not None:
        c.runs = [ValidationRun(RunRecord("ok"))]
        c.measured = {"runs": 1, "decode_tok_s": meas, "decode_min": meas, "decode_max": meas,
                      "prefill_tok_s": prefill, "decode_hit_rate": 0.5}
    elif status != "ok":
        c.runs = [ValidationRun(RunRecord(status, detail="killed"))]
    return c


def test_pick_for_validation_covers_the_alternatives():
    from flashmoe.tune import pick_for_validation

    cands = [_cand("a", d=False, pred=5), _cand("b", d=False, ev="lfru", pred=4.9), _cand("c", pred=4.5),
             _cand("p", mode="pagecache", d=False, pred=4), _cand("e", slots=8, pred=3)]
    assert [c.name for c in pick_for_validation(cands, 3)] == ["a", "c", "p"]  # other I/O mode, other mode
    assert [c.name for c in pick_for_validation(cands, 4)] == ["a", "b", "c", "p"]
    assert pick_for_validation(cands, 0) == []


def test_choose_by_measured_decode_then_prefill():
    from flashmoe.errors import FlashMoEError
    from flashmoe.tune import choose_winner

    a, b = _cand("a", meas=10.0, prefill=5), _cand("b", ev="lfru", meas=10.1, prefill=9)
    c = _cand("c", mode="pagecache", meas=7.0)
    w, why = choose_winner([a, b, c], [a, b, c])
    assert w is b and "+" in why  # b is faster
    b.measured["decode_tok_s"] = 9.9  # within 2%: the better prefill wins
    w, why = choose_winner([a, b, c], [a, b, c])
    assert w is b and "prefilled faster" in why
    # nothing measured (time): the best prediction that was not killed
    x, y = _cand("x", pred=9, status="OOM"), _cand("y", pred=8)
    w, why = choose_winner([x], [x, y])
    assert w is y and "not killed" in why and "not measured" in why
    with pytest.raises(FlashMoEError, match="every validated configuration failed"):
        choose_winner([x], [x])
