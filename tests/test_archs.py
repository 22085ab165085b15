"""The MoE families of the arch registry (gguf_tools/archs/): each synthesized the way llama.cpp's loader
expects, loaded and run by stock llama.cpp, and streamed exactly.

Per family (deepseek2, glm4moe, gpt-oss, llama = Mixtral, llama4, olmoe, granitemoe):

(a) the tiny synthesized file carries the family's features (metadata, tensors, types) and a stock
    llama.cpp load of it (``llama_cpp.Llama``) succeeds and generates finite logits;
(b) streamed == in RAM: 64 greedy tokens identical and every step's logits bit-identical
    (max-abs-diff 0, same kernels: ``use_extra_bufts=False``), with the model's own routing and with
    routing forced from a uniform trace, through a cache of 2-3 slots per layer: evictions and prefill
    waves happen (checked from ``Engine.stats()``);
(c) only the layers that route are hooked: leading dense layers (deepseek2, glm4moe), dense layers
    between MoE layers (llama4) and glm4moe's next-token-prediction layer have no stats entry, are not
    streamed and have no cache; the bytes read are exactly the routed experts' (trace + last-layer rule
    from the registry); the nextn layer is never read nor used (its bytes overwritten with NaN-making
    garbage change nothing).
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from conftest import generate_greedy, last_logits, write_uniform_traces
from flashmoe.trace import model_last_layer, model_moe_layers, read_trace
from gguf_tools import archs
from gguf_tools.reader import open_model
from gguf_tools.synth import make_spec, plan_tensors, synth_model

pytestmark = pytest.mark.slow  # ten architectures, each streamed and replayed

NEW_ARCHES = ["deepseek2", "glm4moe", "gpt-oss", "llama", "llama4", "olmoe", "granitemoe"]
# what the registry must say about the tiny presets: (block_count, MoE layers, last layer computing only outputs)
EXPECT = {
    "deepseek2": (4, [1, 2, 3], 3),  # layer 0: leading dense
    "glm4moe": (5, [1, 2, 3], 3),  # layer 0: leading dense; layer 4: next-token prediction (never runs)
    "gpt-oss": (4, [0, 1, 2, 3], None),  # its last layer computes every row
    "llama": (4, [0, 1, 2, 3], 3),
    "llama4": (4, [1, 3], 3),  # interleave step 2: layers 0 and 2 dense
    "olmoe": (4, [0, 1, 2, 3], 3),
    "granitemoe": (4, [0, 1, 2, 3], 3),
}
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # ~300 tokens: prefill touches every expert
N_GEN = 64
SEED = 0


@pytest.fixture(scope="module")
def arch_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("arch_models")
    out = {}
    for arch in NEW_ARCHES:
        p = str(d / f"tiny-{arch}.gguf")
        synth_model(p, make_spec(arch, "tiny", seed=SEED), progress=False)
        out[arch] = p
    return out


@pytest.fixture(scope="module")
def uniform_traces(arch_models, tmp_path_factory):
    return write_uniform_traces(arch_models, tmp_path_factory.mktemp("arch_traces"))


def _run(path, n=N_GEN, prompt=LONG_PROMPT, **kw):
    from flashmoe.engine import Engine

    with Engine(path, use_extra_bufts=False, n_ctx=1024, **kw) as e:
        g = e.generate(prompt, n, return_logits=True, stop_at_eos=False)
        return g, e.stats()


def _max_diff(a, b):
    assert len(a.logits) == len(b.logits) == N_GEN
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a.logits, b.logits))


def _stream(slots=2, **kw):
    from flashmoe.settings import StreamSettings

    return StreamSettings(mode="cache", cache_slots=slots, readers=2, **kw)


def _expert_bytes(path, layers):
    """Per layer: bytes of one expert (all its slices); and the routed experts' total bytes and tensor count."""
    with open_model(path) as m:
        per = {}
        total = count = 0
        for t in m.tensors:
            if t.is_expert and t.layer in layers:
                per[t.layer] = per.get(t.layer, 0) + t.expert_stride
                total += t.nbytes
                count += 1
    return per, total, count


