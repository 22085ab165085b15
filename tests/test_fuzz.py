"""A fuzz campaign over every input flashmoe reads (issue 15, item 5): GGUF files, policy YAML, routing
traces, HTTP requests to the server, and the JSON schemas and grammars behind constrained answers.

Each input must end in a clean error (a FlashMoEError; one ``error: ...`` line and a non-zero exit
from the CLI; an OpenAI-shaped 4xx from the server) or a correct answer. Anything else is counted:
``crash`` (another exception, a signal, a 5xx), ``hang`` (past the per-input time limit),
``traceback`` (one in the output) and ``wrong`` (an accepted answer that is not what was asked, or
a file written where it should not be). Each test asserts that those counts are 0.

Seeded and bounded: the default run takes well under a minute. ``FLASHMOE_FUZZ_N=2000`` tries that
many inputs of each kind (llama.cpp loads: N/50); ``FLASHMOE_FUZZ_SEED`` changes the inputs;
``FLASHMOE_FUZZ_REPORT=file.json`` writes the counts. docs/RELIABILITY.md has the figures.

    FLASHMOE_FUZZ_N=2000 FLASHMOE_FUZZ_REPORT=/tmp/fuzz.json .venv/bin/python -m pytest tests/test_fuzz.py -q -s
"""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager

import pytest
from click.testing import CliRunner

from hostile_inputs import GGUFDoc, KV
from test_hostile import llama_grammar_verdicts

