"""`flashmoe quality` (issue #9): KL divergence, top-1 agreement and perplexity of a variant against a
reference, over the same text. Tiny synthetic models, the real llama.cpp, small token counts."""
from __future__ import annotations

import json
import os

import pytest

from flashmoe.errors import FlashMoEError
from flashmoe.quality import load_text, measure_quality

CTX = 64
TOKENS = 128  # 2 chunks of 64 -> 62 scored positions

K1_POLICY = """\
version: 1
name: one-expert
description: "stock llama.cpp, 1 expert per token instead of the model's 2"
rules:
  - match: "*"
    place: mmap
runtime:
  n_ctx: 256
  experts_per_token: 1
  repack: false
"""


def run(ref, cand=None, **kw):
    kw.setdefault("n_tokens", TOKENS)
    kw.setdefault("n_ctx", CTX)
    kw.setdefault("use_extra_bufts", False)
    return measure_quality(ref, cand, **kw)


@pytest.fixture(scope="module")
def q2_variant(tiny_models, tmp_path_factory):
    from gguf_tools.quantize import quantize

    out = tmp_path_factory.mktemp("quality") / "tiny-q2k.gguf"
    return quantize(tiny_models["qwen3moe"], out, experts="Q2_K", dense="Q8_0").paths[0]


def test_packaged_text():
    text, label = load_text()
    assert "packaged" in label
    assert not text.startswith("#") and text.startswith("It is a truth universally acknowledged")
    assert len(text.split()) > 3000  # a few thousand tokens for a real tokenizer


def test_self_is_zero(tiny_models, tmp_path, llama_cpp):
    rep = run(tiny_models["qwen3moe"], tmp_dir=str(tmp_path))
    assert rep.n_chunks == 2 and rep.n_tokens == 128 and rep.n_scored == 2 * (CTX - 1 - CTX // 2)
    assert rep.kl_mean == 0.0 and rep.kl_max == 0.0 and rep.kl_median == 0.0 and rep.kl_p99 == 0.0
    assert rep.top1_agreement == 1.0 and rep.top1_same == rep.n_scored
    assert rep.ppl_candidate == rep.ppl_reference and rep.ln_ppl_ratio == 0.0
    assert 1.0 < rep.ppl_reference < 1e6
    assert any("reference itself" in n for n in rep.notes)
    assert os.listdir(tmp_path) == []  # the reference log-probabilities file is gone
    assert "top-1 agreement" in rep.format() and "100.00%" in rep.format()


def test_q2k_variant_diverges(tiny_models, q2_variant, llama_cpp):
    rep = run(tiny_models["qwen3moe"], q2_variant)
    assert rep.kl_mean > 1e-4 and rep.kl_p99 >= rep.kl_median > 0 and rep.kl_max >= rep.kl_p99
    assert rep.top1_agreement < 1.0
    assert rep.ppl_candidate != rep.ppl_reference
    assert abs(rep.ln_ppl_ratio) < 5


def test_fewer_experts_policy_diverges(tiny_models, tmp_path, run_cli, llama_cpp):
    pol = tmp_path / "k1.yaml"
    pol.write_text(K1_POLICY)
    r = run_cli("quality", "-m", tiny_models["qwen3moe"], "--vs-policy", pol, "--tokens", TOKENS, "--ctx", CTX,
                "--no-weight-repack", "--json", "--no-progress")
    assert r.code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["candidate_policy"] == str(pol)
    assert "EXPERTS PER TOKEN OVERRIDDEN: 1 of 2" in rep["candidate_mode"]
    assert rep["kl_mean"] > 1e-4 and rep["kl_median"] > 0 and rep["kl_p99"] > 0
    assert rep["top1_agreement"] < 1.0 and rep["n_scored"] == 62
    # the same through the Python API with the experts-per-token override
    api = run(tiny_models["qwen3moe"], vs_experts_per_token=1)
    assert api.kl_mean == pytest.approx(rep["kl_mean"], rel=1e-6)


def test_cli_text_and_errors(tiny_models, tmp_path, run_cli, llama_cpp):
    txt = tmp_path / "short.txt"
    txt.write_text("Call me Ishmael. " * 20)
    r = run_cli("quality", "-m", tiny_models["qwen3moe"], "--text", txt, "--ctx", 512, "--no-progress")
    assert r.code == 1 and "Traceback" not in r.stderr
    assert "not one chunk of --ctx 512" in r.stderr
    # the text's own chunks; human-readable report
    r = run_cli("quality", "-m", tiny_models["qwen3moe"], "--vs", tiny_models["qwen3moe"], "--text", txt,
                "--ctx", 32, "--no-weight-repack", "--no-progress")
    assert r.code == 0, r.stderr
    assert "KL divergence, mean" in r.stdout and "100.00%" in r.stdout and str(txt) in r.stdout
    r = run_cli("quality", "-m", tiny_models["qwen3moe"], "--vs", tmp_path / "nope.gguf")
    assert r.code == 1 and "no such file" in r.stderr


def test_different_vocabulary_is_refused(tiny_models, tmp_path, llama_cpp):
    from gguf_tools.synth import make_spec, synth_model

    other = str(tmp_path / "v600.gguf")
    synth_model(other, make_spec("qwen3moe", "tiny", seed=0, n_vocab=600), progress=False)
    with pytest.raises(FlashMoEError, match="vocabulary"):
        run(tiny_models["qwen3moe"], other, n_tokens=CTX)