def _check_waves_and_layers(arch, st, forced):
    n_layer, moe, last = EXPECT[arch]
    layers = st["layers"]
    # (c) the hook's per-layer stats list exactly the MoE layers that run: no leading dense layer, no dense
    # layer in between, no next-token-prediction layer
    assert [l["layer"] for l in layers] == moe, (arch, [l["layer"] for l in layers])
    assert st["info"]["n_layers"] == len(moe)
    assert st["total"]["evictions"] > 0 and st["total"]["misses"] > 0
    for l in layers:
        assert l["n_slots"] in (2, 3) and l["evictions"] > 0, (arch, l)
        # one prefill ubatch + N_GEN - 1 decode steps; a layer that computed the whole prompt needed several
        # waves for it (the prompt touches more experts than the cache holds)
        if l["layer"] != last:
            assert l["n_waves"] > N_GEN, (arch, l)
            assert l["n_tokens"] > l["n_waves"], (arch, l)
        else:
            assert l["n_waves"] >= N_GEN, (arch, l)
        if forced:  # uniform routing over a small cache: evictions on most tokens
            assert l["evictions"] >= N_GEN // 4, (arch, l)
    assert st["total"]["n_waves"] > N_GEN * len(layers)


# --------------------------------------------------------------------------------------- registry

def test_registry_names_and_aliases():
    names = archs.names()
    for a in ["qwen3moe", "qwen2moe", "qwen35moe"] + NEW_ARCHES:
        assert a in names
        assert archs.get(a).name == a
    assert archs.get("mixtral").name == "llama" and archs.get("MIXTRAL").name == "llama"
    with pytest.raises(Exception, match="unknown arch 'falcon'"):
        archs.get("falcon")
    for a in archs.all_archs():
        assert a.family and "tiny" in a.presets, a.name


@pytest.mark.parametrize("arch", NEW_ARCHES)
def test_tiny_spec_routing_facts(arch):
    s = make_spec(arch, "tiny", seed=SEED)
    n_layer, moe, last = EXPECT[arch]
    assert s.n_layer == n_layer and s.moe_layers == moe
    assert s.arch_def.last_layer(s) == last
    plan = plan_tensors(s)
    expert_layers = sorted({p.layer for p in plan if p.is_expert})
    # every MoE layer (and only those, plus glm4moe's MTP layer, which llama.cpp skips) has routed experts
    assert expert_layers == (moe + [4] if arch == "glm4moe" else moe)
    roles = {p.role for p in plan}
    assert {"expert", "router", "dense"} <= roles
    assert ("shexp" in roles) == (arch in ("deepseek2", "glm4moe", "llama4", "granitemoe"))
    for p in plan:
        if p.role == "expert":
            assert p.name.endswith("_exps.weight") and len(p.ne) == 3 and p.ne[2] == s.n_expert
    # the spec records its own hyper-parameters flat (flashmoe.synth.spec)
    d = s.to_dict()
    for k in s.arch_def.param_names():
        assert d[k] == getattr(s, k)


def test_spec_params_overrides_and_errors():
    s = make_spec("deepseek2", "tiny", n_layer_dense_lead=2, n_expert_groups=2, n_group_used=1)
    assert s.moe_layers == [2, 3] and s.params.n_layer_dense_lead == 2
    s2 = make_spec("llama4", "tiny", interleave_moe_layer_step=1)
    assert s2.moe_layers == [0, 1, 2, 3]
    s3 = make_spec("glm4moe", "tiny", n_layer=6, nextn_predict_layers=2)
    assert s3.moe_layers == [1, 2, 3] and s3.arch_def.last_layer(s3) == 3
    from flashmoe.errors import UsageError

    with pytest.raises(UsageError, match="applies to deepseek2, glm4moe, not llama"):
        make_spec("mixtral", "tiny", n_layer_dense_lead=1)
    with pytest.raises(UsageError, match="n_group_used"):
        make_spec("deepseek2", "tiny", n_group_used=4)
    with pytest.raises(UsageError, match="one KV head"):
        make_spec("deepseek2", "tiny", n_head_kv=2)
    with pytest.raises(UsageError, match="no 'bench' preset"):
        make_spec("gpt-oss", "bench")
    with pytest.raises(UsageError, match="no MoE layer"):
        make_spec("llama4", "tiny", n_layer=1)
    with pytest.raises(UsageError, match="--kv-heads must equal --heads"):
        make_spec("olmoe", "tiny", n_head_kv=2)


