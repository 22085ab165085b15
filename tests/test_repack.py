"""``flashmoe repack`` (issue #4): grouped, page-aligned GGUF layout, on real tiny models and the real
patched llama.cpp. No mocks: the repacked files are loaded and run; interruptions are real signals to a
real subprocess; the full disk is a real (tiny) tmpfs."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import REPO_ROOT, TINY_ARCHES
from flashmoe.cli import main
from flashmoe.errors import FlashMoEError
from gguf_tools.reader import open_model
from gguf_tools.repack import (
    FUSE_GATE_UP_ARCHS,
    expert_layout,
    plan_repack,
    raw_kvs,
    repack,
    verify_output,
)
from gguf_tools.synth import make_spec, synth_model

PROMPT = "hello world, the model reads experts from the disk"
N_GEN = 12


# ------------------------------------------------------------------------------------------ helpers


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def tensor_hashes(path: str) -> dict:
    """name -> (type, shape, sha256 of the bytes), read independently of the repack code."""
    out = {}
    with open_model(path) as m:
        for t in m.tensors:
            out[t.name] = (t.type_name, tuple(t.shape), hashlib.sha256(m.read_bytes(t)).hexdigest())
    return out


def expert_halves(path: str, name: str):
    """(sha of the gate halves, sha of the up halves) of a fused gate_up tensor, expert by expert."""
    with open_model(path) as m:
        t = m.tensor(name)
        data = m.read_bytes(t)
    n_e = t.shape[2]
    s = t.nbytes // n_e
    g = hashlib.sha256(b"".join(data[e * s: e * s + s // 2] for e in range(n_e))).hexdigest()
    u = hashlib.sha256(b"".join(data[e * s + s // 2: (e + 1) * s] for e in range(n_e))).hexdigest()
    return g, u


def metadata(path: str) -> dict:
    with open_model(path) as m:
        return dict(m.metadata)


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def repack_cli(src, out, *extra):
    code, output = cli("repack", src, "-o", out, "--no-progress", *extra)
    assert code == 0, output
    return output


_TOKENS = {}


def greedy(path: str, **kw):
    from flashmoe.engine import Engine

    with Engine(path, use_extra_bufts=False, n_ctx=256, **kw) as e:
        g = e.generate(PROMPT, N_GEN)
        info = e.stats().get("info", {})
    return g.tokens, info


def baseline(path: str):
    key = os.path.realpath(path)
    if key not in _TOKENS:
        _TOKENS[key] = greedy(path)[0]
    return _TOKENS[key]


def direct_io_works(folder) -> bool:
    p = os.path.join(folder, ".odirect-probe")
    with open(p, "wb") as f:
        f.write(b"\0" * 8192)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    try:
        import mmap

        buf = mmap.mmap(-1, 4096)
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(p)


def streamed(path: str):
    """Greedy tokens and the hook's info with experts streamed into a 2-slot cache with direct I/O; None when
    the imported llama.cpp has no flashmoe hook or the folder has no O_DIRECT."""
    from flashmoe.hook import available
    from flashmoe.settings import StreamSettings

    if not available() or not direct_io_works(os.path.dirname(os.path.abspath(path))):
        return None
    return greedy(path, stream=StreamSettings(mode="cache", cache_slots=2, direct_io=True))


def check_layout(path: str, align: int):
    """Dense first as one contiguous run, then experts layer by layer; every tensor on the alignment;
    every expert slice on the alignment when its stride allows (and only expert 0 guaranteed otherwise)."""
    with open_model(path) as m:
        assert set(m.alignment) == {align}
        ts = sorted(m.tensors, key=lambda t: (t.file_index, t.data_offset))
        kinds = [t.is_expert for t in ts]
        assert kinds == sorted(kinds), "a dense tensor comes after an expert tensor"
        layers = [t.layer for t in ts if t.is_expert]
        assert layers == sorted(layers)
        for t in ts:
            assert t.data_offset % align == 0, t.name
        # dense tensors: one contiguous range (only alignment padding in between), per file
        for fi in range(len(m.files)):
            dense = [t for t in ts if not t.is_expert and t.file_index == fi]
            for a, b in zip(dense, dense[1:]):
                assert b.data_offset == (a.data_end + align - 1) // align * align, (a.name, b.name)
        n_checked = 0
        for t in ts:
            if not t.is_expert:
                continue
            n_e = t.shape[2]
            for e in range(n_e):
                if t.expert_stride % align == 0 or e == 0:
                    assert t.expert_offset(e) % align == 0
                    n_checked += 1
        assert n_checked > 0
        return m.tensors


# --------------------------------------------------------------------------------- every architecture


@pytest.mark.parametrize("arch", TINY_ARCHES)
def test_repack_each_arch_identical_tensors_and_tokens(tiny_models, tmp_path, llama_cpp, arch):
    src = tiny_models[arch]
    out = str(tmp_path / f"{arch}-grouped.gguf")
    before = sha(src)
    text = repack_cli(src, out)
    assert "verified:" in text and "grouped" in text
    assert sha(src) == before

    # tensor table and bytes: same names, types, shapes and data
    assert tensor_hashes(out) == tensor_hashes(src)
    # every metadata key kept (tokenizer, chat template, ...), alignment set
    mi, mo = metadata(src), metadata(out)
    for k, v in mi.items():
        if k.startswith("split.") or k == "general.alignment":
            continue
        assert mo.get(k) == v, k
    assert "tokenizer.chat_template" in mo and "tokenizer.ggml.tokens" in mo
    assert mo["general.alignment"] == 16384
    check_layout(out, 16384)

    # the repacked file runs in stock llama.cpp and generates the same greedy tokens
    toks, _ = greedy(out)
    assert toks == baseline(src) and len(toks) > 0
    # and with the patched llama.cpp streaming its experts: same tokens, every read straight into a slot
    st = streamed(out)
    if st is not None:
        assert st[0] == toks
        assert st[1]["n_direct_reads"] > 0 and st[1]["n_bounce_reads"] == 0


def test_align_4096_puts_every_slice_on_a_page(tiny_models, tmp_path):
    src = tiny_models["qwen3moe"]
    out = str(tmp_path / "a4k.gguf")
    repack_cli(src, out, "--align", "4096")
    tensors = check_layout(out, 4096)
    for t in tensors:
        if t.is_expert:
            assert t.expert_stride % 4096 == 0
            assert all(t.expert_offset(e) % 4096 == 0 for e in range(t.shape[2]))


def test_slices_that_are_16k_multiples_are_all_16k_aligned(tmp_path, llama_cpp):
    # Q4_K: 256 x 1024 -> 147456 B = 9 x 16 KiB per expert slice
    src = str(tmp_path / "wide.gguf")
    synth_model(src, make_spec("qwen3moe", "tiny", n_layer=2, n_expert=4, n_expert_used=2, n_ff_exp=1024, seed=3),
                progress=False)
    out = str(tmp_path / "wide-grouped.gguf")
    text = repack_cli(src, out)
    tensors = check_layout(out, 16384)
    for t in tensors:
        if t.is_expert:
            assert t.expert_stride % 16384 == 0
            assert all(t.expert_offset(e) % 16384 == 0 for e in range(t.shape[2]))
    assert "16 KiB pages: every expert slice page-aligned" in text
    with open_model(out) as m:
        lay = expert_layout(m)
    assert lay["grouped"] and lay["pages"][16384]["aligned"] and lay["pages"][16384]["amplification"] == 1.0
    assert greedy(out)[0] == greedy(src)[0]


def test_unaligned_stride_is_reported(tiny_models, tmp_path):
    # the tiny models' expert slices are 36 KiB: a 4 KiB multiple, not a 16 KiB one
    out = str(tmp_path / "r.gguf")
    text = repack_cli(tiny_models["qwen3moe"], out)
    assert "4 KiB pages: every expert slice page-aligned" in text
    assert "16 KiB pages: NOT page-aligned: slice size 36 KiB (36864 B) is not a multiple of 16 KiB" in text
    code, shown = cli("inspect", out)
    assert code == 0
    assert "[expert_io]" in shown and "16 KiB pages  NOT page-aligned" in shown
    assert "4 KiB pages   every expert slice page-aligned; read amplification of one expert 1.0000" in shown


def test_read_amplification_numbers(tiny_models, tmp_path):
    src = tiny_models["qwen3moe"]
    out = str(tmp_path / "r.gguf")
    repack_cli(src, out, "--align", "4096")
    for path in (src, out):
        with open_model(path) as m:
            lay = expert_layout(m)
            for P in (4096, 16384):
                touched = nbytes = 0
                for t in m.tensors:
                    if not t.is_expert:
                        continue
                    for e in range(t.shape[2]):
                        a = t.expert_offset(e)
                        b = a + t.expert_stride
                        touched += -(-b // P) * P - a // P * P
                        nbytes += t.expert_stride
                assert lay["pages"][P]["amplification"] == pytest.approx(touched / nbytes)
    with open_model(src) as m:
        assert not expert_layout(m)["grouped"]
        assert expert_layout(m)["pages"][4096]["amplification"] > 1.0
    with open_model(out) as m:
        assert expert_layout(m)["pages"][4096]["amplification"] == 1.0


def test_repack_is_idempotent(tiny_models, tmp_path):
    a = str(tmp_path / "a.gguf")
    b = str(tmp_path / "b.gguf")
    repack_cli(tiny_models["qwen2moe"], a)
    repack_cli(a, b)
    assert sha(a) == sha(b)


# ------------------------------------------------------------------------------------------ split


def test_split_input_to_single_file(tmp_path, llama_cpp):
    spec = make_spec("qwen3moe", "tiny", seed=5, shards=3)
    res = synth_model(str(tmp_path / "sp.gguf"), spec, progress=False)
    assert len(res.paths) == 3
    single = str(tmp_path / "single.gguf")
    synth_model(single, make_spec("qwen3moe", "tiny", seed=5), progress=False)  # same tensors, one file
    out = str(tmp_path / "joined.gguf")
    text = repack_cli(res.paths[0], out)
    assert "verified" in text
    mo = metadata(out)
    assert not any(k.startswith("split.") for k in mo)
    assert tensor_hashes(out) == tensor_hashes(res.paths[0]) == tensor_hashes(single)
    check_layout(out, 16384)
    assert greedy(out)[0] == baseline(single)


def test_split_output_shards(tiny_models, tmp_path, llama_cpp):
    src = tiny_models["qwen3moe"]
    out = str(tmp_path / "sh.gguf")
    text = repack_cli(src, out, "--split-max-size", "2MiB")
    paths = sorted(str(p) for p in tmp_path.glob("sh-*-of-*.gguf"))
    n = len(paths)
    assert n >= 3 and not os.path.exists(out)
    assert paths == [str(tmp_path / f"sh-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    assert "sh-00001-of-" in text
    n_tensors = sum(1 for _ in tensor_hashes(src))
    for i, p in enumerate(paths):
        assert os.path.getsize(p) <= 2 << 20
        kv = dict(raw_kvs(p))
        # general.alignment in every shard (the gguf-py bug wrote it only in the first)
        assert "general.alignment" in kv
        from gguf import GGUFReader

        r = GGUFReader(p)
        assert int(r.fields["general.alignment"].contents()) == 16384
        assert int(r.fields["split.no"].contents()) == i
        assert int(r.fields["split.count"].contents()) == n
        assert int(r.fields["split.tensors.count"].contents()) == n_tensors
    assert tensor_hashes(paths[0]) == tensor_hashes(src)
    check_layout(paths[0], 16384)
    assert greedy(paths[0])[0] == baseline(src)
    st = streamed(paths[0])  # expert reads from several files
    if st is not None:
        assert st[0] == baseline(src) and st[1]["n_direct_reads"] > 0 and st[1]["n_bounce_reads"] == 0


# ------------------------------------------------------------------------------------- gate/up fusion


def test_fuse_gate_up_qwen35moe(tiny_models, tmp_path, llama_cpp):
    """The tiny qwen35moe is written fused (like converted Qwen3.5 files). Make a separate-gate/up copy
    (repack's internal inverse, which llama.cpp's qwen35moe loader also accepts), then fuse it back with
    the CLI: identical bytes to the original fused tensors, identical tokens in all three files."""
    assert "qwen35moe" in FUSE_GATE_UP_ARCHS
    src = tiny_models["qwen35moe"]
    sep = str(tmp_path / "separate.gguf")
    repack(src, sep, unfuse_gate_up=True)
    hs = tensor_hashes(sep)
    assert "blk.0.ffn_gate_exps.weight" in hs and "blk.0.ffn_gate_up_exps.weight" not in hs
    assert greedy(sep)[0] == baseline(src)

    fused = str(tmp_path / "fused.gguf")
    text = repack_cli(sep, fused, "--fuse-gate-up")
    assert "fused gate and up experts of 4 layers" in text
    hf = tensor_hashes(fused)
    assert hf == tensor_hashes(src)  # byte-identical to the original fused model's tensors
    assert "blk.0.ffn_gate_exps.weight" not in hf
    # and the fused tensor's gate/up halves are the separate tensors, expert by expert
    g, u = expert_halves(fused, "blk.2.ffn_gate_up_exps.weight")
    assert g == hs["blk.2.ffn_gate_exps.weight"][2] and u == hs["blk.2.ffn_up_exps.weight"][2]
    with open_model(fused) as m:
        t = m.tensor("blk.1.ffn_gate_up_exps.weight")
        assert t.shape[1] == 2 * m.arch_key("expert_feed_forward_length")
    check_layout(fused, 16384)
    assert greedy(fused)[0] == baseline(src)
    st_sep, st_fused = streamed(sep), streamed(fused)
    if st_fused is not None:
        assert st_sep[0] == st_fused[0] == baseline(src)
        assert st_fused[1]["n_bounce_reads"] == 0
        # one read per expert for gate+up instead of two: fewer reads for the same routing
        assert st_fused[1]["n_direct_reads"] < st_sep[1]["n_direct_reads"]
    # an already fused model: nothing to fuse, still repacked
    again = str(tmp_path / "again.gguf")
    assert "already fused" in repack_cli(src, again, "--fuse-gate-up")


def test_fuse_gate_up_refused_for_qwen3moe(tiny_models, tmp_path, run_cli):
    out = tmp_path / "f.gguf"
    r = run_cli("repack", tiny_models["qwen3moe"], "-o", out, "--fuse-gate-up")
    assert r.code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --fuse-gate-up:") and "qwen3moe" in lines[0]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- streaming engine


def test_grouped_layout_gives_direct_reads_without_bounce(tiny_models, tmp_path, llama_cpp):
    from flashmoe.hook import available
    from flashmoe.settings import StreamSettings

    if not available():
        pytest.skip("the imported llama.cpp does not carry the flashmoe patch")
    if not direct_io_works(str(tmp_path)):
        pytest.skip(f"O_DIRECT does not work in {tmp_path}")
    src = str(tmp_path / "orig.gguf")
    with open(tiny_models["qwen3moe"], "rb") as f, open(src, "wb") as g:
        g.write(f.read())  # the original layout, on the same (O_DIRECT-capable) disk
    out = str(tmp_path / "grouped.gguf")
    repack_cli(src, out)

    def stream(p):
        return greedy(p, stream=StreamSettings(mode="cache", cache_slots=2, direct_io=True))

    t_orig, info_orig = stream(src)
    t_out, info_out = stream(out)
    assert info_orig["direct_io"] == 1 and info_out["direct_io"] == 1
    assert info_orig["n_bounce_reads"] > 0  # converter layout: unaligned slices need a bounce copy
    assert info_out["n_direct_reads"] > 0 and info_out["n_bounce_reads"] == 0
    assert t_orig == t_out == baseline(tiny_models["qwen3moe"])


# ----------------------------------------------------------------------------------- verification


def test_verify_catches_a_changed_byte(tiny_models, tmp_path):
    src = tiny_models["qwen2moe"]
    out = str(tmp_path / "v.gguf")
    repack_cli(src, out, "--no-verify")
    with open_model(src) as m:
        plan = plan_repack(m, out)
        assert verify_output(m, plan)["input_tensors"] == len(m.tensors)
    with open_model(out) as mo:
        t = mo.tensor("blk.3.ffn_down_exps.weight")
        off = t.expert_offset(5) + 100
    with open(out, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))
    with open_model(src) as m:
        with pytest.raises(FlashMoEError, match="blk.3.ffn_down_exps.weight differ"):
            verify_output(m, plan_repack(m, out))


# ------------------------------------------------------------------------------------- user errors


def test_refuses_to_overwrite_input(tiny_models, tmp_path, run_cli):
    src = str(tmp_path / "m.gguf")
    with open(tiny_models["qwen3moe"], "rb") as f, open(src, "wb") as g:
        g.write(f.read())
    before = sha(src)
    for extra in ([], ["--force"]):
        r = run_cli("repack", src, "-o", src, *extra)
        assert r.code != 0 and "refusing to overwrite the input" in r.stderr and "Traceback" not in r.stderr
    os.link(src, tmp_path / "hard.gguf")
    r = run_cli("repack", src, "-o", tmp_path / "hard.gguf", "--force")
    assert r.code != 0 and "refusing to overwrite the input" in r.stderr
    assert sha(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.gguf", "m.gguf"]


def test_existing_output_needs_force(tiny_models, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    code, text = cli("repack", tiny_models["qwen3moe"], "-o", out, "--no-progress")
    assert code != 0 and "already exists" in text and out.read_bytes() == b"keep me"
    repack_cli(tiny_models["qwen3moe"], out, "--force")
    assert tensor_hashes(str(out)) == tensor_hashes(tiny_models["qwen3moe"])


@pytest.mark.parametrize("bad", ["1000", "16", "0", "64MiB", "lots"])
def test_bad_alignment(tiny_models, tmp_path, bad):
    code, text = cli("repack", tiny_models["qwen3moe"], "-o", tmp_path / "x.gguf", "--align", bad)
    assert code == 2 and list(tmp_path.iterdir()) == []


def test_not_a_moe_or_not_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    code, text = cli("repack", bad, "-o", tmp_path / "o.gguf")
    assert code == 1 and "not a GGUF file" in text
    code, text = cli("repack", tmp_path / "missing.gguf", "-o", tmp_path / "o.gguf")
    assert code == 1 and "no such file" in text


# ------------------------------------------------------------------------------ interrupts, full disk


def _start(src, out, extra_env=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["FLASHMOE_REPACK_TEST_DELAY"] = "0.05"  # ~50 tensors: a few seconds of writing
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, "-m", "flashmoe", "repack", str(src), "-o", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
                            # Ctrl-C must reach Python's handler even if this test process ignores SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_temp(folder, proc, timeout=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        tmps = [p for p in os.listdir(folder) if p.endswith(".tmp")]
        if tmps and os.path.getsize(os.path.join(folder, tmps[0])) > 1 << 20:
            return tmps
        if proc.poll() is not None:
            raise AssertionError(f"repack ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("no temporary file appeared")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_repack_leaves_no_target_and_input_intact(tiny_models, tmp_path, sig):
    src = str(tmp_path / "in.gguf")
    with open(tiny_models["qwen3moe"], "rb") as f, open(src, "wb") as g:
        g.write(f.read())
    before = sha(src)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "m.gguf"
    p = _start(src, out)
    _wait_for_temp(str(outdir), p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0, err
    assert not out.exists()
    assert sha(src) == before
    left = os.listdir(outdir)
    if sig == signal.SIGKILL:
        # nothing can clean up after SIGKILL: a hidden temporary file stays, never under the target name
        assert all(n.startswith(".m.gguf.repack-") and n.endswith(".tmp") for n in left)
        # the next repack to the same target removes it and succeeds
        code, text = cli("repack", src, "-o", out, "--no-progress")
        assert code == 0 and "left by an interrupted repack" in text
        assert sorted(os.listdir(outdir)) == ["m.gguf"]
    else:
        assert left == [], left
        assert "Traceback" not in err
        if sig == signal.SIGINT:
            assert p.returncode == 130 and "interrupted" in err


@pytest.fixture
def small_tmpfs(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_too_small_disk_is_refused_up_front(tiny_models, small_tmpfs, run_cli):
    src = tiny_models["qwen3moe"]
    before = sha(src)
    r = run_cli("repack", src, "-o", small_tmpfs / "m.gguf")
    assert r.code == 1 and r.stderr.startswith("error: not enough disk space") and "Traceback" not in r.stderr
    assert os.listdir(small_tmpfs) == [] and sha(src) == before


@pytest.mark.parametrize("preallocate", [True, False])
def test_disk_full_while_writing(tiny_models, small_tmpfs, preallocate):
    """The space check skipped (the disk fills while writing): ENOSPC, from fallocate or from a write
    in the middle of the copy, leaves nothing in the folder and the input untouched."""
    src = tiny_models["qwen35moe"]
    before = sha(src)
    with pytest.raises(FlashMoEError, match="disk full"):
        repack(src, small_tmpfs / "m.gguf", check_space=False, preallocate=preallocate)
    assert os.listdir(small_tmpfs) == [] and sha(src) == before
