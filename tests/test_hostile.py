"""Every input is hostile (issue 15, item 5): the cases a hostile-user probe found, one test each.

Each test fails on the code before its fix: a traceback, a hang, an abort inside llama.cpp (exit
134, nothing printed), a file "repaired" that llama.cpp rejects, or a server killed by one request.
After the fix each ends in one clear line (CLI: ``error: ...`` and a non-zero exit) or an
OpenAI-shaped 4xx (server). Real files, real llama.cpp loads and a real server process where the
failure was in llama.cpp.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc

import pytest

from conftest import serve_cli
from click.testing import CliRunner

from hostile_inputs import GGUFDoc, T_ARRAY, T_FLOAT32, T_STRING, T_UINT32

from flashmoe.cli import main
from flashmoe.errors import FlashMoEError
from gguf_tools.reader import open_model, read_header

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(code, stderr, *needles, want_code=None):
    """The CLI contract: non-zero exit, exactly one line on stderr, ``error: ...``, no traceback."""
    assert code != 0, stderr
    if want_code is not None:
        assert code == want_code, (code, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stderr, r


def run_cli(*args, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "flashmoe", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=REPO_ROOT)
    return p.returncode, p.stdout, p.stderr


def mutant(tiny_model, tmp_path, name, edit, raw_offsets=False):
    doc = GGUFDoc.load(tiny_model)
    if raw_offsets:
        doc.layout()
    edit(doc)
    return doc.write(str(tmp_path / f"{name}.gguf"), raw_offsets=raw_offsets)


# ----------------------------------------------------------------------- 1. tracebacks become one line


def test_invalid_utf8_metadata_string_is_one_line_in_inspect_generate_repack(tiny_model, tmp_path):
    def edit(d):
        d.kv("general.name").value = b"bad \xff\xfe name"

    bad = mutant(tiny_model, tmp_path, "utf8", edit)
    code, err, _ = cli("inspect", bad)
    one_line_error(code, err, "general.name", "not valid UTF-8", want_code=1)
    out = tmp_path / "out.gguf"
    code, err, _ = cli("repack", bad, "-o", out)
    one_line_error(code, err, "not valid UTF-8")
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    code, _out, err = run_cli("generate", "-m", bad, "-p", "hi", "-n", "2")
    one_line_error(code, err, "general.name", "not valid UTF-8", want_code=1)


def test_invalid_utf8_token_and_key(tiny_model, tmp_path):
    def tok(d):
        t = d.kv("tokenizer.ggml.tokens")
        t.value = list(t.value)
        t.value[300] = b"\xc3\x28"

    def key(d):
        d.kv("general.type").name = b"general.\xe2\x82"  # the key itself

    for name, edit in (("tok", tok), ("key", key)):
        with pytest.raises(FlashMoEError, match="not valid UTF-8"):
            open_model(mutant(tiny_model, tmp_path, name, edit))


@pytest.mark.parametrize("value", ["1e400", "1e999999999", "9" * 5000, "2e30TiB"])
def test_huge_sizes_are_one_line(tmp_path, tiny_model, value):
    from flashmoe.sizes import SizeError, parse_size

    t0 = time.time()
    with pytest.raises(SizeError, match="too large|cannot parse"):
        parse_size(value)
    assert time.time() - t0 < 1
    pol = tmp_path / "p.yaml"
    pol.write_text(f"version: 1\nname: huge\nbudget: {value}\nrules:\n  - match: \"*\"\n    place: pin\n")
    code, err, _ = cli("policy", "validate", pol)
    line = one_line_error(code, err)
    assert "budget" in line or "too many digits" in line, line
    code, err, _ = cli("generate", "-m", tiny_model, "-p", "x", "--cache-size", value)
    one_line_error(code, err, "--cache-size", want_code=2)


def test_parse_size_is_exact_and_bounded():
    from flashmoe.sizes import MAX_SIZE, SizeError, parse_size

    assert parse_size("1.5G") == 3 << 29
    assert parse_size("1e-400") == 0 and parse_size("1e3K") == 1024000
    assert parse_size("1PiB") == 1 << 50
    with pytest.raises(SizeError):
        parse_size(MAX_SIZE + 1)
    with pytest.raises(SizeError):
        parse_size(float("1e300"))


@pytest.fixture
def trace_file(tmp_path, tiny_model):
    from flashmoe import trace as T

    path = str(tmp_path / "t.fmrt")
    T.write_trace(path, T.trace_for_model(tiny_model, "uniform", 8, 0))
    return path


@pytest.mark.parametrize("cut", [0, 10, 31, 32, 49, 100])
def test_trace_cut_short_is_one_line(trace_file, tmp_path, cut):
    from flashmoe.trace import read_trace

    data = open(trace_file, "rb").read()
    p = tmp_path / f"cut{cut}.fmrt"
    p.write_bytes(data[:cut])
    with pytest.raises(FlashMoEError):
        read_trace(str(p))
    code, err, _ = cli("trace", "stats", p)
    one_line_error(code, err, want_code=1)


def test_trace_header_lies_are_refused_before_reading(trace_file, tmp_path):
    from flashmoe.trace import read_trace

    data = bytearray(open(trace_file, "rb").read())
    for off, value, needle in ((8, 0xFFFFFFFF, "at most 4096 layers"), (8, 5, "header says"), (24, 1 << 62, "header says"),
                               (12, 0, "empty"),
                               (16, 1, "experts per token")):
        d = bytearray(data)
        fmt = "<Q" if off == 24 else "<I"
        struct.pack_into(fmt, d, off, value)
        p = tmp_path / f"lie{off}.fmrt"
        p.write_bytes(bytes(d))
        t0 = time.time()
        with pytest.raises(FlashMoEError, match=needle):
            read_trace(str(p))
        assert time.time() - t0 < 1
    d = bytearray(data)
    struct.pack_into("<i", d, 32 + 4 * 4, 99)  # the first expert id
    p = tmp_path / "range.fmrt"
    p.write_bytes(bytes(d))
    with pytest.raises(FlashMoEError, match="out of range"):
        read_trace(str(p))


# ----------------------------------------------------------------------- 2. no hang: counts bounded by the file


@pytest.mark.parametrize("sub,count", [(T_ARRAY, 10**9), (T_FLOAT32, 10**9), (T_STRING, 2**60), (T_ARRAY, 3)])
def test_absurd_array_claims_fail_at_once(tiny_model, tmp_path, sub, count):
    def edit(d):
        d.kv("tokenizer.ggml.scores").raw_value = struct.pack("<IIQ", T_ARRAY, sub, count)

    bad = mutant(tiny_model, tmp_path, f"claim{sub}", edit)
    tracemalloc.start()
    t0 = time.time()
    try:
        with pytest.raises(FlashMoEError, match="tokenizer.ggml.scores"):
            open_model(bad)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.time() - t0 < 2, "bounded by the file's size"
    assert peak < 64 << 20, peak
    # every path that opens a model: the header reader, repack's metadata copy, the policy's view
    from flashmoe.policy import open_model_view
    from gguf_tools.repack import raw_kvs

    for fn in (read_header, raw_kvs, open_model_view):
        t0 = time.time()
        with pytest.raises(FlashMoEError):
            fn(bad)
        assert time.time() - t0 < 2
    code, err, _ = cli("inspect", bad)
    one_line_error(code, err, "tokenizer.ggml.scores", want_code=1)


def test_absurd_header_counts_and_string_lengths(tiny_model, tmp_path):
    data = open(tiny_model, "rb").read()
    for name, patch in (("ntensors", (8, "<Q", 10**15)), ("nkv", (16, "<Q", 2**63)),
                        ("keylen", (24, "<Q", 2**62))):
        off, fmt, v = patch
        d = bytearray(data)
        struct.pack_into(fmt, d, off, v)
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(bytes(d))
        t0 = time.time()
        with pytest.raises(FlashMoEError, match="truncated or corrupt"):
            open_model(str(p))
        assert time.time() - t0 < 1


# ----------------------------------------------------------------------- 3. hyper-parameters llama.cpp asserts on


HPARAM_CASES = [
    ("expert_count_0", lambda d: d.set("qwen3moe.expert_count", T_UINT32, 0), "expert_count"),
    ("expert_used_0", lambda d: d.set("qwen3moe.expert_used_count", T_UINT32, 0), "expert_used_count"),
    ("expert_used_9", lambda d: d.set("qwen3moe.expert_used_count", T_UINT32, 9), "expert_used_count"),
    ("block_count_0", lambda d: d.set("qwen3moe.block_count", T_UINT32, 0), "block_count"),
    ("rope_type", lambda d: d.set("qwen3moe.rope.scaling.type", T_STRING, "bogus"), "rope.scaling.type"),
    ("dup_token", lambda d: d.kv("tokenizer.ggml.tokens").value.__setitem__(7, d.kv("tokenizer.ggml.tokens").value[8]),
     "twice"),
]


@pytest.mark.parametrize("name,edit,needle", HPARAM_CASES, ids=[c[0] for c in HPARAM_CASES])
def test_hparams_that_abort_llama_cpp_are_refused_first(tiny_model, tmp_path, name, edit, needle):
    from gguf_tools.validate import problems

    bad = mutant(tiny_model, tmp_path, name, edit)
    with open_model(bad) as m:
        assert any(needle in p for p in problems(m)), problems(m)
    code, out, err = run_cli("generate", "-m", bad, "-p", "hi", "-n", "2")
    line = one_line_error(code, err, "cannot be loaded", needle, want_code=1)
    assert code != 134 and not out.strip(), line
    # inspect reports the problems, and exits 1 with one line that says the model will not load
    code, err, r = cli("inspect", bad)
    assert "PROBLEMS: llama.cpp cannot load this model" in r.stdout and needle in r.stdout
    one_line_error(code, err, "llama.cpp cannot load this model", "listed above", want_code=1)
    code, err, r = cli("inspect", bad, "--json")
    assert any(needle in p for p in json.loads(r.stdout)["problems"])
    one_line_error(code, err, 'in "problems"', want_code=1)


def test_those_hparams_really_abort_llama_cpp(llama_cpp, tiny_model, tmp_path):
    """The reason for the checks above: llama.cpp itself aborts the process on these files."""
    bad = mutant(tiny_model, tmp_path, "ec0", HPARAM_CASES[0][1])
    code = "import llama_cpp, sys; llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False)"
    p = subprocess.run([sys.executable, "-c", code, bad], capture_output=True, text=True, timeout=120)
    assert p.returncode in (-6, 134), (p.returncode, p.stderr[-500:])


def test_experts_per_token_beyond_the_experts_is_a_usage_error(tiny_model):
    code, _out, err = run_cli("generate", "-m", tiny_model, "-p", "hi", "-n", "2", "--experts-per-token", "9")
    one_line_error(code, err, "experts per token", want_code=2)


def test_sound_models_have_no_problems(tiny_models):
    from gguf_tools.validate import problems

    for path in tiny_models.values():
        with open_model(path) as m:
            assert problems(m) == []


# ----------------------------------------------------------------------- 4. repack refuses what llama.cpp refuses


def _shift(k, delta):
    def edit(d):
        d.tensors[k].rel_offset += delta
    return edit


LAYOUT_CASES = [
    ("offset_plus_1", _shift(3, 1), "not a multiple of general.alignment"),
    ("overlap", _shift(3, -32), "overlaps"),
    ("gap", _shift(3, 64), "gap"),
    ("past_end", lambda d: setattr(d.tensors[-1], "rel_offset", d.tensors[-1].rel_offset + (1 << 30)), "gap"),
    ("shape", lambda d: setattr(d.tensors[2], "shape", (d.tensors[2].shape[0] * 2,) + tuple(d.tensors[2].shape[1:])),
     "overlaps"),
]


@pytest.mark.parametrize("name,edit,needle", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_repack_refuses_layouts_llama_cpp_refuses(tiny_model, tmp_path, name, edit, needle):
    bad = mutant(tiny_model, tmp_path, name, edit, raw_offsets=True)
    out = tmp_path / "fixed.gguf"
    code, err, _ = cli("repack", bad, "-o", out)
    one_line_error(code, err, needle, want_code=1)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == [f"{name}.gguf"]
    with pytest.raises(FlashMoEError, match=needle):  # and every other command
        open_model(bad)


def test_data_cut_short_is_refused_by_repack(tiny_model, tmp_path):
    data = open(tiny_model, "rb").read()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:-100])
    code, err, _ = cli("repack", p, "-o", tmp_path / "o.gguf")
    one_line_error(code, err, "truncated", want_code=1)


def test_llama_cpp_refuses_the_offset_moved_by_one(llama_cpp, tiny_model, tmp_path):
    """What the reader now mirrors: llama.cpp's own loader fails on this file."""
    bad = mutant(tiny_model, tmp_path, "plus1", LAYOUT_CASES[0][1], raw_offsets=True)
    code = ("import llama_cpp, sys\ntry:\n    llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False)\n"
            "    print('LOADED')\nexcept Exception as e:\n    print('REFUSED')")
    p = subprocess.run([sys.executable, "-c", code, bad], capture_output=True, text=True, timeout=120)
    assert "REFUSED" in p.stdout, (p.returncode, p.stdout, p.stderr[-300:])


