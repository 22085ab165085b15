"""Policies as the engine runs them: the placement `policy show` prints is the placement the engine used."""
from __future__ import annotations

import pytest

from flashmoe.engine import Engine
from flashmoe.policy import load_policy
from gguf_tools.reader import open_model

ARCHES = ["qwen3moe", "qwen2moe", "qwen35moe"]
CONFIGS = ["stock", "stock-mmap", "stream", "pagecache", "gpu-dense", "all-ram"]


def _resolve(name, path, budget="1GiB"):
    with open_model(path) as m:
        return load_policy(name).resolve(m, budget=budget)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("name", CONFIGS)
def test_engine_uses_the_resolved_placement(tiny_models, arch, name):
    path = tiny_models[arch]
    res = _resolve(name, path)
    settings = res.engine_settings()
    settings.runtime.n_ctx = 256
    settings.runtime.use_extra_bufts = False
    with Engine(path, settings=settings) as e:
        g = e.generate("The placement test", 6, stop_at_eos=False)
        assert len(g.tokens) == 6
        assert settings.policy_name in e.mode_line() or name.startswith("stock")
        placed = e.hook_placements
        for tname, place in res.placements.items():
            want = place
            if place == "gpu":  # CPU build: the policy module already resolved gpu rules away
                pytest.fail("gpu placement reached the engine on a CPU build")
            applied = e.tensor_placement(tname)
            if e.info is None:
                # nothing attached: every tensor loaded the stock way, which is what these placements mean
                assert want in ("mmap", "ram") and placed[tname] in ("default", "ram"), (tname, want)
                continue
            if placed[tname] == "default":
                # "mmap" on an mmap'd model is exactly stock
                assert want == "mmap" and applied == "default", (tname, want, applied)
            else:
                assert applied == placed[tname] == want, (tname, want, applied)
        if e.info is not None:
            n_pin = sum(1 for p in res.placements.values() if p == "pin")
            n_stream = sum(1 for p in res.placements.values() if p == "stream")
            assert e.info["n_pin_tensors"] == n_pin
            assert e.info["n_stream_tensors"] == (n_stream if settings.stream.mode != "off" else 0)
            if n_pin:
                # root (tests run as root here) may lock: the pinned bytes are really locked
                pinned = res.bytes_by_placement.get("pin", 0)
                assert e.info["locked_bytes"] >= pinned * 0.9, (e.info["locked_bytes"], pinned)
                assert e.info["n_lock_ranges"] >= 1
            if settings.stream.mode == "cache":
                assert e.info["n_slots"] == settings.stream.cache_slots


def test_stock_policy_is_stock_llama_cpp(tiny_models):
    """stock.yaml attaches nothing and gives the same tokens as a plain Engine (stock llama.cpp)."""
    path = tiny_models["qwen3moe"]
    s = _resolve("stock", path).engine_settings()
    with Engine(path, settings=s) as a:
        assert a.info is None
        ta = a.generate("stock check", 12, stop_at_eos=False).tokens
        ra = a.generate("stock check", 12, stop_at_eos=False).report
    with Engine(path) as b:
        tb = b.generate("stock check", 12, stop_at_eos=False).tokens
    assert ta == tb
    assert ra.cache == {}
    assert ra.mode.startswith("stock llama.cpp (mmap")


def test_grouped_layout_pins_dense_in_one_range(tiny_models, tmp_path):
    """With experts grouped after the dense tensors, pinning the dense weights locks one range."""
    from gguf_tools.repack import repack

    src = tiny_models["qwen3moe"]
    out = str(tmp_path / "grouped.gguf")
    repack(src, out, progress=False)
    counts = {}
    for path in (src, out):
        s = _resolve("stream", path).engine_settings()
        s.runtime.use_extra_bufts = False
        with Engine(path, settings=s) as e:
            counts[path] = e.info["n_lock_ranges"]
    assert counts[out] == 1
    assert counts[src] > 1


def test_pinned_ranges_in_several_buffers_lock(tmp_path):
    """With llama.cpp's CPU repacking on, a model's Q4_K dense weights live in repack buffers
    (anonymous memory) and its F32 norms on the file mapping: pinned ranges come from several
    buffers and are merged only inside each one (merging across buffers would mlock the unmapped
    gap between them and fail the load)."""
    from gguf_tools.synth import make_spec, synth_model

    path = str(tmp_path / "q4k-dense.gguf")
    spec = make_spec("qwen3moe", preset="tiny", seed=5, dense_type="Q4_K")
    synth_model(path, spec, progress=False)
    res = _resolve("stream", path)
    s = res.engine_settings()
    s.runtime.use_extra_bufts = True  # llama.cpp's CPU repacking (the policy's `repack: true`)
    with Engine(path, settings=s) as e:
        info = e.info
        assert info["n_lock_ranges"] >= 2, info
        pinned = res.bytes_by_placement.get("pin", 0)
        assert info["locked_bytes"] >= pinned * 0.9, (info["locked_bytes"], pinned)
        assert len(e.generate("lock check", 4, stop_at_eos=False).tokens) == 4