def test_synth_cli_params(run_cli, tmp_path):
    out = tmp_path / "l4.gguf"
    r = run_cli("synth", "-o", out, "--arch", "llama4", "--param", "interleave_moe_layer_step=1", "-q")
    assert r.code == 0, r.stderr
    with open_model(str(out)) as m:
        assert m.metadata["llama4.interleave_moe_layer_step"] == 1 and model_moe_layers(m) == [0, 1, 2, 3]
    r = run_cli("synth", "-o", tmp_path / "m.gguf", "--arch", "mixtral", "-q")
    assert r.code == 0, r.stderr
    with open_model(str(tmp_path / "m.gguf")) as m:
        assert m.arch == "llama" and m.is_moe
    r = run_cli("synth", "--arch", "glm4moe", "--param", "help")
    assert r.code == 0 and "nextn_predict_layers" in r.stdout
    r = run_cli("synth", "-o", tmp_path / "x.gguf", "--arch", "gpt-oss", "--param", "bogus=1")
    assert r.code == 2 and "gpt-oss has no such parameter" in r.stderr
    r = run_cli("synth", "--help")
    for a in archs.names():
        assert a in r.stdout, a


# ------------------------------------------------------------------- (a) the files and a stock load

def _meta(m, key):
    return m.metadata.get(f"{m.arch}.{key}")


@pytest.mark.parametrize("arch", NEW_ARCHES)
def test_file_has_the_family_features(arch_models, arch):
    path = arch_models[arch]
    assert os.path.getsize(path) < 10 * 1024 * 1024
    with open_model(path) as m:
        names = m.tensors_by_name()
        types = {t.name: t.type_name for t in m.tensors}
        assert m.arch == arch and m.is_moe
        if arch == "deepseek2":
            assert _meta(m, "leading_dense_block_count") == 1
            assert (_meta(m, "expert_group_count"), _meta(m, "expert_group_used_count")) == (4, 2)
            assert _meta(m, "expert_shared_count") == 1 and _meta(m, "expert_gating_func") == 2
            assert _meta(m, "expert_weights_norm") is True and abs(_meta(m, "expert_weights_scale") - 2.5) < 1e-6
            assert (_meta(m, "attention.q_lora_rank"), _meta(m, "attention.kv_lora_rank")) == (64, 64)
            assert (_meta(m, "attention.key_length_mla"), _meta(m, "rope.dimension_count")) == (48, 16)
            assert _meta(m, "rope.scaling.type") == "yarn"
            assert "blk.0.ffn_gate.weight" in names and "blk.0.ffn_gate_exps.weight" not in names
            assert "blk.1.exp_probs_b.bias" in names and "blk.1.ffn_down_shexp.weight" in names
            assert names["blk.1.attn_k_b.weight"].shape == (32, 64, 4)
            assert names["blk.1.attn_v_b.weight"].shape == (64, 32, 4)
        elif arch == "glm4moe":
            assert _meta(m, "nextn_predict_layers") == 1 and _meta(m, "leading_dense_block_count") == 1
            assert _meta(m, "expert_gating_func") == 2 and _meta(m, "expert_weights_norm") is True
            assert "blk.4.nextn.eh_proj.weight" in names and "blk.4.ffn_down_exps.weight" in names
            assert "blk.0.ffn_up.weight" in names and "blk.3.exp_probs_b.bias" in names
            assert "blk.1.attn_q.bias" in names and "blk.1.ffn_gate_shexp.weight" in names
        elif arch == "gpt-oss":
            for k in ("gate", "up", "down"):
                assert types[f"blk.0.ffn_{k}_exps.weight"] == "MXFP4"
                assert f"blk.0.ffn_{k}_exps.bias" in names
            assert names["blk.0.ffn_down_exps.bias"].shape == (256, 8)
            assert "blk.0.attn_sinks.weight" in names and "blk.0.ffn_gate_inp.bias" in names
            assert "blk.0.attn_output.bias" in names and _meta(m, "attention.sliding_window") == 32
        elif arch == "llama":
            assert _meta(m, "expert_count") == 8 and "blk.0.ffn_gate_exps.weight" in names
            assert not any("shexp" in n for n in names)
        elif arch == "llama4":
            assert _meta(m, "interleave_moe_layer_step") == 2 and m.n_expert_used == 1
            assert "blk.0.ffn_gate.weight" in names and "blk.2.ffn_gate.weight" in names
            assert "blk.1.ffn_gate_exps.weight" in names and "blk.3.ffn_up_shexp.weight" in names
            assert "blk.0.ffn_gate_exps.weight" not in names
        elif arch == "olmoe":
            assert names["blk.0.attn_k_norm.weight"].shape == (256,)
        elif arch == "granitemoe":
            assert abs(_meta(m, "logit_scale") - 6.0) < 1e-6 and abs(_meta(m, "residual_scale") - 0.22) < 1e-6
            assert _meta(m, "expert_shared_feed_forward_length") == 128 and "blk.0.ffn_up_shexp.weight" in names
        # what the trace holds, from the registry
        n_layer, moe, last = EXPECT[arch]
        assert m.n_layer == n_layer and model_moe_layers(m) == moe and model_last_layer(m) == last


