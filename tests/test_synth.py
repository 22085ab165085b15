"""Synthetic models: llama.cpp loads and runs them; deterministic; valid quant blocks; tokenizer; chat template."""
from __future__ import annotations

import filecmp
import hashlib
import json
import os

import numpy as np
import pytest

from conftest import TINY_ARCHES, generate_greedy, last_logits
from gguf_tools import quants
from gguf_tools.reader import open_model
from gguf_tools.synth import (
    CHAT_TEMPLATE,
    build_vocab,
    estimate_bytes,
    make_spec,
    plan_tensors,
    render_chat,
    synth_model,
    tensor_chunks,
)

N_GEN = 12


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


# ------------------------------------------------------------------------------- llama.cpp runs them

@pytest.mark.parametrize("arch", TINY_ARCHES)
def test_tiny_model_loads_and_generates(llama_cpp, tiny_models, arch):
    path = tiny_models[arch]
    assert os.path.getsize(path) < 10 * 1024 * 1024
    prompt, out, llm = generate_greedy(llama_cpp, path, N_GEN)
    assert len(prompt) > 0
    assert len(out) == N_GEN
    assert all(0 <= t < llm.n_vocab() for t in out)
    # the last logits are finite (no NaN / inf from the random weights)
    logits = last_logits(llama_cpp, llm)
    assert np.isfinite(logits).all() and np.abs(logits).max() > 0
    assert llm.metadata["general.architecture"] == arch


def test_quantized_dense_and_q8_0_experts_generate(llama_cpp, tmp_path):
    # Q8_0 experts (and the generation path through MUL_MAT_ID) on qwen3moe
    path = str(tmp_path / "q8.gguf")
    synth_model(path, make_spec("qwen3moe", "tiny", expert_type="Q8_0", seed=3), progress=False)
    _, out, llm = generate_greedy(llama_cpp, path, 6)
    assert len(out) == 6
    assert np.isfinite(last_logits(llama_cpp, llm)).all()


def test_split_and_grouped_model_generates_same_tokens(llama_cpp, tiny_models, tmp_path):
    # the same seed written as 3 shards, experts grouped by layer, 4 KiB alignment: same tensors,
    # so llama.cpp must produce the same greedy tokens
    spec = make_spec("qwen3moe", "tiny", seed=0, shards=3, layout="grouped", alignment=4096)
    res = synth_model(str(tmp_path / "split.gguf"), spec, progress=False)
    assert [os.path.basename(p) for p in res.paths] == [f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    _, ref, _ = generate_greedy(llama_cpp, tiny_models["qwen3moe"], 8)
    _, out, _ = generate_greedy(llama_cpp, res.paths[0], 8)
    assert out == ref


# ---------------------------------------------------------------------------------- determinism

def test_same_seed_identical_different_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.gguf", "b.gguf", "c.gguf"))
    synth_model(a, make_spec("qwen35moe", "tiny", seed=7), progress=False)
    synth_model(b, make_spec("qwen35moe", "tiny", seed=7), progress=False)
    synth_model(c, make_spec("qwen35moe", "tiny", seed=8), progress=False)
    assert filecmp.cmp(a, b, shallow=False) and _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)
    assert os.path.getsize(a) == os.path.getsize(c)


def test_same_seed_identical_through_cli(run_cli, tmp_path):
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    for p in (a, b):
        r = run_cli("synth", "-o", p, "--arch", "qwen2moe", "--seed", "5", "-q")
        assert r.code == 0, r.stderr
        assert "wrote" in r.stdout
    assert _sha(a) == _sha(b)


def test_tensor_data_depends_on_seed_and_name_only(tiny_models, tmp_path):
    # other layouts hold byte-identical tensors (what a repack must preserve)
    spec = make_spec("qwen3moe", "tiny", seed=0, layout="grouped", alignment=16384, shards=2)
    res = synth_model(str(tmp_path / "g.gguf"), spec, progress=False)
    with open_model(tiny_models["qwen3moe"]) as ref, open_model(res.paths[0]) as g:
        assert len(g.files) == 2 and g.alignment == [16384, 16384]
        refs = ref.tensors_by_name()
        assert set(refs) == set(t.name for t in g.tensors)
        for t in g.tensors:
            assert t.data_offset % 16384 == 0
            assert g.read_bytes(t) == ref.read_bytes(refs[t.name]), t.name