from flashmoe.cli import main
from flashmoe.errors import FlashMoEError
from gguf_tools.reader import (
    GGML_TYPES, T_ARRAY, T_BOOL, T_FLOAT32, T_INT32, T_STRING, T_UINT8, T_UINT32, T_UINT64, read_header, tensor_nbytes,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ_N = int(os.environ.get("FLASHMOE_FUZZ_N") or 0)
SEED = int(os.environ.get("FLASHMOE_FUZZ_SEED") or 20261129)
REPORT = os.environ.get("FLASHMOE_FUZZ_REPORT")

# inputs per kind in the default (suite) run
DEFAULTS = {"gguf": 300, "gguf_cli": 40, "gguf_load": 6, "policy": 200, "trace": 250, "http": 150, "schema": 80,
            "grammar": 60, "answer": 40}
TIME_LIMIT = {"gguf": 10, "gguf_cli": 30, "gguf_load": 120, "policy": 10, "trace": 10, "http": 60, "schema": 10,
              "grammar": 10, "answer": 60}
BAD = ("crash", "hang", "traceback", "wrong")
OUTCOMES = ("clean_error", "accepted") + BAD

TALLY: dict = {}
SAMPLES: dict = {}
CHECKED: Counter = Counter()  # accepted answers whose content was checked against what was asked
STARTED = time.time()


def n_inputs(kind: str) -> int:
    if not FUZZ_N:
        return DEFAULTS[kind]
    return max(DEFAULTS[kind], FUZZ_N // 50) if kind == "gguf_load" else FUZZ_N


def rng_for(kind: str) -> random.Random:
    return random.Random(f"{SEED}:{kind}")


def record(kind: str, outcome: str, detail: str = "") -> str:
    TALLY.setdefault(kind, Counter())[outcome] += 1
    if outcome in BAD:
        SAMPLES.setdefault(kind, []).append(f"[{outcome}] {detail}"[:700])
    return outcome


def assert_clean(kind: str) -> None:
    t = TALLY.get(kind, Counter())
    assert sum(t.values()) > 0, f"no {kind} inputs were tried"
    bad = {o: t[o] for o in BAD if t[o]}
    assert not bad, f"{kind}: {bad}; first failures:\n" + "\n".join(SAMPLES.get(kind, [])[:8])


class Hang(Exception):
    pass


@contextmanager
def deadline(seconds: float):
    """Raise Hang in the main thread after ``seconds`` (SIGALRM)."""
    def on_alarm(_sig, _frame):
        raise Hang()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def in_process(kind: str, fn, detail: str) -> str:
    """Run ``fn()`` (returns "accepted" or "clean_error", raises FlashMoEError for a clean error)."""
    try:
        with deadline(TIME_LIMIT[kind]):
            out = fn()
        return record(kind, out or "accepted", detail)
    except Hang:
        return record(kind, "hang", detail)
    except FlashMoEError:
        return record(kind, "clean_error", detail)
    except Exception as e:  # anything else escaped: a crash for the user (a traceback)
        import traceback

        tb = traceback.format_exc().strip().splitlines()
        return record(kind, "crash", f"{detail}: {type(e).__name__}: {e} @ {' | '.join(tb[-3:])}")


def cli_outcome(kind: str, args, detail: str, expect_ok=None) -> str:
    """Run the CLI in-process; check the one-line error contract."""
    try:
        with deadline(TIME_LIMIT[kind]):
            r = CliRunner().invoke(main, [str(a) for a in args])
    except Hang:
        return record(kind, "hang", detail)
    text = (r.stdout or "") + (r.stderr or "")
    if "Traceback" in text:
        return record(kind, "traceback", f"{detail}: {text[-400:]}")
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return record(kind, "crash", f"{detail}: {type(r.exception).__name__}: {r.exception}")
    if r.exit_code == 0:
        return record(kind, "accepted", detail)
    lines = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
    if len(lines) == 1 and lines[0].startswith("error: "):
        return record(kind, "clean_error", detail)
    return record(kind, "traceback", f"{detail}: exit {r.exit_code}, stderr {r.stderr[-300:]!r}")


@pytest.fixture(scope="module", autouse=True)
def fuzz_report():
    yield
    secs = round(time.time() - STARTED, 1)
    data = {"seed": SEED, "n_per_kind": FUZZ_N or "default", "seconds": secs,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "kinds": {k: {o: v[o] for o in OUTCOMES} for k, v in sorted(TALLY.items())},
            "checked": dict(CHECKED), "failures": SAMPLES}
    print(f"\nfuzz (seed {SEED}, {FUZZ_N or 'default'} per kind, {secs} s):")
    for k, v in sorted(TALLY.items()):
        print(f"  {k:10s} " + " ".join(f"{o}={v[o]}" for o in OUTCOMES) + f"  (total {sum(v.values())})")
    for k, v in sorted(CHECKED.items()):
        print(f"  {k}: {v}")
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(data, f, indent=2)


# ------------------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small, valid MoE (2 layers, 4 experts, Q8_0 experts): loads in llama.cpp, fast to mutate."""
    from gguf_tools.synth import make_spec, synth_model

    path = str(tmp_path_factory.mktemp("fuzz_model") / "small.gguf")
    spec = make_spec("qwen3moe", "tiny", n_layer=2, n_expert=4, n_expert_used=2, n_embd=64, n_ff_exp=64, n_head=4,
                     n_head_kv=2, head_dim=16, expert_type="Q8_0", dense_type="F16", seed=1)
    synth_model(path, spec, progress=False)
    return path


# ------------------------------------------------------------------------------------------ GGUF mutants

U64_ODD = [0, 1, 2, 3, 7, 255, 256, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63,
           2**64 - 1]
U32_ODD = [0, 1, 2, 3, 8, 9, 13, 31, 32, 64, 255, 512, 513, 1024, 1025, 2**16, 2**31 - 1, 2**31, 2**32 - 1]


class _Layout:
    def __init__(self, path):
        h = read_header(path)
        self.h = h
        self.fields = list(h.fields.values())
        self.kv0 = min(f.offset for f in self.fields)
        self.kv1 = max(f.end for f in self.fields)
        self.table = (self.kv1, h.header_end)


def _flip(rng, b: bytearray, lo: int, hi: int, k: int) -> None:
    for _ in range(k):
        i = rng.randrange(lo, max(lo + 1, hi))
        b[i] ^= 1 << rng.randrange(8)


def byte_mutant(rng: random.Random, base: bytes, lay: _Layout):
    b = bytearray(base)
    op = rng.choice(["truncate", "truncate_header", "flip_header", "flip_table", "flip_kv", "flip_any", "count",
                     "type", "tensor_field", "header_counts", "magic_version", "zero_run", "append"])
    if op == "truncate":
        return op, bytes(b[:rng.randrange(0, len(b))])
    if op == "truncate_header":
        return op, bytes(b[:rng.randrange(0, lay.h.data_offset + 1)])
    if op == "flip_header":
        _flip(rng, b, 0, lay.h.header_end, rng.randint(1, 8))
    elif op == "flip_table":
        _flip(rng, b, lay.table[0], lay.table[1], rng.randint(1, 6))
    elif op == "flip_kv":
        _flip(rng, b, lay.kv0, lay.kv1, rng.randint(1, 6))
    elif op == "flip_any":
        _flip(rng, b, 0, len(b), rng.randint(1, 16))
    elif op in ("count", "type"):
        f = rng.choice(lay.fields)
        klen = struct.unpack_from("<Q", b, f.offset)[0]
        tag = f.offset + 8 + klen
        if op == "type":
            pos = tag + (4 if f.vtype == T_ARRAY and rng.random() < 0.5 else 0)
            struct.pack_into("<I", b, pos, rng.choice(U32_ODD + list(range(14))))
        elif f.vtype == T_ARRAY:
            struct.pack_into("<Q", b, tag + 8, rng.choice(U64_ODD))
        elif f.vtype == T_STRING:
            struct.pack_into("<Q", b, tag + 4, rng.choice(U64_ODD))
        else:
            struct.pack_into("<Q", b, f.offset, rng.choice(U64_ODD))  # the key's length
    elif op == "tensor_field":
        t = rng.choice(lay.h.tensors)
        p = t.info_offset
        nlen = struct.unpack_from("<Q", b, p)[0]
        p_dims = p + 8 + nlen
        nd = struct.unpack_from("<I", b, p_dims)[0]
        p_type = p_dims + 4 + 8 * nd
        p_off = p_type + 4
        what = rng.choice(["ndims", "dim", "type", "offset", "offset_small", "namelen"])
        if what == "ndims":
            struct.pack_into("<I", b, p_dims, rng.choice([0, 1, 2, 3, 4, 5, 8, 2**31, 2**32 - 1]))
        elif what == "dim" and nd:
            j = rng.randrange(nd)
            cur = struct.unpack_from("<Q", b, p_dims + 4 + 8 * j)[0]
            struct.pack_into("<Q", b, p_dims + 4 + 8 * j, rng.choice(U64_ODD + [cur + 1, cur * 2, max(cur - 1, 0)]))
        elif what == "type":
            struct.pack_into("<I", b, p_type, rng.choice(list(range(45)) + [2**31, 2**32 - 1]))
        elif what == "offset":
            struct.pack_into("<Q", b, p_off, rng.choice(U64_ODD))
        elif what == "offset_small":
            cur = struct.unpack_from("<Q", b, p_off)[0]
            struct.pack_into("<Q", b, p_off, max(0, cur + rng.choice([-4096, -64, -32, -1, 1, 31, 32, 64, 4096])))
        else:
            struct.pack_into("<Q", b, p, rng.choice(U64_ODD))
    elif op == "header_counts":
        struct.pack_into("<Q", b, rng.choice([8, 16]), rng.choice(U64_ODD))
    elif op == "magic_version":
        struct.pack_into("<I", b, 4, rng.choice([0, 1, 2, 3, 4, 0x03000000, 2**32 - 1]))
    elif op == "zero_run":
        i = rng.randrange(0, lay.h.header_end)
        b[i:i + rng.randint(1, 64)] = bytes(min(64, len(b) - i))[:len(b[i:i + 64])]
    else:
        b += bytes(rng.randint(1, 5000))
    return op, bytes(b)


ARCH_KEYS = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "attention.value_length",
             "attention.layer_norm_rms_epsilon", "rope.freq_base", "expert_count", "expert_used_count",
             "expert_feed_forward_length", "rope.scaling.type", "rope.scaling.factor", "expert_group_count",
             "expert_group_used_count", "nextn_predict_layers", "rope.dimension_count", "expert_weights_scale",
             "expert_gating_func", "vocab_size", "attention.sliding_window"]


def _random_kv_value(rng):
    kind = rng.choice(["u32", "u32", "u32", "i32", "f32", "str", "arr", "bool", "u64", "u8"])
    if kind == "u32":
        return T_UINT32, rng.choice(U32_ODD + list(range(0, 20))), None
    if kind == "i32":
        return T_INT32, rng.choice([-1, -(2**31), 0, 5]), None
    if kind == "f32":
        return T_FLOAT32, rng.choice([0.0, -1.0, 1e-30, 1e30, float("inf"), float("nan"), 3.5]), None
    if kind == "str":
        return T_STRING, rng.choice(["", "x", "yarn", "linear", "none", "bogus", "\u00e9" * 5, "a" * 300]), None
    if kind == "arr":
        n = rng.choice([0, 1, 2, 4, 5])
        return T_ARRAY, [rng.choice([0, 1, 2, 3, 8, 2**31]) for _ in range(n)], rng.choice([T_UINT32, T_INT32])
    if kind == "bool":
        return T_BOOL, rng.random() < 0.5, None
    if kind == "u8":
        return T_UINT8, rng.randrange(256), None
    return T_UINT64, rng.choice(U64_ODD), None


def doc_mutant(rng: random.Random, base_doc: GGUFDoc, plausible: bool = False):
    """A structurally consistent file (laid out as llama.cpp expects) with odd contents."""
    d = copy.deepcopy(base_doc)
    arch = d.kv("general.architecture").value
    op = rng.choice(["hparam", "hparam", "hparam", "drop_key", "drop_tensor", "reshape", "tokens", "dup_key",
                     "alignment", "split", "tensor_type", "rename"] if not plausible else
                    ["hparam_plausible", "hparam_plausible", "reshape", "drop_tensor", "tokens", "tensor_type"])
    if op == "hparam":
        vt, v, sub = _random_kv_value(rng)
        d.set(f"{arch}.{rng.choice(ARCH_KEYS)}", vt, v, sub)
    elif op == "hparam_plausible":
        key = rng.choice(["attention.head_count_kv", "attention.key_length", "attention.value_length",
                          "rope.freq_base", "attention.layer_norm_rms_epsilon", "expert_used_count",
                          "context_length", "feed_forward_length", "expert_feed_forward_length",
                          "rope.scaling.type", "rope.dimension_count", "attention.head_count"])
        if key in ("rope.freq_base", "attention.layer_norm_rms_epsilon"):
            d.set(f"{arch}.{key}", T_FLOAT32, rng.choice([0.0, -1.0, 1e-30, 1e30, float("inf"), float("nan")]))
        elif key == "rope.scaling.type":
            d.set(f"{arch}.{key}", T_STRING, rng.choice(["none", "linear", "yarn", "longrope"]))
        else:
            d.set(f"{arch}.{key}", T_UINT32, rng.choice([1, 2, 3, 4, 5, 8, 16, 17, 32, 64, 1000, 65536]))
    elif op == "drop_key":
        d.kvs.pop(rng.randrange(len(d.kvs)))
    elif op == "drop_tensor":
        exps = [t for t in d.tensors if "_exps" in t.name]
        victim = rng.choice(exps if exps and rng.random() < 0.6 else d.tensors)
        d.tensors.remove(victim)
    elif op in ("reshape", "tensor_type"):
        t = rng.choice(d.tensors)
        shape = list(t.shape)
        gt = t.ggml_type
        if op == "tensor_type":
            gt = rng.choice(sorted(GGML_TYPES))
        elif shape:
            j = rng.randrange(len(shape))
            shape[j] = rng.choice([0, 1, 2, 3, shape[j] * 2, max(1, shape[j] // 2), shape[j] + 32])
            if rng.random() < 0.2:
                shape = shape[::-1]
        blk = GGML_TYPES[gt][1]
        if shape and shape[0] % blk:
            shape[0] = max(blk, shape[0] - shape[0] % blk)
        t.shape, t.ggml_type = tuple(shape), gt
        t.data = bytes(tensor_nbytes(gt, shape))
    elif op == "tokens":
        toks = d.kv("tokenizer.ggml.tokens")
        toks.value = list(toks.value)
        what = rng.choice(["dup", "empty", "bad_utf8", "short_scores", "scores_type", "types_type", "drop"])
        if what == "dup":
            i, j = rng.sample(range(len(toks.value)), 2)
            toks.value[i] = toks.value[j]
        elif what == "empty":
            toks.value[rng.randrange(len(toks.value))] = ""
        elif what == "bad_utf8":
            toks.value[rng.randrange(len(toks.value))] = b"\xff\xfe"
        elif what == "short_scores":
            s = d.kv("tokenizer.ggml.scores")
            s.value = list(s.value)[:rng.randrange(len(s.value))]
        elif what == "scores_type":
            s = d.kv("tokenizer.ggml.scores")
            s.sub = rng.choice([T_INT32, T_UINT8, T_STRING])
            s.value = ["x"] * len(s.value) if s.sub == T_STRING else [int(x) % 100 for x in s.value]
        elif what == "types_type":
            s = d.kv("tokenizer.ggml.token_type")
            s.sub = T_FLOAT32
            s.value = [float(x) for x in s.value]
        else:
            d.drop("tokenizer.ggml.tokens")
    elif op == "dup_key":
        k = rng.choice(d.kvs)
        d.kvs.append(KV(rng.choice([k.name, "", b"\xff\xfe"]), k.vtype, k.value, k.sub))
    elif op == "alignment":
        if rng.random() < 0.8:
            d.set("general.alignment", T_UINT32, rng.choice([0, 1, 3, 16, 32, 64, 4096, 2**20]))
        else:
            d.set("general.alignment", T_UINT64, 32)
        al = d.kv("general.alignment").value
        if d.kv("general.alignment").vtype == T_UINT32 and al and not al & (al - 1):
            d.alignment = al
    elif op == "split":
        vt = rng.choice([T_UINT32, 2, T_STRING])  # 2: UINT16, as llama.cpp writes them
        value = "x" if vt == T_STRING else rng.choice([0, 1, 2, 3, 65535] + ([2**31] if vt == T_UINT32 else []))
        d.set(rng.choice(["split.count", "split.no", "split.tensors.count"]), vt, value)
    elif op == "rename":
        t = rng.choice(d.tensors)
        t.name = rng.choice([d.tensors[0].name, "x" * 70, "blk.99.ffn_down_exps.weight", "blk.0.ffn_up_exps.weight",
                             "", "blk.-1.attn_q.weight"])
    return op, d.to_bytes()


def _model_consumers(path: str) -> str:
    """What flashmoe does with a model it opened: facts, problems, expert layout, a policy, a trace."""
    from flashmoe.policy import load_policy
    from flashmoe.trace import gen_uniform, model_moe_layers
    from gguf_tools.inspect import format_facts, model_facts
    from gguf_tools.reader import open_model
    from gguf_tools.validate import problems

    with open_model(path) as m:
        probs = problems(m)
        facts = model_facts(m)
        format_facts(facts)
        json.dumps(facts)
        if probs:
            return "clean_error"  # what every loading command does with it (require_loadable)
        res = load_policy("stream").resolve(m)
        res.format() if hasattr(res, "format") else None
        if m.is_moe:
            gen_uniform(model_moe_layers(m), m.n_expert, m.n_expert_used, 4, 0)
    return "accepted"


def test_fuzz_gguf_reader_and_validate(small_model, tmp_path):
    rng = rng_for("gguf")
    base = open(small_model, "rb").read()
    lay = _Layout(small_model)
    base_doc = GGUFDoc.load(small_model)
    path = str(tmp_path / "m.gguf")
    for i in range(n_inputs("gguf")):
        if rng.random() < 0.55:
            op, data = byte_mutant(rng, base, lay)
        else:
            op, data = doc_mutant(rng, base_doc)
        with open(path, "wb") as f:
            f.write(data)
        in_process("gguf", lambda: _model_consumers(path), f"#{i} {op}")
    assert_clean("gguf")


def test_fuzz_gguf_cli_inspect_and_repack(small_model, tmp_path):
    rng = rng_for("gguf_cli")
    base = open(small_model, "rb").read()
    lay = _Layout(small_model)
    base_doc = GGUFDoc.load(small_model)
    src = tmp_path / "in"
    src.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for i in range(n_inputs("gguf_cli")):
        op, data = byte_mutant(rng, base, lay) if rng.random() < 0.5 else doc_mutant(rng, base_doc)
        p = src / f"m{i}.gguf"
        p.write_bytes(data)
        detail = f"#{i} {op}"
        cli_outcome("gguf_cli", ["inspect", p], detail + " inspect")
        cli_outcome("gguf_cli", ["inspect", p, "--json"], detail + " inspect --json")
        out = out_dir / f"r{i}.gguf"
        res = cli_outcome("gguf_cli", ["repack", p, "-o", out, "--align", "4096"], detail + " repack")
        left = sorted(os.listdir(out_dir))
        if res == "clean_error" and left:
            record("gguf_cli", "wrong", f"{detail}: repack failed but left {left}")
        if res == "accepted":
            from gguf_tools.reader import open_model
            from gguf_tools.validate import problems

            try:
                with open_model(str(out)) as m:
                    if problems(m):
                        record("gguf_cli", "wrong", f"{detail}: repack wrote a model with problems {problems(m)}")
            except FlashMoEError as e:
                record("gguf_cli", "wrong", f"{detail}: repack output does not open: {e}")
        for f in os.listdir(out_dir):
            os.unlink(out_dir / f)
        if sorted(os.listdir(src)) != [f"m{i}.gguf"]:
            record("gguf_cli", "wrong", f"{detail}: files appeared next to the input: {os.listdir(src)}")
        p.unlink()
    assert_clean("gguf_cli")


LOAD_ARCHES = ("qwen35moe", "deepseek2", "gpt-oss", "llama4")


def test_fuzz_gguf_loads_in_llama_cpp(llama_cpp, small_model, tmp_path):
    """Mutants that pass the reader and validate (and a few that do not), through `flashmoe generate` in a
    subprocess: llama.cpp must not abort or crash on anything flashmoe lets through."""
    from gguf_tools.reader import open_model
    from gguf_tools.validate import problems

    rng = rng_for("gguf_load")
    from gguf_tools.synth import make_spec, synth_model

    docs = [GGUFDoc.load(small_model)]
    for arch in LOAD_ARCHES:  # other architectures' graphs assert other things
        path = str(tmp_path / f"base-{arch}.gguf")
        synth_model(path, make_spec(arch, "tiny", seed=2), progress=False)
        docs.append(GGUFDoc.load(path))
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    want = n_inputs("gguf_load")
    tried = 0
    for i in range(want * 40):
        if tried >= want:
            break
        base_doc = rng.choice(docs)
        op, data = doc_mutant(rng, base_doc, plausible=rng.random() < 0.7)
        op = f"{base_doc.kv('general.architecture').value} {op}"
        p = tmp_path / f"l{i}.gguf"
        p.write_bytes(data)
        try:
            with open_model(str(p)) as m:
                passes = not problems(m)
        except FlashMoEError:
            passes = False
        if not passes and rng.random() < 0.85:
            p.unlink()
            continue  # mostly the ones flashmoe lets through: those reach llama.cpp
        tried += 1
        args = [sys.executable, "-m", "flashmoe", "generate", "-m", str(p), "-p", "Hello", "-n", "3", "--ctx", "64"]
        if rng.random() < 0.5:
            args += ["--stream", "cache", "--cache-slots", "2"]
        detail = f"#{i} {op} (validate {'passes' if passes else 'refuses'})"
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=TIME_LIMIT["gguf_load"], env=env,
                               cwd=REPO_ROOT)
        except subprocess.TimeoutExpired:
            record("gguf_load", "hang", detail)
            continue
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        if "Traceback" in r.stderr or "Traceback" in r.stdout:
            record("gguf_load", "traceback", f"{detail}: {r.stderr[-400:]}")
        elif r.returncode == 0:
            record("gguf_load", "accepted", detail)
        elif r.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("error: "):
            record("gguf_load", "clean_error", detail)
        else:
            why = [ln for ln in r.stderr.splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()][:3]
            record("gguf_load", "crash", f"{detail}: exit {r.returncode}: {' | '.join(why) or r.stderr[:300]}")
            keep = os.environ.get("FLASHMOE_FUZZ_KEEP")
            if keep:
                os.makedirs(keep, exist_ok=True)
                os.replace(p, os.path.join(keep, p.name))
                continue
        p.unlink()
    assert_clean("gguf_load")


# ------------------------------------------------------------------------------------------ policies


def _random_value(rng, depth=0):
    c = rng.randrange(16)
    if c == 0:
        return None
    if c == 1:
        return rng.random() < 0.5
    if c == 2:
        return rng.choice([0, 1, -1, 7, 2**31, 2**63, 10**30, -10**20])
    if c == 3:
        return rng.choice([0.5, -0.0, 1e-300, 1e300, 3.25])
    if c == 4:
        return rng.choice(["", "auto", "90%", "150%", "-5%", "0%", "1e400", "8GiB", "1.5 G", "0B", "12 parsecs",
                           "9" * 200, "stream", "pin", "gpu", "mmap", "cache", "lru", "lfru"])
    if c == 5:
        return rng.choice(["*", "blk.*", "regex:.*", "regex:(", "regex:(a+)+$", "{a,{b,c}", "[!", "\\", "**.**",
                           "blk.{0,1,2}.ffn_{gate,up,down}_exps.weight", "regex:(.*.*)*x", "*a*a*a*a*a*a*a*a*a*a*z",
                           "{" * 50 + "}" * 50, "?" * 300])
    if c == 6 and depth < 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if c == 7 and depth < 3:
        return {rng.choice(["match", "place", "mode", "x", "cache_size", "readers"]): _random_value(rng, depth + 1)
                for _ in range(rng.randrange(3))}
    if c == 8:
        return "".join(rng.choice("abc{}[]*?,:!\\é\x00\n ") for _ in range(rng.randrange(20)))
    return rng.choice([1, 2, 4, 64, 65, 1000, "x", True, [], {}])


def _mutate_tree(rng, tree):
    """Delete, replace, rename or add one key (anywhere) of a YAML tree."""
    nodes = []

    def walk(x):
        if isinstance(x, dict):
            nodes.append(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            nodes.append(x)
            for v in x:
                walk(v)

    walk(tree)
    node = rng.choice(nodes)
    op = rng.choice(["delete", "replace", "replace", "rename", "add"])
    if isinstance(node, dict) and node:
        k = rng.choice(list(node))
        if op == "delete":
            del node[k]
        elif op == "replace":
            node[k] = _random_value(rng)
        elif op == "rename":
            node[k + rng.choice(["_", "s", ""]) + "x"] = node.pop(k)
        else:
            node[rng.choice(["extra", "budget", "rules", "runtime", "expert_cache", "n_ctx"])] = _random_value(rng)
    elif isinstance(node, list):
        if node and op == "delete":
            node.pop(rng.randrange(len(node)))
        elif node and op == "replace":
            node[rng.randrange(len(node))] = _random_value(rng)
        else:
            node.append(_random_value(rng))
    return op


def test_fuzz_policies(small_model, tmp_path):
    import yaml

    from flashmoe.policy import load_policy
    from gguf_tools.reader import open_model

    rng = rng_for("policy")
    configs = sorted(os.listdir(os.path.join(REPO_ROOT, "configs")))
    bases = {c: open(os.path.join(REPO_ROOT, "configs", c)).read() for c in configs}
    model = open_model(small_model)
    for i in range(n_inputs("policy")):
        name = rng.choice(configs)
        text = bases[name]
        if rng.random() < 0.2:  # raw text damage
            b = bytearray(text.encode())
            how = rng.choice(["cut", "flip", "insert", "deep", "anchor"])
            if how == "cut":
                b = b[:rng.randrange(len(b))]
            elif how == "flip":
                _flip(rng, b, 0, len(b), rng.randint(1, 10))
            elif how == "insert":
                pos = rng.randrange(len(b))
                b[pos:pos] = rng.choice([b"\t", b"{", b"[", b": :", b"&a ", b"*a", b"!!python/object:os.system ", b"\x00"])
            elif how == "deep":
                b += b"\nextra: " + b"[" * 5000 + b"]" * 5000 + b"\n"
            else:
                b += b"\nx: &a [1,2,3,4,5,6,7,8,9]\ny: &b [*a,*a,*a,*a,*a,*a,*a,*a]\nz: [*b,*b,*b,*b,*b,*b,*b,*b]\n"
            data, op = bytes(b), f"text-{how}"
        else:
            tree = yaml.safe_load(text)
            op = " ".join(_mutate_tree(rng, tree) for _ in range(rng.randint(1, 3)))
            data = yaml.safe_dump(tree, allow_unicode=True).encode("utf-8", "surrogateescape")
        p = tmp_path / f"p{i}.yaml"
        p.write_bytes(data)
        detail = f"#{i} {name} {op}"
        cli_outcome("policy", ["policy", "validate", p], detail + " validate")

        def resolve():
            pol = load_policy(str(p))
            res = pol.resolve(model)
            try:
                res.engine_settings()
            except FlashMoEError:
                return "clean_error"
            return "accepted"

        in_process("policy", resolve, detail + " resolve")
        p.unlink()
    model.close()
    assert_clean("policy")


# ------------------------------------------------------------------------------------------ traces


def test_fuzz_traces(small_model, tmp_path):
    from flashmoe import trace as T
    from gguf_tools.reader import open_model

    rng = rng_for("trace")
    good = tmp_path / "good.fmrt"
    T.write_trace(str(good), T.trace_for_model(small_model, "realistic", 12, 3))
    base = good.read_bytes()
    model = open_model(small_model)
    for i in range(n_inputs("trace")):
        b = bytearray(base)
        op = rng.choice(["cut", "flip", "field", "field_consistent", "ids", "layers", "extra", "magic"])
        if op == "cut":
            b = b[:rng.randrange(len(b))]
        elif op == "flip":
            _flip(rng, b, 0, len(b), rng.randint(1, 8))
        elif op == "field":
            off = rng.choice([4, 8, 12, 16, 20, 24])
            if off == 24:
                struct.pack_into("<Q", b, 24, rng.choice(U64_ODD))
            else:
                struct.pack_into("<I", b, off, rng.choice(U32_ODD))
        elif op == "field_consistent":  # a header that matches its file size, with odd values
            n_lay, n_used, n_exp, n_tok = (rng.randint(1, 5), rng.randint(0, 6), rng.randint(0, 9), rng.randint(1, 9))
            ids = [rng.randint(-2, 10) for _ in range(n_lay * n_used * n_tok)]
            layers = [rng.randint(-1, 4) for _ in range(n_lay)]
            b = bytearray(struct.pack("<4s5IQ", b"FMRT", 1, n_lay, n_used, n_exp, 0, n_tok)
                          + struct.pack(f"<{n_lay}i", *layers) + struct.pack(f"<{len(ids)}i", *ids))
        elif op == "ids":
            n = (len(b) - 32) // 4
            for _ in range(rng.randint(1, 4)):
                j = rng.randrange(n)
                struct.pack_into("<i", b, 32 + 4 * j, rng.choice([-1, 4, 99, 2**31 - 1, -(2**31)]))
        elif op == "layers":
            struct.pack_into("<i", b, 32, rng.choice([-5, 1, 2**31 - 1]))
        elif op == "extra":
            b += bytes(rng.randint(1, 64))
        else:
            b[0:4] = rng.choice([b"FMRU", b"\0\0\0\0", b"GGUF"])
        p = tmp_path / "t.fmrt"
        p.write_bytes(bytes(b))
        detail = f"#{i} {op}"

        def use():
            tr = T.read_trace(str(p))
            T.trace_stats(tr)
            T.check_trace_fits(tr, model)
            return "accepted"

        in_process("trace", use, detail)
        if i % 5 == 0:
            cli_outcome("trace", ["trace", "stats", p], detail + " cli")
    model.close()
    assert_clean("trace")


# ------------------------------------------------------------------------------------------ the server

SCHEMA_KEYS = ["type", "properties", "required", "items", "prefixItems", "enum", "const", "anyOf", "oneOf", "allOf",
               "minLength", "maxLength", "minItems", "maxItems", "pattern", "format", "minimum", "maximum",
               "additionalProperties", "$ref", "not", "description", "$defs", "uniqueItems", "exclusiveMinimum"]
ODD_NAMES = ["a", "b", 'q"uote', "back\\slash", "new\nline", "é", "\u4e2d", "with space", "", "0", "-", "a" * 40]
PATTERNS = ["^[a-z]+$", "^a{2,3}$", "^(ab|cd)*$", "^\\d+$", "[a-z]", "^[^\"]{1,5}$", "^a{99999}$", "^(?=a)$",
            "^.$", "^[A-Z][a-z]{0,4}$", "^\\.$", "^a|b$", "^(a)(b)?$", "^x{0,}$", "^é+$", "^\"+$"]


def random_schema(rng, depth=0):
    """A random JSON schema: mostly of the supported kind, with odd values and hostile parts."""
    if depth > 3 or rng.random() < 0.25:
        return rng.choice([
            {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
            {"type": "string", "maxLength": rng.choice([0, 1, 3, 8])}, {"enum": ["x", 1, None]},
            {"const": rng.choice(ODD_NAMES)}, {"type": "string", "pattern": rng.choice(PATTERNS)}, {},
            {"type": ["string", "null"]}, {"type": "string", "format": rng.choice(["date", "uuid", "email", "time"])},
        ])
    s = {}
    t = rng.choice(["object", "object", "array", "string", "integer", "number", None, ["string", "integer"], "nope"])
    if t is not None:
        s["type"] = t
    for _ in range(rng.randint(0, 4)):
        k = rng.choice(SCHEMA_KEYS)
        if k == "properties":
            s[k] = {rng.choice(ODD_NAMES): random_schema(rng, depth + 1) for _ in range(rng.randint(0, 3))}
        elif k == "required":
            s[k] = rng.sample(ODD_NAMES, rng.randint(0, 2)) if rng.random() < 0.9 else "a"
        elif k in ("items", "not", "additionalProperties"):
            s[k] = random_schema(rng, depth + 1) if rng.random() < 0.85 else rng.choice([True, False, 3])
        elif k in ("anyOf", "oneOf", "allOf", "prefixItems"):
            s[k] = [random_schema(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        elif k in ("minLength", "maxLength", "minItems", "maxItems"):
            s[k] = rng.choice([0, 1, 2, 5, 10, 999, 1001, 10**9, -1, 2.5, "3"])
        elif k in ("minimum", "maximum", "exclusiveMinimum"):
            s[k] = rng.choice([0, 1, -5, 2.5, 10**20, "x"])
        elif k == "enum":
            s[k] = [rng.choice(ODD_NAMES + [1, 2.5, None, True, [1], {"a": 1}]) for _ in range(rng.randint(0, 4))]
        elif k == "const":
            s[k] = rng.choice(ODD_NAMES + [1, None, [1, "a"], {"k": "v"}])
        elif k == "pattern":
            s[k] = rng.choice(PATTERNS)
        elif k == "format":
            s[k] = rng.choice(["date", "date-time", "uuid", "email", 5])
        elif k == "$ref":
            s[k] = rng.choice(["#/$defs/x", "#/$defs/missing", "#", "https://x.y/z", "#/properties/a"])
            s.setdefault("$defs", {"x": random_schema(rng, depth + 2)})
        elif k == "$defs":
            s[k] = {"x": random_schema(rng, depth + 1)}
        elif k == "uniqueItems":
            s[k] = rng.choice([True, False, "y"])
        else:
            s[k] = rng.choice(["desc", 1])
    return s


def _strip_unenforced(schema):
    """The schema without what the grammar does not enforce (docs/server.md), for checking answers."""
    from flashmoe.schemas import UNENFORCED

    if isinstance(schema, list):
        return [_strip_unenforced(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in UNENFORCED and not (k == "format" and v in ("date", "time", "date-time", "uuid")):
            continue
        if k in ("enum", "const", "default", "examples"):
            out[k] = v
        elif k in ("properties", "$defs", "definitions"):
            out[k] = {n: _strip_unenforced(x) for n, x in v.items()} if isinstance(v, dict) else v
        else:
            out[k] = _strip_unenforced(v)
    return out


def _random_json(rng, depth=0):
    c = rng.randrange(9)
    if c == 0:
        return None
    if c == 1:
        return rng.random() < 0.5
    if c == 2:
        return rng.choice([0, -1, 1, 2**31, 10**30, -10**30])
    if c == 3:
        return rng.choice([0.0, 1.5, -2.5, 1e308, 1e-308])
    if c == 4:
        return rng.choice(["", "x", "<|im_end|>", "\u0000", "é" * 3, "a" * 5000, "</tool_call>", "{{ x }}",
                           "{% for %}", "\\u0000"])
    if c == 5 and depth < 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if c == 6 and depth < 4:
        return {rng.choice(["role", "content", "type", "x", "name", "function"]): _random_json(rng, depth + 1)
                for _ in range(rng.randrange(4))}
    return rng.choice(["user", "assistant", "system", "tool", "function", "developer"])


def _tool(rng, schema=None):
    name = rng.choice(["get_weather", "f", "calc", "bad name", "", "x" * 200, "a.b:c-d"])
    return {"type": rng.choice(["function"] * 8 + ["code", None]),
            "function": {"name": name, "description": "d", "parameters": schema if schema is not None
                         else random_schema(rng)}}


def random_request(rng):
    """(path, body bytes or None, what) for a mostly-plausible request with hostile parts."""
    msgs = [{"role": "user", "content": "Hi"}]
    base = {"messages": msgs, "max_tokens": rng.choice([1, 4, 8, 16]), "temperature": rng.choice([0, 0.7, 1.5])}
    kind = rng.choice(["fields", "fields", "messages", "tools", "tools", "response_format", "response_format",
                       "malformed", "completions", "huge", "stream", "paths"])
    if kind == "fields":
        body = dict(base)
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(["max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n",
                             "stream", "repeat_penalty", "presence_penalty", "logprobs", "max_completion_tokens",
                             "model", "messages", "tool_choice", "stream_options", "parallel_tool_calls",
                             "response_format", "tools", "functions", "function_call"])] = _random_json(rng)
        return "/v1/chat/completions", json.dumps(body).encode(), kind
    if kind == "messages":
        n = rng.choice([1, 2, 3, 50, 5000])
        body = dict(base, messages=[_random_json(rng) if rng.random() < 0.3 else
                                    {"role": rng.choice(["user", "assistant", "system", "tool", "developer", "x"]),
                                     "content": _random_json(rng) if rng.random() < 0.4 else "hello",
                                     **({"tool_calls": _random_json(rng)} if rng.random() < 0.2 else {})}
                                    for _ in range(n)])
        return "/v1/chat/completions", json.dumps(body).encode(), kind
    if kind == "tools":
        tools = [_tool(rng) for _ in range(rng.randint(1, 3))]
        names = [t["function"]["name"] for t in tools]
        choice = rng.choice(["auto", "required", "none", {"type": "function", "function": {"name": rng.choice(names)}},
                             {"type": "function", "function": {"name": "nope"}}, 5])
        return "/v1/chat/completions", json.dumps(dict(base, tools=tools, tool_choice=choice,
                                                       max_tokens=rng.choice([8, 24]))).encode(), kind
    if kind == "response_format":
        schema = random_schema(rng)
        rf = rng.choice([{"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                         {"type": "json_schema", "json_schema": {"schema": schema}}, {"type": "json_object"},
                         {"type": "json_schema"}, {"type": "yaml"}, {"type": "json_object", "schema": schema},
                         "json", None])
        return "/v1/chat/completions", json.dumps(dict(base, response_format=rf, max_tokens=rng.choice([8, 32]))).encode(), kind
    if kind == "malformed":
        good = json.dumps(dict(base)).encode()
        how = rng.choice(["cut", "flip", "garbage", "deep", "nan", "empty", "array", "utf8", "big_number"])
        if how == "cut":
            return "/v1/chat/completions", good[:rng.randrange(len(good))], kind + "-cut"
        if how == "flip":
            b = bytearray(good)
            _flip(rng, b, 0, len(b), rng.randint(1, 4))
            return "/v1/chat/completions", bytes(b), kind + "-flip"
        if how == "garbage":
            return "/v1/chat/completions", bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))), kind
        if how == "deep":
            d = rng.choice([100, 1000, 100000])
            return "/v1/chat/completions", b'{"messages":' + b"[" * d + b"]" * d + b"}", kind + "-deep"
        if how == "nan":
            return "/v1/chat/completions", good.replace(b'"temperature": 0', b'"temperature": NaN'), kind
        if how == "empty":
            return "/v1/chat/completions", b"", kind
        if how == "array":
            return "/v1/chat/completions", b"[1,2,3]", kind
        if how == "utf8":
            return "/v1/chat/completions", good.replace(b"Hi", b"H\xff\xfe"), kind
        return "/v1/chat/completions", good.replace(b'"max_tokens": ', b'"max_tokens": 1' + b"0" * 5000 + b", "
                                                                                           b'"x": '), kind
    if kind == "completions":
        prompt = rng.choice(["Hello", "", ["a", "b"], ["a"], [1, 2, 3], [-1], [10**9], [], 5, None,
                             "<|im_start|>" * 100, [1] * 5000])
        body = {"prompt": prompt, "max_tokens": rng.choice([1, 4, 10**9, 0]), "echo": rng.random() < 0.3,
                "stream": rng.random() < 0.3, "suffix": rng.choice([None, "x"]), "best_of": rng.choice([None, 1, 2])}
        return "/v1/completions", json.dumps(body).encode(), kind
    if kind == "huge":
        what = rng.choice(["max_tokens", "body", "content"])
        if what == "max_tokens":
            return "/v1/chat/completions", json.dumps(dict(base, max_tokens=10**12, temperature=0)).encode(), kind
        if what == "body":
            return "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"a" * (9 << 20) + b'"}]}', kind
        return "/v1/chat/completions", json.dumps(dict(base, messages=[{"role": "user",
                                                                       "content": "word " * 200_000}])).encode(), kind
    if kind == "stream":
        body = dict(base, stream=True, stream_options={"include_usage": rng.random() < 0.5})
        if rng.random() < 0.5:
            body["response_format"] = {"type": "json_schema", "json_schema": {"schema": random_schema(rng)}}
        return "/v1/chat/completions", json.dumps(body).encode(), kind
    path = rng.choice(["/v1/models", "/v1/models/tiny", "/v1/models/x", "/health", "/flashmoe/stats", "/openapi.json",
                       "/docs", "/v1/nope", "/../etc/passwd", "/v1/chat/completions"])
    return path, None, "paths"


@pytest.fixture(scope="module")
def fuzz_app(llama_cpp, small_model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from flashmoe.engine import Engine
    from flashmoe.server import create_app
    from flashmoe.settings import StreamSettings

    eng = Engine(small_model, stream=StreamSettings(mode="cache", cache_slots=2), n_ctx=512)
    app = create_app(eng, api_key="fuzz", model_name="tiny")
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    eng.close()


def _check_answer(req: dict, r, path: str):
    """None when the 200 answer is what was asked; else why not."""
    import jsonschema

    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return "a stream that does not end with [DONE]"
        for e in events[:-1]:
            obj = json.loads(e)
            if "error" in obj:
                err = obj["error"]
                if not isinstance(err.get("message"), str) or err.get("type") == "server_error" and \
                        "cancelled" not in err["message"]:
                    return f"an error event {err}"
        return None
    body = r.json()
    if path.endswith("/completions") and "choices" in body and path == "/v1/chat/completions":
        ch = body["choices"][0]
        msg = ch["message"]
        rf = req.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_schema" and ch["finish_reason"] == "stop":
            schema = (rf.get("json_schema") or {}).get("schema")
            try:
                val = json.loads(msg["content"])
            except (TypeError, ValueError):
                return f"content is not JSON: {msg['content']!r}"
            try:
                jsonschema.validate(val, _strip_unenforced(schema))
            except jsonschema.ValidationError as e:
                return f"content {msg['content']!r} does not match {json.dumps(schema)[:200]}: {e.message[:200]}"
            CHECKED["json_schema answers validated"] += 1
        if ch["finish_reason"] == "tool_calls":
            tools = {t["function"]["name"]: t["function"].get("parameters") for t in req.get("tools") or []
                     if isinstance(t, dict) and isinstance(t.get("function"), dict)}
            for c in msg["tool_calls"]:
                args = json.loads(c["function"]["arguments"])
                if req.get("tool_choice") not in (None, "auto") and tools.get(c["function"]["name"]) is not None:
                    try:
                        jsonschema.validate(args, _strip_unenforced(tools[c["function"]["name"]]))
                    except jsonschema.ValidationError as e:
                        return f"call {c} does not match its schema: {e.message[:200]}"
                    CHECKED["forced tool calls validated"] += 1
    return None


def test_fuzz_http_requests(fuzz_app):
    rng = rng_for("http")
    H = {"Authorization": "Bearer fuzz", "Content-Type": "application/json"}
    for i in range(n_inputs("http")):
        path, body, what = random_request(rng)
        headers = dict(H)
        if rng.random() < 0.05:
            headers.pop("Authorization")
        detail = f"#{i} {what} {path} {(body or b'')[:160]!r}"
        t0 = time.time()
        try:
            with deadline(TIME_LIMIT["http"]):
                if body is None:
                    r = fuzz_app.get(path, headers=headers) if rng.random() < 0.8 else fuzz_app.delete(path)
                else:
                    r = fuzz_app.post(path, content=body, headers=headers)
        except Hang:
            record("http", "hang", detail)
            continue
        except Exception as e:
            record("http", "crash", f"{detail}: client saw {type(e).__name__}: {e}")
            continue
        if "Traceback" in r.text:
            record("http", "traceback", f"{detail}: {r.text[:300]}")
            continue
        if r.status_code >= 500:
            record("http", "crash", f"{detail}: {r.status_code} {r.text[:300]}")
            continue
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                ok = isinstance(err.get("message"), str) and set(err) == {"message", "type", "param", "code"}
            except Exception:
                ok = False
            record("http", "clean_error" if ok else "wrong", f"{detail}: {r.status_code} {r.text[:200]}")
            continue
        try:
            req = json.loads(body) if body else {}
        except ValueError:
            req = {}
        why = _check_answer(req if isinstance(req, dict) else {}, r, path)
        record("http", "wrong" if why else "accepted", f"{detail}: {why}")
        if time.time() - t0 > TIME_LIMIT["http"]:
            record("http", "hang", detail)
    # and the server still answers
    r = fuzz_app.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                      headers=H)
    assert r.status_code == 200
    assert_clean("http")


def test_fuzz_constrained_answers_match_their_schema(fuzz_app):
    """Random schemas the server accepts, answered under their grammar at a high temperature: every
    complete answer must be JSON that validates against the schema (minus what docs/server.md lists
    as not enforced), as `response_format` and as a forced tool call."""
    import jsonschema

    from flashmoe.schemas import SchemaProblem, schema_to_grammar

    rng = rng_for("answer")
    H = {"Authorization": "Bearer fuzz", "Content-Type": "application/json"}
    done = 0
    for i in range(n_inputs("answer") * 50):
        if done >= n_inputs("answer"):
            break
        schema = random_schema(rng)
        try:
            schema_to_grammar(schema)
        except SchemaProblem:
            continue
        done += 1
        as_tool = rng.random() < 0.4 and schema.get("type") == "object"
        body = {"messages": [{"role": "user", "content": "Answer."}], "max_tokens": rng.choice([16, 48]),
                "temperature": rng.choice([0.0, 1.0, 1.8]), "seed": rng.randrange(1000)}
        if as_tool:
            body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
            body["tool_choice"] = "required"
        else:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        detail = f"#{i} {json.dumps(body)[:600]}"
        try:
            with deadline(TIME_LIMIT["answer"]):
                r = fuzz_app.post("/v1/chat/completions", json=body, headers=H)
        except Hang:
            record("answer", "hang", detail)
            continue
        if r.status_code != 200:
            ctx = r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            record("answer", "clean_error" if ctx else "crash" if r.status_code >= 500 else "wrong",
                   f"{detail}: {r.status_code} {r.text[:300]}")
            continue
        ch = r.json()["choices"][0]
        try:
            if as_tool:
                if ch["finish_reason"] != "tool_calls":
                    record("answer", "accepted", detail)  # the budget ran out first: an honest "length"
                    continue
                value = json.loads(ch["message"]["tool_calls"][0]["function"]["arguments"])
            else:
                if ch["finish_reason"] != "stop":
                    record("answer", "accepted", detail)
                    continue
                value = json.loads(ch["message"]["content"])
            jsonschema.validate(value, _strip_unenforced(schema))
            CHECKED["constrained answers validated"] += 1
            record("answer", "accepted", detail)
        except (ValueError, jsonschema.ValidationError) as e:
            record("answer", "wrong", f"{detail}: {ch['message']}: {str(e)[:300]}")
    assert_clean("answer")


# ------------------------------------------------------------------------------------------ schemas and grammars


def test_fuzz_schemas_make_grammars_llama_cpp_accepts(llama_cpp, small_model, tmp_path):
    """Every grammar flashmoe builds from a (random) schema parses in llama.cpp itself."""
    from flashmoe.schemas import SchemaProblem, schema_to_grammar

    rng = rng_for("schema")
    made = []
    for i in range(n_inputs("schema")):
        schema = random_schema(rng)
        detail = f"#{i} {json.dumps(schema)[:300]}"

        def build():
            try:
                made.append((detail, schema_to_grammar(schema)))
            except SchemaProblem:
                return "clean_error"
            return "accepted"

        in_process("schema", build, detail)
    verdicts = llama_grammar_verdicts(small_model, [g for _d, g in made], tmp_path, timeout=300) if made else []
    for (detail, g), ok in zip(made, verdicts):
        if not ok:
            record("schema", "crash", f"{detail}: llama.cpp refuses the grammar (a NULL sampler: SIGSEGV)")
    assert len(verdicts) == len(made)
    assert_clean("schema")


def _mutate_grammar(rng, g: str) -> str:
    s = list(g)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(s) + 1)
        if op == 0 and s:
            del s[min(pos, len(s) - 1)]
        elif op == 1:
            s.insert(pos, rng.choice(list('"[]()|*+?{}.,-^\\#:=\n x0123456789') + ["::=", "{2,1}", "{3000}", "\\x",
                                                                                  "\\u00", "<[5]>", "\x00"]))
        elif op == 2 and s:
            i = rng.randrange(len(s))
            s[i] = rng.choice('"[]()|*+?{}\\\n')
        else:
            s.insert(pos, "\nx ::= x \"a\"\n" if rng.random() < 0.5 else "\nroot ::= root\n")
    return "".join(s)


def test_fuzz_gbnf_check_never_passes_what_llama_cpp_refuses(llama_cpp, small_model, tmp_path):
    """Random damage to grammars: what flashmoe's check passes, llama.cpp must accept (it would crash
    otherwise); the check may be stricter (counted, allowed)."""
    from flashmoe.gbnf import GrammarError, check_grammar
    from flashmoe.schemas import SchemaProblem, schema_to_grammar

    rng = rng_for("grammar")
    seeds = []
    while len(seeds) < 8:
        try:
            seeds.append(schema_to_grammar(random_schema(rng)))
        except SchemaProblem:
            pass
    from llama_cpp.llama_grammar import ARITHMETIC_GBNF, JSON_GBNF, LIST_GBNF

    seeds += [JSON_GBNF, ARITHMETIC_GBNF, LIST_GBNF]
    passed = []
    for i in range(n_inputs("grammar")):
        g = _mutate_grammar(rng, rng.choice(seeds))
        detail = f"#{i} {g[:200]!r}"

        def check():
            try:
                check_grammar(g)
            except GrammarError:
                return "clean_error"
            passed.append((detail, g))
            return "accepted"

        in_process("grammar", check, detail)
    verdicts = llama_grammar_verdicts(small_model, [g for _d, g in passed], tmp_path, timeout=300) if passed else []
    for (detail, _g), ok in zip(passed, verdicts):
        if not ok:
            record("grammar", "crash", f"{detail}: passed the check, llama.cpp refuses it")
    assert len(verdicts) == len(passed)
    assert_clean("grammar")