@pytest.mark.parametrize("arch", NEW_ARCHES)
def test_stock_llama_cpp_loads_and_generates(llama_cpp, arch_models, arch):
    prompt, out, llm = generate_greedy(llama_cpp, arch_models[arch], 12)
    assert len(prompt) > 0 and len(out) == 12
    assert all(0 <= t < llm.n_vocab() for t in out)
    logits = last_logits(llama_cpp, llm)
    assert np.isfinite(logits).all() and np.abs(logits).max() > 0
    assert llm.metadata["general.architecture"] == arch


# --------------------------------------------------------------------------- (b) streamed == in RAM

@pytest.mark.parametrize("arch", NEW_ARCHES)
def test_streamed_equals_in_ram_own_routing(llama_cpp, arch_models, arch):
    path = arch_models[arch]
    ref, ref_st = _run(path)
    assert ref_st == {}  # hook off: the stock graph
    got, st = _run(path, stream=_stream(2))
    assert len(got.tokens) == N_GEN and got.tokens == ref.tokens
    assert _max_diff(ref, got) == 0.0
    _check_waves_and_layers(arch, st, forced=False)


@pytest.mark.parametrize("arch", NEW_ARCHES)
def test_streamed_equals_in_ram_forced_uniform_routing(llama_cpp, arch_models, uniform_traces, arch):
    path, tr = arch_models[arch], uniform_traces[arch]
    ref, _ = _run(path, routing_trace=tr)
    own, _ = _run(path)
    assert _max_diff(own, ref) > 0  # the forced routing changes the computation (the override is no no-op)
    for stream in (_stream(2), _stream(3, eviction="lfru", direct_io=True)):
        got, st = _run(path, routing_trace=tr, stream=stream)
        assert st["info"]["routing_forced"] == 1
        assert got.tokens == ref.tokens, stream
        assert _max_diff(ref, got) == 0.0, stream
        _check_waves_and_layers(arch, st, forced=True)


# --------------------------------------------------- (c) only routed layers are hooked, streamed, read

@pytest.mark.parametrize("arch", NEW_ARCHES)
def test_reads_only_the_routed_layers_experts(llama_cpp, arch_models, uniform_traces, arch):
    """A cache holding every expert (no evictions), direct I/O, forced routing: the hook streams exactly the
    MoE layers that run (leading dense layers, dense layers between and next-token-prediction layers are
    neither streamed nor cached), and reads exactly the distinct experts the trace selects, following the
    registry's last-layer rule."""
    from flashmoe.engine import Engine

    path, tr_path = arch_models[arch], uniform_traces[arch]
    n_layer, moe, last = EXPECT[arch]
    tr = read_trace(tr_path)
    assert tr.layers == moe
    per_expert, streamed, n_tensors = _expert_bytes(path, set(moe))
    with open_model(path) as m:
        n_expert = m.n_expert
    n_new = 6
    with Engine(path, use_extra_bufts=False, n_ctx=256, routing_trace=tr_path,
                stream=_stream(n_expert, direct_io=True)) as e:
        toks = e.tokenize("hello there, world")[:5]
        rows = len(toks) + n_new - 1  # the last sampled token is not evaluated
        expected = 0
        for li, layer in enumerate(tr.layers):
            # the layer that computes only the output rows computes the prompt's last token only
            first = len(toks) - 1 if layer == last else 0
            distinct = set(int(x) for x in tr.ids[first:rows, li].ravel())
            expected += len(distinct) * per_expert[layer]
        g = e.generate(toks, n_new, stop_at_eos=False)
        st = e.stats()
    assert len(g.tokens) == n_new
    info = st["info"]
    assert [l["layer"] for l in st["layers"]] == moe and info["n_layers"] == len(moe)
    assert info["streamed_bytes"] == streamed and info["n_stream_tensors"] == n_tensors
    # slot tensors [ne0, ne1, n_slots + 1] per streamed expert tensor of the routed layers only
    assert info["cache_bytes"] == sum((n_expert + 1) * per_expert[l] for l in moe)
    assert st["total"]["evictions"] == 0
    assert st["total"]["bytes_read"] == expected