def test_reader_offsets_hold_the_written_bytes(tiny_models):
    spec = make_spec("qwen2moe", "tiny", seed=0)
    plan = {p.name: p for p in plan_tensors(spec)}
    with open_model(tiny_models["qwen2moe"]) as m:
        for name in ("token_embd.weight", "blk.1.ffn_down_exps.weight", "blk.2.ffn_gate_inp_shexp.weight",
                     "blk.3.attn_q.bias", "output.weight"):
            t = m.tensor(name)
            want = b"".join(bytes(c) for c in tensor_chunks(spec, plan[name]))
            assert m.read_bytes(t) == want
            assert t.nbytes == plan[name].nbytes and t.shape == plan[name].ne


# the sha256 of `flashmoe synth --arch A --preset tiny --seed 0` before the arch registry (gguf_tools/archs/):
# moving an architecture's knowledge into its module must not change a byte of its files
V1_TINY_SHA256 = {
    "qwen3moe": "fa11899310dace347877a51147a9eba3950769ee567c7b53f9627925fbbb1198",
    "qwen2moe": "51bd1acbc3f4c0c4efc291b6f2f5d81646c8e10207e4d835b5e0f0de3ae12dff",
    "qwen35moe": "43763bc942734984eb182d27f2dc9c1c765e2828321cbab415243f22e31030d8",
}


@pytest.mark.parametrize("arch", TINY_ARCHES)
def test_existing_archs_files_are_unchanged(tiny_models, arch):
    assert _sha(tiny_models[arch]) == V1_TINY_SHA256[arch], (
        f"the tiny {arch} file changed: an intended change of the synthesized format updates V1_TINY_SHA256")


def test_spec_params_read_and_write_through_the_spec():
    s = make_spec("qwen35moe", "tiny", ssm_d_state=16)
    assert s.ssm_d_state == 16 and s.params.ssm_d_state == 16
    s.ssm_dt_rank = 8
    assert s.params.ssm_dt_rank == 8
    d = s.to_dict()
    assert d["ssm_d_state"] == 16 and "params" not in d
    # the v1 spec JSON of qwen3moe carried the (unused) qwen35moe keys: kept for byte-identical files
    assert make_spec("qwen3moe", "tiny").to_dict()["ssm_d_state"] == 32
    from flashmoe.errors import UsageError

    with pytest.raises(UsageError, match="applies to qwen35moe, not qwen3moe"):
        make_spec("qwen3moe", "tiny", ssm_d_state=16)


# -------------------------------------------------------------------------------------- presets

def test_bench_preset_is_b1():
    s = make_spec("qwen3moe", "bench")
    assert (s.n_layer, s.n_expert, s.n_expert_used, s.n_embd, s.n_ff_exp) == (24, 128, 8, 2048, 768)
    assert (s.n_head, s.head_dim, s.n_head_kv) == (32, 128, 4)
    assert s.n_vocab >= 4096 and s.expert_type == "Q4_K" and s.dense_type == "Q4_K"
    plan = plan_tensors(s)
    for p in plan:
        if p.name.endswith("_norm.weight"):
            assert p.ggml_type == quants.F32
        if ".attn_" in p.name and p.name.endswith((".attn_q.weight", ".attn_k.weight", ".attn_v.weight",
                                                   ".attn_output.weight")):
            assert p.ggml_type == quants.Q4_K
    size = estimate_bytes(s)
    assert 8.0e9 < size < 9.0e9, size


def test_explicit_options_override_preset():
    s = make_spec("qwen3moe", "bench", n_layer=2, n_expert=16, n_vocab=600, seed=9)
    assert (s.n_layer, s.n_expert, s.n_expert_used, s.n_embd, s.n_vocab, s.seed) == (2, 16, 8, 2048, 600, 9)
    t = make_spec("qwen2moe", "tiny", n_embd=512)
    assert t.head_dim == 512 // t.n_head  # qwen2moe derives the head size from embd / heads


