"""`flashmoe quantize` (issue #9): mixed-precision requantization through llama.cpp's quantizer, written in
the streaming layout in one pass. Tiny synthetic models, the real llama.cpp."""
from __future__ import annotations

import ctypes
import hashlib
import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from flashmoe.cli import main
from flashmoe.errors import FlashMoEError, UsageError
from gguf_tools import quantize as qmod
from gguf_tools.reader import open_model
from gguf_tools.repack import expert_layout

PROMPT = "hello world, the model reads experts from the disk"
ALIGN = 16384


def sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def tensors(path):
    with open_model(path) as m:
        return {t.name: (t.type_name, tuple(t.shape), hashlib.sha256(m.read_bytes(t)).hexdigest()) for t in m.tensors}


def kept_at_precision(name, shape) -> bool:
    return len([d for d in shape if d > 1]) < 2 or name.endswith(("_norm.weight", "ffn_gate_inp.weight"))


def generate(path, n=8, **kw):
    from flashmoe.engine import Engine

    with Engine(path, use_extra_bufts=False, n_ctx=256, **kw) as e:
        g = e.generate(PROMPT, n, stop_at_eos=False)
        logits = e._last_logits()
    assert np.all(np.isfinite(logits))
    return g.tokens


@pytest.fixture(scope="module")
def q2(tiny_models, tmp_path_factory):
    """The tiny qwen3moe quantized by the CLI: experts Q2_K, dense Q8_0. (src, out, sha before, output)."""
    src = tiny_models["qwen3moe"]
    before = sha(src)
    out = str(tmp_path_factory.mktemp("quant") / "tiny-q2k-q80.gguf")
    code, output = cli("quantize", src, "-o", out, "--experts", "Q2_K", "--dense", "Q8_0", "--no-progress")
    assert code == 0, output
    return src, out, before, output


# ------------------------------------------------------------------------------------- the main path


def test_quantize_types_layout_source_and_generation(q2, llama_cpp):
    src, out, before, output = q2
    assert sha(src) == before  # the source is untouched
    assert "verified" in output and "Q4_K -> Q2_K" in output and "F16 -> Q8_0" in output

    ti, to = tensors(src), tensors(out)
    assert set(ti) == set(to)
    for name, (typ, shape, h) in ti.items():
        otyp, oshape, oh = to[name]
        assert oshape == shape, name
        if kept_at_precision(name, shape):  # router, norms, 1-D: same type, same bytes
            assert (otyp, oh) == (typ, h), name
        elif ".ffn_" in name and name.endswith("_exps.weight"):
            assert otyp == "Q2_K", name
        else:
            assert otyp == "Q8_0", name
    assert to["blk.0.ffn_gate_inp.weight"][0] == "F32"

    with open_model(out) as m:
        md = m.metadata
        assert md["general.file_type"] == 10  # LLAMA_FTYPE_MOSTLY_Q2_K
        assert md["general.alignment"] == ALIGN
        assert md["flashmoe.quantize.recipe"] == "experts=Q2_K dense=Q8_0"
        assert md["tokenizer.ggml.tokens"] == open_model(src).metadata["tokenizer.ggml.tokens"]
        lay = expert_layout(m)
        assert lay["grouped"] and lay["dense_first"]
        for t in m.tensors:
            assert t.data_offset % ALIGN == 0, t.name
            if t.is_expert:
                assert t.expert_stride * t.shape[2] == t.nbytes
    assert os.path.getsize(out) < os.path.getsize(src) + 51 * ALIGN  # smaller data, only padding added

    toks = generate(out)
    assert len(toks) == 8


def test_quantized_file_streams_like_it_runs(q2, llama_cpp):
    """The quantized file runs with its experts streamed through the expert cache: same greedy tokens."""
    from flashmoe.hook import available
    from flashmoe.settings import StreamSettings

    if not available():
        pytest.skip("the imported llama.cpp has no flashmoe hook")
    _, out, _, _ = q2
    assert generate(out, stream=StreamSettings(mode="cache", cache_slots=2)) == generate(out)