def test_glm4moe_nextn_layer_is_never_read_nor_used(llama_cpp, arch_models, tmp_path):
    """glm4moe's next-token-prediction layer (blk.4): llama.cpp skips its tensors and its graph never runs
    it. With every byte of its tensors overwritten by 0xFF (NaN scales in every quantized block, NaN
    norms), stock and streamed runs still equal the clean model's exactly, and the hook has no entry for it."""
    src = arch_models["glm4moe"]
    bad = str(tmp_path / "glm4moe-garbage-nextn.gguf")
    shutil.copy(src, bad)
    with open_model(bad) as m:
        nextn = [t for t in m.tensors if t.layer == 4]
        assert any(t.is_expert for t in nextn) and any(".nextn." in t.name for t in nextn)
        assert all(t.file_index == 0 for t in nextn)
        spans = [(t.data_offset, t.nbytes) for t in nextn]
    with open(bad, "r+b") as f:
        for off, n in spans:
            f.seek(off)
            f.write(b"\xff" * n)
    ref, _ = _run(src)
    stock_bad, _ = _run(bad)
    got, st = _run(bad, stream=_stream(2))
    assert stock_bad.tokens == ref.tokens and _max_diff(ref, stock_bad) == 0.0
    assert got.tokens == ref.tokens and _max_diff(ref, got) == 0.0
    assert 4 not in [l["layer"] for l in st["layers"]]
    assert all(np.isfinite(x).all() for x in got.logits)


def test_deepseek2_grouped_routing_is_applied(llama_cpp, tmp_path):
    """8 experts in 2 groups of 4, 1 group used: llama.cpp takes every token's 2 experts from one group (the
    recorded routing shows it; without groups the same model's tokens cross groups), and the streamed run
    equals the in-RAM run."""
    from flashmoe.engine import Engine

    def recorded(groups, used):
        path = str(tmp_path / f"ds-{groups}.gguf")
        synth_model(path, make_spec("deepseek2", "tiny", seed=SEED, n_expert_groups=groups, n_group_used=used),
                    progress=False)
        rec = str(tmp_path / f"ds-{groups}.trace")
        with Engine(path, use_extra_bufts=False, n_ctx=1024, record_trace=True) as e:
            e.generate(LONG_PROMPT, 16, stop_at_eos=False)
            e.save_trace(rec)
        return path, read_trace(rec)

    path, tr = recorded(2, 1)
    g = tr.ids // 4  # the group of each selected expert
    assert tr.n_tokens > 100 and (g.min(axis=2) == g.max(axis=2)).all()
    _, free = recorded(0, 0)
    fg = free.ids // 4
    assert (fg.min(axis=2) != fg.max(axis=2)).any()
    ref, _ = _run(path)
    got, st = _run(path, stream=_stream(2))
    assert got.tokens == ref.tokens and _max_diff(ref, got) == 0.0
    assert st["total"]["evictions"] > 0


# --------------------------------------------------------- the last-layer rule: registry == hook behaviour

SIM_FIELDS = ("layer", "n_slots", "hits", "misses", "evictions", "bytes_read", "n_tokens", "n_waves")


