"""The hook never computes garbage and never takes the process down (issue 15).

What the tiny test models do not exercise by default, each against the real patched llama.cpp:
per-expert scale tensors and LoRA adapters on streamed experts; read errors (injected with the hook's
test-only FLASHMOE_FAULT_INJECT switch, see include/flashmoe.h), a model file truncated or rewritten
after load, O_DIRECT refused; several contexts on one streamed model; routing traces with impossible
headers; the last layer's routing when its output rows are not the ubatch's last rows; the hook's
configuration being consumed by one load.
"""
from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest

from flashmoe import hook
from flashmoe.engine import Engine
from flashmoe.errors import FlashMoEError
from flashmoe.settings import StreamSettings
from flashmoe.trace import read_trace
from gguf_tools.reader import open_model
from gguf_tools.synth import make_spec, synth_model

PROMPT = "The quick brown fox jumps over the lazy dog. " * 4
N = 24


def _gen(path, n=N, **kw):
    with Engine(path, use_extra_bufts=False, n_ctx=512, **kw) as e:
        g = e.generate(PROMPT, n, return_logits=True, stop_at_eos=False)
        return g, e.info, e.stats()


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a.logits, b.logits))


@pytest.fixture
def fault(monkeypatch):
    """Sets FLASHMOE_FAULT_INJECT for the next model load (the hook reads it at load)."""
    def set_(value):
        monkeypatch.setenv("FLASHMOE_FAULT_INJECT", value)
    yield set_
    monkeypatch.delenv("FLASHMOE_FAULT_INJECT", raising=False)


# ------------------------------------------------------------------------------------------ scales, LoRA


@pytest.fixture(scope="module")
def scaled_models(tmp_path_factory, llama_cpp):
    d = tmp_path_factory.mktemp("scaled")
    out = {}
    for arch in ("qwen3moe",):  # of the synthesized archs, llama.cpp's qwen3moe graph applies expert scales
        for scales in (True, False):
            p = str(d / f"{arch}-{'scales' if scales else 'plain'}.gguf")
            synth_model(p, make_spec(arch, "tiny", seed=3, expert_scales=scales), progress=False)
            out[(arch, scales)] = p
    return out


@pytest.mark.parametrize("arch", ["qwen3moe"])
def test_expert_scales_stream_exactly(scaled_models, arch):
    path = scaled_models[(arch, True)]
    with open_model(path) as m:
        names = {t.name for t in m.tensors}
    assert "blk.0.ffn_up_exps.scale" in names and "blk.3.ffn_down_exps.scale" in names
    ref, _, _ = _gen(path)
    plain, _, _ = _gen(scaled_models[(arch, False)])
    assert _max_diff(ref, plain) > 0  # the scales are loaded and change the computation
    got, info, st = _gen(path, stream=StreamSettings(mode="cache", cache_slots=2, readers=2))
    assert info["mode"] == "cache" and st["total"]["evictions"] > 0
    assert got.tokens == ref.tokens
    assert _max_diff(ref, got) == 0.0  # scales gathered by the real expert ids, not the cache slots