def test_same_bytes_as_llama_model_quantize(tiny_models, tmp_path, llama_cpp):
    """Every tensor byte-identical to llama.cpp's own llama_model_quantize (pure Q2_K, requantizing)."""
    src = tiny_models["qwen3moe"]
    ref = tmp_path / "ref-q2k.gguf"
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = 10  # LLAMA_FTYPE_MOSTLY_Q2_K
    p.pure = True
    p.allow_requantize = True
    p.quantize_output_tensor = True
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(src.encode(), str(ref).encode(), ctypes.byref(p)) == 0
    res = qmod.quantize(src, tmp_path / "ours.gguf", experts="Q2_K", dense="Q2_K")
    assert {n: (t, h) for n, (t, _, h) in tensors(str(ref)).items()} == \
        {n: (t, h) for n, (t, _, h) in tensors(res.paths[0]).items()}


# ------------------------------------------------------------------------------------- errors


def test_unknown_type_lists_valid_names(tiny_models, tmp_path, run_cli):
    out = tmp_path / "x.gguf"
    r = run_cli("quantize", tiny_models["qwen3moe"], "-o", out, "--experts", "Q9_K")
    assert r.code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "Q9_K" in lines[0] and "valid types:" in lines[0]
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0", "IQ2_XXS", "IQ4_XS", "F16", "keep"):
        assert name in lines[0]
    assert not out.exists()
    r = run_cli("quantize", tiny_models["qwen3moe"], "-o", out, "--experts", "Q2_K", "--rule", "attn_q=Q7")
    assert r.code == 2 and "valid types:" in r.stderr and not out.exists()


def test_type_needing_an_imatrix_without_one(tiny_models, tmp_path, run_cli):
    src = tiny_models["qwen3moe"]
    before = sha(src)
    out = tmp_path / "x.gguf"
    r = run_cli("quantize", src, "-o", out, "--experts", "IQ2_XXS", "--dense", "Q8_0")
    assert r.code == 1 and "Traceback" not in r.stderr
    assert "IQ2_XXS needs an importance matrix" in r.stderr and "--imatrix" in r.stderr
    assert os.listdir(tmp_path) == []  # no output, no temporary file
    assert sha(src) == before


def test_nothing_to_do_and_rules(tiny_models, tmp_path):
    src = tiny_models["qwen3moe"]
    with pytest.raises(UsageError, match="nothing to quantize"):
        qmod.quantize(src, tmp_path / "x.gguf")
    with pytest.raises(UsageError, match="PATTERN=TYPE"):
        qmod.quantize(src, tmp_path / "x.gguf", rules=["attn_q"])
    with pytest.raises(UsageError, match="bad regular expression"):
        qmod.quantize(src, tmp_path / "x.gguf", rules=["(=Q4_0"])
    # first rule wins; keep; rules never touch the router; a rule matching nothing is reported
    res = qmod.quantize(src, tmp_path / "r.gguf", experts="Q3_K", dense="Q6_K",
                        rules=[r"blk\.0\.ffn_down=Q5_K", r"ffn_down_exps=Q4_0", r"attn_v=keep",
                               "ffn_gate_inp=Q8_0", "no_such_tensor=Q8_0"])
    to, ti = tensors(res.paths[0]), tensors(src)
    assert to["blk.0.ffn_down_exps.weight"][0] == "Q5_K"
    assert to["blk.1.ffn_down_exps.weight"][0] == "Q4_0"
    assert to["blk.1.ffn_up_exps.weight"][0] == "Q3_K"
    assert to["blk.2.attn_v.weight"] == ti["blk.2.attn_v.weight"]
    assert to["blk.2.attn_q.weight"][0] == "Q6_K"
    assert to["blk.0.ffn_gate_inp.weight"] == ti["blk.0.ffn_gate_inp.weight"]
    assert any("ffn_gate_inp=Q8_0" in n and "kept at their precision" in n for n in res.notes)
    assert any("no_such_tensor=Q8_0" in n and "matches no tensor" in n for n in res.notes)
    assert any("already Q4_K" in n for n in res.notes)


