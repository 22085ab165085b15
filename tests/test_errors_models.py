"""Bad input to ``flashmoe synth`` / ``flashmoe inspect``: one ``error: ...`` line, non-zero exit, no traceback."""
from __future__ import annotations

import os
import shutil

import pytest
from click.testing import CliRunner

from flashmoe.cli import main
from flashmoe.errors import FlashMoEError, UsageError
from gguf_tools.reader import open_model
from gguf_tools.synth import make_spec, synth_model


def _check_one_line_error(code, stderr, want_code, *needles):
    assert code == want_code, (code, stderr)
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stderr, r


# ------------------------------------------------------------------------------- inspect: bad files

@pytest.fixture
def bad_files(tmp_path, tiny_model):
    d = {}
    d["missing"] = str(tmp_path / "nope.gguf")
    d["text"] = str(tmp_path / "notes.gguf")
    with open(d["text"], "w") as f:
        f.write("this is not a model\n" * 10)
    d["empty"] = str(tmp_path / "empty.gguf")
    open(d["empty"], "wb").close()
    data = open(tiny_model, "rb").read()
    d["trunc_data"] = str(tmp_path / "trunc_data.gguf")
    with open(d["trunc_data"], "wb") as f:
        f.write(data[: len(data) - 5000])
    d["trunc_header"] = str(tmp_path / "trunc_header.gguf")
    with open(d["trunc_header"], "wb") as f:
        f.write(data[:3000])  # inside the tokenizer arrays
    d["trunc_tiny"] = str(tmp_path / "trunc_tiny.gguf")
    with open(d["trunc_tiny"], "wb") as f:
        f.write(data[:6])
    d["folder"] = str(tmp_path)
    return d


@pytest.mark.parametrize("kind,needles", [
    ("missing", ["no such file", "nope.gguf"]),
    ("text", ["not a GGUF file", "bad magic"]),
    ("empty", ["not a GGUF file", "empty file"]),
    ("trunc_data", ["truncated", "tensor data extends past the end of the file"]),
    ("trunc_header", ["truncated", "header is cut short"]),
    ("trunc_tiny", ["truncated", "header is cut short"]),
    ("folder", ["is a folder"]),
])
def test_inspect_bad_file(bad_files, kind, needles):
    code, err, _ = _cli("inspect", bad_files[kind])
    _check_one_line_error(code, err, 1, *needles)
    with pytest.raises(FlashMoEError):
        open_model(bad_files[kind])


def test_inspect_bad_file_through_subprocess(run_cli, bad_files):
    r = run_cli("inspect", bad_files["text"])
    _check_one_line_error(r.code, r.stderr, 1, "not a GGUF file")
    r = run_cli("inspect", bad_files["trunc_data"])
    _check_one_line_error(r.code, r.stderr, 1, "truncated")


def test_missing_shard(tmp_path):
    res = synth_model(str(tmp_path / "m.gguf"), make_spec("qwen3moe", "tiny", shards=3), progress=False)
    os.remove(res.paths[1])
    code, err, _ = _cli("inspect", res.paths[0])
    _check_one_line_error(code, err, 1, "missing shard 2 of 3", "m-00002-of-00003.gguf")
    # asking for a later shard whose first shard is gone
    shutil.move(res.paths[0], str(tmp_path / "elsewhere.gguf"))
    code, err, _ = _cli("inspect", res.paths[2])
    _check_one_line_error(code, err, 1, "missing shard", "m-00001-of-00003.gguf")


def test_shard_of_another_model(tmp_path):
    a = synth_model(str(tmp_path / "a.gguf"), make_spec("qwen3moe", "tiny", shards=2), progress=False)
    b = synth_model(str(tmp_path / "b.gguf"), make_spec("qwen3moe", "tiny", shards=3), progress=False)
    shutil.copy(b.paths[1], a.paths[1])  # "2 of 3" where "2 of 2" belongs
    code, err, _ = _cli("inspect", a.paths[0])
    _check_one_line_error(code, err, 1, "is not shard 2 of 2")


