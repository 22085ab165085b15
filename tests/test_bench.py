"""`flashmoe bench`: real worker processes, real memory cgroups, small models.

Every bench here runs through the CLI (`python -m flashmoe bench ...`), so exit codes, stderr and
the JSON are what a user gets. Runs are short (a few tokens of a few-MB model); timings are not
checked, only what the bench reports about them.
"""
from __future__ import annotations

import json
import os

import pytest

from flashmoe import bench as B

pytestmark = pytest.mark.slow  # real worker processes under memory cgroups

SMALL_STREAM = """\
version: 1
name: small-stream
rules:
  - match: "blk.*.ffn_{gate,up,down}_exps.weight"
    place: stream
  - match: "*"
    place: pin
expert_cache:
  mode: cache
  cache_slots: 4
  readers: 2
  direct_io: true
runtime:
  overhead: 16MiB
"""

# the same with one expert per token instead of the model's two: the output must be flagged
K1 = SMALL_STREAM.replace("name: small-stream", "name: k1").replace("  overhead: 16MiB", "  overhead: 16MiB\n  experts_per_token: 1")


def _cgroup_or_skip():
    from flashmoe import cgroup
    from flashmoe.errors import FlashMoEError

    try:
        cgroup.detect()
    except FlashMoEError as e:
        pytest.skip(f"no memory cgroup here: {e}")


def _table(stdout: str):
    """The markdown table of the report: {(config, budget): cells}."""
    rows = [l for l in stdout.splitlines() if l.startswith("|")]
    head = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for l in rows[2:]:
        cells = [c.strip() for c in l.strip("|").split("|")]
        out[(cells[0], cells[1])] = dict(zip(head, cells))
    return head, out


@pytest.fixture(scope="module")
def bench_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    (d / "cache").mkdir()
    (d / "small-stream.yaml").write_text(SMALL_STREAM)
    (d / "k1.yaml").write_text(K1)
    return {"dir": d, "env": {"XDG_CACHE_HOME": str(d / "cache")}}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """98 MiB: 4 layers of 16 F16 experts, 2 used (the tiny preset's shape, bigger experts)."""
    from gguf_tools.synth import make_spec, synth_model

    path = str(tmp_path_factory.mktemp("bench_small") / "small.gguf")
    synth_model(path, make_spec("qwen3moe", "tiny", seed=0, n_expert=16, n_ff_exp=1024, expert_type="F16"),
                progress=False)
    return path