# ----------------------------------------------------------------------- 6. --record-trace folder checked first


@pytest.mark.parametrize("target,needle", [("/nonexistent/dir/x.fmrt", "does not exist"),
                                           ("/proc/flashmoe-x.fmrt", "cannot write")])
def test_record_trace_folder_checked_before_generating(tiny_model, target, needle):
    code, out, err = run_cli("generate", "-m", tiny_model, "-p", "hi", "-n", "4", "--record-trace", target)
    one_line_error(code, err, "--record-trace", needle, want_code=1)
    assert out == ""  # nothing was generated


# ----------------------------------------------------------------------- 5. the server


@pytest.fixture(scope="module")
def app_client(llama_cpp, tiny_model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from flashmoe.engine import Engine
    from flashmoe.server import create_app
    from flashmoe.settings import StreamSettings

    eng = Engine(tiny_model, stream=StreamSettings(mode="cache", cache_slots=2), n_ctx=1024)
    app = create_app(eng, api_key="k", model_name="tiny")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    eng.close()


H = {"Authorization": "Bearer k", "Content-Type": "application/json"}
ASK = [{"role": "user", "content": "Answer in JSON."}]


def post(c, body=None, raw=None, path="/v1/chat/completions"):
    r = c.post(path, content=raw if raw is not None else json.dumps(body), headers=H)
    return r


def openai_error(r, status, needle=None, param=None):
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.text[:200]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert "Traceback" not in r.text
    if needle:
        assert needle in err["message"], err
    if param:
        assert err["param"] == param, err
    return err


def rf(schema):
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


IMPOSSIBLE = [
    ({"enum": []}, "enum is empty"),
    ({"type": "string", "minLength": 10, "maxLength": 2}, "minLength 10 is more than maxLength 2"),
    ({"type": "number", "minimum": 5, "maximum": 1}, "minimum is above the maximum"),
    ({"type": "array", "items": {"type": "string"}, "minItems": 4, "maxItems": 1}, "minItems 4 is more than maxItems 1"),
    ({"type": "string", "enum": [1, 2]}, "no enum value is of type string"),
    ({"type": "integer", "minimum": 1.2, "maximum": 1.8}, "no integer"),
    ({"type": "nope"}, "not a valid JSON schema"),
    ({"not": {"type": "string"}}, "'not' is not supported"),
    ({"$ref": "https://example.com/s.json"}, "only local references"),
    ({"type": "string", "pattern": "\\d+"}, "anchored"),
    ({"type": "string", "maxLength": 10**9}, "too large"),
]


@pytest.mark.parametrize("schema,needle", IMPOSSIBLE, ids=[n for _s, n in IMPOSSIBLE])
def test_impossible_or_unsupported_response_format_is_a_400(app_client, schema, needle):
    openai_error(post(app_client, {"messages": ASK, "response_format": rf(schema)}), 400, needle, "response_format")


@pytest.mark.parametrize("schema,needle", IMPOSSIBLE[:7], ids=[n for _s, n in IMPOSSIBLE[:7]])
def test_tool_schemas_get_the_same_validation(app_client, schema, needle):
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    for choice in ("auto", "required"):
        openai_error(post(app_client, {"messages": ASK, "tools": [tool], "tool_choice": choice}), 400, needle,
                     "tools")


@pytest.mark.parametrize("const", ['a"b', "back\\slash", 'both \\" mixed', "new\nline", "\u00e9\u4e2d"])
def test_constants_with_quotes_and_backslashes_come_out_exact(app_client, const):
    """The upstream converter left backslashes unescaped: a grammar llama.cpp cannot parse (a crash)."""
    r = post(app_client, {"messages": ASK, "max_tokens": 32, "temperature": 0, "response_format": rf({"const": const})})
    assert r.status_code == 200, r.text[:300]
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == const


def test_body_of_100000_brackets_is_an_openai_400(app_client):
    err = openai_error(post(app_client, raw=b"[" * 100_000), 400)
    assert err["code"] == "invalid_json"
    openai_error(post(app_client, raw=b'{"messages": ' + b"[" * 500 + b"]" * 500 + b"}"), 400, "nests")


def test_20000_messages_are_refused_fast(app_client):
    t0 = time.time()
    err = openai_error(post(app_client, {"messages": [{"role": "user", "content": "hi"}] * 20000}), 400,
                       "too many messages", "messages")
    assert time.time() - t0 < 3 and err["code"] == "too_many_messages"
    # under the count limit but far over the context: refused before tokenizing
    t0 = time.time()
    openai_error(post(app_client, {"messages": [{"role": "user", "content": "<|im_end|>" * 100}] * 4000}), 400,
                 "at least", "messages")
    assert time.time() - t0 < 3


def test_oversized_body_nan_and_lone_surrogates(app_client):
    err = openai_error(post(app_client, raw=b'{"messages": "' + b"a" * (9 << 20) + b'"}'), 413)
    assert err["code"] == "request_too_large"
    openai_error(post(app_client, raw=b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'), 400,
                 "NaN")
    openai_error(post(app_client, raw=b'{"messages": [{"role": "user", "content": "\\ud800"}]}'), 400,
                 "not valid Unicode")
    openai_error(post(app_client, {"messages": ASK, "stop": ["x"] * 100}), 400, "stop strings", "stop")


def test_openapi_and_docs_need_the_key(app_client):
    assert app_client.get("/openapi.json").status_code == 401
    r = app_client.get("/openapi.json", headers=H)
    assert r.status_code == 200 and "paths" in r.json()
    for path in ("/docs", "/redoc"):
        assert app_client.get(path).status_code == 404
        assert app_client.get(path, headers=H).status_code == 404


def test_the_server_still_answers(app_client):
    r = post(app_client, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_one_request_no_longer_kills_flashmoe_serve(llama_cpp, tiny_model):
    """The probe's request (an empty enum) killed the server process with SIGSEGV: a real server now
    answers 400 and goes on serving."""
    httpx = pytest.importorskip("httpx")
    with serve_cli("-m", tiny_model, "--ctx", "512", "--log-level", "warning") as (p, url, _seen):
        body = {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": []}}}}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        r = httpx.post(url + "/v1/chat/completions", json={**body, "response_format": rf({"const": 'a"b'})},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert p.poll() is None
        r = httpx.post(url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200



# ----------------------------------------------------------------------- the grammar check mirrors llama.cpp


GRAMMARS = [
    ('root ::= "a"', True), ("root ::= x", False), ('root ::= root "a"', False), ('x ::= "a"', False),
    ("root ::= [a-", False), ('root ::= "\\q"', False), ('root ::= ("a" ("b")?)?', True),
    ('root ::= "a"{2001}', False), ('root ::= "a"{0,2001}', True), ('root ::= "a" | ', True),
    ('root ::= a\na ::= b?\nb ::= a "x"', False), ('root ::= "\\x41" [^\\u0000-\\u001F] .', True),
]


def test_gbnf_check_agrees_with_llama_cpp(llama_cpp, tiny_model, tmp_path):
    from flashmoe.gbnf import GrammarError, check_grammar

    ours = []
    for g, want in GRAMMARS:
        try:
            check_grammar(g)
            ok = True
        except GrammarError:
            ok = False
        assert ok == want, g
        ours.append(ok)
    assert llama_grammar_verdicts(tiny_model, [g for g, _ in GRAMMARS], tmp_path) == ours


ORACLE = r"""
import ctypes, json, sys
import llama_cpp as lc
cb = lc.llama_log_callback(lambda *a: None)
lc.llama_log_set(cb, ctypes.c_void_p())
p = lc.llama_model_default_params()
p.vocab_only = True
m = lc.llama_model_load_from_file(sys.argv[1].encode(), p)
vocab = lc.llama_model_get_vocab(m)
for line in open(sys.argv[2]):
    s = lc.llama_sampler_init_grammar(vocab, json.loads(line).encode("utf-8"), b"root")
    print(1 if s else 0, flush=True)
    if s:
        lc.llama_sampler_free(s)
"""


def llama_grammar_verdicts(model, grammars, tmp_path, timeout=120):
    """llama.cpp's own verdict on each grammar (llama_sampler_init_grammar: NULL = refused), in a subprocess."""
    src = tmp_path / "oracle.py"
    src.write_text(ORACLE)
    gfile = tmp_path / "grammars.jsonl"
    gfile.write_text("".join(json.dumps(g) + "\n" for g in grammars))
    p = subprocess.run([sys.executable, str(src), model, str(gfile)], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-500:]
    return [x == "1" for x in p.stdout.split()]


# ----------------------------------------------------------------------- found by the fuzz campaign (test_fuzz.py)


def _set(key, vtype, value):
    return lambda d: d.set(key, vtype, value)


def _retype(name, ggml_type):
    def edit(d):
        t = d.tensor(name)
        from gguf_tools.reader import tensor_nbytes

        t.ggml_type = ggml_type
        t.data = bytes(tensor_nbytes(ggml_type, t.shape))
    return edit


FUZZ_FOUND = [  # each aborted or crashed llama.cpp (exit 134 / SIGSEGV) before validate knew about it
    ("rope_dims", _set("qwen3moe.rope.dimension_count", T_UINT32, 1000), "rope.dimension_count"),
    ("rope_dims_vs_head", _set("qwen3moe.rope.dimension_count", T_UINT32, 32), "key_length = attention.value_length"),
    ("eps_nan", _set("qwen3moe.attention.layer_norm_rms_epsilon", T_FLOAT32, float("nan")), "finite"),
    ("alignment_1", _set("general.alignment", T_UINT32, 1), "32-byte aligned"),
    ("norm_f16", _retype("output_norm.weight", 1), "element-wise"),
    ("weight_i32", _retype("blk.1.attn_q.weight", 26), "cannot multiply"),
    ("gating_func", _set("qwen3moe.expert_gating_func", T_UINT32, 13), "expert_gating_func"),
    ("value_length", _set("qwen3moe.attention.value_length", T_UINT32, 2), "value_length"),
    ("context_huge", _set("qwen3moe.context_length", T_UINT32, 2**32 - 1), "context_length"),
    ("block_count_huge", _set("qwen3moe.block_count", T_UINT32, 2**31), "block_count"),
]


@pytest.mark.parametrize("name,edit,needle", FUZZ_FOUND, ids=[c[0] for c in FUZZ_FOUND])
def test_fuzz_found_hparams_are_problems(tiny_model, tmp_path, name, edit, needle):
    from gguf_tools.validate import problems

    def apply(d):
        if name == "alignment_1":
            d.alignment = 1
            d.set("flashmoe.test.pad", T_STRING, "x")  # moves the data section off a 32-byte boundary
        edit(d)

    bad = mutant(tiny_model, tmp_path, name, apply)
    t0 = time.time()
    with open_model(bad) as m:
        found = problems(m)
        from gguf_tools.inspect import model_facts

        model_facts(m)  # block_count 2**31 once made inspect loop for ever
    assert time.time() - t0 < 5
    assert any(needle in p for p in found), found


def test_missing_tensor_in_one_layer_is_a_problem(tiny_models, tmp_path):
    """qwen35moe: dropping one recurrent layer's attn_qkv made llama.cpp dereference NULL (SIGSEGV)."""
    from gguf_tools.validate import problems

    doc = GGUFDoc.load(tiny_models["qwen35moe"])
    doc.tensors = [t for t in doc.tensors if t.name != "blk.1.attn_qkv.weight"]
    p = doc.write(str(tmp_path / "drop.gguf"))
    with open_model(p) as m:
        assert any("blk.1.attn_qkv.weight" in x for x in problems(m)), problems(m)


def test_tool_calls_that_are_not_a_list_are_a_400(app_client):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": True}]
    openai_error(post(app_client, {"messages": msgs}), 400, "tool_calls", "messages")


@pytest.mark.parametrize("schema,needle", [
    ({"const": "é", "enum": ["a", "b"]}, "not one of the enum values"),
    ({"type": ["string", "integer"], "const": "0", "minLength": 2}, "satisfies"),
    ({"type": "string", "pattern": '^"+$'}, "must escape"),
    ({"type": "string", "pattern": "^[ -~]+$"}, "can produce"),
    ({"anyOf": [{"type": "string"}], "maxLength": 3}, "cannot be combined"),
    ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 2}]}, "may overlap"),
])
def test_schemas_the_grammar_would_not_honour_are_refused(schema, needle):
    from flashmoe.schemas import SchemaProblem, schema_to_grammar

    with pytest.raises(SchemaProblem, match=needle):
        schema_to_grammar(schema)


@pytest.mark.parametrize("pattern,ok,piece", [
    ("^a|b$", ["a", "b"], '("a" | "b")'),
    ("^[^x]{1,3}$", ["yz"], '[^x"\\\\\\x00-\\x1f\\x7f]'),
    ("^\\d+\\.\\d$", ["12.5"], "[0-9]+ [.] [0-9]"),
])
def test_patterns_become_json_safe_grammars(pattern, ok, piece):
    """The converter copied pattern characters unescaped into the JSON string (`^a|b$` even lost its
    quotes). What the grammar accepts is now valid JSON that matches the pattern."""
    from flashmoe.schemas import schema_to_grammar

    g = schema_to_grammar({"type": "string", "pattern": pattern})
    assert "root ::=" in g and '"\\""' in g
    import re as _re

    for s in ok:
        assert _re.search(pattern, s)
    # the grammar's root keeps its quotes around the whole pattern; classes never produce what JSON escapes
    root = [ln for ln in g.splitlines() if ln.startswith("root ::=")][0]
    assert root.startswith('root ::= "\\"" (') and root.endswith('"\\"" space'), root
    assert piece in g, g


def test_policy_files_with_control_characters_or_deep_nesting(tmp_path):
    for name, text in (("ctl", "version: 1\nname: x\x00\nrules: []\n"),
                       ("deep", "version: 1\nname: x\nextra: " + "[" * 5000 + "]" * 5000 + "\n"),
                       ("glob", "version: 1\nname: x\nrules:\n  - match: \"{\\n{\"\n    place: pin\n")):
        p = tmp_path / f"{name}.yaml"
        p.write_text(text)
        t0 = time.time()
        code, err, _ = cli("policy", "validate", p)
        one_line_error(code, err)
        assert time.time() - t0 < 2


def test_trace_with_absurd_expert_count_is_refused(trace_file, tmp_path):
    from flashmoe.trace import read_trace

    d = bytearray(open(trace_file, "rb").read())
    struct.pack_into("<I", d, 16, 2**31 - 1)
    p = tmp_path / "experts.fmrt"
    p.write_bytes(bytes(d))
    with pytest.raises(FlashMoEError, match="at most"):
        read_trace(str(p))
