"""`flashmoe generate` and the Engine's run report, on the real patched library."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flashmoe.engine import Engine
from flashmoe.errors import FlashMoEError


def _json_out(res):
    assert res.code == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "qwen35moe"])
def test_generate_json_report_is_plausible(run_cli, tiny_models, arch):
    out = _json_out(run_cli("generate", "-m", tiny_models[arch], "-p", "Once upon a time", "-n", "12", "--json"))
    r = out["report"]
    assert len(out["tokens"]) == r["generated_tokens"] == 12
    assert r["prompt_tokens"] >= 3
    for k in ("load_s", "prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_bytes"):
        assert r[k] > 0, k
    assert r["disk_read_bytes"] >= 0 and r["major_faults"] >= 0
    # no policy: auto, which runs a model that fits in RAM the stock way and says so
    assert r["mode"].startswith("auto -> stock: ") and "; stock llama.cpp (mmap" in r["mode"]
    assert r["cache"] == {}


def test_generate_streams_text_then_report(run_cli, tiny_models):
    res = run_cli("generate", "-m", tiny_models["qwen3moe"], "-p", "Hello", "-n", "8",
                  "--stream", "cache", "--cache-slots", "2", "--readers", "2")
    assert res.code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(l.startswith("mode") and "explicit cache, 2 slots/layer" in l for l in lines)
    assert any(l.startswith("expert cache") and "hit rate" in l for l in lines)
    assert any(l.startswith("generated") and "8 tokens" in l for l in lines)


def test_generate_records_and_replays_a_trace(run_cli, tiny_models, tmp_path):
    tr = str(tmp_path / "r.trace")
    # matched kernels: no CPU weight repacking in either run (stock repacks expert weights into an
    # interleaved layout with other kernels; the expert cache holds them in the file's format)
    a = _json_out(run_cli("generate", "-m", tiny_models["qwen3moe"], "-p", "Hello there", "-n", "10", "--json",
                          "--record-trace", tr, "--no-weight-repack"))
    b = _json_out(run_cli("generate", "-m", tiny_models["qwen3moe"], "-p", "Hello there", "-n", "10", "--json",
                          "--routing-trace", tr, "--stream", "cache", "--cache-slots", "2", "--no-weight-repack"))
    assert a["tokens"] == b["tokens"]
    assert "routing forced from trace" in b["report"]["mode"]
    st = run_cli("trace", "stats", tr, "--json")
    assert st.code == 0 and json.loads(st.stdout)["tokens"] >= 10


def test_experts_per_token_override_is_reported_and_changes_output(tiny_models):
    with Engine(tiny_models["qwen3moe"], use_extra_bufts=False) as e:
        base = e.generate("Hello world", 16, return_logits=True, stop_at_eos=False)
    with Engine(tiny_models["qwen3moe"], use_extra_bufts=False, n_expert_used=1) as e:
        one = e.generate("Hello world", 16, return_logits=True, stop_at_eos=False)
        assert "EXPERTS PER TOKEN OVERRIDDEN: 1 of 2" in e.mode_line()
    assert any("experts per token overridden" in n for n in one.report.notes)
    assert float(np.max(np.abs(base.logits[0] - one.logits[0]))) > 0


def test_python_api_streams_text(tiny_models):
    pieces = []
    with Engine(tiny_models["qwen2moe"]) as e:
        g = e.generate("abc", 6, on_token=pieces.append, stop_at_eos=False)
    assert "".join(pieces) == g.text
    assert len(g.tokens) == 6


def _write_dense_gguf(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_inputs_give_one_line_errors(run_cli, tiny_models, tmp_path):
    missing = run_cli("generate", "-m", str(tmp_path / "nope.gguf"), "-p", "x")
    notgguf = tmp_path / "text.gguf"
    notgguf.write_text("hello, not a model\n" * 10)
    bad = run_cli("generate", "-m", str(notgguf), "-p", "x")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(open(tiny_models["qwen3moe"], "rb").read()[:200_000])
    cut = run_cli("generate", "-m", str(trunc), "-p", "x")
    dense = tmp_path / "dense.gguf"
    _write_dense_gguf(dense)
    nomoe = run_cli("generate", "-m", str(dense), "-p", "x", "--stream", "cache")
    badn = run_cli("generate", "-m", tiny_models["qwen3moe"], "-p", "x", "-n", "0")
    slots = run_cli("generate", "-m", tiny_models["qwen3moe"], "-p", "x", "--stream", "cache", "--cache-slots", "1")
    for res, word in ((missing, "nope.gguf"), (bad, "not a GGUF"), (cut, "trunc"), (nomoe, "Mixture-of-Experts"),
                      (badn, "-n"), (slots, "at least 2")):
        assert res.code != 0
        assert "Traceback" not in res.stderr
        err = [l for l in res.stderr.splitlines() if l.strip()]
        assert len(err) == 1 and err[0].startswith("error:"), res.stderr
        assert word in err[0], (word, err[0])


def test_context_overflow_is_a_clear_error(tiny_models):
    with Engine(tiny_models["qwen3moe"], n_ctx=32) as e:
        with pytest.raises(FlashMoEError, match="context"):
            e.generate("word " * 40, 8)