def test_tiny_presets_are_small_and_moe(tiny_models):
    for arch, path in tiny_models.items():
        with open_model(path) as m:
            assert m.arch == arch and m.is_moe and m.n_layer == 4 and m.n_expert == 8 and m.n_expert_used == 2
            assert m.metadata["flashmoe.synth.preset"] == "tiny"
            assert m.metadata["flashmoe.synth.seed"] == 0
            assert m.metadata["general.name"]
            kinds = {t.expert_kind for t in m.tensors if t.is_expert}
            assert kinds == ({"gate_up", "down"} if arch == "qwen35moe" else {"gate", "up", "down"})
            if arch != "qwen3moe":
                assert any(t.name.endswith("ffn_gate_inp_shexp.weight") for t in m.tensors)


# -------------------------------------------------------------------------------- quant blocks

@pytest.mark.parametrize("tname", ["Q4_K", "Q8_0", "MXFP4", "F16", "F32"])
def test_random_blocks_are_finite_zero_mean_with_requested_std(tname):
    t = quants.type_id(tname)
    ne = (512, 64)
    rng = quants.new_rng([1, 2])
    raw = quants.random_tensor_bytes(rng, t, ne, std=0.05)
    assert raw.dtype == np.uint8 and raw.nbytes == quants.tensor_nbytes(t, ne)
    if t == quants.Q4_K:
        v = quants.dequantize_q4_k(raw)
    elif t == quants.Q8_0:
        v = quants.dequantize_q8_0(raw)
    elif t == quants.MXFP4:
        v = quants.dequantize_mxfp4(raw)
    elif t == quants.F16:
        v = raw.view(np.float16).astype(np.float32)
    else:
        v = raw.view(np.float32)
    assert v.size == ne[0] * ne[1] and np.isfinite(v).all()
    assert abs(float(v.mean())) < 0.005
    assert 0.03 < float(v.std()) < 0.08


def test_q4_k_scale_packing_round_trips():
    rng = np.random.default_rng(0)
    sc = rng.integers(0, 64, (100, 8), dtype=np.uint8)
    m = rng.integers(0, 64, (100, 8), dtype=np.uint8)
    sc2, m2 = quants.unpack_k4_scales(quants._pack_k4_scales(sc, m))
    assert (sc2 == sc).all() and (m2 == m).all()


def test_chunked_generation_is_deterministic():
    a = quants.random_tensor_bytes(quants.new_rng([5]), quants.Q4_K, (256, 300), 0.1)
    b = np.concatenate(list(quants.random_tensor_chunks(quants.new_rng([5]), quants.Q4_K, (256, 300), 0.1,
                                                        chunk_bytes=144 * 37)))
    assert a.nbytes == b.nbytes  # chunking changes the stream, but the size and validity hold
    assert np.isfinite(quants.dequantize_q4_k(b)).all()
    c = quants.random_tensor_bytes(quants.new_rng([5]), quants.Q4_K, (256, 300), 0.1)
    assert (a == c).all()


# ------------------------------------------------------------------------------------ tokenizer

ROUND_TRIP_TEXTS = [
    "Hello world",
    " leading and trailing spaces  ",
    "emoji 😀🎉👩‍👩‍👧 and CJK 你好，世界 / 日本語 / 한국어",
    "ünïcödé ñ ß Ελληνικά русский العربية",
    "tabs\tand\nnew\r\nlines\n\n",
    'code: def f(x):\n    return {"a": [1, 2, 3]}',
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
]


def test_vocab_layout():
    tokens, scores, types = build_vocab(1000)
    assert len(tokens) == len(scores) == len(types) == 1000 == len(set(tokens))
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3] == "<0x00>" and tokens[3 + 255] == "<0xFF>" and set(types[3:259]) == {6}
    for special in ("<|im_start|>", "<|im_end|>"):
        assert types[tokens.index(special)] == 3  # control
    for user in ("<tool_call>", "</tool_call>"):
        assert types[tokens.index(user)] == 4  # user-defined
    assert "\u2581the" in tokens


