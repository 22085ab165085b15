"""Experts from RAM (`expert_cache.source: ram`), against the real patched llama.cpp.

Every streamed expert is read once at load into host RAM (on a GPU: its page-locked host memory) and
the cache's misses and reads ahead are copies from there: the --n-cpu-moe situation with a cache of the
hot experts in the slots. The CPU build runs the same code path with plain memory and memcpy; the GPU's
asynchronous copies were run on the lent H200 (docs/BENCHMARKS.md). What must hold everywhere: the
output is the in-RAM run's, bit for bit, and after the load the model file is never read again.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from flashmoe.engine import Engine
from flashmoe.errors import FlashMoEError
from flashmoe.settings import StreamSettings

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(HERE, "..", "flashmoe", "data", "real-moe-22m-q8_0.gguf")
PROMPT = "Once upon a time, a little girl named Lily found a shiny red ball in the park. She"
N = 40


def _max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a.logits, b.logits))


def _ram(slots=6, prefetch="next-layer", **kw):
    return StreamSettings(mode="cache", cache_slots=slots, readers=2, prefetch=prefetch, source="ram", **kw)


@pytest.fixture(scope="module")
def reference(llama_cpp):
    with Engine(REAL, use_extra_bufts=False, n_ctx=512) as e:
        return e.generate(PROMPT, N, return_logits=True, stop_at_eos=False)


@pytest.mark.parametrize("prefetch", ["off", "next-layer"])
def test_experts_from_ram_are_exact(llama_cpp, reference, prefetch):
    with Engine(REAL, use_extra_bufts=False, n_ctx=512, stream=_ram(prefetch=prefetch)) as e:
        got = e.generate(PROMPT, N, return_logits=True, stop_at_eos=False)
        info, st = e.info, e.stats()["total"]
    assert got.tokens == reference.tokens
    assert _max_diff(reference, got) == 0.0
    # every streamed expert is held in RAM (plain memory on a CPU build), and the cache still works
    assert info["tier_bytes"] == info["streamed_bytes"] > 0 and info["tier_pinned"] == 0
    assert st["misses"] > 0 and st["evictions"] > 0 and st["hits"] > 0
    if prefetch == "next-layer":
        assert st["n_prefetched"] > 0 and 0 < st["n_prefetch_used"] < st["n_prefetched"]
        assert st["n_prefetch_cancelled"] == 0  # copies are not dropped
    else:
        assert st["n_prefetched"] == 0


def test_the_file_is_not_read_after_the_load(llama_cpp, reference, tmp_path):
    """Truncated under a running model, the file breaks a disk-sourced cache (an error, as it must) and
    leaves a RAM-sourced one exact: its misses are copies from RAM."""
    path = str(tmp_path / "real.gguf")
    shutil.copyfile(REAL, path)
    ram = Engine(path, use_extra_bufts=False, n_ctx=512, stream=_ram())
    disk = Engine(path, use_extra_bufts=False, n_ctx=512,
                  stream=StreamSettings(mode="cache", cache_slots=6, readers=2, prefetch="next-layer"))
    try:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        got = ram.generate(PROMPT, N, return_logits=True, stop_at_eos=False)
        assert got.tokens == reference.tokens and _max_diff(reference, got) == 0.0
        with pytest.raises(FlashMoEError, match="truncated|changed|replaced"):
            disk.generate(PROMPT, N, stop_at_eos=False)
    finally:
        ram.close()
        disk.close()


def test_a_read_error_while_filling_fails_the_load(llama_cpp, monkeypatch):
    monkeypatch.setenv("FLASHMOE_FAULT_INJECT", "eio:7")
    with pytest.raises(FlashMoEError, match="expert read failed.*Input/output error"):
        Engine(REAL, use_extra_bufts=False, n_ctx=512, stream=_ram())


def test_repacked_slots_from_ram_equal_stock_with_repacking(llama_cpp, tmp_path):
    from gguf_tools.quantize import quantize

    q4k = str(tmp_path / "real-q4k.gguf")
    quantize(REAL, q4k, experts="Q4_K", progress=False)
    with Engine(q4k, use_extra_bufts=True, n_ctx=512) as e:
        ref = e.generate(PROMPT, 24, return_logits=True, stop_at_eos=False)
    with Engine(q4k, use_extra_bufts=True, n_ctx=512, stream=_ram()) as e:
        got = e.generate(PROMPT, 24, return_logits=True, stop_at_eos=False)
        info, st = e.info, e.stats()["total"]
    assert info["n_repacked_tensors"] > 0 and st["evictions"] > 0
    assert got.tokens == ref.tokens and _max_diff(ref, got) == 0.0


@pytest.mark.parametrize("case", ["mixed-types", "fused-gate-up"])
def test_packed_experts_of_mixed_sizes_are_exact(llama_cpp, tiny_models, tmp_path, case):
    """With `source: ram` a layer's RAM copy and slots hold each expert's slices back to back (one copy per
    expert; the slot tensors are strided views). Real files mix types within an expert (Q4_K_M keeps some
    down projections in Q6_K), and Qwen3.5 files fuse gate and up (a tensor twice the size of the down
    one): slices of different sizes and types side by side. Both stay the in-RAM run's, bit for bit."""
    if case == "mixed-types":
        from gguf_tools.quantize import quantize

        path = str(tmp_path / "mixed.gguf")
        quantize(REAL, path, experts="Q4_K", rules=["ffn_down_exps=Q6_K"], progress=False)
        prompt, n = PROMPT, 24
    else:
        path, prompt, n = tiny_models["qwen35moe"], "The quick brown fox " * 3, 24
    with Engine(path, use_extra_bufts=False, n_ctx=512) as e:
        ref = e.generate(prompt, n, return_logits=True, stop_at_eos=False)
    with Engine(path, use_extra_bufts=False, n_ctx=512, stream=_ram(slots=5)) as e:
        got = e.generate(prompt, n, return_logits=True, stop_at_eos=False)
        st = e.stats()["total"]
    assert st["misses"] > 0 and st["evictions"] > 0 and st["n_prefetched"] > 0
    assert got.tokens == ref.tokens and _max_diff(ref, got) == 0.0
