"""bench, tune, quantize and quality on every MoE family of the arch registry (issue 17), through the CLI
(``python -m flashmoe ...``: exit codes, stderr and JSON as a user gets them), on the tiny synthesized
model of each family (deepseek2, glm4moe, gpt-oss, llama = Mixtral, llama4, olmoe, granitemoe):

* generate: every shipped policy gives the same tokens, the streaming ones stream the routed layers;
* quantize: Q2_K experts (gpt-oss: from MXFP4) and Q8_0 dense weights; the routers, norms and biases keep
  their precision; the output loads in stock llama.cpp and a streamed run through a 2-slot cache equals
  the in-RAM run (tokens and bit-identical logits); MXFP4 is requantized both ways; a family whose
  loader reads separate gate and up experts refuses ``--fuse-gate-up`` in one line;
* quality: the quantized model diverges measurably (KL > 0), the same file streamed through a 2-slot
  cache does not at all (KL 0, every top-1 equal);
* bench: a streamed configuration and a stock baseline in worker processes under forced uniform
  routing, both ``identical``, and the streamed run's per-layer cache counters are exactly the cache
  simulator's (the routed layers, the last-layer rule and the expert bytes of the family);
* tune: a tuned policy is written, validated with real runs under forced routing (the predicted decode
  hit rate is the measured one), one slot is one expert of every routed layer, and the policy loads and runs the model.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from conftest import write_uniform_traces
from flashmoe.sizes import format_size
from flashmoe.trace import model_last_layer, model_moe_layers, read_trace
from gguf_tools import archs
from gguf_tools.reader import open_model
from gguf_tools.synth import make_spec, synth_model

pytestmark = pytest.mark.slow  # worker processes (bench, tune), many loads per family

FAMILIES = ["deepseek2", "glm4moe", "gpt-oss", "llama", "llama4", "olmoe", "granitemoe"]
SEED = 0
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4

STREAM2 = """\
version: 1
name: stream-2
rules:
  - match: "blk.*.ffn_{gate,up,down,gate_up}_exps.weight"
    place: stream
  - match: "*"
    place: pin
expert_cache:
  mode: cache
  cache_slots: 2
  readers: 2
  direct_io: true
runtime:
  n_ctx: 256
  overhead: 16MiB
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("family_models")
    out = {}
    for arch in FAMILIES:
        p = str(d / f"tiny-{arch}.gguf")
        synth_model(p, make_spec(arch, "tiny", seed=SEED), progress=False)
        out[arch] = p
    return out


@pytest.fixture(scope="module")
def traces(models, tmp_path_factory):
    return write_uniform_traces(models, tmp_path_factory.mktemp("family_traces"), tokens=64)


@pytest.fixture(scope="module")
def stream2(tmp_path_factory):
    p = tmp_path_factory.mktemp("family_policies") / "stream-2.yaml"
    p.write_text(STREAM2)
    return str(p)


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    """{arch: path}: Q2_K experts, Q8_0 dense weights (gguf_tools.quantize, what the CLI calls)."""
    from gguf_tools.quantize import quantize

    d = tmp_path_factory.mktemp("family_quantized")
    out = {}
    for arch, src in models.items():
        out[arch] = str(d / f"{arch}-q2k.gguf")
        quantize(src, out[arch], experts="Q2_K", dense="Q8_0", threads=1)
    return out


def _run(path, n=16, **kw):
    from flashmoe.engine import Engine

    with Engine(path, use_extra_bufts=False, n_ctx=512, **kw) as e:
        g = e.generate(PROMPT, n, return_logits=True, stop_at_eos=False)
        return g, e.stats()


def _stream2():
    from flashmoe.settings import StreamSettings

    return StreamSettings(mode="cache", cache_slots=2, readers=2)


def _assert_streamed_equals_in_ram(path, moe):
    ref, ref_st = _run(path)
    got, st = _run(path, stream=_stream2())
    assert ref_st == {} and len(got.tokens) == 16 and got.tokens == ref.tokens
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(ref.logits, got.logits)) == 0.0
    assert all(np.isfinite(x).all() for x in ref.logits)
    assert [l["layer"] for l in st["layers"]] == moe and st["total"]["evictions"] > 0