def test_fallback_for_row_lengths_not_a_multiple_of_the_block(tiny_models, tmp_path, llama_cpp):
    """qwen2moe's shared-expert down projection has rows of 128: Q6_K (256) falls back to Q8_0, as llama.cpp."""
    src = tiny_models["qwen2moe"]
    res = qmod.quantize(src, tmp_path / "fb.gguf", experts="Q4_K", dense="Q6_K")
    to = tensors(res.paths[0])
    assert to["blk.0.ffn_down_shexp.weight"][0] == "Q8_0" and to["blk.0.ffn_down_shexp.weight"][1][0] == 128
    assert to["blk.0.ffn_up_shexp.weight"][0] == "Q6_K"
    fb = [c for c in res.changes if c.fallback]
    assert fb and all(c.wanted == "Q6_K" and c.dst_type == "Q8_0" for c in fb)
    assert any(n.startswith("fallback:") and "Q6_K" in n and "Q8_0" in n for n in res.notes)
    assert len(generate(res.paths[0])) == 8


def test_failure_midway_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    src = tiny_models["qwen3moe"]
    before = sha(src)
    calls = {"n": 0}
    real = qmod.quantize_rows

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise FlashMoEError("quantized Q2_K data failed llama.cpp's validation")
        return real(*a, **k)

    monkeypatch.setattr(qmod, "quantize_rows", flaky)
    with pytest.raises(FlashMoEError, match="validation"):
        qmod.quantize(src, tmp_path / "x.gguf", experts="Q2_K", dense="Q8_0", threads=1)
    assert os.listdir(tmp_path) == []
    assert sha(src) == before


# ------------------------------------------------------------------------------------- imatrix


def _expert_entries(path, seed=0):
    """Random positive importance values for every expert tensor: name -> (values [n_expert, ne0], counts)."""
    rng = np.random.default_rng(seed)
    out = {}
    with open_model(path) as m:
        for t in m.tensors:
            if t.is_expert:
                ne0, _, n_e = t.shape
                out[t.name] = (rng.uniform(0.1, 4.0, (n_e, ne0)).astype(np.float32),
                               rng.integers(1, 50, n_e).astype(np.float32))
    return out


def write_imatrix_gguf(path, entries):
    import gguf

    w = gguf.GGUFWriter(str(path), "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", ["test.txt"])
    w.add_uint32("imatrix.chunk_count", 10)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, (vals, counts) in entries.items():
        w.add_tensor(name + ".in_sum2", vals * counts[:, None])  # numpy [n_mat, ne0] = ggml [ne0, n_mat]
        w.add_tensor(name + ".counts", counts.reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_imatrix_dat(path, entries, ncall=7):
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, (vals, _) in entries.items():
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, vals.size))
            f.write((vals.reshape(-1) * ncall).astype(np.float32).tobytes())
        f.write(struct.pack("<i", 10) + struct.pack("<i", 8) + b"test.txt")


def test_imatrix_gguf_and_dat(tiny_models, tmp_path, llama_cpp):
    src = tiny_models["qwen3moe"]
    entries = _expert_entries(src)
    write_imatrix_gguf(tmp_path / "im.gguf", entries)
    write_imatrix_dat(tmp_path / "im.dat", entries)
    a = qmod.read_imatrix(str(tmp_path / "im.gguf"))
    b = qmod.read_imatrix(str(tmp_path / "im.dat"))
    for name, (vals, _) in entries.items():
        np.testing.assert_allclose(a[name], vals.reshape(-1), rtol=1e-6)
        np.testing.assert_allclose(b[name], vals.reshape(-1), rtol=1e-6)

    rule = r"blk\.0\.ffn_down_exps=IQ2_XXS"
    code, output = cli("quantize", src, "-o", tmp_path / "g.gguf", "--rule", rule, "--imatrix", tmp_path / "im.gguf",
                       "--no-progress")
    assert code == 0, output
    code, output = cli("quantize", src, "-o", tmp_path / "d.gguf", "--rule", rule, "--imatrix", tmp_path / "im.dat",
                       "--no-progress")
    assert code == 0, output
    tg, td, ti = tensors(tmp_path / "g.gguf"), tensors(tmp_path / "d.gguf"), tensors(src)
    assert tg["blk.0.ffn_down_exps.weight"][0] == "IQ2_XXS"
    assert tg == td  # same importance values from either format -> same bytes
    assert tg["blk.1.ffn_down_exps.weight"] == ti["blk.1.ffn_down_exps.weight"]  # --experts keep
    assert len(generate(str(tmp_path / "g.gguf"))) == 8

    # an imatrix without data for the tensor that needs it
    del entries["blk.0.ffn_down_exps.weight"]
    write_imatrix_gguf(tmp_path / "partial.gguf", entries)
    with pytest.raises(FlashMoEError, match="has no data for blk.0.ffn_down_exps.weight"):
        qmod.quantize(src, tmp_path / "x.gguf", rules=[rule], imatrix=str(tmp_path / "partial.gguf"))
    # not an imatrix at all
    (tmp_path / "junk.dat").write_bytes(b"\x01\x00\x00\x00garbage")
    with pytest.raises(FlashMoEError, match="not an importance matrix"):
        qmod.quantize(src, tmp_path / "x.gguf", experts="Q2_K", imatrix=str(tmp_path / "junk.dat"))
    assert not (tmp_path / "x.gguf").exists()