@pytest.fixture(scope="module")
def alternation_run(tiny_model, bench_env, llama_cpp):
    """One unconfined bench: two policies (one with an experts-per-token override) and stock-mmap, 2 rounds."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    d = bench_env["dir"]
    js = d / "alt.json"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, **bench_env["env"])
    p = subprocess.run([sys.executable, "-m", "flashmoe", "bench", "-m", tiny_model,
                        "--policy", str(d / "small-stream.yaml"), "--policy", str(d / "k1.yaml"),
                        "--vs", "stock-mmap", "-p", "8", "-n", "6", "--repeat", "2", "--threads", "1",
                        "--json-out", str(js)], capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert p.returncode == 0, p.stderr
    return p.stdout, p.stderr, json.loads(js.read_text())


def test_alternation_order_and_repeats(alternation_run):
    _out, err, doc = alternation_run
    order = [r["config"] for r in doc["runs"]]
    assert order == ["small-stream", "k1", "stock-mmap"] * 2
    assert [r["round"] for r in doc["runs"]] == [1, 1, 1, 2, 2, 2]
    assert [r["seq"] for r in doc["runs"]] == list(range(1, 7))
    assert all(r["status"] == "ok" for r in doc["runs"])
    for s in doc["summary"]:
        assert s["runs"] == 2 and s["counts"] == {"ok": 2}
        assert s["metrics"]["decode_tok_s"]["n"] == 2
    # the progress log on stderr is in the same order
    lines = [l for l in err.splitlines() if l.startswith("[")]
    assert [l.split("]")[1].split()[0] for l in lines] == order


def test_json_fields_and_table_agree(alternation_run):
    out, _err, doc = alternation_run
    m = doc["machine"]
    for k in ("cpu", "cores", "ram_bytes", "os", "kernel", "disk"):
        assert k in m
    assert doc["model"]["arch"] == "qwen3moe" and doc["model"]["n_expert"] == 8
    assert doc["bench"]["prompt_tokens"] == 8 and doc["bench"]["gen_tokens"] == 6 and doc["bench"]["repeat"] == 2
    assert doc["disk"]["ok"] and [d["qd"] for d in doc["disk"]["depths"]] == [1, 4, 8]
    assert doc["reference"]["status"] == "ok" and len(doc["reference"]["tokens"]) == 6
    assert all(p["settings"]["runtime"]["n_threads"] == 1 for p in doc["plans"])
    for r in doc["runs"]:
        for k in B.METRICS + ("decode_tokens", "generated_tokens"):
            assert k in r["metrics"]
        assert r["metrics"]["generated_tokens"] == 6 and r["metrics"]["decode_tokens"] == 5
        assert r["peak_bytes"] and r["metrics"]["load_s"] > 0 and r["metrics"]["decode_tok_s"] > 0
        assert len(r["tokens"]) == 6
    head, table = _table(out)
    assert head == B.TABLE_HEADERS
    assert len(table) == len(doc["summary"])
    for s in doc["summary"]:
        row = table[(s["config"], s["budget_text"])]
        assert list(row.values()) == B.table_row(s)
        dec = s["metrics"]["decode_tok_s"]
        assert row["decode tok/s"] == f"{dec['median']:.2f}"
        assert row["decode min-max"] == f"{dec['min']:.2f}-{dec['max']:.2f}"
        assert row["peak MiB"] == f"{s['metrics']['peak_mib']['median']:.0f}"
    # streaming runs have cache figures and an I/O bound; the stock run has none
    st = next(s for s in doc["summary"] if s["config"] == "small-stream")
    assert st["metrics"]["hit_rate"] is not None and st["metrics"]["stall_ms_per_token"] is not None
    assert st["metrics"]["io_bound_tok_s"] is not None
    # the bound comes from the engine's own reads (the time its reader pool was busy): never exceeded
    for r in doc["runs"]:
        if r["config"] == "small-stream" and r.get("metrics"):
            m = r["metrics"]
            assert m["io_bound_source"] == "engine reads" and 0 < m["io_fraction"] <= 1.0, m
    sm = next(s for s in doc["summary"] if s["config"] == "stock-mmap")
    assert sm["metrics"]["hit_rate"] is None and table[("stock-mmap", "none")]["hit %"] == "-"
    assert "Modes:" in out and "streaming experts: explicit cache, 4 slots/layer" in out


def test_identical_check_flags_other_experts_per_token(alternation_run):
    out, _err, doc = alternation_run
    by = {s["config"]: s for s in doc["summary"]}
    assert by["small-stream"]["identical"] is True
    assert by["stock-mmap"]["identical"] is True
    assert by["k1"]["identical"] is False
    _head, table = _table(out)
    assert table[("small-stream", "none")]["identical"] == "yes"
    assert table[("k1", "none")]["identical"].startswith("NO (token ")
    assert "EXPERTS PER TOKEN OVERRIDDEN: 1 of 2" in by["k1"]["mode_line"]


def test_limit_confines_and_oom_is_reported(small_model, bench_env, run_cli, llama_cpp):
    """98 MiB of experts under a 96 MiB limit: reading the model into RAM is killed (OOM, a row of the
    table, not a crash); the streaming policy and the page-cache baseline run inside the limit."""
    _cgroup_or_skip()
    d = bench_env["dir"]
    js = d / "oom.json"
    limit = 96 * B.MiB
    r = run_cli("bench", "-m", small_model, "--policy", d / "small-stream.yaml", "--vs", "stock-no-mmap",
                "--vs", "stock-mmap", "--ram-limit", "96MiB", "-p", "8", "-n", "4", "--repeat", "1",
                "--threads", "1", "--json-out", js, env=bench_env["env"])
    assert r.code == 0, r.stderr
    doc = json.loads(js.read_text())
    by = {s["config"]: s for s in doc["summary"]}
    assert by["stock-no-mmap"]["status"] == "OOM"
    run = next(x for x in doc["runs"] if x["config"] == "stock-no-mmap")
    assert run["oom_killed"] and "memory limit" in run["detail"]
    assert run["peak_bytes"] <= limit
    for name in ("small-stream", "stock-mmap"):
        assert by[name]["status"] == "ok", by[name]
        assert by[name]["identical"] is True
        assert by[name]["metrics"]["peak_mib"]["max"] * B.MiB <= limit
    assert doc["bench"]["cgroup"] in ("v1", "v2", "systemd")
    _head, table = _table(r.stdout)
    assert table[("stock-no-mmap", "96 MiB")]["status"] == "OOM 1/1"
    assert "killed by the 96 MiB memory limit" in r.stdout


def test_no_cgroup_clear_error(tiny_model, tmp_path, run_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("bench", "-m", tiny_model, "--vs", "stock-mmap", "--ram-limit", "64MiB", "-n", "2",
                env={"FLASHMOE_CGROUP_ROOT": str(empty), "XDG_CACHE_HOME": str(tmp_path)})
    assert r.code != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --ram-limit needs a memory cgroup")
    assert "cgroup v2" in lines[0] or "systemd-run" in lines[0]


def test_timeout_is_reported_with_progress(tiny_model, bench_env, run_cli, llama_cpp):
    js = bench_env["dir"] / "timeout.json"
    r = run_cli("bench", "-m", tiny_model, "--vs", "stock-mmap", "-p", "8", "-n", "30000", "--repeat", "1",
                "--threads", "1", "--run-timeout", "3", "--no-reference", "--no-disk", "--json-out", js,
                env=bench_env["env"])
    assert r.code == 0, r.stderr
    doc = json.loads(js.read_text())
    run = doc["runs"][0]
    assert run["status"] == "TIMEOUT" and run["timed_out"]
    assert run["progress"]["load_s"] is not None and run["progress"]["generated"] > 1
    assert "killed after 3 s" in run["detail"] and "/30000 tokens generated" in run["detail"]
    _head, table = _table(r.stdout)
    row = table[("stock-mmap", "none")]
    assert row["status"] == "TIMEOUT 1/1" and row["decode tok/s"].endswith("(partial)")


def test_forced_trace_and_cached_reference(tiny_model, bench_env, run_cli, llama_cpp, tmp_path):
    from flashmoe.trace import trace_for_model, write_trace

    tr = str(tmp_path / "real.trace")
    write_trace(tr, trace_for_model(tiny_model, "realistic", 64, seed=1))
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    docs = []
    for out in (["--json-out", tmp_path / "t0.json"], ["--json"]):  # to a file (and the report), then on stdout
        r = run_cli("bench", "-m", tiny_model, "--policy", bench_env["dir"] / "small-stream.yaml",
                    "--policy", bench_env["dir"] / "k1.yaml", "--vs", "stock-mmap", "--routing-trace", tr,
                    "-p", "8", "-n", "4", "--repeat", "1", "--threads", "1", "--no-disk", *out, env=env)
        assert r.code == 0, r.stderr
        docs.append(json.loads((tmp_path / "t0.json").read_text() if len(out) == 2 else r.stdout))
    assert "routing: forced from real.trace (64 tokens: next-token reuse" not in r.stdout  # --json: JSON alone
    assert docs[0]["reference"]["cached"] is False and docs[1]["reference"]["cached"] is True
    assert docs[0]["reference"]["tokens"] == docs[1]["reference"]["tokens"]
    by = {s["config"]: s for s in docs[1]["summary"]}
    assert by["small-stream"]["identical"] is True and by["stock-mmap"]["identical"] is True
    assert "routing forced from trace real.trace" in by["small-stream"]["mode_line"]
    assert docs[1]["bench"]["routing_trace"]["stats"]["tokens"] == 64
    # one expert per token cannot replay a two-expert trace: that run fails alone, the bench goes on
    assert by["k1"]["status"] == "FAILED" and "routing trace does not fit" in by["k1"]["detail"]
    assert "routing: forced from real.trace (64 tokens: next-token reuse" in B.format_markdown(docs[1])


def test_sweep_and_plot(tiny_model, bench_env, run_cli, llama_cpp, tmp_path):
    _cgroup_or_skip()
    pytest.importorskip("matplotlib")
    png, js = tmp_path / "sweep.png", tmp_path / "sweep.json"
    r = run_cli("bench", "-m", tiny_model, "--policy", bench_env["dir"] / "small-stream.yaml", "--vs", "stock-mmap",
                "--sweep-ram", "128MiB,256MiB", "-p", "8", "-n", "4", "--repeat", "1", "--threads", "1",
                "--no-disk", "--json-out", js, "--plot", png, env=bench_env["env"])
    assert r.code == 0, r.stderr
    doc = json.loads(js.read_text())
    assert [(s["config"], s["budget"]) for s in doc["summary"]] == [
        ("small-stream", 128 * B.MiB), ("stock-mmap", 128 * B.MiB), ("small-stream", 256 * B.MiB),
        ("stock-mmap", 256 * B.MiB)]
    assert [(x["config"], x["budget"]) for x in doc["runs"]] == [(s["config"], s["budget"]) for s in doc["summary"]]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_usage_errors(tiny_model, run_cli):
    r = run_cli("bench", "-m", tiny_model, "--ram-limit", "1GiB", "--sweep-ram", "1GiB,2GiB")
    assert r.code == 2 and "not both" in r.stderr
    r = run_cli("bench", "-m", tiny_model, "--vs", "stok")
    assert r.code == 2 and "unknown --vs 'stok'" in r.stderr
    r = run_cli("bench", "-m", tiny_model, "--plot", "x.png")
    assert r.code == 2 and "--sweep-ram" in r.stderr
    r = run_cli("bench", "-m", tiny_model, "--json", "out.json")  # --json is a flag: the file is --json-out
    assert r.code == 2 and "out.json" in r.stderr


def test_expand_vs():
    assert B.expand_vs(["stock"]) == ["stock", "stock-mmap", "stock-no-mmap", "stock-lazy", "stock-n-cpu-moe",
                                      "stock-ot-exps-cpu"]
    assert B.expand_vs(["stock-mmap", "stock"])[0] == "stock-mmap"
    assert B.expand_vs(["none"]) == []


def test_gpu_baselines_by_platform(tiny_model, monkeypatch):
    """The two `-ot exps=CPU` baselines: not applicable on a CPU build (this machine); on a GPU build
    (faked: the detection is what differs) every routed expert stays in host memory and the rest goes to
    the GPU, unrepacked on the mmap for stock-n-cpu-moe, loaded and repacked as llama.cpp's own
    -ot exps=CPU does for stock-ot-exps-cpu."""
    from flashmoe.bench import configs as C
    from gguf_tools.reader import open_model

    opts = B.BenchOptions(model=tiny_model, vs=["stock-n-cpu-moe", "stock-ot-exps-cpu"])
    with open_model(tiny_model) as m:
        monkeypatch.setattr(C, "detect_gpu_backend", lambda: None)
        cpu = C.build_configs(opts, m)
        monkeypatch.setattr(C, "detect_gpu_backend", lambda: "cuda")
        gpu = C.build_configs(opts, m)
        experts = {t.name for t in m.tensors if t.is_expert}
        names = {t.name for t in m.tensors}
    assert [c.applicable for c in cpu] == [False, False] and all("CPU builds" in c.reason for c in cpu)
    by = {c.name: c for c in gpu}
    assert all(c.applicable for c in gpu) and experts
    for name, place, repack in (("stock-n-cpu-moe", "mmap", False), ("stock-ot-exps-cpu", "ram", True)):
        c = by[name]
        assert c.stock["use_extra_bufts"] is repack
        assert {n for n, p in c.placements.items() if p == place} == experts
        assert {n for n, p in c.placements.items() if p == "gpu"} == names - experts


def test_disk_measurement(tiny_model):
    d = B.disk_test(tiny_model, reads=32)
    assert d.ok, d
    assert [x.qd for x in d.depths] == [1, 4, 8]
    assert all(x.bytes >= x.reads * d.slice_bytes for x in d.depths)
    bw, qd = B.disk_bw_for(d, 4)
    assert qd == 4 and bw > 0
    assert B.measure_disk(tiny_model, depths=(1,), reads=16)["depths"][0]["qd"] == 1  # the JSON form
    buffered = B.disk_test(tiny_model, direct=False, depths=(2,), reads=16, seed=1)
    assert buffered.ok and buffered.direct is False and buffered.read_bytes == buffered.slice_bytes
    assert buffered.depths[0].evicted is not None and "evicted" in buffered.depths[0].to_dict()
    assert B.DiskMeasurement.from_dict(d.to_dict()) == d


def test_expert_offset_sampler_stays_inside_the_file(tiny_model):
    import random

    s = B.ExpertSlices.of_model(tiny_model)
    page = 4096
    offs = s.sample(random.Random(0), 200, align=page, read_len=s.slice_bytes + page)
    assert all(off % page == 0 and off + s.slice_bytes + page <= s.sizes[fi] for fi, off in offs)
    exact = s.sample(random.Random(0), 50)
    starts = {t.data_offset + e * t.expert_stride for t in s.tensors for e in range(t.nbytes // t.expert_stride)}
    assert all(off in starts for _, off in exact)


def test_realistic_trace_calibration():
    """On B1's shape (128 experts, 8 used): ~45% next-token reuse, an LRU of 40% of the experts hits 90-95%."""
    from flashmoe.trace import gen_realistic, trace_stats

    s = trace_stats(gen_realistic(list(range(6)), 128, 8, 512, seed=0))
    assert 0.42 <= s["next_token_reuse"] <= 0.49
    assert 0.90 <= s["lru_hit_rate"]["40%"] <= 0.96
    assert 0.74 <= s["reuse_within_8"] <= 0.84