def _engine_vs_registry_sim(path, trace_path, last):
    from flashmoe.engine import Engine
    from flashmoe.tune.simulate import engine_ubatches, simulate

    prompt, n_gen, slots = list(range(1, 40)), 40, 3
    with open_model(path) as m:
        eb = {}
        for t in m.tensors:
            if t.is_expert:
                eb[t.layer] = eb.get(t.layer, 0) + t.expert_stride
    with Engine(path, stream=_stream(slots), routing_trace=trace_path, n_threads=1) as e:
        e.generate(prompt, n_gen, stop_at_eos=False)
        eng = [{k: l[k] for k in SIM_FIELDS} for l in e.stats()["layers"]]
    sim = simulate(read_trace(trace_path), engine_ubatches(len(prompt), n_gen), slots, "lru", last_layer=last,
                   expert_bytes=eb).engine_view()
    return eng, [{k: l[k] for k in SIM_FIELDS} for l in sim]  # (the simulator also gives prefetch counters)


@pytest.mark.parametrize("arch", NEW_ARCHES)
def test_registry_last_layer_rule_is_the_hooks(llama_cpp, arch_models, uniform_traces, arch):
    """The exact cache simulator (flashmoe.tune.simulate), given the registry's last-layer rule, reproduces the
    hook's per-layer counters: which rows each layer computes is what the registry says (glm4moe: the last
    trunk layer, not the MTP layer; gpt-oss: every layer every row)."""
    path = arch_models[arch]
    with open_model(path) as m:
        last = model_last_layer(m)
    eng, sim = _engine_vs_registry_sim(path, uniform_traces[arch], last)
    assert sim == eng


def test_tuner_last_layer_agrees_with_the_registry(arch_models):
    """The tuner's model facts take the last-layer rule and the routed layers from the arch registry
    (a name-only rule took glm4moe's never-run next-token-prediction layer for the last one)."""
    from flashmoe.trace import model_moe_layers
    from flashmoe.tune.model import ModelFacts

    for arch in NEW_ARCHES:
        with open_model(arch_models[arch]) as m:
            mf = ModelFacts.of(m)
            assert mf.last_layer == model_last_layer(m), arch
            assert mf.moe_layers == model_moe_layers(m), arch


def test_mixtral_expert_scales_stream_exactly(llama_cpp, arch_models, tmp_path):
    """llama.cpp's llama graph applies per-expert scales (ffn_*_exps.scale, gathered by the real expert ids):
    synthesized with --expert-scales, the streamed run equals the in-RAM run, and the scales change it."""
    path = str(tmp_path / "mixtral-scales.gguf")
    synth_model(path, make_spec("mixtral", "tiny", seed=SEED, expert_scales=True), progress=False)
    with open_model(path) as m:
        assert "blk.0.ffn_down_exps.scale" in m.tensors_by_name()
    ref, _ = _run(path)
    got, st = _run(path, stream=_stream(2))
    assert got.tokens == ref.tokens and _max_diff(ref, got) == 0.0
    assert st["total"]["evictions"] > 0
    plain, _ = _run(arch_models["llama"])
    assert _max_diff(plain, ref) > 0


@pytest.mark.parametrize("arch", NEW_ARCHES)
def test_repack_inspect_policy_and_trace_commands(run_cli, arch_models, tmp_path, arch):
    """The other commands on each family: repack (every tensor's bytes unchanged, experts grouped by
    layer), inspect, policy show with the shipped stream policy, trace gen for the routed layers."""
    src = arch_models[arch]
    out = str(tmp_path / f"{arch}-repacked.gguf")
    r = run_cli("repack", src, "-o", out)
    assert r.code == 0, r.stderr
    with open_model(src) as a, open_model(out) as b:
        assert [t.name for t in a.tensors] and {t.name for t in a.tensors} == {t.name for t in b.tensors}
        for t in a.tensors:
            assert a.read_bytes(t) == b.read_bytes(b.tensor(t.name)), t.name
    r = run_cli("inspect", out)
    assert r.code == 0 and "expert" in r.stdout.lower(), r.stderr
    r = run_cli("policy", "show", "stream", "-m", out)
    assert r.code == 0 and "stream" in r.stdout, r.stderr
    tr = str(tmp_path / f"{arch}.trace")
    r = run_cli("trace", "gen", "-m", out, "--kind", "realistic", "--tokens", "64", "-o", tr)
    assert r.code == 0, r.stderr
    with open_model(out) as m:
        assert read_trace(tr).layers == model_moe_layers(m)