def test_imatrix_same_bytes_as_llama_model_quantize(tiny_models, tmp_path, llama_cpp):
    """With an importance matrix, Q4_K experts are byte-identical to llama_model_quantize given the same data."""
    src = tiny_models["qwen3moe"]
    entries = _expert_entries(src, seed=1)
    write_imatrix_gguf(tmp_path / "im.gguf", entries)
    data = qmod.read_imatrix(str(tmp_path / "im.gguf"))
    arr = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
    keep = []
    for i, (name, vals) in enumerate(data.items()):
        v = np.ascontiguousarray(vals, dtype=np.float32)
        keep.append((name.encode(), v))
        arr[i].name = keep[-1][0]
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(data)].name = None
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = 15  # Q4_K_M, pure: every matrix Q4_K
    p.pure = True
    p.allow_requantize = True
    p.quantize_output_tensor = True
    p.nthread = 2
    p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    # the source's experts are Q4_K already (both quantizers would copy them): go through F16 first, with
    # llama.cpp's default alignment (llama_model_quantize writes a broken file from a 16 KiB-aligned input)
    f16 = qmod.quantize(src, tmp_path / "f16.gguf", experts="F16", align=32)
    ref16 = tmp_path / "ref16.gguf"
    assert llama_cpp.llama_model_quantize(f16.paths[0].encode(), str(ref16).encode(), ctypes.byref(p)) == 0
    ours = qmod.quantize(f16.paths[0], tmp_path / "ours.gguf", experts="Q4_K", dense="Q4_K",
                         imatrix=str(tmp_path / "im.gguf"))
    want = {n: (t, h) for n, (t, _, h) in tensors(str(ref16)).items()}
    got = {n: (t, h) for n, (t, _, h) in tensors(ours.paths[0]).items()}
    assert got == want
    # and the importance data did change the experts (vs. no imatrix)
    plain = qmod.quantize(f16.paths[0], tmp_path / "plain.gguf", experts="Q4_K", dense="Q4_K")
    assert tensors(plain.paths[0])["blk.0.ffn_up_exps.weight"][2] != got["blk.0.ffn_up_exps.weight"][1]
    assert tensors(plain.paths[0])["blk.0.attn_q.weight"][2] == got["blk.0.attn_q.weight"][1]


def test_hybrid_arch_with_fused_gate_up(tiny_models, tmp_path, llama_cpp):
    """qwen35moe (recurrent layers, fused ffn_gate_up_exps, shared experts): quantizes, keeps its small
    special tensors, runs."""
    src = tiny_models["qwen35moe"]
    res = qmod.quantize(src, tmp_path / "h.gguf", experts="Q2_K", dense="Q8_0")
    ti, to = tensors(src), tensors(res.paths[0])
    assert to["blk.0.ffn_gate_up_exps.weight"][0] == "Q2_K"
    conv = [n for n in ti if "ssm_conv1d" in n]
    assert conv and all(to[n] == ti[n] for n in conv)
    assert len(generate(res.paths[0])) == 8