def test_gpu_runs_are_compared_with_a_stock_run_on_the_gpu_at_their_ubatch():
    """On a GPU build a run that places tensors on the GPU computes with the GPU's kernels: its reference is
    stock with every tensor on the GPU, at the run's ubatch (a device expert cache lowers it to slots // k);
    CPU runs keep the CPU reference by weight repacking. Platform faked: this machine has no GPU."""
    from flashmoe.bench.reference import key_name, reference_desc, reference_key, reference_settings
    from flashmoe.settings import EngineSettings, RuntimeSettings, StreamSettings

    names = ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_up_exps.weight"]
    gpu_dense = EngineSettings(policy_name="gpu-dense", stream=StreamSettings(mode="cache", cache_slots=53),
                               runtime=RuntimeSettings(n_batch=512, n_ubatch=512, use_extra_bufts=False),
                               placements={names[0]: "pin", names[1]: "gpu", names[2]: "stream"})
    cpu = EngineSettings(policy_name="stream", stream=StreamSettings(mode="cache", cache_slots=53),
                         runtime=RuntimeSettings(use_extra_bufts=True),
                         placements={names[0]: "pin", names[1]: "pin", names[2]: "stream"})
    assert reference_key(gpu_dense, "gpu", 128, 8) == (False, 6)  # 53 slots // 8 experts per token
    assert reference_key(gpu_dense, None, 128, 8) == (False, None)  # a CPU build ignores gpu placements
    assert reference_key(cpu, "gpu", 128, 8) == (True, None)
    # a cache that holds every expert needs no lower ubatch
    gpu_dense.stream.cache_slots = 128
    assert reference_key(gpu_dense, "gpu", 128, 8) == (False, 512)
    s = reference_settings(256, 16, False, 6, names)
    assert s.placements == {n: "gpu" for n in names} and s.stream.mode == "off"
    assert s.runtime.n_ubatch == 6 and s.runtime.n_batch == 512 and not s.runtime.use_extra_bufts
    assert reference_settings(256, 16, True).placements == {}
    assert key_name((False, 6)) == "gpu-ubatch-6" and key_name((True, None)) == "repack"
    assert "every tensor on the GPU, ubatch 6" in reference_desc(False, 6)