def test_tokenizer_round_trips_utf8(llama_cpp, tiny_model):
    llm = llama_cpp.Llama(tiny_model, n_ctx=512, verbose=False, vocab_only=True)
    for text in ROUND_TRIP_TEXTS:
        toks = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert llm.detokenize(toks) == text.encode(), text
    # merged pieces are used (not only bytes / single characters)
    assert len(llm.tokenize(b"the world", add_bos=False)) < len("the world")
    # ChatML markers are single special tokens
    ids = llm.tokenize(b"<|im_start|>user\nhi<|im_end|>", add_bos=False, special=True)
    assert ids[0] == 259  # <|im_start|>: after <unk> <s> </s> and the 256 byte tokens
    assert ids[-1] == llm.token_eos()
    assert llm.detokenize([llm.token_eos()], special=True) == b"<|im_end|>"


# -------------------------------------------------------------------------------- chat template

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21}"},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
    {"role": "user", "content": "Thanks!"},
]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_chat_template_renders_tool_call():
    text = render_chat(MESSAGES, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n")
    tools_block = text.split("\n<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert [json.loads(line) for line in tools_block.splitlines()] == TOOLS
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>\n") in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp_c\": 21}\n</tool_response><|im_end|>\n" in text
    assert "<|im_start|>assistant\nIt is 21 °C in Paris.<|im_end|>\n" in text
    assert text.endswith("<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    # arguments given as an object render the same JSON
    msgs = json.loads(json.dumps(MESSAGES))
    msgs[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    assert render_chat(msgs, tools=TOOLS) == text
    # without tools: plain ChatML
    plain = render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"


def test_chat_template_through_llama_cpp(llama_cpp, tiny_model):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = llama_cpp.Llama(tiny_model, n_ctx=1024, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>", bos_token="<s>")
    assert fmt(messages=MESSAGES, tools=TOOLS).prompt == render_chat(MESSAGES, tools=TOOLS)
    out = llm.create_chat_completion(messages=MESSAGES[:2], tools=TOOLS, max_tokens=4, temperature=0.0)
    assert out["choices"][0]["message"]["role"] == "assistant"


def test_writer_lays_out_gguf_as_gguf_py_does(tmp_path):
    """gguf_tools.writer (the one path synth, repack and quantize write through) gives the bytes gguf-py's
    GGUFWriter gives for the same key/values and tensor table: header, key/values of every value type the
    models use, tensor infos (ne order) and offsets at the alignment."""
    import gguf

    from gguf_tools.writer import KV, TensorEntry, layout_file

    path = str(tmp_path / "g.gguf")
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_uint32("general.alignment", 64)
    w.data_alignment = 64
    w.add_float32("a.f", 1.5)
    w.add_bool("a.b", True)
    w.add_uint64("a.u64", 2**40)
    w.add_key_value("a.toks", ["x", "yy", "\u2581z"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    w.add_key_value("a.scores", [0.0, -1.0, -2.5], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)
    w.add_key_value("a.types", [1, 2, 6], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
    w.add_tensor_info("t0", (4, 64), np.dtype(np.float32), 4 * 64 * 4, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.add_tensor_info("t1", (3, 32), np.dtype(np.float16), 3 * 32 * 2, raw_dtype=gguf.GGMLQuantizationType.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    theirs = open(path, "rb").read()

    kv = (KV().s("general.architecture", "qwen3moe").u32("general.alignment", 64).f32("a.f", 1.5).b("a.b", True)
          .add("a.u64", "UINT64", 2**40).add("a.toks", "ARRAY", ["x", "yy", "\u2581z"], "STRING")
          .add("a.scores", "ARRAY", [0.0, -1.0, -2.5], "FLOAT32").add("a.types", "ARRAY", [1, 2, 6], "INT32"))
    entries = [TensorEntry("t0", (64, 4), 0, 4 * 64 * 4), TensorEntry("t1", (32, 3), 1, 3 * 32 * 2)]
    hdr, offsets, size = layout_file(kv.encode(), len(kv), entries, 64)
    assert hdr[:len(theirs)] == theirs
    assert hdr[len(theirs):] == b"\0" * (len(hdr) - len(theirs)) and len(hdr) % 64 == 0  # padded to the data
    assert offsets == [0, 1024] and size == len(hdr) + 1024 + 192