def _write_expert_lora(path, model_path, rank=4, seed=11):
    import gguf

    with open_model(model_path) as m:
        arch = m.arch
        tensors = [t for t in m.tensors if t.name.endswith("ffn_up_exps.weight") or t.name.endswith("ffn_down_exps.weight")]
        shapes = {t.name: tuple(int(x) for x in t.shape) for t in tensors}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    for name, (ne0, ne1, ne2) in shapes.items():
        # numpy shapes are reversed ggml shapes: a is [ne0, rank, n_expert], b is [rank, ne1, n_expert]
        a = (rng.standard_normal((ne2, rank, ne0)) * 0.2).astype(np.float32)
        b = (rng.standard_normal((ne2, ne1, rank)) * 0.2).astype(np.float32)
        w.add_tensor(name + ".lora_a", a)
        w.add_tensor(name + ".lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_lora_on_streamed_experts(tiny_model, tmp_path):
    lora = str(tmp_path / "experts-lora.gguf")
    _write_expert_lora(lora, tiny_model)
    base, _, _ = _gen(tiny_model)
    ref, _, _ = _gen(tiny_model, lora_path=lora)
    assert _max_diff(base, ref) > 0  # the adapter is applied
    got, info, st = _gen(tiny_model, lora_path=lora, stream=StreamSettings(mode="cache", cache_slots=2, readers=2))
    assert info["mode"] == "cache" and st["total"]["evictions"] > 0
    assert got.tokens == ref.tokens
    assert _max_diff(ref, got) == 0.0  # found by the model's tensor, applied with the real expert ids


# ------------------------------------------------------------------------------------------ I/O errors


def test_injected_read_error_fails_the_call_and_the_next_call_works(tiny_model, fault):
    ref, _, _ = _gen(tiny_model)
    fault("eio:7")
    with Engine(tiny_model, stream=StreamSettings(mode="cache", cache_slots=2, readers=2), use_extra_bufts=False,
                n_ctx=512) as e:
        with pytest.raises(FlashMoEError) as ei:
            e.generate(PROMPT, N, stop_at_eos=False)
        msg = str(ei.value)
        assert "expert read failed" in msg and os.path.basename(tiny_model) in msg
        assert "offset" in msg and "errno 5" in msg
        # the failed experts were not kept: the same engine now gives the in-RAM answer
        g = e.generate(PROMPT, N, return_logits=True, stop_at_eos=False)
        assert g.tokens == ref.tokens
        assert _max_diff(ref, g) == 0.0


def test_injected_read_error_exits_the_cli_non_zero(tiny_model, run_cli, monkeypatch):
    monkeypatch.setenv("FLASHMOE_FAULT_INJECT", "eio:3")
    r = run_cli("generate", "-m", tiny_model, "-p", "hello", "-n", "8", "--stream", "cache", "--cache-slots", "2")
    assert r.code != 0
    assert "expert read failed" in r.stderr and "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize("how", ["truncate", "rewrite"])
def test_model_file_changed_after_load_is_an_error_not_zeros(tiny_model, tmp_path, how):
    path = str(tmp_path / "m.gguf")
    shutil.copy(tiny_model, path)
    with open_model(path) as m:
        last = max(t.layer for t in m.tensors if t.is_expert)
        cut = min(t.data_offset for t in m.tensors if t.is_expert and t.layer == last)
    with Engine(path, stream=StreamSettings(mode="cache", cache_slots=2, readers=2), use_extra_bufts=False,
                n_ctx=512) as e:
        e.generate("hello", 4)  # works before the change
        if how == "truncate":
            os.truncate(path, cut)
        else:
            with open(path, "r+b") as f:
                f.seek(cut)
                f.write(b"\0" * 4096)
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(FlashMoEError, match="changed after it was loaded"):
            e.generate(PROMPT, 8)


def test_replaced_model_file_is_an_error(tiny_model, tmp_path):
    path = str(tmp_path / "m.gguf")
    shutil.copy(tiny_model, path)
    with Engine(path, stream=StreamSettings(mode="cache", cache_slots=2), use_extra_bufts=False, n_ctx=512) as e:
        e.generate("hello", 4)
        shutil.copy(tiny_model, path + ".new")
        os.replace(path + ".new", path)
        with pytest.raises(FlashMoEError, match="removed or replaced"):
            e.generate(PROMPT, 8)


def test_direct_io_refused_falls_back_to_buffered_reads(tiny_model, fault):
    ref, _, _ = _gen(tiny_model)
    fault("einval-direct")
    got, info, st = _gen(tiny_model, stream=StreamSettings(mode="cache", cache_slots=2, readers=2, direct_io=True))
    assert got.tokens == ref.tokens and _max_diff(ref, got) == 0.0
    assert st["total"]["misses"] > 0
    assert info["direct_io"] == 0 or st["info"]["direct_io"] == 0  # the report says direct I/O is off now


def test_truncated_before_load_is_refused(tiny_model, tmp_path, run_cli):
    path = str(tmp_path / "t.gguf")
    shutil.copy(tiny_model, path)
    os.truncate(path, os.path.getsize(path) - 5000)
    r = run_cli("generate", "-m", path, "-p", "hi", "-n", "4", "--stream", "cache", "--cache-slots", "2")
    assert r.code != 0 and "Traceback" not in r.stderr + r.stdout


# ------------------------------------------------------------------------------------------ contexts


def _lc():
    import llama_cpp.llama_cpp as lc

    return lc


def test_a_streamed_model_refuses_a_second_context(tiny_model):
    lc = _lc()
    with Engine(tiny_model, stream=StreamSettings(mode="cache", cache_slots=2), use_extra_bufts=False, n_ctx=256) as e:
        p = lc.llama_context_default_params()
        p.n_ctx = 256
        ctx2 = lc.llama_init_from_model(e._model_ptr, p)
        assert not ctx2  # NULL: refused, the first context keeps working
        assert len(e.generate("hello", 4).tokens) >= 1
    with Engine(tiny_model, use_extra_bufts=False, n_ctx=256) as e:  # a stock model takes several
        p = lc.llama_context_default_params()
        p.n_ctx = 256
        ctx2 = lc.llama_init_from_model(e._model_ptr, p)
        assert ctx2
        lc.llama_free(ctx2)


# ------------------------------------------------------------------------------------------ traces


def _trace_bytes(n_layers, n_used, n_expert, n_tokens, layers=None, body_tokens=None):
    layers = layers if layers is not None else list(range(n_layers))
    head = b"FMRT" + struct.pack("<5I", 1, n_layers, n_used, n_expert, 0) + struct.pack("<Q", n_tokens)
    head += struct.pack(f"<{len(layers)}i", *layers)
    body_tokens = n_tokens if body_tokens is None else body_tokens
    return head + b"\0" * (4 * body_tokens * len(layers) * n_used)


@pytest.mark.parametrize("hdr", [
    dict(n_layers=4, n_used=2, n_expert=8, n_tokens=1 << 62, body_tokens=4),  # overflows n*layers*used
    dict(n_layers=1 << 30, n_used=2, n_expert=8, n_tokens=1, layers=[0, 1, 2, 3], body_tokens=1),
    dict(n_layers=4, n_used=0, n_expert=8, n_tokens=4),
    dict(n_layers=4, n_used=9, n_expert=8, n_tokens=4),
    dict(n_layers=4, n_used=2, n_expert=8, n_tokens=5, body_tokens=4),  # one token short
])
def test_impossible_trace_headers_are_refused_by_the_hook(tmp_path, hdr, llama_cpp):
    p = tmp_path / "bad.trace"
    p.write_bytes(_trace_bytes(**hdr))
    with pytest.raises(FlashMoEError, match="not a valid flashmoe trace"):
        hook.configure(mode="off", routing_trace=str(p))
    hook.reset_config()


def _decode_batch(lc, ctx, tokens, outputs):
    n = len(tokens)
    b = lc.llama_batch_init(n, 0, 1)
    try:
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i in outputs else 0
        assert lc.llama_decode(ctx, b) == 0
    finally:
        lc.llama_batch_free(b)


def test_last_layer_routing_follows_the_output_rows(tiny_model, tmp_path):
    """The last layer computes only the rows whose outputs are asked for; the recorded routing puts
    each at its own token, wherever it is in the ubatch (before: always at the ubatch's last rows)."""
    lc = _lc()
    with Engine(tiny_model, record_trace=True, use_extra_bufts=False, n_ctx=256) as e:
        toks = e.tokenize("one two three four five six seven eight nine")[:9]
        ctx = e.llama._ctx.ctx
        mem = lc.llama_get_memory(ctx)

        def record(outputs):
            lc.llama_memory_clear(mem, True)
            hook.trace_clear(e._model_ptr)
            _decode_batch(lc, ctx, toks, outputs)
            p = str(tmp_path / f"t{len(outputs)}.trace")
            assert e.save_trace(p) == len(toks)
            return read_trace(p)

        full = record(set(range(len(toks))))
        part = record({2, 5})
    last = full.layers.index(max(full.layers))
    for t in (2, 5):
        assert list(part.ids[t, last]) == list(full.ids[t, last]), t
    # the other layers computed every row either way
    assert np.array_equal(part.ids[:, :last], full.ids[:, :last])


# ------------------------------------------------------------------------------------------ configuration


def test_configuration_is_consumed_by_one_load(tiny_model, llama_cpp):
    """A second load after a configured one is stock: the hook's configuration is for one load."""
    hook.configure(mode="cache", cache_slots=2, placements=_stream_placements(tiny_model))
    a = llama_cpp.Llama(tiny_model, n_ctx=128, verbose=False, use_mmap=False)
    b = llama_cpp.Llama(tiny_model, n_ctx=128, verbose=False)
    try:
        assert hook.model_info(a._model.model)["mode"] == "cache"
        assert hook.model_info(b._model.model) is None
    finally:
        a.close()
        b.close()


def _stream_placements(path):
    with open_model(path) as m:
        return {t.name: ("stream" if t.is_expert else "ram") for t in m.tensors}


# ------------------------------------------------------------------------------------------ the server


def test_serve_survives_an_injected_read_error(tiny_model, tmp_path):
    """`flashmoe serve` streaming experts: the request whose read fails gets a 5xx naming the failure,
    the next request succeeds, the process is alive."""
    from conftest import serve_cli

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pol = tmp_path / "tiny-stream.yaml"
    pol.write_text("version: 1\nname: tiny-stream\nrules:\n"
                   "  - match: \"blk.*.ffn_{gate,up,down,gate_up}_exps.weight\"\n    place: stream\n"
                   "  - match: \"*\"\n    place: ram\n"
                   "expert_cache:\n  mode: cache\n  cache_slots: 2\n")
    env = dict(os.environ, FLASHMOE_FAULT_INJECT="eio:5")
    with serve_cli("-m", tiny_model, "--policy", pol, "--ctx", "512", "--log-level", "warning",
                   env=env) as (p, url, _seen):
        body = {"model": "x", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        r1 = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert 500 <= r1.status_code < 600, r1.text
        err = r1.json()["error"]
        assert "expert read failed" in err["message"] and "errno 5" in err["message"]
        r2 = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r2.status_code == 200, r2.text
        assert r2.json()["choices"][0]["text"] is not None
        assert p.poll() is None  # alive
        assert httpx.get(url + "/health", timeout=30).status_code == 200