# ----------------------------------------------------------------------------------------- generate

@pytest.mark.parametrize("arch", FAMILIES)
def test_generate_with_every_shipped_policy(run_cli, models, llama_cpp, arch):
    """Every shipped policy gives the same greedy tokens (the engine as `flashmoe generate --policy P` builds
    it; the stream policy through the CLI itself); the streaming ones stream exactly the routed layers."""
    from flashmoe.engine import Engine
    from flashmoe.policy import list_configs

    prompt = "Hello world, this is a test"
    names = list(list_configs())
    assert {"stock", "stock-mmap", "stream", "pagecache", "gpu-dense", "gpu-ram", "all-ram"} <= set(names)
    with open_model(models[arch]) as m:
        moe = model_moe_layers(m)
    tokens = {}
    for name in names:
        with Engine(models[arch], policy=name, use_extra_bufts=False) as e:
            g = e.generate(prompt, 12)
            tokens[name] = g.tokens
            mode, st = e.mode_line(), e.stats()
        assert len(g.tokens) == 12, (name, g.tokens)  # no early end of text: the comparison means something
        assert name.startswith("stock") or mode.startswith(f"policy {name}:"), mode
        if name in ("stream", "pagecache"):
            assert [l["layer"] for l in st["layers"]] == moe, name
    assert all(t == tokens["stock"] for t in tokens.values()), tokens
    r = run_cli("generate", "-m", models[arch], "-p", prompt, "-n", 12, "--policy", "stream", "--no-weight-repack",
                "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["tokens"] == tokens["stock"] and doc["report"]["mode"].startswith("policy stream:")
    assert [l["layer"] for l in doc["report"]["cache"]["layers"]] == moe


# ------------------------------------------------------------------------------------------ quantize

@pytest.mark.parametrize("arch", FAMILIES)
def test_quantize_each_family(run_cli, models, tmp_path, llama_cpp, arch):
    src = models[arch]
    out = str(tmp_path / f"{arch}-q.gguf")
    r = run_cli("quantize", src, "-o", out, "--experts", "Q2_K", "--dense", "Q8_0", "--threads", 1, "--no-progress",
                "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verified"] and doc["paths"] == [out] and set(doc["type_bytes"]) == {"Q2_K", "Q8_0"}
    assert doc["file_type_name"] == "MOSTLY_" + max(doc["type_bytes"], key=doc["type_bytes"].get)
    with open_model(src) as a, open_model(out) as b:
        src_types = {t.name: t.type_name for t in a.tensors}
        moe = model_moe_layers(a)
        assert {t.name for t in b.tensors} == set(src_types)
        for t in b.tensors:
            if t.is_expert:  # every routed expert, glm4moe's never-run next-token-prediction layer's included
                assert t.type_name == "Q2_K", t.name
            elif len(t.shape) < 2 or not t.name.endswith(".weight") or "_norm" in t.name \
                    or "ffn_gate_inp" in t.name:
                # 1-D tensors, gpt-oss's per-expert biases, routers, norms: copied at their precision
                assert t.type_name == src_types[t.name], t.name
                assert b.read_bytes(t) == a.read_bytes(a.tensor(t.name)), t.name
            else:  # attention (MLA's attn_k_b/attn_v_b too), shared experts, dense FFNs, embeddings, output
                assert t.type_name == "Q8_0", t.name
        for k, v in a.metadata.items():
            if not k.startswith(("general.file_type", "general.quantization_version", "general.alignment")):
                assert b.metadata.get(k) == v, k
        assert model_moe_layers(b) == moe and model_last_layer(b) == model_last_layer(a)
        assert archs.expert_bytes(b) == {l: 3 * 256 * 256 // 256 * 84 for l in moe}  # 3 Q2_K matrices/expert
    # llama.cpp loads it, and its experts stream exactly
    _assert_streamed_equals_in_ram(out, moe)


def test_quantize_mxfp4_both_ways(run_cli, models, tmp_path, llama_cpp):
    """gpt-oss's MXFP4 experts are dequantized by llama.cpp's own MXFP4 kernel and requantized (Q4_K), and
    a Q4_K model's experts are quantized to MXFP4 (Mixtral): both load and stream exactly."""
    cases = (("gpt-oss", "MXFP4", "Q4_K"), ("llama", "Q4_K", "MXFP4"))
    for arch, before, after in cases:
        out = str(tmp_path / f"{arch}-{after}.gguf")
        r = run_cli("quantize", models[arch], "-o", out, "--experts", after, "--no-progress")
        assert r.code == 0, r.stderr
        with open_model(models[arch]) as a, open_model(out) as b:
            assert {t.type_name for t in a.tensors if t.is_expert} == {before}
            assert {t.type_name for t in b.tensors if t.is_expert} == {after}
            moe = model_moe_layers(b)
        _assert_streamed_equals_in_ram(out, moe)
    # the MXFP4 round trip stays close to the original (a second rounding only)
    back = str(tmp_path / "gpt-oss-back.gguf")
    r = run_cli("quantize", str(tmp_path / "gpt-oss-Q4_K.gguf"), "-o", back, "--experts", "MXFP4", "--no-progress")
    assert r.code == 0, r.stderr
    r = run_cli("quality", "-m", models["gpt-oss"], "--vs", back, "--ctx", 64, "--tokens", 128, "--no-weight-repack",
                "--no-progress", "--json")
    assert r.code == 0, r.stderr
    assert 0 < json.loads(r.stdout)["kl_mean"] < 0.5


@pytest.mark.parametrize("arch", ["glm4moe", "gpt-oss", "llama", "llama4", "olmoe", "granitemoe"])
def test_quantize_fuse_gate_up_refused_where_llama_cpp_reads_separate_experts(run_cli, models, tmp_path, arch):
    out = tmp_path / "fused.gguf"
    r = run_cli("quantize", models[arch], "-o", out, "--experts", "Q4_K", "--fuse-gate-up", "--no-progress")
    assert r.code != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --fuse-gate-up: llama.cpp's ") and arch in lines[0]
    assert not out.exists()


def test_quantize_fuse_gate_up_deepseek2(run_cli, models, tmp_path, llama_cpp):
    """deepseek2's loader takes fused gate_up experts: quantized and fused, it streams exactly."""
    out = str(tmp_path / "ds-fused.gguf")
    r = run_cli("quantize", models["deepseek2"], "-o", out, "--experts", "Q4_K", "--fuse-gate-up", "--no-progress")
    assert r.code == 0, r.stderr
    with open_model(out) as m:
        assert {t.expert_kind for t in m.tensors if t.is_expert} == {"gate_up", "down"}
        moe = model_moe_layers(m)
    _assert_streamed_equals_in_ram(out, moe)


# ------------------------------------------------------------------------------------------- quality

@pytest.mark.parametrize("arch", FAMILIES)
def test_quality_each_family(run_cli, models, quantized, stream2, llama_cpp, arch):
    src = models[arch]
    common = ("--ctx", 64, "--tokens", 256, "--no-weight-repack", "--no-progress", "--json")
    r = run_cli("quality", "-m", src, "--vs", quantized[arch], *common)
    assert r.code == 0, r.stderr
    q = json.loads(r.stdout)
    assert q["n_scored"] == 4 * 31 and q["kl_mean"] > 0 and q["kl_max"] >= q["kl_p99"] >= q["kl_median"] >= 0
    assert math.isfinite(q["ppl_reference"]) and math.isfinite(q["ppl_candidate"]) and 0 <= q["top1_agreement"] <= 1
    # the same file with its experts streamed through 2 slots per layer: nothing changes
    r = run_cli("quality", "-m", src, "--policy", "stock", "--vs-policy", stream2, *common)
    assert r.code == 0, r.stderr
    s = json.loads(r.stdout)
    assert "2 slots/layer" in s["candidate_mode"]
    assert s["kl_max"] == 0.0 and s["top1_agreement"] == 1.0 and s["ppl_candidate"] == s["ppl_reference"]


# --------------------------------------------------------------------------------------------- bench

@pytest.mark.parametrize("arch", FAMILIES)
def test_bench_each_family(run_cli, models, traces, stream2, tmp_path, llama_cpp, arch):
    from flashmoe.tune.simulate import engine_ubatches, simulate

    src, tr = models[arch], traces[arch]
    js = tmp_path / "bench.json"
    r = run_cli("bench", "-m", src, "--policy", stream2, "--vs", "stock-mmap", "--routing-trace", tr, "-p", 16, "-n", 8,
                "--repeat", 1, "--threads", 1, "--no-disk", "--json-out", js, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert r.code == 0, r.stderr
    doc = json.loads(js.read_text())
    assert doc["model"]["arch"] == arch
    assert [x["config"] for x in doc["runs"]] == ["stream-2", "stock-mmap"]
    assert all(x["status"] == "ok" for x in doc["runs"]), [x.get("detail") for x in doc["runs"]]
    by = {s["config"]: s for s in doc["summary"]}
    assert by["stream-2"]["identical"] is True and by["stock-mmap"]["identical"] is True
    assert "| stream-2 " in r.stdout and "| stock-mmap " in r.stdout
    # the streamed run's cache, layer by layer, is the exact simulation of this family's routed layers
    cache = doc["runs"][0]["result"]["report"]["cache"]
    with open_model(src) as m:
        moe, last, eb = model_moe_layers(m), model_last_layer(m), archs.expert_bytes(m)
    assert cache["info"]["n_layers"] == len(moe) and cache["info"]["n_slots"] == 2
    assert cache["info"]["streamed_bytes"] == 8 * sum(eb.values())  # next-token-prediction experts not streamed
    sim = simulate(read_trace(tr), engine_ubatches(16, 8), 2, "lru", last_layer=last, expert_bytes=eb)
    assert [{k: l[k] for k in sim.layers[0].engine_view()} for l in cache["layers"]] == sim.engine_view()
    assert by["stream-2"]["metrics"]["hit_rate"]["median"] is not None


# ---------------------------------------------------------------------------------------------- tune

def _header_rates(text):
    pred = re.search(r"^# predicted: .*\(decode hit rate ([\d.]+)%\)", text, re.M)
    meas = re.search(r"^# measured: .* decode hit rate ([\d.]+)%", text, re.M)
    assert pred and meas, text[:2000]
    return float(pred.group(1)), float(meas.group(1))


@pytest.mark.parametrize("arch", FAMILIES)
def test_tune_each_family(run_cli, models, traces, tmp_path, llama_cpp, arch):
    """Tuned on a forced uniform routing trace (its validation runs force it too, so the hook's hit rate is
    the exact simulation's)."""
    src = models[arch]
    out, rep = tmp_path / "tuned.yaml", tmp_path / "tune.md"
    r = run_cli("tune", "-m", src, "--ram", "512MiB", "--trace", traces[arch], "-o", out, "--report", rep,
                "--time-limit", "120s", "--ctx", 256,
                "--prompt-tokens", 16, "--gen-tokens", 8, "--validate", 1, "--repeat", 1, "--readers", 2, "--threads", 1,
                "--no-plot", timeout=600)
    assert r.code == 0, r.stderr
    text = out.read_text()
    pred, meas = _header_rates(text)
    assert pred == meas  # the simulator knows this family: the hook's measured hit rate is the predicted one
    with open_model(src) as m:
        moe, eb = model_moe_layers(m), archs.expert_bytes(m)
        report = rep.read_text()
        assert f"| one slot in every MoE layer | {format_size(sum(eb.values()))} |" in report
        assert f"{len(moe)} MoE layers" in r.stderr
    # the tuned policy resolves for the model and runs it: the same tokens as stock llama.cpp
    r = run_cli("policy", "show", out, "-m", src, "--json")
    assert r.code == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["expert_cache"]["streamed_layers"] == len(moe)
    assert shown["expert_cache"]["bytes_per_slot_all_layers"] == sum(eb.values())
    tuned, _ = _run(src, policy=str(out))
    stock, _ = _run(src, policy="stock")
    assert tuned.tokens == stock.tokens


def test_families_cover_the_registry():
    assert sorted(FAMILIES + ["qwen3moe", "qwen2moe", "qwen35moe"]) == sorted(archs.names())