# ------------------------------------------------------------------------------- synth: bad options

@pytest.mark.parametrize("args,needles", [
    (["--arch", "falcon"], ["unknown arch 'falcon'", "qwen3moe"]),
    (["--preset", "huge"], ["unknown preset 'huge'"]),
    (["--experts", "4", "--experts-used", "5"], ["--experts-used = 5 is more than --experts = 4"]),
    (["--layers", "0"], ["--layers = 0 is out of range"]),
    (["--embd", "300"], ["--embd = 300 must be a multiple of 256 for Q4_K"]),
    (["--expert-ffn", "100"], ["--expert-ffn = 100 must be a multiple of 256 for Q4_K"]),
    (["--head-dim", "7"], ["--head-dim = 7 must be even"]),
    (["--dense-type", "Q3_K"], ["--dense-type 'Q3_K' is not supported"]),
    (["--vocab", "100"], ["--vocab = 100 is out of range"]),
    (["--heads", "8", "--kv-heads", "3"], ["--heads = 8 must be a multiple of --kv-heads = 3"]),
    (["--alignment", "48"], ["--alignment = 48 must be a power of two"]),
    (["--layout", "random"], ["--layout 'random' is unknown"]),
    (["--shards", "1000"], ["--shards = 1000 is more than the"]),
    (["--arch", "qwen2moe", "--head-dim", "32"], ["qwen2moe needs --heads x --head-dim = --embd"]),
    (["--arch", "qwen3moe", "--shared-ffn", "256"], ["--shared-ffn applies to qwen2moe and qwen35moe only"]),
])
def test_synth_bad_options(tmp_path, args, needles):
    out = tmp_path / "x.gguf"
    code, err, _ = _cli("synth", "-o", out, "-q", *args)
    _check_one_line_error(code, err, 2, *needles)
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing written, no temp file left


def test_synth_bad_option_through_subprocess(run_cli, tmp_path):
    r = run_cli("synth", "-o", tmp_path / "x.gguf", "--arch", "falcon")
    _check_one_line_error(r.code, r.stderr, 2, "unknown arch 'falcon'")
    r = run_cli("synth", "-o", tmp_path / "x.gguf", "--experts", "8", "--experts-used", "9")
    _check_one_line_error(r.code, r.stderr, 2, "--experts-used = 9 is more than --experts = 8")


def test_synth_missing_output_and_folder(tmp_path):
    code, err, _ = _cli("synth")
    _check_one_line_error(code, err, 2, "missing option -o")
    code, err, _ = _cli("synth", "-o", tmp_path / "no" / "such" / "x.gguf", "-q")
    _check_one_line_error(code, err, 1, "output folder does not exist")


def test_synth_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "x.gguf"
    code, err, _ = _cli("synth", "-o", out, "-q")
    assert code == 0, err
    before = out.read_bytes()
    code, err, _ = _cli("synth", "-o", out, "-q", "--seed", "3")
    _check_one_line_error(code, err, 1, "already exists", "--force")
    assert out.read_bytes() == before
    code, err, _ = _cli("synth", "-o", out, "-q", "--seed", "3", "--force")
    assert code == 0 and out.read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["x.gguf"]  # no temp files left behind


def test_make_spec_errors_are_usage_errors():
    with pytest.raises(UsageError):
        make_spec("qwen3moe", "tiny", n_expert_used=0)
    with pytest.raises(UsageError):
        make_spec("qwen3moe", "tiny", bogus=1)
    e = UsageError("x")
    assert e.exit_code == 2


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    from gguf_tools.atomic import atomic_write

    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"new data")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["t.bin"]
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["t.bin"]
    with pytest.raises(FlashMoEError, match="is a folder"):
        with atomic_write(tmp_path) as f:
            pass
